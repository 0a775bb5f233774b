"""The promoted set as data, without an engine: its file and revision (loragate/core/promoted_set.py),
the chart's rendering of it, the proxy's admission of requests while an adapter is removed
(server/reconciler.py), the reconciler's readiness and settings, and what `loragate rollout
status` reads (loragate/core/rollout.py). The replicas that apply it are tests/test_replicas.py."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from chart_tools import one, render

from loragate.core.promoted_set import MAX_ENTRIES, PromotedSetError, parse, revision
from loragate.core.promoted_set import render as render_set
from loragate.core.rollout import ReplicaStatus, parse_report, wait
from loragate.server.config import ConfigError, load_config
from loragate.server.metrics import ProxyMetrics
from loragate.server.reconciler import Admission, Reconciler


def test_the_revision_is_the_files_sha256_and_the_chart_computes_the_same() -> None:
    data = render_set("/adapters", [("a", "a"), ("b", "team/b")])
    assert revision(data) == hashlib.sha256(data).hexdigest()[:16]
    promoted = [{"name": "a", "path": "a"}, {"name": "b", "path": "team/b"}]
    config_map = one(render(set_json={"adapters.promoted": promoted}), "ConfigMap", "-promoted")
    rendered = config_map["data"]["promoted.json"].encode()
    assert rendered == data  # Helm's toJson and render() write the same bytes
    assert config_map["metadata"]["annotations"]["loragate.dev/promoted-revision"] == revision(data)


def test_each_bad_entry_is_reported_alone() -> None:
    data = json.dumps({"base": "/adapters", "adapters": [
        {"name": "good", "path": "good"},
        {"name": "bad name", "path": "x"},
        {"name": "escapes", "path": "../etc"},
        {"name": "absolute", "path": "/etc/passwd"},
        {"name": "twice", "path": "t1"}, {"name": "twice", "path": "t2"},
        {"path": "no-name"},
    ]}).encode()
    promoted = parse(data)
    assert {n: e.path for n, e in promoted.entries.items()} == {"good": "/adapters/good"}
    assert set(promoted.invalid) == {"#1", "escapes", "absolute", "twice", "#6"}
    assert "listed twice" in promoted.invalid["twice"] and "stay under /adapters" in promoted.invalid["escapes"]


@pytest.mark.parametrize("data, message", [
    (b"not json", "not JSON"),
    (b'{"adapters": []}', "base must be an absolute path"),
    (b'{"base": "/a", "adapters": {}}', "expected"),
    (json.dumps({"base": "/a", "adapters": [{"name": f"n{i}", "path": "p"} for i in range(MAX_ENTRIES + 1)]}).encode(),
     "more than"),
])
def test_an_unusable_file_is_refused_whole(data: bytes, message: str) -> None:
    with pytest.raises(PromotedSetError, match=message):
        parse(data)


def _body(model: str) -> bytes:
    return json.dumps({"model": model, "prompt": "x"}).encode()


def test_admission_refuses_requests_for_an_adapter_being_removed_and_counts_the_rest() -> None:
    admission = Admission()
    old = [admission.enter(_body("going")) for _ in range(2)]
    other = admission.enter(_body("staying"))
    assert None not in old and other is not None
    admission.retiring.add("going")
    assert admission.in_flight("going") == 2
    admission.retiring.add("staying")  # a body read while another adapter was removed is read again
    assert admission.in_flight("staying") == 1
    admission.retiring.discard("staying")
    assert admission.enter(_body("going")) is None  # new requests for it: refused
    # a client escaping the name in JSON is still recognised
    assert admission.enter(b'{"model": "go\\u0069ng", "prompt": "x"}') is None
    assert admission.enter(_body("staying")) is not None
    for ticket in old:
        admission.leave(ticket)  # type: ignore[arg-type]
    assert admission.in_flight("going") == 0
    assert admission.changed.is_set()
    admission.retiring.discard("going")
    assert admission.enter(_body("going")) is not None  # back in the set: served again


def test_the_reconciler_is_not_ready_before_a_set_is_applied(tmp_path: Path) -> None:
    file = tmp_path / "promoted.json"

    async def run() -> tuple[bool, str]:
        from loragate.server.upstream import Upstream
        from loragate.stack import free_port

        upstream = Upstream(f"http://127.0.0.1:{free_port()}", read_timeout_s=5)
        metrics = ProxyMetrics()
        metrics.enable_promoted()
        reconciler = Reconciler(file, lambda: upstream, metrics)
        reconciler._read_file()   # no file yet
        missing = reconciler.ready()
        file.write_bytes(render_set("/adapters", [("a", "a")]))
        reconciler._read_file()
        await reconciler.reconcile()  # the engine is not there: nothing applied
        await upstream.close()
        assert reconciler.ready()[0] is False and reconciler.applied_revision is None
        return missing

    ready, why = asyncio.run(run())
    assert ready is False and "cannot read" in why


def test_reconciler_settings() -> None:
    config = load_config(env={"LORAGATE_PROXY_PROMOTED_SET": "/etc/loragate/promoted/promoted.json",
                              "LORAGATE_PROXY_PROMOTED_POLL_S": "2"}, upstream="http://127.0.0.1:1")
    assert str(config.promoted_set) == "/etc/loragate/promoted/promoted.json" and config.promoted_poll_s == 2.0
    assert load_config(upstream="http://127.0.0.1:1").promoted_set is None
    with pytest.raises(ConfigError, match="must be positive"):
        load_config(env={"LORAGATE_PROXY_PROMOTED_RETRY_S": "0"}, upstream="http://127.0.0.1:1")


def test_rollout_reads_each_replicas_report() -> None:
    report = {"revision": "r2", "applied_revision": "r2", "adapters": {
        "a": {"state": "loaded", "error": None}, "b": {"state": "failed", "error": "load failed: 404"}},
        "invalid": {"#3": "entry 3: bad name"}}
    status = parse_report("http://x", report)
    assert status.bad() == {"b": "load failed: 404", "#3": "entry 3: bad name"}
    assert "applied r2, with #3: entry 3: bad name; b: load failed: 404" in status.describe("r2")
    assert "waiting" in parse_report("http://y", {**report, "applied_revision": "r1"}).describe("r2")
    statuses = [ReplicaStatus("http://x", "r2", "r2", {"a": "loaded"})]
    result = wait(lambda: statuses, "r2", timeout_s=5, interval_s=0.01)
    assert result.done and result.ok
    late = wait(lambda: [ReplicaStatus("http://y", "r1", "r1")], "r2", timeout_s=0.05, interval_s=0.01)
    assert not late.done and not late.ok
    assert not wait(lambda: [], "r2", timeout_s=0.05, interval_s=0.01).ok  # no replica is no rollout


def test_rollout_status_needs_replicas_and_a_revision() -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "loragate.cli", "rollout", "status", *args],
                              capture_output=True, text=True, timeout=60, check=False)

    assert run().returncode == 2
    assert "--revision R or --promoted-file" in run("--replica", "http://127.0.0.1:1").stderr
    unreachable = run("--replica", "http://127.0.0.1:1", "--revision", "abc", "--timeout", "0.2")
    assert unreachable.returncode == 1 and "unreachable" in unreachable.stdout


def test_engine_pods_are_those_scheduled_and_not_terminating() -> None:
    from kubernetes.client import V1ObjectMeta, V1Pod, V1PodStatus

    from loragate.cli.rollout import engine_pods

    pods = [V1Pod(metadata=V1ObjectMeta(name="running"), status=V1PodStatus(phase="Running")),
            V1Pod(metadata=V1ObjectMeta(name="starting"), status=V1PodStatus(phase="Pending")),
            V1Pod(metadata=V1ObjectMeta(name="leaving", deletion_timestamp="2026-01-01T00:00:00Z"),
                  status=V1PodStatus(phase="Running")),
            V1Pod(metadata=V1ObjectMeta(name="done"), status=V1PodStatus(phase="Succeeded"))]
    assert engine_pods(pods) == ["running", "starting"]


def test_the_gate_waits_for_its_rollout_and_exits_3_when_a_replica_did_not_apply_it(capsys) -> None:
    """`loragate gate --rollout-replica`: after a PROMOTE, the replicas must report the new set's
    revision within --rollout-timeout, else the gate exits 3 naming the replica."""
    import argparse

    from loragate.cli.gate import _wait_rollout

    args = argparse.Namespace(rollout_replica=["http://127.0.0.1:1"], rollout_timeout=0.2, api_key=None)
    assert _wait_rollout(args, "abcdef0123456789") == 3
    out = capsys.readouterr().out
    assert "http://127.0.0.1:1: unreachable" in out and "NOT done on every replica" in out
