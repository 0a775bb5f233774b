"""The proxy's connection to the engine: a pooled HTTP/1.1 client built for the hot path, and its errors.

The proxy sends every request to one engine base URL and passes the answer's bytes through, so
its client needs little of a general one: no redirects, cookies, proxies, TLS settings or
decompression. It is an :class:`asyncio.Protocol` per connection with ``httptools`` (llhttp, the
C parser uvicorn also uses) reading the answers, keep-alive connections reused last in, first
out, and one timer per request for the read timeout. ``loragate bench proxy`` and
``python -m loragate.bench.floor`` measure it: it costs the proxy about half the CPU per
request of the aiohttp client it replaced (README, "Performance").

Semantics:

- A request is written in one piece (head and body), its request line carrying the target
  bytes it was given (the proxy's checked raw target, never a decoded copy). Hop-by-hop headers
  are not forwarded either way: RFC 9110's list, and every header the message's own
  ``Connection`` header names. ``date`` and ``server`` of an answer stay behind too: the proxy's
  server writes its own ``date``, once.
- :meth:`Upstream.send` returns once the status line and headers are in; the body then comes
  through :meth:`UpstreamResponse.iter_chunks` (as it arrives) or :meth:`UpstreamResponse.read`,
  or :meth:`UpstreamResponse.next_chunk`, whose ``sink`` takes bytes in the read callback itself.
  Reading stops while more than :data:`HIGH_WATER` bytes wait unread (a slow client slows the
  engine's connection, nothing piles up in memory).
- The read timeout is the longest wait for the next byte, from the request on: a stream that
  keeps sending never times out, an engine that goes quiet does.
- :meth:`UpstreamResponse.close` returns a finished connection to the pool and closes an
  unfinished one, which makes vLLM abort the request.

Errors are a small hierarchy, each with the ``kind`` label the metrics use:

- :class:`UpstreamConnectError` (``connect``): the engine refused or could not be reached;
- :class:`UpstreamTimeout` (``timeout``): no connection, or no next byte, within its timeout;
- :class:`UpstreamReset` (``reset``): the connection was closed or reset after the request was
  sent and before the answer's head came (an engine that crashed or was killed mid-request);
- :class:`UpstreamBroken` (``stream_broken``): the engine closed the connection mid-answer or
  sent something that is not HTTP.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
from collections import deque
from typing import AsyncIterator, Awaitable, Callable
from urllib.parse import urlsplit

import httptools

#: Headers that belong to one hop, never forwarded either way (lower-case). ``expect`` too: the
#: proxy has the whole body before it sends, so a ``100 Continue`` from the engine means nothing.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection",
    b"te", b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"host", b"content-length", b"expect",
})
#: Answer headers the proxy's own server writes: forwarding the engine's would send them twice.
SERVER_WRITTEN = frozenset({b"date", b"server"})


def connection_named(headers: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """The lower-case header names a message's ``Connection`` header lists (hop-by-hop too)."""
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(named)
_VISIBLE_ASCII = re.compile(rb"[\x21-\x7e]+")
#: Unread body bytes at which a connection stops reading until the consumer catches up.
HIGH_WATER = 256 * 1024
#: How long an idle keep-alive connection is kept: under uvicorn's (and so vLLM's) default of
#: 5 s, so the engine never closes a connection just as the proxy reuses it.
KEEPALIVE_S = 4.0


class UpstreamError(Exception):
    """The engine failed to answer; ``kind`` is the metrics label."""

    kind = "connect"


class UpstreamConnectError(UpstreamError):
    kind = "connect"


class UpstreamTimeout(UpstreamError):
    kind = "timeout"


class UpstreamBroken(UpstreamError):
    kind = "stream_broken"


class UpstreamReset(UpstreamBroken):
    kind = "reset"


class _Connection(asyncio.Protocol):
    """One keep-alive connection to the engine, answering one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser: httptools.HttpResponseParser | None = None
        self._head_only = False
        self._ends_at_close = False
        self._headers: list[tuple[bytes, bytes]] = []
        self._head: asyncio.Future | None = None
        self._body: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future | None = None
        self._sink: Callable[[bytes], bool] | None = None
        self._error: UpstreamError | None = None
        self.complete = False
        self.keep_alive = False
        self._timeout_s = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._last_data = 0.0

    def _live_transport(self) -> asyncio.Transport:
        """The transport; ``create_connection`` runs ``connection_made`` before it hands the connection out."""
        transport = self.transport
        if transport is None:
            raise RuntimeError("the engine connection was used before it was made")
        return transport

    def _live_parser(self) -> httptools.HttpResponseParser:
        """The parser of the answer being read; set by :meth:`start`, and the parser's callbacks come
        only while it is fed."""
        parser = self._parser
        if parser is None:
            raise RuntimeError("an answer callback with no request outstanding")
        return parser

    # -------------------------------------------------------------- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._last_data = self.loop.time()
        if self._parser is None:  # bytes with no request outstanding: not HTTP we can use
            self._fail(UpstreamBroken("unexpected bytes from the engine"))
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamBroken(f"invalid HTTP from the engine: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._parser is not None and not self.complete:
            if exc is None and self._ends_at_close and self._head is not None and self._head.done():
                self._finish(keep_alive=False)
                return
            if self._head is not None and not self._head.done():
                self._fail(UpstreamReset("the engine closed the connection before answering"))
            else:
                self._fail(UpstreamBroken("the engine closed the connection mid-answer"))

    def pause_writing(self) -> None:  # a request body is written once; nothing to pause
        pass

    def resume_writing(self) -> None:
        pass

    # -------------------------------------------------------------- httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._live_parser().get_status_code()
        if self._head is not None and not self._head.done():
            self._head.set_result(status)
        if self._head_only:  # an answer to HEAD has no body, whatever its Content-Length says
            self._finish(keep_alive=False)
            return
        # a body without Content-Length or chunked framing ends when the engine closes
        self._ends_at_close = status >= 200 and status not in (204, 304) and not any(
            name.lower() in (b"content-length", b"transfer-encoding") for name, _ in self._headers)

    def on_body(self, body: bytes) -> None:
        sink = self._sink
        if sink is not None and sink(body):
            return
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused:
            self._paused = True
            self._live_transport().pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self._finish(keep_alive=self._live_parser().should_keep_alive())

    # -------------------------------------------------------------- the exchange
    def start(self, request: bytes, head_only: bool, timeout_s: float) -> asyncio.Future:
        """Write ``request``; returns a future for the answer's status code."""
        self._parser = httptools.HttpResponseParser(self)
        self._head_only = head_only
        self._ends_at_close = False
        self._headers = []
        self._body.clear()
        self._buffered = 0
        self._error = None
        self.complete = False
        self._head = self.loop.create_future()
        self._timeout_s = timeout_s
        self._last_data = self.loop.time()
        self._timer = self.loop.call_at(self._last_data + timeout_s, self._check_timeout)
        self._live_transport().write(request)
        return self._head

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        return self._headers

    def _check_timeout(self) -> None:
        self._timer = None
        if self.complete or self._error is not None:
            return
        if self._paused:  # the consumer is behind, not the engine: wait for it
            self._timer = self.loop.call_at(self.loop.time() + self._timeout_s, self._check_timeout)
            return
        due = self._last_data + self._timeout_s
        if self.loop.time() >= due:
            self._fail(UpstreamTimeout(f"no answer from the engine within {self._timeout_s:g}s"))
        else:
            self._timer = self.loop.call_at(due, self._check_timeout)

    def _finish(self, keep_alive: bool) -> None:
        self.complete = True
        self.keep_alive = keep_alive
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wake()

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None and not self.complete:
            self._error = error
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)
        self._wake()
        self.abort()

    def _wake(self) -> None:
        self._sink = None  # disarmed: what comes next waits behind what the waiter is handed
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def next_chunk(self, sink: Callable[[bytes], bool] | None = None) -> bytes | None:
        """The next body bytes, or ``None`` at the end of the answer.

        With a ``sink``, bytes that arrive while this waits go to ``sink(data)`` first, called
        from the connection's read callback: it returns True when it has taken them (this keeps
        waiting), False to leave them, and all that follows, to this call, which then returns
        them. The sink is armed only while this waits with nothing buffered and is disarmed
        once it declines, so bytes reach the sink or the caller, in the order they came, and
        never both.
        """
        while True:
            if self._body:
                if len(self._body) == 1:
                    chunk = self._body.popleft()
                else:
                    chunk = b"".join(self._body)
                    self._body.clear()
                self._buffered = 0
                if self._paused:
                    self._paused = False
                    self._last_data = self.loop.time()  # the wait for the engine starts again
                    if not self.closed:
                        self._live_transport().resume_reading()
                return chunk
            if self._error is not None:
                raise self._error
            if self.complete:
                return None
            self._waiter = self.loop.create_future()
            self._sink = sink
            try:
                await self._waiter
            finally:
                self._sink = None

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and self._error is None and not self.closed and not self._body


