"""``/metrics/engine``: the engine's own metrics through the proxy (server/engine_metrics.py),
against the stack's real vLLM: what is relayed, who may read it, and its bounds (one fetch for
many scrapes, a size cap, a deadline, an engine that is gone). The Prometheus test that scrapes
it is in tests/test_prometheus.py."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from conftest import sample, scrape, start_proxy
from prometheus_client.parser import text_string_to_metric_families
from relay import Relay

from loragate.server.engine_metrics import ROUTE, EngineMetricsRelay
from loragate.server.metrics import ProxyMetrics
from loragate.server.upstream import Upstream
from loragate.stack import free_port


def test_the_proxy_relays_the_engines_metrics(own_proxy, stack) -> None:
    resp = httpx.get(f"{own_proxy.url}{ROUTE}", timeout=30)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    assert resp.headers["cache-control"] == "no-store"
    relayed = {f.name for f in text_string_to_metric_families(resp.text)}
    direct = {f.name for f in text_string_to_metric_families(httpx.get(f"{stack.vllm_url}/metrics", timeout=30).text)}
    assert relayed == direct
    assert {"vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc"} <= relayed
    # the proxy's own /metrics stays its own
    own = {f.name for f in text_string_to_metric_families(httpx.get(own_proxy.metrics_url, timeout=30).text)}
    assert not own & relayed


def test_engine_metrics_follow_the_metrics_access_rule(stack, tmp_path) -> None:
    guarded = start_proxy(stack.vllm_url, tmp_path, contracts=stack.contracts_file,
                          env={"LORAGATE_PROXY_API_KEYS": "k1", "LORAGATE_PROXY_PUBLIC_METRICS": "false"})
    try:
        assert httpx.get(f"{guarded.url}{ROUTE}", timeout=30).status_code == 401
        ok = httpx.get(f"{guarded.url}{ROUTE}", headers={"Authorization": "Bearer k1"}, timeout=30)
        assert ok.status_code == 200 and "vllm:num_requests_waiting" in ok.text
    finally:
        guarded.stop()


async def _scrape(relay: EngineMetricsRelay, n: int) -> list[tuple[int, bytes]]:
    """``n`` scrapes of the relay at once, as the ASGI server would make them."""
    async def one() -> tuple[int, bytes]:
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        await relay({"type": "http", "path": ROUTE}, send)
        return sent[0]["status"], sent[1]["body"]

    return list(await asyncio.gather(*(one() for _ in range(n))))


def _relay_over(url: str, metrics: ProxyMetrics, **bounds) -> tuple[EngineMetricsRelay, list[Upstream]]:
    upstreams: list[Upstream] = []

    def upstream() -> Upstream:
        if not upstreams:
            upstreams.append(Upstream(url, read_timeout_s=30))
        return upstreams[0]

    return EngineMetricsRelay(upstream, metrics.engine_scrape_errors, **bounds), upstreams


def test_concurrent_scrapes_share_one_engine_fetch(stack) -> None:
    metrics = ProxyMetrics()
    with Relay(stack.vllm_url) as recorder:
        async def run() -> list[tuple[int, bytes]]:
            relay, upstreams = _relay_over(recorder.url, metrics)
            try:
                return await _scrape(relay, 10)
            finally:
                await upstreams[0].close()

        answers = asyncio.run(run())
        assert len(recorder.calls("/metrics")) == 1
    assert [status for status, _ in answers] == [200] * 10
    assert len({body for _, body in answers}) == 1 and b"vllm:num_requests_waiting" in answers[0][1]


@pytest.mark.parametrize("bounds, kind, message", [
    ({"max_bytes": 1000}, "too_large", b"exceeds 1000 bytes"),
    ({"timeout_s": 1e-6}, "timeout", b"did not answer within"),
])
def test_an_answer_beyond_the_bounds_is_a_503(stack, bounds, kind, message) -> None:
    metrics = ProxyMetrics()

    async def run() -> list[tuple[int, bytes]]:
        relay, upstreams = _relay_over(stack.vllm_url, metrics, **bounds)
        try:
            return await _scrape(relay, 1)
        finally:
            if upstreams:
                await upstreams[0].close()

    [(status, body)] = asyncio.run(run())
    assert status == 503 and message in body, body
    samples = scrape_registry(metrics)
    assert sample(samples, "loragate_engine_scrape_errors_total", kind=kind) == 1


def test_an_engine_that_is_gone_is_a_503_and_counted(tmp_path) -> None:
    proxy = start_proxy(f"http://127.0.0.1:{free_port()}", tmp_path)
    try:
        resp = httpx.get(f"{proxy.url}{ROUTE}", timeout=30)
        assert resp.status_code == 503 and "failed" in resp.text
        assert sample(scrape(proxy.metrics_url), "loragate_engine_scrape_errors_total", kind="connect") == 1
    finally:
        proxy.stop()


def scrape_registry(metrics: ProxyMetrics) -> dict:
    from prometheus_client import generate_latest

    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}
