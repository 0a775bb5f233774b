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

:data:`UVICORN_SETTINGS` are the server settings ``loragate proxy`` runs with; the CPU floor
benchmark (:mod:`loragate.bench_floor`) serves its null app with the same.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


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


class CorkedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol writing through a :class:`CorkedTransport`."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CorkedTransport(transport, self.loop))  # type: ignore[arg-type]


#: uvicorn settings of the proxy (beside host, port and lifespan): no access log (the proxy logs
#: one JSON line per judged request itself), no ``server`` header, no X-Forwarded-* rewriting
#: (nothing reads the client address), answers written through :class:`CorkedTransport`.
UVICORN_SETTINGS: dict[str, Any] = {
    "http": CorkedHttpToolsProtocol, "loop": "auto", "log_config": None, "access_log": False,
    "server_header": False, "proxy_headers": False,
}