class UpstreamResponse:
    """An answer of the engine whose body has not been read yet."""

    __slots__ = ("_conn", "_pool", "status", "headers", "content_type", "_released")

    def __init__(self, conn: _Connection, pool: "Upstream", status: int) -> None:
        self._conn = conn
        self._pool = pool
        self.status: int = status
        #: Response headers without hop-by-hop ones, as raw (name, value) byte pairs.
        self.headers: list[tuple[bytes, bytes]] = []
        content_type = b""
        named = connection_named(conn.headers)
        for name, value in conn.headers:
            lower = name.lower()
            if lower not in HOP_BY_HOP and lower not in SERVER_WRITTEN and lower not in named:
                self.headers.append((name, value))
                if lower == b"content-type":
                    content_type = value
        self.content_type: str = content_type.decode("latin-1")
        self._released = False

    def next_chunk(self, sink: Callable[[bytes], bool] | None = None) -> Awaitable[bytes | None]:
        """The next body bytes as they arrive, or ``None`` at the end of the answer (what
        :meth:`iter_chunks` yields, without an async generator's cost per chunk); bytes that
        arrive meanwhile go to ``sink`` while it takes them (see ``_Connection.next_chunk``)."""
        return self._conn.next_chunk(sink)

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive."""
        while (chunk := await self._conn.next_chunk()) is not None:
            yield chunk

    async def read(self) -> bytes:
        """The whole body."""
        parts = []
        while (chunk := await self._conn.next_chunk()) is not None:
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        """Release the connection; one whose answer is unfinished is closed, which makes vLLM
        abort the request."""
        if self._released:
            return
        self._released = True
        self._pool._release(self._conn)


class Upstream:
    """A pooled client for one engine base URL (``http://host:port`` or ``https://``, optionally
    with a path prefix). Create inside the running event loop."""

    def __init__(self, base_url: str, *, read_timeout_s: float, connect_timeout_s: float = 5.0,
                 max_connections: int = 512) -> None:
        parts = urlsplit(base_url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream must be an http:// or https:// URL with a host, not {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self._prefix = parts.path.encode()
        self._host_header = b"host: " + parts.netloc.encode("idna") + b"\r\n"
        self._read_timeout_s = read_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._loop = asyncio.get_running_loop()
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(max_connections)
        self._closing = False

    async def _connection(self, connect_timeout_s: float) -> _Connection:
        now = self._loop.time()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and now - conn.idle_since < KEEPALIVE_S:
                return conn
            conn.abort()
        try:
            async with asyncio.timeout(connect_timeout_s):
                _, conn = await self._loop.create_connection(
                    lambda: _Connection(self._loop), self._host, self._port, ssl=self._ssl)
        except TimeoutError as exc:
            raise UpstreamTimeout(f"no connection to the engine within {connect_timeout_s:g}s") from exc
        except OSError as exc:
            raise UpstreamConnectError(f"cannot connect to the engine: {exc}") from exc
        return conn

    async def send(self, method: str, target: bytes | str, headers: list[tuple[bytes, bytes]], body: bytes,
                   *, timeout_s: float | None = None) -> UpstreamResponse:
        """Send a request; returns once the status line and headers are in.

        ``target`` goes into the request line as it is, after the base URL's path prefix: an
        origin-form target (``/v1/models?x=1``) of bytes the caller has checked, or a ``str`` of
        ASCII the client writes itself (``/health``). Anything that could end the request line
        (a space, CR, LF, or any byte outside visible ASCII) raises :class:`ValueError`.
        """
        if self._closing:
            raise UpstreamConnectError("the upstream client is closed")
        raw = target.encode("ascii") if isinstance(target, str) else target
        if not raw.startswith(b"/") or not _VISIBLE_ASCII.fullmatch(raw):
            raise ValueError(f"not an origin-form request target: {raw[:80]!r}")
        head = [method.encode("ascii"), b" ", self._prefix, raw, b" HTTP/1.1\r\n", self._host_header]
        named = connection_named(headers)
        for name, value in headers:
            lower = name.lower()
            if lower not in HOP_BY_HOP and lower not in named:
                head += (name, b": ", value, b"\r\n")
        if body or method not in ("GET", "HEAD"):
            head += (b"content-length: ", str(len(body)).encode(), b"\r\n")
        head.append(b"\r\n")
        head.append(body)
        request = b"".join(head)
        await self._slots.acquire()
        conn = None
        try:
            conn = await self._connection(
                self._connect_timeout_s if timeout_s is None else min(timeout_s, self._connect_timeout_s))
            status = await conn.start(request, method == "HEAD",
                                      self._read_timeout_s if timeout_s is None else timeout_s)
        except BaseException:
            if conn is not None:
                conn.abort()
            self._slots.release()
            raise
        return UpstreamResponse(conn, self, status)

    def _release(self, conn: _Connection) -> None:
        self._slots.release()
        if conn.reusable() and not self._closing:
            conn._parser = None
            conn.idle_since = self._loop.time()
            self._idle.append(conn)
        else:
            conn.abort()

    async def get_json(self, path: str, timeout_s: float) -> object:
        """GET a JSON document (health, model list); raises :class:`UpstreamError`."""
        resp = await self.send("GET", path, [], b"", timeout_s=timeout_s)
        try:
            if resp.status != 200:
                raise UpstreamBroken(f"GET {path}: status {resp.status}")
            try:
                return json.loads(await resp.read() or b"null")
            except ValueError as exc:
                raise UpstreamBroken(f"GET {path}: not JSON") from exc
        finally:
            resp.close()

    async def healthy(self, timeout_s: float = 2.0) -> bool:
        try:
            resp = await self.send("GET", "/health", [], b"", timeout_s=timeout_s)
        except UpstreamError:
            return False
        try:
            await resp.read()
        except UpstreamError:
            return False
        finally:
            resp.close()
        return resp.status == 200

    async def close(self) -> None:
        self._closing = True
        while self._idle:
            self._idle.pop().abort()
