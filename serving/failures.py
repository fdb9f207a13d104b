"""What went wrong, in the serving domain's words: the errors that session, engine and request-checking code raise.

No HTTP here. The edge (``edge/errors.py``) maps each kind to a status code and the OpenAI error envelope in one table;
the same error raised under ``adapt-serve --ray`` or in-process is answered the same way.
"""

from __future__ import annotations


class ServingError(Exception):
    """An error a client can act on. ``code``: the envelope's machine-readable code; ``param``: the request field it
    is about; ``retry_after``: seconds after which the same request may succeed (None: it will not)."""

    retry_after: int | None = None

    def __init__(self, message: str, code: str, param: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message, self.code, self.param = message, code, param
        if retry_after is not None:
            self.retry_after = retry_after


class InvalidRequest(ServingError):
    """The request cannot be served as asked (a bad value, too many choices or tokens, an empty prompt)."""


class NotFound(ServingError):
    """What the request names does not exist (a session, a model), or is not the caller's."""


class Conflict(ServingError):
    """The request collides with the state it finds: a session in another turn, a lease lost, an id just taken."""


class LimitReached(ServingError):
    """A capacity or quota is full (sessions, concurrent requests); retry once something is freed."""

    retry_after = 1


class Unavailable(ServingError):
    """A dependency failed for now (the disk, the session store); the same request may succeed shortly."""

    retry_after = 1
