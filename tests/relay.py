"""A recording, fault-injecting HTTP relay in front of a real upstream (the stack's vLLM).

Tests put it between a client (the gate, the proxy) and the real engine when they need to see
what was sent or to make the real engine look slow, broken or gone. It never invents an
answer the engine did not give, except the faults a test asks for by name:

Faults apply to the paths where the engine generates (completions, chat completions and
``/invocations``):

- ``delay_s``: wait this long before forwarding a completion request (a slow engine);
- ``fail_status``: answer completion requests with this HTTP status and an OpenAI-style error
  body instead of forwarding them (an engine returning 5xx);
- ``cut_after_chunks``: forward this many body chunks of a completion response, then drop the
  connection without finishing it (an engine that dies mid-stream);
- ``end_after_chunks``: forward this many body chunks of a completion response, then end it
  cleanly (terminating chunk, connection kept): a stream that stops early without a
  ``finish_reason`` or ``[DONE]``, as an engine or an intermediary that gives up politely does;
- ``stall_after_chunks`` and ``stall_s``: forward this many body chunks of a completion
  response, then send nothing for ``stall_s`` seconds before going on (an engine that hangs
  mid-stream);
- ``hold_end_s``: after the last body chunk of a completion response, wait this long before
  ending it (an engine whose end of the body comes after its last event);
- ``refuse()``: stop listening and drop every open connection, so connections are refused,
  until ``resume()``.

A chunk of a streamed answer is one server-sent event, whatever reads the engine's bytes
arrived in (a busy engine can put a whole short stream in one read); of any other answer, one
read. With ``pass_reads`` on, an answer that starts while no fault counts chunks passes read by
read (cheaper for long streams), and a fault set while it passes counts its reads.

Every request is recorded in ``requests`` as :class:`Recorded` (method, path, JSON body or
``None``); ``completion_bodies()`` gives the JSON bodies sent to ``/v1/completions``.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "upgrade",
              "proxy-connection", "te", "trailer"}
COMPLETION_PATHS = ("/v1/completions", "/v1/chat/completions")
#: Paths where the engine generates, so where the faults apply: vLLM also generates on /invocations.
GENERATION_PATHS = (*COMPLETION_PATHS, "/invocations")


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    body: Any  # parsed JSON, or None when the body was empty or not JSON


class Relay:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.requests: list[Recorded] = []
        self.delay_s = 0.0
        self.fail_status: int | None = None
        self.cut_after_chunks: int | None = None
        self.end_after_chunks: int | None = None
        self.stall_after_chunks: int | None = None
        self.stall_s = 0.0
        self.hold_end_s = 0.0
        #: pass an answer on read by read when no fault counts its chunks (else event by event)
        self.pass_reads = False
        self._lock = threading.Lock()
        self._down = False
        self._transports: set[asyncio.BaseTransport] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="relay", daemon=True)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._session: aiohttp.ClientSession | None = None
        self.port = 0

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> "Relay":
        self._thread.start()
        self._call(self._start())
        return self

    def __enter__(self) -> "Relay":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def refuse(self) -> None:
        """Stop listening and drop open connections: new ones are refused until :meth:`resume`."""
        self._call(self._go_down())

    def resume(self) -> None:
        self._down = False
        self._call(self._open_site())

    @property
    def listening(self) -> bool:
        """False between :meth:`refuse` and :meth:`resume`."""
        return self._site is not None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def completion_bodies(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r.body for r in self.requests if r.path in COMPLETION_PATHS and isinstance(r.body, dict)]

    def calls(self, path: str) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    # ---------------------------------------------------------------- internals
    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    async def _start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=5))
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await self._open_site()

    async def _open_site(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()
        if not self.port:
            self.port = self._site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _go_down(self) -> None:
        self._down = True
        if self._site is not None:
            await self._site.stop()
            self._site = None
        for transport in list(self._transports):
            transport.abort()
        # an engine that is gone keeps no kept-alive connection either: drop them all
        if self._runner is not None and self._runner.server is not None:
            for conn in self._runner.server.connections:
                conn.force_close()

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        transport = request.transport
        assert transport is not None
        if self._down:
            transport.abort()
            raise ConnectionResetError("relay is down")
        self._transports.add(transport)
        try:
            return await self._relay(request)
        finally:
            self._transports.discard(transport)

    def _counts_chunks(self) -> bool:
        """Whether a fault that counts an answer's chunks is set (read as the answer starts)."""
        return any(n is not None for n in (self.cut_after_chunks, self.end_after_chunks, self.stall_after_chunks))

    @staticmethod
    async def _pieces(upstream: aiohttp.ClientResponse):
        """The answer's body as it comes: one server-sent event at a time for a stream (so
        "after N chunks" means after N events, however the engine's writes were cut into
        reads), else as read."""
        if not upstream.content_type == "text/event-stream":
            async for chunk in upstream.content.iter_any():
                yield chunk
            return
        buffer = b""
        async for chunk in upstream.content.iter_any():
            buffer += chunk
            while (cut := buffer.find(b"\n\n")) >= 0:
                yield buffer[:cut + 2]
                buffer = buffer[cut + 2:]
        if buffer:
            yield buffer

    async def _relay(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        with self._lock:
            self.requests.append(Recorded(request.method, request.path, body))
        completion = request.path in GENERATION_PATHS
        if completion and self.delay_s:
            await asyncio.sleep(self.delay_s)
        if completion and self.fail_status is not None:
            return web.json_response({"error": {"message": "injected upstream failure", "type": "server_error",
                                                "code": self.fail_status}}, status=self.fail_status)
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        async with self._session.request(request.method, self.upstream + request.path_qs, data=raw,
                                         headers=headers) as upstream:
            out = web.StreamResponse(status=upstream.status, headers={
                k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP})
            await out.prepare(request)
            # nothing to count and pass_reads: the reads go on as they come, one write each
            # (splitting a long stream into events costs the test process's one interpreter dearly)
            by_read = self.pass_reads and not (completion and self._counts_chunks())
            sent = 0
            async for chunk in (upstream.content.iter_any() if by_read else self._pieces(upstream)):
                if completion and self.cut_after_chunks is not None and sent >= self.cut_after_chunks:
                    assert request.transport is not None
                    request.transport.abort()  # the engine "dies": no terminating chunk, no [DONE]
                    return out
                if completion and self.end_after_chunks is not None and sent >= self.end_after_chunks:
                    break
                if completion and self.stall_after_chunks is not None and sent == self.stall_after_chunks:
                    await asyncio.sleep(self.stall_s)
                await out.write(chunk)
                sent += 1
            if completion and self.hold_end_s:
                await asyncio.sleep(self.hold_end_s)
            await out.write_eof()
            return out
