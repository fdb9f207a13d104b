"""The HTTP protocol uvicorn runs, with a deadline on request headers (slowloris).

uvicorn parses headers before the application sees a request, and it has no limit of its own on how long a
client may take to send them: a client that sends half a request line holds its connection forever. This
subclass of uvicorn's protocol (httptools when installed, as uvicorn picks, else h11) closes a connection whose
next request's headers are not complete ``seconds`` after the connection opened or the previous response ended.
An idle keep-alive connection is closed earlier by uvicorn's own keep-alive timeout.
"""

from __future__ import annotations

import asyncio
from typing import Any  # uvicorn's protocol classes are untyped here (not analysed): the base is Any


def _base() -> type:
    try:
        import httptools  # noqa: F401
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return HttpToolsProtocol
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return H11Protocol


def with_header_timeout(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class, closing connections whose request headers take longer than ``seconds``."""
    base: Any = _base()

    class HeaderDeadlineProtocol(base):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self._arm_header_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_deadline()

        def _arm_header_deadline(self) -> None:
            # a new request replaces ``self.cycle`` once its headers are complete
            self.loop.call_later(seconds, self._header_deadline, self.cycle)

        def _header_deadline(self, waiting_after: object) -> None:
            if self.cycle is waiting_after and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadlineProtocol
