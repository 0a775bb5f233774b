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
from conftest import heldout, start_proxy, wait_for

from loragate.core.contracts import Thresholds, load_contracts, parse_contracts
from loragate.core.judging import ConstraintResult, FinishClass, JsonResult, LengthCause, judge_completion
from loragate.core.metric_names import (
    OTHER_ADAPTER,
    PROMOTED_ADAPTER_STATES,
    SHADOW_PAIRED_METRICS,
    SHADOW_PAIRS,
    UPSTREAM_ERROR_KINDS,
)
from loragate.server.app import ProxyApp
from loragate.server.config import ProxyConfig, ShadowConfig
from loragate.server.engine_metrics import ROUTE as ENGINE_ROUTE
from loragate.stack import free_port

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "charts" / "loragate" / "files" / "prometheus-rules.yaml"
RULE_TESTS = ROOT / "tests" / "promtool" / "rules_test.yaml"
DASHBOARD = ROOT / "charts" / "loragate" / "files" / "grafana-dashboard.json"


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
#: The promoted-set reconciler's series the rules read: labelled with the adapters of the set, and
#: exported only by a proxy that applies one (``promoted_set``).
PROMOTED_LABEL_VALUES = {
    "loragate_promoted_adapter_state": {("state", v) for v in PROMOTED_ADAPTER_STATES},
    "loragate_promoted_set_converged": {None},
}
_SELECTOR = re.compile(r'(?<![:\w{,])(loragate_\w+)(?!\s*[=!~])(?:\{([^}]*)\})?|\{__name__=~"([^"]+)"\}')
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
    known = set(LABEL_VALUES) | set(SHADOW_LABEL_VALUES) | set(PROMOTED_LABEL_VALUES)
    assert selected == known, selected ^ known


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
            if metric in SHADOW_LABEL_VALUES or metric in PROMOTED_LABEL_VALUES:
                continue  # their own labels: the tests below
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


def test_every_series_a_promoted_set_rule_reads_exists_for_each_adapter_of_the_set(tmp_path):
    """A proxy applying a promoted set whose engine never answered: each adapter of the set (an
    invalid entry included) has every ``state`` series, 0 but its own, the set's convergence
    exists (0), and every selector of the promoted-set rules finds its series for each adapter."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from loragate.core.promoted_set import render as render_set

    file = tmp_path / "promoted-set.json"
    file.write_bytes(render_set("/adapters", [("a", "a"), ("b", "b")]))

    async def run() -> str:
        app = ProxyApp(ProxyConfig(upstream=f"http://127.0.0.1:{free_port()}", promoted_set=file), None)
        await app.startup()
        try:
            assert app.reconciler is not None
            app.reconciler._read_file()
            await app.reconciler.reconcile()  # no engine: nothing loads
            app.reconciler._export()  # what each pass of its loop ends with
            return generate_latest(app.metrics.registry).decode()
        finally:
            await app.shutdown()

    samples = [(s.name, s.labels, s.value) for family in text_string_to_metric_families(asyncio.run(run()))
               for s in family.samples if s.name in PROMOTED_LABEL_VALUES]
    assert [v for n, _, v in samples if n == "loragate_promoted_set_converged"] == [0]
    states = [(labels["adapter"], labels["state"], v) for n, labels, v in samples
              if n == "loragate_promoted_adapter_state"]
    assert {a for a, _, _ in states} == {"a", "b"}
    for adapter in ("a", "b"):
        assert {s for a, s, _ in states if a == adapter} == {v for _, v in PROMOTED_LABEL_VALUES[
            "loragate_promoted_adapter_state"]}
        assert sum(v for a, _, v in states if a == adapter) == 1
        for rule, metric, matchers in rule_selectors():
            if metric in PROMOTED_LABEL_VALUES:
                assert any(name == metric and labels.get("adapter", adapter) == adapter and _matches(labels, matchers)
                           for name, labels, _ in samples), (rule, metric, matchers, adapter)


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
    """A proxy of its own (counters at zero) for the Prometheus test, reconciling a promoted set
    of one adapter the stack's engine already serves from the same folder (adopted)."""
    from loragate.core.promoted_set import render as render_set

    contracts = load_contracts(stack.contracts_file)
    promoted = tmp_path / "promoted.json"
    promoted.write_bytes(render_set(str(contracts.adapters_dir), [("poster-good", "poster-good")]))
    proc = start_proxy(stack.vllm_url, tmp_path, contracts=stack.contracts_file, config={"promoted_set": str(promoted)})
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def prometheus(scraped_proxy, tmp_path):
    """A real Prometheus server scraping ``scraped_proxy`` every second, with the chart's rules
    loaded: its /metrics and the engine's metrics it relays at /metrics/engine, labelled
    loragate_target as the chart's ServiceMonitor labels them."""
    port = free_port()
    target = scraped_proxy.url.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": "loragate-proxy", "static_configs": [{"targets": [target], "labels": {"loragate_target": "proxy"}}]},
            {"job_name": "loragate-engine", "metrics_path": ENGINE_ROUTE,
             "static_configs": [{"targets": [target], "labels": {"loragate_target": "engine"}}]},
        ],
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
    # every contract's series exist from the start, at 0, and those of every name the engine
    # serves (its base model; the demo serves no adapter outside the contracts) and __other__
    served = {*contracts.names, stack.base_model, OTHER_ADAPTER}

    def adapters_of(samples: dict, name: str) -> set[str]:
        return {dict(labels)["adapter"] for (n, labels) in samples if n == name}

    before = wait_for(lambda: (s := scraped_proxy.scrape()) and adapters_of(s, "loragate_completions_total") == served
                      and s, 30) or scraped_proxy.scrape()
    completions = {labels: v for (n, labels), v in before.items() if n == "loragate_completions_total"}
    assert not any(completions.values()), "scraped_proxy must start at zero"
    assert adapters_of(before, "loragate_completions_total") == served
    # ... among them every series the alerts read (increase() needs the 0 before a first event)
    for name in (*LABEL_VALUES, "loragate_client_disconnects_total"):
        series = {labels: v for (n, labels), v in before.items() if n == name}
        want = {a for a in contracts.names if contracts[a].expects_json} if name == "loragate_json_outputs_total" \
            else served
        assert adapters_of(before, name) == want, name
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
    expected_total = {**{a: 0.0 for a in served}, **{a: float(len(prompts)) for a in expected_stop}}
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
    assert {g["name"] for g in rules} == {"loragate.recording", "loragate.alerts", "loragate.availability",
                                          "loragate.promoted"}
    assert all(r["health"] in ("ok", "unknown") for g in rules for r in g["rules"])


