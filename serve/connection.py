"""uvicorn's httptools protocol with the connection limits the service needs, writing each response once.

Two jobs, both per connection and cheap on the hot path (a few attribute writes per request):

- **Limits.** The request line and headers are capped in bytes and in count (431), counted as
  they arrive, before httptools has buffered more than one read past the limit (a read that
  ends one request and begins the next counts only from the next one's start); a connection
  must deliver a whole request within `request_timeout` seconds of its first byte (or of
  connecting), else it is answered 408 and closed; past `max_connections` open connections a new
  one is answered 503 and closed. A refused request is answered with `{"error": ...}` naming the
  limit and the `bnfold serve` option that raises it, after every answer to the requests that
  came before it on the connection (pipelined), the connection is half-closed (the client reads
  the answers; what it still sends is dropped), and each kind of refusal is logged, at most one
  line per second with a count. A request line without an HTTP version (HTTP/0.9 to httptools)
  is a 400, versions other than 1.0 and 1.1 a 505 (RFC 9110 15.6.6), transfer codings other than
  `chunked` a 501 (RFC 9112 6.1). Idle keep-alive connections are uvicorn's `timeout_keep_alive`.
- **One write per response.** uvicorn writes the status line and headers when the app sends
  `http.response.start`, and the body in a second `transport.write`. On loopback each write wakes
  the client, which often preempts the server only to find half a response: measured here, the
  two writes were over half of the server's time per LeNet request. The transport wrapper holds
  the head back until the body arrives (or until the next event-loop turn, for HEAD and 304
  answers that have no body), so a batch-1 answer is one write and one wake-up.

Everything else is uvicorn's own code.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar

try:
    import httptools
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # uvicorn without httptools support: serve.launch falls back to "httptools"
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

log = logging.getLogger("bnfold.serve")

_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large",
            501: b"Not Implemented", 503: b"Service Unavailable", 505: b"HTTP Version Not Supported"}
_VERSIONS = ("1.1", "1.0")


@dataclass(frozen=True)
class ConnectionLimits:
    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    request_timeout: float = 30.0
    max_connections: int = 512


class _Refusal(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 response: `{"error": message}`, and the connection closes."""
    body = json.dumps({"error": message}).encode()
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % (status, _REASONS.get(status, b"Error"), len(body)) + body)


