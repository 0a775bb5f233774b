"""A TCP relay that records every byte a client (the proxy) sends to a server (the real vLLM).

Tests put it between the proxy and the engine to see exactly what the engine received, as
bytes, and to read those bytes the way the engine's own server does: :meth:`ByteRelay.requests`
parses them with httptools (llhttp, the parser uvicorn runs inside vLLM) and computes each
request's route exactly as uvicorn does (the target's path, percent-decoded once).
"""

from __future__ import annotations

import asyncio
import threading
import urllib.parse
from dataclasses import dataclass, field

import httptools


@dataclass
class EngineRequest:
    """One request as the engine's server read it."""

    method: str
    target: bytes
    route: str
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    def header(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name]


class _Reader:
    """httptools callbacks collecting requests from one connection's bytes, as they come."""

    def __init__(self, requests: list[EngineRequest]) -> None:
        self.requests = requests
        self.broken = False
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self.parser = httptools.HttpRequestParser(self)

    def on_message_begin(self) -> None:
        self._url, self._headers = b"", []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        raw_path = httptools.parse_url(self._url).path
        path = raw_path.decode("ascii")
        route = urllib.parse.unquote(path) if "%" in path else path  # uvicorn's own two lines
        self.requests.append(EngineRequest(self.parser.get_method().decode(), self._url, route, self._headers))


class ByteRelay:
    """Listens on 127.0.0.1:``port`` and relays each connection to ``upstream_port``."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._lock = threading.Lock()
        self._streams: list[bytearray] = []
        self._seen: list[EngineRequest] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="byte-relay", daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self.port = 0

    def start(self) -> "ByteRelay":
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def close() -> None:
            self._server.close()
        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        record = bytearray()
        parsed = _Reader(self._seen)
        with self._lock:
            self._streams.append(record)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, keep: bytearray | None) -> None:
            try:
                while data := await src.read(65536):
                    if keep is not None:
                        with self._lock:
                            keep.extend(data)
                            if not parsed.broken:
                                try:
                                    parsed.parser.feed_data(data)  # what it read up to an error is what it acted on
                                except httptools.HttpParserError:
                                    parsed.broken = True
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer, record), pipe(up_reader, writer, None))

    def mark(self) -> int:
        """A position in :meth:`requests`: pass it to :meth:`since`."""
        with self._lock:
            return len(self._seen)

    def since(self, mark: int) -> list[EngineRequest]:
        """The requests the engine's server read after ``mark``."""
        with self._lock:
            return list(self._seen[mark:])

    def requests(self) -> list[EngineRequest]:
        """Every request the engine's server read, in the order they arrived."""
        return self.since(0)

    def raw(self) -> bytes:
        """Every byte the engine received, connection after connection."""
        with self._lock:
            return b"".join(bytes(s) for s in self._streams)
