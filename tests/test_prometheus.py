"""The proxy's metrics as Prometheus sees them: a real server scrapes it, promtool checks it.

Uses Debian's ``prometheus`` and ``promtool`` (installed by scripts/setup.sh).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import heldout, start_proxy

from loragate.core.contracts import Thresholds, load_contracts, parse_contracts
from loragate.core.judging import ConstraintResult, FinishClass, JsonResult, LengthCause, judge_completion
from loragate.core.metric_names import OTHER_ADAPTER, SHADOW_PAIRED_METRICS, SHADOW_PAIRS, UPSTREAM_ERROR_KINDS
from loragate.server.app import ProxyApp
from loragate.server.config import ProxyConfig, ShadowConfig
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
    # a shadow candidate is worse than live by more than the gate's allowed drop
    found = re.search(r"ratio_rate1h < (-[0-9.]+)", rules["LoragateShadowCandidateWorseThanLive"]["expr"])
    assert found and float(found.group(1)) == -Thresholds().max_regression


#: Every label value each counter the rules read takes besides ``adapter``.
LABEL_VALUES = {
    "loragate_completions_total": {("finish_reason", v.value) for v in FinishClass},
    "loragate_length_cutoffs_total": {("cause", v.value) for v in LengthCause},
    "loragate_json_outputs_total": {("result", v.value) for v in JsonResult},
    "loragate_json_constrained_outputs_total": {("result", v.value) for v in ConstraintResult},
    "loragate_upstream_errors_total": {("kind", v) for v in UPSTREAM_ERROR_KINDS},
    "loragate_scoring_requests_total": {None},
}
#: The shadow counters the rules read (labelled candidate and live, never adapter).
SHADOW_LABEL_VALUES = {
    "loragate_shadow_completions_total": {("finish_reason", v.value) for v in FinishClass},
    "loragate_shadow_paired_total": {(("metric", m), ("pair", p)) for m in SHADOW_PAIRED_METRICS for p in SHADOW_PAIRS},
}
_SELECTOR = re.compile(r'(?<![:\w])(loragate_\w+)(?:\{([^}]*)\})?|\{__name__=~"([^"]+)"\}')
_MATCHER = re.compile(r'(\w+)\s*(=~|!=|=)\s*"([^"]*)"')


def rule_selectors() -> list[tuple[str, str, list[tuple[str, str, str]]]]:
    """``(rule, metric name, [(label, op, value)])`` for every series selector of every rule."""
    found = []
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule.get("record")
            for metric, matchers, names in _SELECTOR.findall(rule["expr"]):
                for each in (names.split("|") if names else [metric]):
                    found.append((name, each, _MATCHER.findall(matchers)))
    return found


def _matches(labels: dict, matchers: list[tuple[str, str, str]]) -> bool:
    for label, op, value in matchers:
        have = labels.get(label, "")
        if (op == "=" and have != value) or (op == "!=" and have == value) or (
                op == "=~" and not re.fullmatch(value, have)):
            return False
    return True


def test_the_rules_read_only_counters_whose_label_values_are_known():
    selected = {metric for _, metric, _ in rule_selectors()}
    assert selected == set(LABEL_VALUES) | set(SHADOW_LABEL_VALUES), selected ^ (set(LABEL_VALUES) | set(SHADOW_LABEL_VALUES))


def test_every_series_an_alert_reads_exists_at_0_for_every_known_adapter_before_its_first_request(tmp_path):
    """A fresh proxy, before any request: for each adapter it knows (its contracts' adapters and
    base model, an adapter the engine serves, ``__other__``) every label combination of every
    counter the rules read exists at 0, and every selector of every rule finds its series, so
    ``increase()`` sees each adapter's first event (JSON outputs only for adapters whose contract
    expects JSON: nothing else is ever counted there)."""
    contracts = parse_contracts({"base_model": "base", "adapters_dir": str(tmp_path), "adapters": {
        "json-adapter": {"path": "j", "output": "json"}, "text-adapter": {"path": "t", "output": "text"}}},
        tmp_path / "adapters.yaml")

    async def fresh_metrics() -> str:
        app = ProxyApp(ProxyConfig(upstream=f"http://127.0.0.1:{free_port()}"), contracts)
        await app.startup()
        try:
            # what the engine's model list adds, as the proxy reads it
            app._adapter_names()._take([{"id": "base"}, {"id": "served-adapter", "parent": "base"}])
            from prometheus_client import generate_latest
            return generate_latest(app.metrics.registry).decode()
        finally:
            await app.shutdown()

    from prometheus_client.parser import text_string_to_metric_families
    samples = [(s.name, s.labels, s.value) for family in text_string_to_metric_families(asyncio.run(fresh_metrics()))
               for s in family.samples if s.name in LABEL_VALUES]
    assert samples and all(value == 0 for _, _, value in samples)
    known = {"json-adapter", "text-adapter", "base", "served-adapter", OTHER_ADAPTER}
    assert {labels["adapter"] for _, labels, _ in samples} == known
    for adapter in known:
        for metric, values in LABEL_VALUES.items():
            have = {next(((k, v) for k, v in labels.items() if k != "adapter"), None)
                    for name, labels, _ in samples if name == metric and labels["adapter"] == adapter}
            assert have == (values if metric != "loragate_json_outputs_total" or adapter == "json-adapter"
                            else set()), (adapter, metric)
        for rule, metric, matchers in rule_selectors():
            if metric in SHADOW_LABEL_VALUES:
                continue  # no adapter label: the test below
            if metric == "loragate_json_outputs_total" and adapter != "json-adapter":
                continue
            assert any(name == metric and labels["adapter"] == adapter and _matches(labels, matchers)
                       for name, labels, _ in samples), (rule, metric, matchers, adapter)


def test_every_series_a_shadow_rule_reads_exists_at_0_for_each_configured_pair_only(tmp_path):
    """A fresh proxy with two shadows: every label combination of every shadow counter the rules
    read exists at 0 for each configured (candidate, live) pair, every selector of the shadow
    rules finds its series for each pair, and no other pair has any."""
    contracts = parse_contracts({"base_model": "base", "adapters_dir": str(tmp_path), "adapters": {
        "v1": {"path": "a", "output": "json"}, "v2": {"path": "b", "output": "json"},
        "v3": {"path": "c", "output": "text"}}}, tmp_path / "adapters.yaml")
    shadows = (ShadowConfig("v1", "v2", 0.1), ShadowConfig("v1", "v3", 1.0))
    app = ProxyApp(ProxyConfig(upstream="http://127.0.0.1:9", shadows=shadows), contracts)
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families
    samples = [(s.name, s.labels, s.value) for family in text_string_to_metric_families(
        generate_latest(app.metrics.registry).decode()) for s in family.samples if s.name.startswith("loragate_shadow") and not s.name.endswith("_created")]
    assert samples and all(value == 0 for _, _, value in samples)
    pairs = {(labels["candidate"], labels["live"]) for _, labels, _ in samples}
    assert pairs == {("v2", "v1"), ("v3", "v1")}
    for candidate, live in pairs:
        for metric, values in SHADOW_LABEL_VALUES.items():
            have = set()
            for name, labels, _ in samples:
                if name == metric and (labels["candidate"], labels["live"]) == (candidate, live):
                    rest = tuple(sorted((k, v) for k, v in labels.items() if k not in ("candidate", "live")))
                    have.add(rest[0] if len(rest) == 1 else rest)
            assert have == values, (candidate, metric)
        for rule, metric, matchers in rule_selectors():
            if metric in SHADOW_LABEL_VALUES:
                assert any(name == metric and labels["candidate"] == candidate and _matches(labels, matchers)
                           for name, labels, _ in samples), (rule, metric, matchers, candidate)


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
    # every known adapter's series exist from the start, at 0: the contracts' adapters and base
    # model, what the engine serves (the same here) and __other__
    known = set(contracts.names) | {contracts.base_model, OTHER_ADAPTER}
    assert {dict(labels)["adapter"] for labels in completions} == known
    # ... among them every series the alerts read (increase() needs the 0 before a first event)
    for name in LABEL_VALUES:
        series = {labels: v for (n, labels), v in before.items() if n == name}
        want = {a for a in contracts.names if contracts[a].expects_json} if name == "loragate_json_outputs_total" \
            else known
        assert {dict(labels)["adapter"] for labels in series} == want, name
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
    expected_total = {**{a: 0.0 for a in known}, **{a: float(len(prompts)) for a in expected_stop}}
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
