"""uvicorn's httptools protocol, writing each response's head and body in one system call.

uvicorn writes the status line and headers when the app sends `http.response.start`, and the
body in a second `transport.write`. On loopback each write wakes the client, which often
preempts the server only to find half a response: measured here, the two writes were over
half of the server's time per LeNet request. This shim holds the head back until the body
arrives (or until the next event-loop turn, for HEAD and 304 answers that have no body), so a
batch-1 answer is one write and one wake-up. Everything else is uvicorn's own code.
"""
from __future__ import annotations

import asyncio
from typing import Any

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # uvicorn without httptools support: serve.launch falls back to "httptools"
    HttpToolsProtocol = None  # type: ignore[assignment,misc]


class _OneWriteTransport:
    """Delegates to the real transport; a response head is held until the next write."""

    __slots__ = ("_transport", "_held", "_loop")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._held: bytes | None = None
        self._loop = loop

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held + data)
        elif data.startswith(b"HTTP/1.1 ") and not data.startswith(b"HTTP/1.1 1") and data.endswith(b"\r\n\r\n"):
            # A final response's head (never "100 Continue": the client waits for that one).
            self._held = data
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            if not self._transport.is_closing():
                self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


if HttpToolsProtocol is not None:
    class OneWriteHttpToolsProtocol(HttpToolsProtocol):  # type: ignore[misc,valid-type]
        """uvicorn's `HttpToolsProtocol` over a transport that coalesces head and body."""

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(_OneWriteTransport(transport, self.loop))  # type: ignore[arg-type]
else:
    OneWriteHttpToolsProtocol = None  # type: ignore[assignment,misc]
