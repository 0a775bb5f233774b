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
benchmark (:mod:`loragate.bench_floor`) serves its null app with the same.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


#: The scope extension holding a request's :class:`BodyWriter`.
BODY_WRITER = "loragate.body_writer"
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
    """Writes a streamed answer's body chunks straight to the client's connection, from any
    callback, without an ``await``: the ASGI extension :data:`BODY_WRITER` that
    :class:`CorkedHttpToolsProtocol` puts in each request's scope.

    ASGI's ``send`` is a coroutine, so an app that relays a stream must wake its task for every
    piece the engine sends and build a message for uvicorn to frame it. With this, the proxy
    forwards each event from the engine connection's own read callback
    (:meth:`loragate.server.upstream.UpstreamResponse.next_chunk`'s ``sink``): about 3 µs less
    CPU per event, a seventh of what an engine-paced event cost the proxy (README,
    "Performance").

    :meth:`ready` says whether a write may go out now: after the app has started a chunked
    answer, before it has ended it, while the client is connected and its connection is not
    paused for back-pressure. When it is not ready, the app uses ``send``, which waits for the
    client. It reads uvicorn's request-response cycle, so it answers False (``send`` then does
    all the writing) should a uvicorn release rename what it reads; ``tests/test_serving.py``
    checks it against the installed one.
    """

    __slots__ = ("_cycle",)

    def __init__(self, cycle: Any) -> None:
        # weakly: the cycle's scope holds this writer, and a strong reference back would make
        # every request a reference cycle left to the garbage collector
        self._cycle = weakref.ref(cycle)

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
        self._cycle().transport.write(b"%x\r\n%s\r\n" % (len(data), data))


class CorkedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol writing through a :class:`CorkedTransport`, offering each
    request a :class:`BodyWriter` (scope ``extensions``, key :data:`BODY_WRITER`)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CorkedTransport(transport, self.loop))  # type: ignore[arg-type]

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope:  # a request cycle began (not an upgrade)
            self.scope["extensions"] = {**self.scope.get("extensions", {}), BODY_WRITER: BodyWriter(cycle)}


#: uvicorn settings of the proxy (beside host, port and lifespan): no access log (the proxy logs
#: one JSON line per judged request itself), no ``server`` header, no X-Forwarded-* rewriting
#: (nothing reads the client address), answers written through :class:`CorkedTransport`.
UVICORN_SETTINGS: dict[str, Any] = {
    "http": CorkedHttpToolsProtocol, "loop": "auto", "log_config": None, "access_log": False,
    "server_header": False, "proxy_headers": False,
}
