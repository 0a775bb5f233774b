"""How the proxy is served: uvicorn (httptools, uvloop) with one change on the wire.

uvicorn writes an answer's status line and headers as soon as the app starts the response,
and its body in a second write. On loopback and in VMs each ``write`` is an expensive system
call (the kernel runs the receiver's side of TCP and wakes it), and profiling the proxy
(``py-spy record --native`` during ``loragate bench proxy``) put a quarter of its CPU per
request in ``write``. :class:`CorkedTransport` holds a write that starts an answer (its status
line) and what follows it in the same turn of the event loop, and sends them in one call at
the end of that turn, so a whole answer goes out in one write. Any other write with nothing
held goes out at once: a stream's events after its head are written as they come, without
waiting for the turn to end (which cost each event one more turn of the loop).

A streamed answer's events go out through :class:`BodyWriter` where they can: straight from the
engine connection's read callback, with no task switch per event.

:data:`UVICORN_SETTINGS` are the server settings ``loragate proxy`` runs with; the CPU floor
benchmark (:mod:`loragate.bench.floor`) serves its null app with the same.
"""

from __future__ import annotations

import asyncio
import json
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

#: The scope extension holding a request's :class:`BodyWriter`.
BODY_WRITER = "loragate.body_writer"
#: The scope extension holding a request's raw target, as the request line carried it (bytes).
RAW_TARGET = "loragate.raw_target"
#: How uvicorn's writes that start an answer begin (the status line; also ``100 Continue``).
RESPONSE_START = b"HTTP/1.1 "