def _panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel of the chart's dashboard, its variables filled as
    Grafana fills them with "All" adapters selected and a 1-minute rate interval."""
    import json

    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"].replace("$adapter", ".*").replace("$__rate_interval", "1m"))
            for panel in dashboard["panels"] if panel["type"] != "row" for target in panel["targets"]]


@pytest.mark.stack
def test_every_dashboard_panel_evaluates_against_prometheus_scraping_proxy_and_engine(
        stack, scraped_proxy, prometheus):
    """Prometheus scrapes the proxy and the engine (through /metrics/engine); after some traffic
    every query of every panel evaluates without error or warning, and every panel shows data.
    The availability alerts stay quiet with both targets up."""
    for prompt in heldout(stack, 3, offset=30):
        with httpx.stream("POST", f"{scraped_proxy.url}/v1/completions", timeout=300, json={
                "model": "poster-good", "prompt": prompt, "max_tokens": 64, "temperature": 0, "stream": True}) as resp:
            assert resp.status_code == 200
            assert any(line == "data: [DONE]" for line in resp.iter_lines())

    def up() -> dict[str, float]:
        data = httpx.get(f"{prometheus}/api/v1/query", params={"query": "up"}, timeout=10).json()["data"]["result"]
        return {r["metric"]["loragate_target"]: float(r["value"][1]) for r in data}

    assert wait_for(lambda: up() == {"proxy": 1.0, "engine": 1.0}, 30), up()
    # both scraped after the traffic: the counts and the engine's token counters are in
    assert wait_for(lambda: _query(prometheus, 'sum(loragate_time_to_first_token_seconds_count)').get("") == 3.0
                    and _query(prometheus, 'sum(vllm:generation_tokens_total)').get("", 0) > 0, 30)
    time.sleep(2)  # a few more scrapes, so rates over the last minute have two samples or more
    empty = []
    queries = _panel_queries()
    assert len({title for title, _ in queries}) >= 15
    for title, expr in queries:
        answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert answer["status"] == "success", (title, expr, answer)
        assert not answer.get("warnings"), (title, expr, answer["warnings"])
        if not answer["data"]["result"]:
            empty.append(title)
    titles = {title for title, _ in queries}
    shown = titles - set(empty)
    assert shown == titles, f"panels without data: {sorted(titles - shown)}"
    alerts = httpx.get(f"{prometheus}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    assert not [a for a in alerts if a["labels"]["alertname"].startswith(("LoragateEngine", "LoragateProxy",
                                                                          "LoragateScrape", "LoragatePromoted"))], alerts
    # the promoted set was adopted from what the engine serves, with no load call
    states = _query(prometheus, 'loragate_promoted_adapter_state{state="loaded"} == 1')
    assert states == {"poster-good": 1.0}
