"""The proxy's drain after SIGTERM (server/loragate/server/drain.py), without an engine.

A request whose body is still arriving is a request in flight as real as a stream: the proxy
has started handling it and must not cut it. These tests hold one open that way, signal the
proxy, and check what the drain promises: new requests get a clean 503, the one in flight runs
to its end, the proxy then stops by itself and says what it did; the drain's deadline cuts what
is left, and a second signal stops at once. The drain with real streams through vLLM, with the
chart's own command lines, is tests/test_replicas.py.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest
from conftest import ProxyProcess, log_events, sample, start_proxy, wait_for

from loragate.stack import free_port

BODY = json.dumps({"model": "m", "prompt": "x" * 200, "max_tokens": 1}).encode()


@pytest.fixture
def proxy_factory(tmp_path: Path):
    started: list[ProxyProcess] = []

    def start(drain_timeout_s: float) -> ProxyProcess:
        # nothing listens upstream: the request in flight ends in a 502 (connect), after the drain began
        proc = start_proxy(f"http://127.0.0.1:{free_port()}", tmp_path,
                           config={"drain_timeout_s": drain_timeout_s, "body_timeout_s": 120})
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.popen.poll() is None:
            proc.popen.kill()
            proc.popen.wait(10)


def _half_sent_request(proxy: ProxyProcess) -> socket.socket:
    """A completion request whose head and half its body have been sent: in flight at the proxy."""
    host, port = proxy.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(BODY)).encode() + b"\r\n\r\n" + BODY[:50])
    return sock


def _events(proxy: ProxyProcess) -> list[dict]:
    return log_events(proxy.log)


def _event(proxy: ProxyProcess, name: str) -> dict | None:
    return next((e for e in _events(proxy) if e.get("event") == name), None)


def _signal_and_wait_for_drain(proxy: ProxyProcess) -> None:
    proxy.popen.send_signal(signal.SIGTERM)
    assert wait_for(lambda: _event(proxy, "draining"), 15), proxy.log.read_text()


def test_new_requests_get_503_while_the_one_in_flight_finishes(proxy_factory) -> None:
    proxy = proxy_factory(drain_timeout_s=120)
    sock = _half_sent_request(proxy)
    try:
        assert wait_for(lambda: sample(proxy.scrape(), "loragate_requests_in_flight", endpoint="completions") == 1, 15)
        _signal_and_wait_for_drain(proxy)
        assert _event(proxy, "draining")["in_flight"] >= 1
        refused = httpx.post(f"{proxy.url}/v1/completions", json={"model": "m", "prompt": "x"}, timeout=10)
        assert refused.status_code == 503
        assert refused.json()["error"]["type"] == "service_unavailable"
        assert refused.headers["connection"] == "close" and refused.headers["retry-after"] == "1"
        # the probes and the scrape still answer: liveness yes, readiness no (leave the Service)
        assert httpx.get(f"{proxy.url}/health", timeout=10).status_code == 200
        ready = httpx.get(f"{proxy.url}/ready", timeout=10)
        assert ready.status_code == 503 and ready.json() == {"status": "draining"}
        samples = proxy.scrape()
        assert sample(samples, "loragate_rejected_requests_total", reason="draining") == 1
        assert sample(samples, "loragate_requests_in_flight", endpoint="completions") == 1
        assert proxy.popen.poll() is None, "the proxy stopped with a request in flight"
        # the rest of the body: the request goes on (to an engine that is not there: 502)
        sock.sendall(BODY[50:])
        answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 502"), answer[:200]
    finally:
        sock.close()
    proxy.popen.wait(30)  # and with nothing in flight, it stops by itself
    drained = _event(proxy, "drained")
    assert drained is not None, proxy.log.read_text()
    assert drained["cut"] == 0 and drained["refused"] == 1
    assert drained["finished"] == drained["in_flight_at_signal"] >= 1


def test_the_deadline_cuts_what_is_left(proxy_factory) -> None:
    proxy = proxy_factory(drain_timeout_s=1)
    sock = _half_sent_request(proxy)
    try:
        assert wait_for(lambda: sample(proxy.scrape(), "loragate_requests_in_flight", endpoint="completions") == 1, 15)
        _signal_and_wait_for_drain(proxy)
        proxy.popen.wait(30)  # the body never completes: cut at the 1 s deadline
    finally:
        sock.close()
    drained = _event(proxy, "drained")
    assert drained is not None and drained["cut"] == 1 and drained["finished"] == drained["in_flight_at_signal"] - 1


def test_a_second_signal_stops_at_once(proxy_factory) -> None:
    proxy = proxy_factory(drain_timeout_s=600)
    sock = _half_sent_request(proxy)
    try:
        assert wait_for(lambda: sample(proxy.scrape(), "loragate_requests_in_flight", endpoint="completions") == 1, 15)
        _signal_and_wait_for_drain(proxy)
        time.sleep(0.5)
        assert proxy.popen.poll() is None
        proxy.popen.send_signal(signal.SIGTERM)
        proxy.popen.wait(30)  # far within the 600 s the drain would have waited
    finally:
        sock.close()
    assert _event(proxy, "drained") is None  # stopped, not drained


def test_without_requests_in_flight_the_proxy_stops_at_once(proxy_factory) -> None:
    proxy = proxy_factory(drain_timeout_s=600)
    proxy.popen.send_signal(signal.SIGTERM)
    proxy.popen.wait(30)
    drained = _event(proxy, "drained")
    assert drained is not None and drained["cut"] == 0 and drained["refused"] == 0
