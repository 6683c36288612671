"""uvicorn HTTP protocols that close a connection whose request headers do not arrive in time.

uvicorn times out idle keep-alive connections, but not a request whose headers are half sent
(or a connection that sends nothing at all): such sockets would stay open forever. Body reads
are timed by `defectscope.serving.limits.RequestGuard`, which sees the body as it arrives.
``defectscope serve`` passes ``http="defectscope.serving.protocol:HeaderTimeoutProtocol"``.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the same interface; at run time whichever uvicorn picks ("auto")
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as BaseProtocol
else:
    from uvicorn.protocols.http.auto import AutoHTTPProtocol as BaseProtocol


def _read_timeout() -> float:
    # Each worker reads the same DEFECTSCOPE_* environment as its app does.
    from defectscope.serving.settings import ServingSettings

    return ServingSettings().read_timeout_s


class HeaderTimeoutProtocol(BaseProtocol):
    """httptools (or h11) protocol with a deadline for each request's headers.

    The deadline starts when the connection opens and again after each response; it is
    cleared once a new request's headers are parsed (the protocol then has a new cycle).
    """

    header_timeout_s: float | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cls = type(self)
        if cls.header_timeout_s is None:
            cls.header_timeout_s = _read_timeout()
        self._header_deadline: asyncio.TimerHandle | None = None
        self._waiting_cycle: object = None

    def _arm(self) -> None:
        self._disarm()
        self._waiting_cycle = self.cycle
        timeout = type(self).header_timeout_s or 10.0
        self._header_deadline = self.loop.call_later(timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._header_deadline is not None and self.cycle is not self._waiting_cycle:
            self._disarm()  # a new request's headers are complete

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a pipelined request, whose headers are already in, has started
        self._arm()
