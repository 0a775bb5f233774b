"""The proxy's connection to the engine: one pooled HTTP/1.1 client, and its errors.

Built on aiohttp rather than httpx for the hot path: profiling the proxy (``loragate bench
proxy`` under cProfile) showed most of its CPU per request in httpx/httpcore's connection pool
and anyio layers; aiohttp's C-accelerated parser and simpler pool cost a fraction of that.
Bodies are passed through as raw bytes (no decompression, no re-encoding).

Errors are a small hierarchy, each with the ``kind`` label the metrics use:

- :class:`UpstreamConnectError` (``connect``): the engine refused or could not be reached;
- :class:`UpstreamTimeout` (``timeout``): no answer, or no next byte, within the read timeout;
- :class:`UpstreamBroken` (``stream_broken``): the engine closed the connection mid-answer.
"""

from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator

import aiohttp

#: Request headers that belong to one hop, never forwarded (lower-case).
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
    "transfer-encoding", "upgrade", "host", "content-length",
})


class UpstreamError(Exception):
    """The engine failed to answer; ``kind`` is the metrics label."""

    kind = "connect"


class UpstreamConnectError(UpstreamError):
    kind = "connect"


class UpstreamTimeout(UpstreamError):
    kind = "timeout"


class UpstreamBroken(UpstreamError):
    kind = "stream_broken"


def _translate(exc: BaseException) -> UpstreamError:
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return UpstreamTimeout(str(exc) or type(exc).__name__)
    if isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ClientOSError)) and not isinstance(
            exc, aiohttp.ServerDisconnectedError):
        return UpstreamConnectError(str(exc) or type(exc).__name__)
    return UpstreamBroken(str(exc) or type(exc).__name__)


class UpstreamResponse:
    """An answer of the engine whose body has not been read yet."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status: int = resp.status
        #: Response headers without hop-by-hop ones, as raw (name, value) byte pairs.
        self.headers: list[tuple[bytes, bytes]] = [
            (k, v) for k, v in resp.raw_headers if k.lower().decode("latin-1") not in HOP_BY_HOP]
        self.content_type: str = resp.headers.get("content-type", "")

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive."""
        try:
            async for chunk in self._resp.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _translate(exc) from exc
        if not self._resp.content.is_eof():  # pragma: no cover - iter_any ends only at EOF
            raise UpstreamBroken("answer ended early")

    async def read(self) -> bytes:
        try:
            return await self._resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _translate(exc) from exc

    def close(self) -> None:
        """Release the connection; one whose answer is unfinished is closed, which makes vLLM
        abort the request."""
        if self._resp.content.is_eof():
            self._resp.release()
        else:
            self._resp.close()


class Upstream:
    """A pooled client for one engine base URL. Create inside the running event loop."""

    def __init__(self, base_url: str, *, read_timeout_s: float, connect_timeout_s: float = 5.0,
                 max_connections: int = 512) -> None:
        self.base_url = base_url.rstrip("/")
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max_connections, limit_per_host=0, keepalive_timeout=30,
                                           enable_cleanup_closed=True),
            timeout=aiohttp.ClientTimeout(total=None, connect=connect_timeout_s, sock_read=read_timeout_s),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def send(self, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes,
                   *, timeout_s: float | None = None) -> UpstreamResponse:
        """Send a request; returns once the status line and headers are in."""
        forward = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers
                   if k.lower().decode("latin-1") not in HOP_BY_HOP]
        extra = {} if timeout_s is None else {"timeout": aiohttp.ClientTimeout(total=timeout_s)}
        try:
            resp = await self._session.request(method, self.base_url + path, headers=forward,
                                               data=body if body or method not in ("GET", "HEAD") else None,
                                               allow_redirects=False, **extra)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise _translate(exc) from exc
        return UpstreamResponse(resp)

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
        resp.close()
        return resp.status == 200

    async def close(self) -> None:
        await self._session.close()
