"""Shadows without an engine: their settings, their bounded series, the paired interval, and the
shadow gate's checks on counters a real :class:`ProxyMetrics` exported."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qs, urlsplit

import pytest
from prometheus_client import generate_latest

from loragate.acceptance.gate import decide
from loragate.acceptance.shadow_gate import read_metrics_text, read_prometheus, required_shadow_n, shadow_checks
from loragate.core.contracts import ContractSet, load_contracts
from loragate.core.stats import PairedDifference, required_n_floor, required_n_paired, wilson_interval
from loragate.server.config import ConfigError, ShadowConfig, load_config
from loragate.server.metrics import ProxyMetrics
from loragate.server.shadow import Shadows

CONTRACTS = """base_model: base
adapters_dir: .
adapters:
  live: {path: live, output: json}
  cand: {path: cand, output: json}
  prose: {path: prose, output: text}
"""


@pytest.fixture
def contracts(tmp_path: Path) -> ContractSet:
    path = tmp_path / "adapters.yaml"
    path.write_text(CONTRACTS)
    return load_contracts(path)


# --------------------------------------------------------------------------- settings


def test_shadows_are_read_from_the_file_and_the_variable(tmp_path: Path) -> None:
    file = tmp_path / "proxy.yaml"
    file.write_text("shadows:\n  - {live: live, candidate: cand, share: 0.1}\n")
    config = load_config(file, env={}, upstream="http://e", contracts=str(tmp_path / "a.yaml"))
    assert config.shadows == (ShadowConfig("live", "cand", 0.1, 4),)
    env = {"LORAGATE_PROXY_SHADOWS": json.dumps([{"live": "live", "candidate": "cand", "share": 1,
                                                  "max_in_flight": 2}])}
    assert load_config(env=env, upstream="http://e", contracts="a.yaml").shadows == (ShadowConfig("live", "cand", 1.0, 2),)


@pytest.mark.parametrize("shadows, message", [
    ([{"live": "live", "candidate": "cand", "share": 0}], "share must be a number in"),
    ([{"live": "live", "candidate": "cand", "share": 1.5}], "share must be a number in"),
    ([{"live": "live", "candidate": "cand", "share": "0.5"}], "share must be a number in"),
    ([{"live": "live", "candidate": "cand", "share": 0.5, "max_in_flight": 0}], "max_in_flight"),
    ([{"live": "live", "candidate": "live", "share": 0.5}], "cannot shadow itself"),
    ([{"live": "live", "candidate": "cand", "share": 0.5}] * 2, "twice"),
    ([{"live": "live", "candidate": "cand", "share": 0.5, "mirror": True}], "unknown key"),
    ([{"live": "live", "share": 0.5}], "must be adapter names"),
    ({"live": "live"}, "expected a list"),
])
def test_bad_shadow_settings_are_refused(shadows, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(env={"LORAGATE_PROXY_SHADOWS": json.dumps(shadows)}, upstream="http://e", contracts="a.yaml")


def test_shadows_need_contracts_and_pair_contract_adapters_only(contracts: ContractSet) -> None:
    env = {"LORAGATE_PROXY_SHADOWS": '[{"live": "live", "candidate": "cand", "share": 1}]'}
    with pytest.raises(ConfigError, match="need the contracts"):
        load_config(env=env, upstream="http://e")
    with pytest.raises(ConfigError, match="'ghost' is not an adapter of the contracts"):
        Shadows([ShadowConfig("live", "ghost", 1.0)], contracts, ProxyMetrics())
    with pytest.raises(ConfigError, match="is not an adapter of the contracts"):
        Shadows([ShadowConfig("live", "cand", 1.0)], None, ProxyMetrics())


def test_shadow_series_exist_at_zero_for_the_configured_pairs_only(contracts: ContractSet) -> None:
    metrics = ProxyMetrics()
    Shadows([ShadowConfig("live", "cand", 1.0), ShadowConfig("live", "prose", 1.0)], contracts, metrics)
    text = generate_latest(metrics.registry).decode()
    pairs = {(s.split('candidate="')[1].split('"')[0], s.split('live="')[1].split('"')[0])
             for s in text.splitlines() if s.startswith("loragate_shadow") and 'candidate="' in s}
    assert pairs == {("cand", "live"), ("prose", "live")}
    assert 'loragate_shadow_completions_total{candidate="cand",finish_reason="stop",live="live"} 0.0' in text
    # JSON series only for a candidate whose contract expects JSON
    assert 'loragate_shadow_json_outputs_total{candidate="cand",live="live",result="valid"} 0.0' in text
    assert 'loragate_shadow_json_outputs_total{candidate="prose"' not in text


def test_sampling_skips_other_adapters_scoring_and_prompt_logprobs(contracts: ContractSet) -> None:
    from loragate.server.fields import read_fields

    shadows = Shadows([ShadowConfig("live", "cand", 1.0)], contracts, ProxyMetrics())
    plain = {"model": "live", "prompt": "x", "max_tokens": 4}
    assert [c.candidate for c in shadows.sample("live", plain, read_fields(plain))] == ["cand"]
    assert shadows.sample("cand", plain, read_fields(plain)) == []
    for request in ({**plain, "prompt_logprobs": 1}, {**plain, "echo": True, "logprobs": 1},
                    {**plain, "echo": True, "max_tokens": 0}):
        assert shadows.sample("live", request, read_fields(request)) == [], request
    tenth = Shadows([ShadowConfig("live", "cand", 0.1)], contracts, ProxyMetrics())
    picked = sum(len(tenth.sample("live", plain, read_fields(plain))) for _ in range(4000))
    assert 300 < picked < 500


# --------------------------------------------------------------------------- the paired interval


def test_the_paired_interval_needs_as_many_concordant_pairs_as_the_floor_of_one_minus_the_drop() -> None:
    need = required_n_paired(0.05)
    assert need == required_n_floor(0.95) == 73
    assert PairedDifference(need, 0, 0, 0).interval[0] >= -0.05
    assert PairedDifference(need - 1, 0, 0, 0).interval[0] < -0.05
    # with no discordant pair the lower bound is the Wilson lower bound of the first rate, minus 1
    assert PairedDifference(need, 0, 0, 0).interval[0] == pytest.approx(wilson_interval(need, need)[0] - 1)


def test_the_paired_interval_is_antisymmetric_and_covers_its_estimate() -> None:
    d = PairedDifference(50, 3, 9, 10)
    low, high = d.interval
    assert low < d.value < high and d.value == pytest.approx((3 - 9) / 72)
    swapped = PairedDifference(50, 9, 3, 10).interval
    assert swapped == pytest.approx((-high, -low))
    assert high < 0.05 and low > -0.25


# --------------------------------------------------------------------------- the shadow gate's checks


def _exported(contracts: ContractSet, *, stop: int, length: int, valid: int, live_stop: int, pairs: int,
              failed: int = 0, candidate: str = "cand") -> str:
    """A ProxyMetrics registry with the given shadow outcomes, as the proxy exports it: the first
    ``stop`` candidate answers stopped and the first ``valid`` are valid JSON; of ``pairs`` paired
    answers the live one stopped in the first ``live_stop``."""
    metrics = ProxyMetrics()
    Shadows([ShadowConfig("live", candidate, 1.0)], contracts, metrics)
    n = stop + length
    for i in range(n):
        finish = "stop" if i < stop else "length"
        metrics.shadow_completions.labels(candidate, "live", finish).inc()
        if finish == "length":
            metrics.shadow_length_cutoffs.labels(candidate, "live", "max_tokens").inc()
        metrics.shadow_json_outputs.labels(candidate, "live", "valid" if i < valid else "invalid").inc()
        metrics.shadow_requests.labels(candidate, "live", "judged").inc()
        if i < pairs:
            for metric, live_ok, cand_ok in (("stop", i < live_stop, i < stop), ("json_valid", i < live_stop, i < valid)):
                pair = {(True, True): "both", (True, False): "live_only", (False, True): "candidate_only",
                        (False, False): "neither"}[(live_ok, cand_ok)]
                metrics.shadow_paired.labels(candidate, "live", metric, pair).inc()
    metrics.shadow_requests.labels(candidate, "live", "upstream_error").inc(failed)
    return generate_latest(metrics.registry).decode()


def _verdict(contracts: ContractSet, text: str) -> tuple[str, dict]:
    counts = read_metrics_text(text, "cand")["live"]
    checks = shadow_checks(contracts["cand"], contracts["live"], counts)
    verdict, _, _ = decide(checks)
    return verdict, {c.id: c for c in checks}


def test_a_candidate_as_good_as_live_on_enough_requests_promotes(contracts: ContractSet) -> None:
    n = max(required_shadow_n(contracts["cand"], True).values())
    verdict, checks = _verdict(contracts, _exported(contracts, stop=n, length=0, valid=n, live_stop=n, pairs=n))
    assert verdict == "PROMOTE", [c.summary for c in checks.values() if not c.passed]
    assert set(checks) == {"shadow.sample_size", "shadow.stop_rate", "shadow.json_validity", "shadow.runaway_rate",
                           "shadow.paired_stop_rate", "shadow.paired_json_validity"}


def test_too_few_shadowed_requests_fail_closed(contracts: ContractSet) -> None:
    n = max(required_shadow_n(contracts["cand"], True).values()) - 1
    verdict, checks = _verdict(contracts, _exported(contracts, stop=n, length=0, valid=n, live_stop=n, pairs=n))
    assert verdict == "REJECT" and not checks["shadow.sample_size"].passed
    assert "fail closed" in checks["shadow.sample_size"].summary


def test_a_candidate_clearing_the_bars_but_worse_than_live_is_rejected_on_the_pairs(contracts: ContractSet) -> None:
    # 190/200 stops clear the 90% bar on the Wilson lower bound; live stopped on all 200
    verdict, checks = _verdict(contracts, _exported(contracts, stop=190, length=10, valid=200, live_stop=200, pairs=200))
    assert checks["shadow.stop_rate"].passed and checks["shadow.runaway_rate"].passed
    assert not checks["shadow.paired_stop_rate"].passed and verdict == "REJECT"
    assert checks["shadow.paired_stop_rate"].measured["difference"] == pytest.approx(-0.05)


def test_shadows_the_engine_did_not_answer_count_as_failures(contracts: ContractSet) -> None:
    n = 200
    verdict, checks = _verdict(contracts, _exported(contracts, stop=n, length=0, valid=n, live_stop=n, pairs=n,
                                                    failed=30))
    stop = checks["shadow.stop_rate"]
    assert stop.measured["n"] == n + 30 and stop.measured["successes"] == n and not stop.passed


class _Prometheus(BaseHTTPRequestHandler):
    """Answers instant queries with two replicas' sums already taken, as Prometheus would."""

    queries: list[str] = []

    def do_GET(self) -> None:  # noqa: N802
        query = parse_qs(urlsplit(self.path).query)["query"][0]
        type(self).queries.append(query)
        result = []
        if "loragate_shadow_completions_total" in query:
            result = [{"metric": {"live": "live", "finish_reason": "stop"}, "value": [0, "70"]},
                      {"metric": {"live": "live", "finish_reason": "length"}, "value": [0, "3"]}]
        body = json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def prometheus() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Prometheus)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_prometheus_is_asked_for_sums_over_replicas_of_the_candidate(prometheus: str) -> None:
    _Prometheus.queries.clear()
    counts = read_prometheus(prometheus, 'c"and')["live"]
    assert counts.get("loragate_shadow_completions", "stop") == 70 and counts.total("loragate_shadow_completions") == 73
    assert 'sum by (live, finish_reason) (loragate_shadow_completions_total{candidate="c\\"and"})' in _Prometheus.queries


def test_shadow_flags_without_shadow_are_a_usage_error(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "loragate.cli", "gate", "--adapter", "x", "--endpoint", "http://127.0.0.1:9",
                          "--prometheus", "http://127.0.0.1:9"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--prometheus is for --shadow" in out.stderr