class RefusalLog:
    """One log line per kind of refusal per second at most, with how many happened since the last."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._pending: dict[str, int] = {}
        self._messages: dict[str, str] = {}   # the latest message of each kind not yet logged
        self._last: dict[str, float] = {}

    def note(self, kind: str, message: str) -> None:
        self._pending[kind] = self._pending.get(kind, 0) + 1
        self._messages[kind] = message
        self._log_due(kind, time.monotonic())

    def flush(self) -> None:
        """Log the refusals counted but not yet logged whose interval has passed (the sweeper calls it)."""
        now = time.monotonic()
        for kind in list(self._pending):
            self._log_due(kind, now)

    def _log_due(self, kind: str, now: float) -> None:
        if now - self._last.get(kind, 0.0) >= self.interval:
            count = self._pending.pop(kind)
            self._last[kind] = now
            log.warning("refused %d connection(s): %s", count, self._messages.pop(kind))


class _OneWriteTransport:
    """Delegates to the real transport; a response head is held until the next write.

    After `write_eof` (a refusal's half-close) further writes are dropped: the transport would
    raise `RuntimeError: Cannot call write() after write_eof()` in whatever task wrote.
    """

    __slots__ = ("_transport", "_held", "_loop", "_ended")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._held: bytes | None = None
        self._loop = loop
        self._ended = False

    def write(self, data: bytes) -> None:
        if self._ended:
            log.debug("dropped %d bytes written after the connection was half-closed", len(data))
            return
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

    def write_eof(self) -> None:
        self.flush()
        self._ended = True
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


if HttpToolsProtocol is not None:
    class GuardedHttpToolsProtocol(HttpToolsProtocol):  # type: ignore[misc,valid-type]
        """uvicorn's `HttpToolsProtocol` with `ConnectionLimits` and one write per response.

        Use `protocol_class(limits)`: the limits and the timeout sweeper are per server.
        """

        limits: ClassVar[ConnectionLimits] = ConnectionLimits()
        refusals: ClassVar[RefusalLog]
        _sweeping: ClassVar[bool] = False

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._deadline: float | None = None   # when the request in progress must be complete
            self._in_head = False                 # between a request's first byte and its headers' end
            self._head_bytes = 0                  # bytes of the head in progress, from reads after its first
            self._head_began = False              # a head began during the read being parsed
            self._read_bytes = 0                  # size of the read being parsed
            self._refused = False
            self._running: Any = None             # the request cycle whose handler runs now
            self._deferred: tuple[int, str] | None = None   # a refusal waiting for earlier answers

        # -------------------------------------------------------------- connection
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            wrapped = _OneWriteTransport(transport, self.loop)
            if len(self.connections) >= self.limits.max_connections:
                self.transport = wrapped  # type: ignore[assignment]
                self._refused = True
                message = (f"this server has {self.limits.max_connections} connections open, its limit "
                           f"(raise it with `bnfold serve --max-connections`)")
                wrapped.write(error_response(503, message))
                wrapped.close()
                self.refusals.note("connections", message)
                return
            super().connection_made(wrapped)  # type: ignore[arg-type]
            self._deadline = self.loop.time() + self.limits.request_timeout
            if not type(self)._sweeping:
                type(self)._sweeping = True
                self.loop.call_later(self._sweep_interval(), self._sweep, self.loop, self.connections)

        def data_received(self, data: bytes) -> None:
            # uvicorn's own, with our refusals told apart from malformed requests.
            if self._refused:
                return   # answered already; what the client still sends is dropped
            self._unset_keepalive_if_required()
            self._head_began = False
            self._read_bytes = len(data)
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                # No WebSocket or h2c here (serve.launch runs uvicorn with ws="none"): the request
                # was dispatched as plain HTTP when its headers completed. uvicorn would log two
                # warnings per such request (one suggesting to install a WebSocket library).
                log.debug("ignored an Upgrade request header; this server speaks HTTP/1.1 only")
                return
            except httptools.HttpParserError as exc:
                if isinstance(exc.__context__, _Refusal):
                    self._refuse(exc.__context__.status, exc.__context__.message)
                else:
                    # uvicorn logs a warning per malformed request (a client sending garbage in a loop
                    # wrote a log line per request) and answers in plain text: rate-limited and JSON.
                    self._refuse(400, f"malformed HTTP request: {str(exc)[:100]}")
                return
            if self._in_head and not self._head_began:
                # Count what httptools buffers for a head still incomplete, so a 64 MB header line
                # is refused after one read past the limit, not after it has all arrived. The read in
                # which a head begins may end an earlier request (its body, pipelined heads): it is
                # not counted here, and a head complete within it is measured exactly when complete.
                self._head_bytes += len(data)
                if self._head_bytes > self.limits.max_header_bytes:
                    self._refuse(431, self._header_size_message())

        # -------------------------------------------------------------- parser callbacks
        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._deadline = self.loop.time() + self.limits.request_timeout
            self._in_head = True
            self._head_bytes = 0
            self._head_began = True

        # The URL and header bytes are counted in data_received (what arrives while the head is
        # incomplete), not per callback: an override of on_header would cost every request a
        # Python call per header. The count is checked once the head is complete; until then
        # the byte limit bounds it.
        def on_headers_complete(self) -> None:
            self._in_head = False
            headers = self.headers
            if len(headers) > self.limits.max_headers:
                raise _Refusal(431, f"request has {len(headers)} header fields, over the limit of "
                                    f"{self.limits.max_headers} (raise it with `bnfold serve --max-headers`)")
            # Heads counted only in part (see data_received) are measured once, exactly, when they may
            # be over: the line and each field with its ": " and CRLF.
            if self._head_bytes + self._read_bytes > self.limits.max_header_bytes and \
                    len(self.url) + sum(len(k) + len(v) + 4 for k, v in headers) > self.limits.max_header_bytes:
                raise _Refusal(431, self._header_size_message())
            version = self.parser.get_http_version()
            if version not in _VERSIONS:
                if version == "0.9":   # what httptools makes of a request line without a version
                    raise _Refusal(400, "malformed HTTP request: the request line has no HTTP version (HTTP/0.9 "
                                        "is not spoken here); end it with HTTP/1.1")
                raise _Refusal(505, f"HTTP version {version} is not supported; this server speaks HTTP/1.1 "
                                    f"(and 1.0)")
            for name, value in headers:
                if name == b"transfer-encoding" and value.strip().lower() != b"chunked":
                    # llhttp reads `gzip, chunked` as chunked and passes the gzip on untouched.
                    raise _Refusal(501, f"Transfer-Encoding {value[:60].decode('latin-1')!r} is not supported; "
                                        f"only chunked is (compress the body with Content-Encoding instead)")
            super().on_headers_complete()

        def _start_asgi_task(self, cycle: Any, app: Any) -> None:
            self._running = cycle
            super()._start_asgi_task(cycle, app)

        def on_response_complete(self) -> None:
            super().on_response_complete()   # starts the next pipelined request, if any
            if self._deferred is not None and not self._answers_pending():
                status, message = self._deferred
                self._deferred = None
                self._write_refusal(status, message)

        def on_message_complete(self) -> None:
            self._deadline = None
            super().on_message_complete()

        # -------------------------------------------------------------- refusals
        def _header_size_message(self) -> str:
            return (f"request line and headers are over the limit of {self.limits.max_header_bytes} bytes "
                    f"(raise it with `bnfold serve --max-header-kb`)")

        def _answers_pending(self) -> bool:
            """Requests before the refused one still owe the client an answer (running or queued)."""
            running = self._running
            return bool(self.pipeline) or (running is not None and not running.response_complete
                                           and not running.disconnected)

        def _refuse(self, status: int, message: str) -> None:
            """Answer `status`, after the answers still owed to earlier requests, and half-close."""
            self._refused = True
            self._in_head = False
            self._deadline = None
            self.refusals.note(f"status {status}", message)
            cycle = self.cycle
            if cycle is not None and cycle.more_body and not cycle.response_complete:
                # The refused request is the one whose body was arriving (a malformed chunk): its
                # handler gets a disconnect, and the refusal answers it.
                cycle.disconnected = True
                cycle.message_event.set()
                if any(queued is cycle for queued, _ in self.pipeline):
                    self.pipeline = type(self.pipeline)(e for e in self.pipeline if e[0] is not cycle)
            if self._answers_pending():
                self._deferred = (status, message)   # written by on_response_complete
            else:
                self._write_refusal(status, message)

        def _write_refusal(self, status: int, message: str) -> None:
            if self.transport.is_closing():
                return
            self.transport.write(error_response(status, message))
            try:
                self.transport.write_eof()   # half-close: the client reads the answer, we drop the rest
            except (AttributeError, NotImplementedError, RuntimeError, OSError):
                self.transport.close()

        @classmethod
        def _sweep_interval(cls) -> float:
            return max(0.05, min(1.0, cls.limits.request_timeout / 4))

        @classmethod
        def _sweep(cls, loop: asyncio.AbstractEventLoop, connections: set) -> None:
            """Close every connection whose request is overdue (408), then look again later."""
            now = loop.time()
            cls.refusals.flush()
            for connection in list(connections):
                deadline = getattr(connection, "_deadline", None)
                if deadline is None or now < deadline or connection.transport.is_closing():
                    continue
                connection._deadline = None
                message = (f"request not complete within {cls.limits.request_timeout:g} s "
                           f"(raise it with `bnfold serve --request-timeout`)")
                cycle = connection.cycle
                if not connection._refused and (connection._in_head or cycle is None or not cycle.response_started):
                    connection.transport.write(error_response(408, message))
                connection.transport.close()
                cls.refusals.note("timeout", f"closed a connection whose {message}")
            loop.call_later(cls._sweep_interval(), cls._sweep, loop, connections)

    def protocol_class(limits: ConnectionLimits) -> type:
        """A protocol class for one server: its limits, its own sweeper and refusal log."""
        return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,),
                    {"limits": limits, "refusals": RefusalLog(), "_sweeping": False})
else:
    GuardedHttpToolsProtocol = None  # type: ignore[assignment,misc]

    def protocol_class(limits: ConnectionLimits) -> type | None:  # type: ignore[misc]
        return None
