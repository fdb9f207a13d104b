"""What a request names, read at the edge: the server context, the caller's principal and the session.

The guard puts the principal (the API key's hash) into the request scope; a session is named by the
``X-Session-ID`` header or the body's ``session_id`` field. Past the edge only these values travel: turns and
stores take an owner and an id, never a request.
"""

from __future__ import annotations

from adapt_runtime.serving.context import ServerContext
from adapt_runtime.serving.failures import InvalidRequest
from adapt_runtime.serving.sessions.local_store import check_session_id
from fastapi import Request

SESSION_HEADER = "X-Session-ID"


def ctx_of(request: Request) -> ServerContext:
    """The server's context, set on the app by ``build_app``."""
    return request.app.state.ctx


def principal_of(request: Request) -> str:
    """The caller's namespace: the hash of the API key the guard accepted."""
    return request.scope["state"]["principal"]


def session_id_of(request: Request, body_id: str | None) -> str | None:
    """The session named by the ``X-Session-ID`` header or the ``session_id`` field; 400 if they differ."""
    header = request.headers.get(SESSION_HEADER)
    if header is not None and body_id is not None and header != body_id:
        raise InvalidRequest(f"the {SESSION_HEADER} header and the session_id field name different sessions",
                             "session_id_mismatch", "session_id")
    sid = header if header is not None else body_id
    return None if sid is None else check_session_id(sid)