class CorkedTransport:
    """A transport that holds an answer's start and sends it with what the same event-loop
    turn writes after it, in one ``write`` call; other writes go out at once unless something
    is held (then they join it, so the order on the wire is always the order written).

    Everything but writing is the wrapped transport's own; closing sends what is held first,
    aborting drops it (as an abort drops the transport's own buffer).
    """

    __slots__ = ("_transport", "_loop", "_held")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not data:
            return
        if not self._held:
            if not data.startswith(RESPONSE_START):
                if not self._transport.is_closing():
                    self._transport.write(data)
                return
            self._loop.call_soon(self._flush)
        self._held.append(data)

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def _flush(self) -> None:
        held = self._held
        if not held:
            return
        data = held[0] if len(held) == 1 else b"".join(held)
        held.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(len(d) for d in self._held)

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._held.clear()
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class BodyWriter:
    """A request's view of its client connection, offered by :class:`CorkedHttpToolsProtocol`
    as the ASGI scope extension :data:`BODY_WRITER`.

    - :meth:`write` sends a streamed answer's body chunks straight to the client's connection,
      from any callback, without an ``await``. ASGI's ``send`` is a coroutine, so an app that
      relays a stream must wake its task for every piece the engine sends and build a message
      for uvicorn to frame it; with this, the proxy forwards each event from the engine
      connection's own read callback (about 3 µs less CPU per event; docs/performance.md).
      :meth:`ready` says whether a write may go out now: after the app has started a chunked
      answer, before it has ended it, while the client is connected and its connection is not
      paused for back-pressure. When it is not ready, the app uses ``send``, which waits.
    - :attr:`connected` and :meth:`on_disconnect` tell the app, synchronously, that the client
      is gone: the moment the server saw the connection close, with no task to wake. What the
      app wrote while :attr:`connected` was true was handed to the client's connection.

    It reads uvicorn's request-response cycle (uvicorn's version range is pinned in
    ``pyproject.toml`` and ``tests/test_serving.py`` checks it against the installed one); should
    a release rename what it reads, :meth:`ready` answers False and ``send`` does all the writing.
    """

    __slots__ = ("_cycle", "_protocol")

    def __init__(self, cycle: Any, protocol: "CorkedHttpToolsProtocol") -> None:
        # weakly: the cycle's scope holds this writer, and a strong reference back would make
        # every request a reference cycle left to the garbage collector
        self._cycle = weakref.ref(cycle)
        self._protocol = weakref.ref(protocol)

    def ready(self) -> bool:
        cycle = self._cycle()
        try:
            return (cycle is not None and cycle.response_started and cycle.chunked_encoding is True
                    and not cycle.response_complete and not cycle.disconnected and not cycle.flow.write_paused)
        except AttributeError:
            return False

    def write(self, data: bytes) -> None:
        """Send ``data`` (not empty) as one chunk of the answer, framed as uvicorn frames it;
        only when :meth:`ready`."""
        cycle = self._cycle()
        if cycle is None:  # ready() is False once the cycle is gone
            raise RuntimeError("BodyWriter.write after the request's cycle ended; check ready() first")
        cycle.transport.write(b"%x\r\n%s\r\n" % (len(data), data))

    @property
    def connected(self) -> bool:
        """Whether the client's connection is still open (False once the server saw it close)."""
        cycle = self._cycle()
        return cycle is not None and not cycle.disconnected

    def unread_body(self) -> bytes | None:
        """The request's whole body when it all came but the app has not read it, else ``None``.

        uvicorn answers ``receive`` with ``http.disconnect`` once the client has closed, and
        drops a body the app had not read yet: a client that sends its request and leaves
        before the app's task runs (a busy proxy) takes its body with it. The app reads it here
        to count the request as its adapter's."""
        cycle = self._cycle()
        body = getattr(cycle, "body", None)
        if cycle is None or getattr(cycle, "more_body", True) or not isinstance(body, (bytes, bytearray)):
            return None
        return bytes(body) or None

    def on_disconnect(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (once, synchronously) if the client's connection closes before
        this request's answer is complete."""
        protocol = self._protocol()
        cycle = self._cycle()
        if protocol is None or cycle is None or cycle.disconnected:
            callback()
            return
        protocol.lost_callbacks.append(callback)


@dataclass(frozen=True)
class ServerLimits:
    """Limits on what a client controls before the app sees a request; each refusal is
    counted through :class:`ServerEvents`."""

    #: Seconds a connection may take to send a whole request head, counted from the connection's
    #: start or the head's first byte; then 408 (or a silent close when nothing came).
    head_timeout_s: float = 10.0
    #: Largest request head (request line and headers) in bytes; larger gets 431.
    max_head_bytes: int = 64 * 1024
    #: Most header fields in one request; more gets 431.
    max_headers: int = 100
    #: Most client connections at once. A new connection beyond it closes the connection that has
    #: waited longest for a request head (idle keep-alive or a head still arriving); when every
    #: connection has a request in progress, the new one gets 503.
    max_connections: int = 2048


class ServerEvents:
    """What the serving layer reports; the proxy app counts these in its metrics."""

    def refused(self, reason: str, status: int | None) -> None:
        """A connection or request refused before the app saw it (``status`` None: closed silently)."""

    def evicted(self) -> None:
        """A connection waiting for a request head closed to make room at the connection cap."""


class _HeadRefused(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


_REASON_PHRASES = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large",
                   503: b"Service Unavailable"}


def _error_answer(status: int, message: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error" if status < 500
                                 else "server_error", "param": None, "code": status}}).encode()
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (status, _REASON_PHRASES[status], len(body), body))


class CorkedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol writing through a :class:`CorkedTransport`, offering each
    request a :class:`BodyWriter` (scope ``extensions``, key :data:`BODY_WRITER`) and its raw
    request target (key :data:`RAW_TARGET`), and enforcing :class:`ServerLimits`.

    Use :func:`protocol_class` to bind limits and events; this class has the defaults.
    """

    limits: ServerLimits = ServerLimits()
    events: ServerEvents = ServerEvents()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lost_callbacks: list[Callable[[], None]] = []
        self._awaiting_head = True
        self._head_since = 0.0
        self._head_raw = 0
        self._head_bytes = 0
        self._head_count = 0
        self._head_timer: asyncio.TimerHandle | None = None

    # ---------------------------------------------------------------- connection
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CorkedTransport(transport, self.loop))  # type: ignore[arg-type]
        self._expect_head()
        self._arm_head_timer()
        if len(self.connections) > self.limits.max_connections and not self._make_room():
            self.events.refused("connection_limit", 503)
            self._close_with(503, f"the proxy is at its limit of {self.limits.max_connections} connections")

    def _make_room(self) -> bool:
        """Close the connection that has waited longest for a request head; False if none does."""
        oldest: CorkedHttpToolsProtocol | None = None
        for conn in self.connections:
            if conn is not self and isinstance(conn, CorkedHttpToolsProtocol) and conn._awaiting_head and (
                    oldest is None or conn._head_since < oldest._head_since):
                oldest = conn
        if oldest is None:
            return False
        oldest._cancel_head_timer()
        oldest.transport.close()
        self.events.evicted()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)
        callbacks, self.lost_callbacks = self.lost_callbacks, []
        for callback in callbacks:
            callback()

    def data_received(self, data: bytes) -> None:
        if self._awaiting_head:
            self._head_raw += len(data)
            if self._head_timer is None:
                self._arm_head_timer()
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _HeadRefused):
                self._refuse_head(exc.__context__)
                return
            self._invalid()
            return
        except httptools.HttpParserUpgrade:  # not reached: on_headers_complete refuses upgrades
            self._invalid()
            return
        except httptools.HttpParserError:
            self._invalid()
            return
        if self._awaiting_head and self._head_raw > self.limits.max_head_bytes:
            self._refuse_head(_HeadRefused(431, "headers_too_large",
                                           f"request head larger than {self.limits.max_head_bytes} bytes"))

    def _invalid(self) -> None:
        self.events.refused("invalid_http", 400)
        self._close_with(400, "invalid HTTP request")

    def _refuse_head(self, refusal: _HeadRefused) -> None:
        self.events.refused(refusal.reason, refusal.status)
        self._close_with(refusal.status, refusal.message)

    def _close_with(self, status: int, message: str) -> None:
        self._awaiting_head = False
        self._cancel_head_timer()
        if not self.transport.is_closing():
            self.transport.write(_error_answer(status, message))
            self.transport.close()

    # ---------------------------------------------------------------- the request head
    def _expect_head(self) -> None:
        self._awaiting_head = True
        self._head_since = self.loop.time()
        self._head_raw = self._head_bytes = self._head_count = 0

    def _arm_head_timer(self) -> None:
        self._head_since = self.loop.time()
        self._head_timer = self.loop.call_later(self.limits.head_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._awaiting_head or self.transport.is_closing():
            return
        if self._head_raw:
            self.events.refused("head_timeout", 408)
            self._close_with(408, f"request head not received within {self.limits.head_timeout_s:g}s")
        else:
            self.events.refused("head_timeout", None)
            self._awaiting_head = False
            self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = self._head_count = 0

    def on_url(self, url: bytes) -> None:
        self._head_bytes += len(url)
        if self._head_bytes > self.limits.max_head_bytes:
            raise _HeadRefused(431, "headers_too_large", f"request head larger than {self.limits.max_head_bytes} bytes")
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_count += 1
        self._head_bytes += len(name) + len(value) + 4
        if self._head_count > self.limits.max_headers:
            raise _HeadRefused(431, "headers_too_large", f"more than {self.limits.max_headers} header fields")
        if self._head_bytes > self.limits.max_head_bytes:
            raise _HeadRefused(431, "headers_too_large", f"request head larger than {self.limits.max_head_bytes} bytes")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self.parser.should_upgrade():
            raise _HeadRefused(400, "invalid_http", "protocol upgrades are not served")
        self._awaiting_head = False
        self._cancel_head_timer()
        self._head_raw = 0
        url = self.url
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope:  # a request cycle began (not an upgrade)
            # loragate's own extensions hold objects for the app, not the dicts uvicorn's ASGI types expect
            extensions: dict[str, Any] = {**self.scope.get("extensions", {}), BODY_WRITER: BodyWriter(cycle, self),
                                          RAW_TARGET: url}
            self.scope["extensions"] = extensions

    def on_response_complete(self) -> None:
        self.lost_callbacks.clear()
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline:
            self._expect_head()  # uvicorn's keep-alive timer runs until the next byte; then ours


def protocol_class(limits: ServerLimits, events: ServerEvents) -> type[CorkedHttpToolsProtocol]:
    """A :class:`CorkedHttpToolsProtocol` with these limits and events, for uvicorn's ``http``."""
    return type("LoragateHttpProtocol", (CorkedHttpToolsProtocol,), {"limits": limits, "events": events})


#: uvicorn settings of the proxy (beside host, port and lifespan): no access log (the proxy logs
#: one JSON line per judged request itself), no ``server`` header, no X-Forwarded-* rewriting
#: (nothing reads the client address), answers written through :class:`CorkedTransport`.
UVICORN_SETTINGS: dict[str, Any] = {
    "http": CorkedHttpToolsProtocol, "loop": "auto", "log_config": None, "access_log": False,
    "server_header": False, "proxy_headers": False,
}
