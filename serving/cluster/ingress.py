"""Ingress: the stateless HTTP front of the cluster. It picks the session of each request and forwards it.

The session is the ``X-Session-ID`` header, else the ``session_id`` field of a completion body, else the id in a
``/v1/sessions/{id}`` path; the call to the engine carries it as Serve's ``session_id``, which the engine's
consistent-hash router maps to one replica (Serve does not carry the proxy's session id across a second handle
hop, so it is set here explicitly). The engine's first item decides the status line before any byte is sent;
everything else (auth, validation, 409 ``session_busy``, SSE) is the app's, running on the engine replica.
"""

# no ``from __future__ import annotations`` here: FastAPI must see the route's ``Request`` annotation as a class
import json
import logging
import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from adapt_runtime.serving.edge.errors import envelope_bytes
from fastapi import FastAPI, Request
from ray import serve
from starlette.responses import Response, StreamingResponse

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

log = logging.getLogger("adapt_serve")
SESSION_PATH = re.compile(r"^/v1/sessions/([^/]+)")
TURN_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
ingress_app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


def routing_key(method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> str | None:
    """The session a request belongs to, for routing only (the engine validates it)."""
    for name, value in headers:
        if name.lower() == b"x-session-id":
            return value.decode("latin-1")
    if method == "POST" and path in TURN_PATHS and b"session_id" in body:
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError):  # not routable by its body; the engine's guard answers 400
            return None
        sid = parsed.get("session_id") if isinstance(parsed, dict) else None
        return sid if isinstance(sid, str) else None
    match = SESSION_PATH.match(path)
    return match.group(1) if match else None


def _unavailable(message: str) -> Response:
    return Response(envelope_bytes(503, message, "engine_unavailable"), status_code=503,
                    media_type="application/json", headers={"Retry-After": "1"})


async def _relay(stream: "DeploymentResponseGenerator", sse: bool) -> AsyncIterator[bytes]:
    """Pass the engine's chunks on; if the replica dies mid-stream, an SSE stream ends with an error event (the
    turn was not committed), any other body is cut."""
    try:
        async for chunk in stream:
            yield chunk
    except Exception as err:
        log.warning("engine stream broke: %r", err)
        if not sse:
            raise
        error = envelope_bytes(503, "the engine replica was lost during the stream; the turn may not be committed",
                               "engine_lost")
        yield b"data: " + error + b"\n\n"
    finally:
        stream.cancel()


# helpers must be defined above: Serve captures the class when the decorator runs
@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
@serve.ingress(ingress_app)
class Ingress:
    def __init__(self, engine: "DeploymentHandle", max_body_bytes: int) -> None:
        self.engine = engine
        self.max_body_bytes = max_body_bytes

    @ingress_app.api_route("/{path:path}", methods=METHODS)
    async def forward(self, request: Request) -> Response:
        body = await request.body()
        if len(body) > self.max_body_bytes:
            return Response(envelope_bytes(413, f"request body exceeds {self.max_body_bytes} bytes",
                                           "request_too_large"), status_code=413, media_type="application/json")
        path = request.url.path
        headers = [(k, v) for k, v in request.scope["headers"]]
        sid = routing_key(request.method, path, headers, body)
        handle = self.engine.options(stream=True) if sid is None else self.engine.options(stream=True, session_id=sid)
        stream = handle.handle.remote(request.method, path, request.scope.get("query_string", b""), headers, body)
        try:
            start = await stream.__anext__()
        except Exception as err:  # noqa: BLE001 - a replica died or Serve shed the request before it started
            log.warning("engine call failed before the response started: %r", err)
            return _unavailable("no engine replica could take the request; retry shortly")
        status = start["status"]
        out_headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in start["headers"]}
        if "content-length" in out_headers:
            try:
                chunks = [chunk async for chunk in stream]
            except Exception as err:  # noqa: BLE001 - the replica died before the body was complete
                log.warning("engine call failed mid-response: %r", err)
                return _unavailable("the engine replica was lost during the request; retry shortly")
            return Response(b"".join(chunks), status_code=status, headers=out_headers)
        sse = out_headers.get("content-type", "").startswith("text/event-stream")
        return StreamingResponse(_relay(stream, sse), status_code=status, headers=out_headers)
