"""The HTTP edge's errors: the one table from domain errors (``serving/failures.py``) to status codes, ``APIError``
for what only the edge knows, and the OpenAI error envelope ``{"error": {"message", "type", "param", "code"}}`` on
every path."""

from __future__ import annotations

import json
import logging

from adapt_runtime.serving.failures import Conflict, InvalidRequest, LimitReached, NotFound, ServingError, Unavailable
from adapt_runtime.serving.types import JsonObject
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

log = logging.getLogger("adapt_serve")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


# The status code of each kind of domain error: the one place the domain meets HTTP.
STATUS: dict[type[ServingError], int] = {
    InvalidRequest: 400,
    NotFound: 404,
    Conflict: 409,
    LimitReached: 429,
    Unavailable: 503,
}


class APIError(ServingError):
    """An error with its HTTP status, raised by the edge itself (auth, body limits, routes); rendered as the OpenAI
    envelope with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, code, param)
        self.status = status
        self.headers = headers or {}

    def body(self) -> JsonObject:
        return envelope(self.status, self.message, self.code, self.param)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class SlowClient(Exception):
    """The client left a response unread for longer than the send timeout (raised by the guard's send)."""


def is_slow_client(exc: BaseException) -> bool:
    """Whether ``exc`` is a SlowClient, alone or in an exception group (a stream's task group wraps it)."""
    return isinstance(exc, SlowClient) or any(is_slow_client(e) for e in getattr(exc, "exceptions", ()))


def envelope(status: int, message: str, code: str, param: str | None = None) -> JsonObject:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def envelope_bytes(status: int, message: str, code: str) -> bytes:
    return json.dumps(envelope(status, message, code)).encode()


def http_error(err: ServingError) -> APIError:
    """The HTTP form of any serving error: its status from ``STATUS`` (by kind), ``Retry-After`` when it says."""
    if isinstance(err, APIError):
        return err
    status = next((code for kind, code in STATUS.items() if isinstance(err, kind)), 500)
    headers = {} if err.retry_after is None else {"Retry-After": str(err.retry_after)}
    return APIError(status, err.message, err.code, err.param, headers)


def retry_later(status: int, message: str, code: str, seconds: int = 1) -> APIError:
    """429/503 errors carry ``Retry-After`` so clients (the openai SDK included) back off."""
    return APIError(status, message, code, headers={"Retry-After": str(seconds)})


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    where = f" ({param})" if param else ""
    return f"{first.get('msg', 'invalid value')}{where}", param


def install_error_handlers(app: FastAPI) -> None:
    """Every error the framework or a route raises leaves as the envelope, never as FastAPI's default."""

    @app.exception_handler(ServingError)
    async def _serving_error(_: Request, exc: ServingError) -> JSONResponse:
        return http_error(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return APIError(400, message, "invalid_request", param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        code = codes.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return APIError(exc.status_code, message, code).response()

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> JSONResponse:
        if not is_slow_client(exc):  # a dropped slow client is no fault: the guard logs it as one WARNING line
            log.exception("unhandled error")
        headers = {"x-should-retry": "false"}
        return APIError(500, f"internal error: {type(exc).__name__}", "internal_error", headers=headers).response()
