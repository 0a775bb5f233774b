"""The proxy's metrics as Prometheus sees them: a real server scrapes it, promtool checks it.

Uses Debian's ``prometheus`` and ``promtool`` (installed by scripts/setup.sh).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import heldout, start_proxy

from loragate.core.contracts import Thresholds, load_contracts
from loragate.core.judging import judge_completion
from loragate.stack import free_port

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "charts" / "loragate" / "files" / "prometheus-rules.yaml"
RULE_TESTS = ROOT / "tests" / "promtool" / "rules_test.yaml"


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: scripts/setup.sh installs Debian's prometheus package"
    return path


def test_rules_file_is_valid_and_its_unit_tests_pass():
    check = subprocess.run([tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run([tool("promtool"), "test", "rules", str(RULE_TESTS)], capture_output=True, text=True,
                          cwd=RULE_TESTS.parent)
    assert unit.returncode == 0, unit.stdout + unit.stderr
    assert "SUCCESS" in unit.stdout


def test_alert_bars_are_the_gates_thresholds():
    """One fact, one value: the alerts fire below the same bars the gate applies."""
    rules = {r.get("alert"): r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    bars = {"LoragateAdapterLowStopRate": Thresholds().stop_rate,
            "LoragateAdapterLowJsonValidity": Thresholds().json_validity}
    for alert, bar in bars.items():
        found = re.search(r"ratio_rate5m < ([0-9.]+)", rules[alert]["expr"])
        assert found and float(found.group(1)) == bar, f"{alert} fires below {found and found.group(1)}, gate bar {bar}"


def test_recording_rules_are_what_their_names_and_comments_say():
    """Prometheus's naming convention (level:metric:operations): a ``ratio`` record divides one
    rate by another, a ``:rate5m`` record is a rate alone, and the comment above a rate does not
    call it a ratio."""
    lines = RULES.read_text().splitlines()
    rules = {r["record"]: r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"]
             for r in g["rules"] if "record" in r}
    assert rules
    for i, line in enumerate(lines):
        found = re.match(r"\s*- record: (\S+)", line)
        if not found:
            continue
        record = found.group(1)
        comment = []
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#"):
            comment.insert(0, lines[j].strip("# ").lower())
            j -= 1
        comment_text = " ".join(comment)
        assert comment_text, f"{record} has no comment"
        if ":ratio_" in record:
            assert "/" in rules[record], f"{record} is named a ratio but divides nothing"
            assert "share" in comment_text or "ratio" in comment_text, record
        else:
            assert record.endswith(":rate5m") and "/" not in rules[record], record
            assert "per second" in comment_text, f"the comment of {record} does not say it is a rate"
            assert "ratio:" not in comment_text and not comment_text.startswith(("ratio", "share")), \
                f"the comment of {record} calls a rate a ratio: {comment_text}"


@pytest.mark.stack
def test_live_metrics_pass_promtool_check_metrics(own_proxy):
    httpx.post(f"{own_proxy.url}/v1/completions", timeout=120,
               json={"model": "poster-good", "prompt": "### Paper:\nx\n### Layout:\n", "max_tokens": 4})
    text = httpx.get(own_proxy.metrics_url).text
    assert "loragate_completions_total" in text
    result = subprocess.run([tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr


@pytest.fixture
def scraped_proxy(stack, tmp_path):
    """A proxy of its own (counters at zero) for the Prometheus test."""
    proc = start_proxy(stack.vllm_url, tmp_path, contracts=stack.contracts_file)
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def prometheus(scraped_proxy, tmp_path):
    """A real Prometheus server scraping ``scraped_proxy`` every second, with the chart's rules loaded."""
    port = free_port()
    target = scraped_proxy.url.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "loragate-proxy", "static_configs": [{"targets": [target]}]}],
    }))
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen([tool("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def _query(url: str, promql: str) -> dict[str, float]:
    data = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=10).json()
    assert data["status"] == "success", data
    return {r["metric"].get("adapter", ""): float(r["value"][1]) for r in data["data"]["result"]}


@pytest.mark.stack
def test_prometheus_scrapes_the_proxy_and_promql_gives_each_adapters_stop_rate(stack, scraped_proxy, prometheus):
    contracts = load_contracts(stack.contracts_file)
    prompts = heldout(stack, 4, offset=20)
    counts: dict[str, list[int]] = {}
    validity: dict[str, list[int]] = {}
    before = scraped_proxy.scrape()
    completions = {labels: v for (n, labels), v in before.items() if n == "loragate_completions_total"}
    assert not any(completions.values()), "scraped_proxy must start at zero"
    # every contract's series exist from the start, at 0
    assert {dict(labels)["adapter"] for labels in completions} == set(contracts.names)
    # ... among them those the alerts read on a first event (increase() needs the 0 before it)
    for name in ("loragate_json_constrained_outputs_total", "loragate_upstream_errors_total",
                 "loragate_client_disconnects_total"):
        series = {labels: v for (n, labels), v in before.items() if n == name}
        assert {dict(labels)["adapter"] for labels in series} == set(contracts.names), name
        assert not any(series.values()), name
    for adapter, max_tokens in (("poster-good", 160), ("poster-eos-masked", 24), ("poster-truncated", 48)):
        for prompt in prompts:
            answer = httpx.post(f"{scraped_proxy.url}/v1/completions", timeout=300, json={
                "model": adapter, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).json()
            choice = answer["choices"][0]
            j = judge_completion(choice["text"], choice["finish_reason"], expects_json=contracts[adapter].expects_json,
                                 json_schema=contracts[adapter].json_schema)
            counts.setdefault(adapter, []).append(int(j.stopped))
            validity.setdefault(adapter, []).append(int(j.json_valid))
    expected_stop = {a: sum(v) / len(v) for a, v in counts.items()}
    expected_valid = {a: sum(v) / len(v) for a, v in validity.items()}
    assert expected_stop["poster-good"] == 1.0 and expected_stop["poster-eos-masked"] == 0.0

    stop_rate = ('sum by (adapter) (loragate_completions_total{finish_reason="stop"})'
                 ' / sum by (adapter) (loragate_completions_total)')
    json_validity = ('sum by (adapter) (loragate_json_outputs_total{result="valid"})'
                     ' / sum by (adapter) (loragate_json_outputs_total)')
    total = 'sum by (adapter) (loragate_completions_total)'
    # the adapters not asked keep their series, at 0 (their rates are 0/0: no value)
    expected_total = {**{a: 0.0 for a in contracts.names}, **{a: float(len(prompts)) for a in expected_stop}}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if _query(prometheus, total) == expected_total:
            break
        time.sleep(0.5)
    assert _query(prometheus, total) == expected_total

    def asked(result: dict) -> dict:
        return {a: v for a, v in result.items() if a in expected_stop}

    assert asked(_query(prometheus, stop_rate)) == expected_stop
    assert asked(_query(prometheus, json_validity)) == expected_valid

    rules = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    assert {g["name"] for g in rules} == {"loragate.recording", "loragate.alerts"}
    assert all(r["health"] in ("ok", "unknown") for g in rules for r in g["rules"])
