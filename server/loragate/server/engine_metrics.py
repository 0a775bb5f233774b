"""``/metrics/engine``: the engine's own Prometheus metrics, relayed by the proxy.

vLLM listens on 127.0.0.1 inside the pod, so Prometheus cannot scrape its ``/metrics``
(queue depth, KV-cache use, engine latencies, LoRA adapters running); autoscalers and
LoRA-aware routers need them. The proxy answers ``GET /metrics/engine`` with the engine's
``/metrics`` document, byte for byte, under the same access rule as its own ``/metrics``
(``public_metrics``). The relay is bounded:

- one fetch at a time: scrapes that arrive while a fetch runs share its answer, so scrapers can
  never multiply the load on the engine;
- a deadline (``timeout_s``) and a size cap (``max_bytes``) on the engine's answer;
- nothing of the scraper's request reaches the engine (a fixed ``GET /metrics``).

When the engine does not answer in time, answers something other than 200, or answers more
than the cap, the scrape gets a 503 with the reason in plain text: Prometheus marks the target
down (``up == 0``), which the chart's ``LoragateEngineDown`` alert reads. Each failure is counted
in ``loragate_engine_scrape_errors_total`` by kind.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from loragate.core import metric_names as names
from loragate.server.upstream import Upstream, UpstreamError

#: The route the proxy answers with the engine's metrics.
ROUTE = "/metrics/engine"
#: Seconds the engine's /metrics may take (a busy engine answers in well under a second).
TIMEOUT_S = 10.0
#: Largest engine metrics document relayed (vLLM's is tens of KiB; per-adapter label sets grow it).
MAX_BYTES = 16 * 1024 * 1024

Send = Callable[[dict], Awaitable[None]]


class EngineMetricsRelay:
    """Answers :data:`ROUTE` from the engine's ``/metrics``; see the module docstring."""

    def __init__(self, upstream: Callable[[], Upstream], errors: Any, *, timeout_s: float = TIMEOUT_S,
                 max_bytes: int = MAX_BYTES) -> None:
        self._upstream = upstream
        self._errors = errors
        self._timeout_s = timeout_s
        self._max_bytes = max_bytes
        self._inflight: asyncio.Future[tuple[int, bytes, bytes]] | None = None

    async def __call__(self, scope: dict[str, Any], send: Send) -> None:
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.ensure_future(self._fetch())
        # shield: a scraper that goes away does not cancel the fetch others wait for
        status, content_type, body = await asyncio.shield(self._inflight)
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", content_type), (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store")]})
        await send({"type": "http.response.body", "body": body})

    async def _fetch(self) -> tuple[int, bytes, bytes]:
        try:
            async with asyncio.timeout(self._timeout_s):
                return await self._read()
        except TimeoutError:
            return self._failed("timeout", f"the engine's /metrics did not answer within {self._timeout_s:g} s")
        except UpstreamError as exc:
            return self._failed(exc.kind, f"the engine's /metrics failed: {exc}")

    async def _read(self) -> tuple[int, bytes, bytes]:
        resp = await self._upstream().send("GET", "/metrics", [], b"", timeout_s=self._timeout_s)
        try:
            if resp.status != 200:
                return self._failed("status", f"the engine's /metrics answered {resp.status}")
            parts, size = [], 0
            while (chunk := await resp.next_chunk()) is not None:
                size += len(chunk)
                if size > self._max_bytes:
                    return self._failed("too_large", f"the engine's /metrics exceeds {self._max_bytes} bytes")
                parts.append(chunk)
            return 200, (resp.content_type or "text/plain; version=0.0.4").encode("latin-1"), b"".join(parts)
        finally:
            resp.close()

    def _failed(self, kind: str, message: str) -> tuple[int, bytes, bytes]:
        self._errors.labels(kind if kind in names.ENGINE_SCRAPE_ERROR_KINDS else "other").inc()
        return 503, b"text/plain; charset=utf-8", (message + "\n").encode()
