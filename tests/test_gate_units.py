"""The gate's parts without an engine: prompts, probes, plans, check evaluation, verdict, reports."""

from __future__ import annotations

import dataclasses
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from loragate.acceptance import report as rep
from loragate.acceptance.checks import SCHEMA_ERROR_KEEP, evaluate, failed_sample, judge_sample, rate
from loragate.acceptance.gate import decide
from loragate.acceptance.plan import (
    AdapterPlan,
    Baseline,
    CheckSpec,
    RequestSpec,
    RunSpec,
    SuitePlan,
    build_adapter_plan,
    probe_lengths,
)
from loragate.acceptance.prompts import PromptRecord, PromptsError, read_prompts
from loragate.acceptance.results import CheckResult
from loragate.acceptance.runner import FORBIDDEN_FIELDS, read_samples, request_body
from loragate.core.contracts import Contract, Thresholds
from loragate.demo import data
from loragate.demo.lengthen import DemoPaperLengthener, is_demo_paper, parse_demo_paper

SCHEMA = data.LAYOUT_SCHEMA
TEMPLATE = data.PROMPT_TEMPLATE
VALID = json.dumps({"title": "T", "authors": ["A"], "panels": [{"heading": "Method", "column": 1}], "theme": "dark"})


def contract(tmp_path: Path, **kw) -> Contract:
    base = dict(name="poster", path=tmp_path, base_model="base", output="json", json_schema=SCHEMA, max_tokens=160,
                train_seq_len=512, max_input_tokens=600, prompt_template=TEMPLATE)
    base.update(kw)
    return Contract(**base)


def papers(n: int, seed: int = 7) -> list[data.Paper]:
    import random

    rng = random.Random(seed)
    return [data.make_paper(rng) for _ in range(n)]


def count_chars(prompt: str) -> int:
    """A stand-in tokenizer: 1 token per 4 characters (monotone, like a real one)."""
    return len(prompt) // 4 + 1


# --------------------------------------------------------------------------- prompts


def test_prompts_are_rendered_with_the_contract_template(tmp_path: Path) -> None:
    c = contract(tmp_path)
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"input": "Title: X"}) + "\n" + json.dumps({"prompt": TEMPLATE.replace("{input}", "Y")}) + "\n")
    records = read_prompts(f, c)
    assert records[0].prompt == "### Paper:\nTitle: X\n### Layout:\n" and records[0].input == "Title: X"
    assert records[1].input == "Y"
    f.write_text(json.dumps({"prompt": "Y without the template"}) + "\n")
    with pytest.raises(PromptsError, match="does not follow poster's prompt_template"):
        read_prompts(f, c)
    f.write_text("[1]\n")
    with pytest.raises(PromptsError, match="expected a JSON object"):
        read_prompts(f, c)


def test_demo_papers_are_recognised_and_lengthened_to_the_target(tmp_path: Path) -> None:
    c = contract(tmp_path)
    records = [PromptRecord(c.render_prompt(p.text), p.text, p.layout) for p in papers(20)]
    assert all(is_demo_paper(r.input) for r in records)
    assert not is_demo_paper("a support ticket")
    assert parse_demo_paper(records[0].input).text == records[0].input
    lengthener = DemoPaperLengthener(c, records, count_chars)
    for target in (400, 1000):
        probes = lengthener.build(target, 8, seed=3)
        assert len(probes) == 8
        for probe in probes:
            assert probe.tokens == count_chars(probe.prompt) <= target
            assert probe.tokens >= target - DemoPaperLengthener.TOLERANCE
            # Same task, longer input: the template wraps it and the right answer is unchanged.
            assert probe.prompt.startswith("### Paper:\n") and probe.prompt.endswith("\n### Layout:\n")
            paper = parse_demo_paper(probe.prompt[len("### Paper:\n"):-len("\n### Layout:\n")])
            assert paper.layout == probe.expected
    assert lengthener.build(400, 8, seed=3) == lengthener.build(400, 8, seed=3)  # deterministic


# --------------------------------------------------------------------------- plan


def test_probe_ladder_goes_beyond_training_up_to_the_served_context(tmp_path: Path) -> None:
    c = contract(tmp_path)
    ladder = probe_lengths(c, 4096, longest_heldout=217)
    assert ladder == [(512, True), (600, True), (1024, False), (2048, False), (4096 - 160 - 16, False)]
    whole = probe_lengths(dataclasses.replace(c, max_input_tokens=None), 4096, 217)
    assert all(gating for _, gating in whole)  # no promise: the whole served context must hold
    assert probe_lengths(c, 300, 217) == []


def test_plan_sizes_runs_and_never_forces_a_length(tmp_path: Path) -> None:
    c = contract(tmp_path)
    records = [PromptRecord(c.render_prompt(p.text), p.text, p.layout) for p in papers(80)]
    plan = build_adapter_plan(c, contracts_file="x.yaml", max_model_len=4096, heldout=records,
                              lengthener=DemoPaperLengthener(c, records, count_chars), probe_source="demo",
                              count_tokens=count_chars, baseline=Baseline("base", "base"), temperature=0.2, seed=5)
    sizes = {r.id: len(r.requests) for r in plan.runs}
    assert sizes["greedy"] == sizes["sampled"] == 35
    assert sizes["baseline"] == 16
    short = [r for r in sizes if r.startswith("probe-") and int(r[6:]) <= 600]
    long = [r for r in sizes if r.startswith("probe-") and int(r[6:]) > 600]
    assert short and long, sorted(sizes)  # probes on both sides of 600 tokens, or the checks below are empty
    assert all(sizes[r] == 16 for r in short)
    assert all(sizes[r] == 8 for r in long)
    sampled = plan.run("sampled")
    assert [q.seed for q in sampled.requests] == [5 + i for i in range(35)]
    assert {q.prompt for q in sampled.requests}.isdisjoint({q.prompt for q in plan.run("greedy").requests})
    for run in plan.runs:
        for q in run.requests:
            body = request_body(run, q)
            assert not FORBIDDEN_FIELDS & body.keys()
            assert set(body) <= {"model", "prompt", "max_tokens", "temperature", "seed"}
            assert body["max_tokens"] == 160 and body["prompt"].startswith("### Paper:\n")
    gating = {ch.id for ch in plan.checks if ch.gating}
    assert {"greedy.stop_rate", "greedy.json_validity", "greedy.runaway_rate", "sampled.stop_rate",
            "probe-600.json_validity", "all.non_empty"} <= gating
    assert "probe-1024.stop_rate" not in gating and "baseline.runaway_rate" not in gating
    assert AdapterPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    with pytest.raises(PromptsError, match="need 35 held-out prompts"):
        build_adapter_plan(c, contracts_file="x.yaml", max_model_len=4096, heldout=records[:20],
                           lengthener=DemoPaperLengthener(c, records, count_chars), probe_source="demo",
                           count_tokens=count_chars, baseline=Baseline("none"))


# --------------------------------------------------------------------------- checks


def _plan(run_sizes: dict[str, int], checks: list[CheckSpec], baseline: Baseline = Baseline("none")) -> AdapterPlan:
    runs = tuple(RunSpec(r, r, "poster", 0.0, 160, tuple(RequestSpec(i, "p") for i in range(n)))
                 for r, n in run_sizes.items())
    return AdapterPlan("poster", "x.yaml", True, 4096, 160, Thresholds(), baseline, runs, tuple(checks))


def _sample(run: str, i: int, text: str, finish: str, completion_tokens: int = 40):
    return judge_sample(adapter="poster", run=run, index=i, model="poster", text=text, finish_reason=finish,
                        prompt_tokens=100, completion_tokens=completion_tokens, expects_json=True,
                        json_schema=SCHEMA, max_model_len=4096)


def test_runaway_and_prefix_diagnosis_use_the_shared_judging() -> None:
    run_on = _sample("greedy", 0, VALID + "\n### Layout:\n{", "length", 160)
    assert not run_on.stopped and run_on.runaway and run_on.json_result == "invalid"
    assert run_on.prefix_json_valid is True  # the answer was there; it did not stop
    prose = _sample("greedy", 1, "The model reduces latency.", "length", 160)
    assert prose.prefix_json_valid is False
    cut_by_context = judge_sample(adapter="poster", run="probe", index=0, model="poster", text="{", finish_reason="length",
                                  prompt_tokens=4000, completion_tokens=96, expects_json=True, json_schema=SCHEMA,
                                  max_model_len=4096)
    assert cut_by_context.context_cut and not cut_by_context.runaway


def test_floor_check_on_the_lower_bound_and_failed_requests_count_against() -> None:
    spec = CheckSpec("greedy.stop_rate", "greedy", "stop_rate", "floor", 0.9, True)
    plan = _plan({"greedy": 35}, [spec])
    perfect = [_sample("greedy", i, VALID, "stop") for i in range(35)]
    assert evaluate(spec, plan, {"greedy": perfect}).passed
    one_error = perfect[:34] + [failed_sample(adapter="poster", run="greedy", index=34, model="poster", error="HTTP 500")]
    result = evaluate(spec, plan, {"greedy": one_error})
    assert not result.passed and "1 request(s) failed" in result.summary
    assert result.summary.startswith("stop rate (greedy): 34/35 = 97.1%")
    missing = evaluate(spec, plan, {"greedy": perfect[:20]})
    assert not missing.passed and "only 20 of 35 planned requests were judged" in missing.summary
    runaway = CheckSpec("greedy.runaway_rate", "greedy", "runaway_rate", "ceiling", 0.1, True)
    assert rate(one_error, "runaway_rate").successes == 1
    assert not evaluate(runaway, _plan({"greedy": 35}, [runaway]), {"greedy": one_error}).passed


def test_regression_against_the_promoted_adapter() -> None:
    spec = CheckSpec("regression.stop_rate", "greedy", "regression_stop_rate", "max_drop", 0.05, True)
    plan = _plan({"greedy": 35, "baseline": 35}, [spec], Baseline("promoted", "old"))
    good = [_sample("greedy", i, VALID, "stop") for i in range(35)]
    worse = good[:31] + [_sample("greedy", i, VALID, "length", 160) for i in range(31, 35)]
    assert evaluate(spec, plan, {"greedy": good, "baseline": good}).passed
    result = evaluate(spec, plan, {"greedy": worse, "baseline": good})
    assert not result.passed and "drop 11.4%" in result.summary
    recorded = _plan({"greedy": 35}, [spec], Baseline("record", "poster", recorded={"stop_rate": 1.0}))
    assert not evaluate(spec, recorded, {"greedy": worse}).passed
    assert evaluate(spec, recorded, {"greedy": good}).passed


def _failed(id_: str, summary: str, measured: dict | None = None) -> CheckResult:
    return CheckResult(id=id_, phase="suite", name=id_, passed=False, gating=True, summary=summary,
                       measured=measured or {})


def test_reasons_name_the_root_cause_first() -> None:
    # An adapter that writes the answer and never stops: stop rate first.
    runs_on = [_failed("greedy.json_validity", "JSON validity", {"n": 35, "successes": 0, "prefix_json_valid_cut": 35}),
               _failed("probe-600.stop_rate", "probe stop"), _failed("greedy.stop_rate", "stop rate"),
               _failed("regression.json_validity", "JSON regression"), _failed("regression.stop_rate", "stop regression")]
    verdict, reasons, _ = decide(runs_on)
    assert verdict == "REJECT" and reasons[0] == "stop rate" and reasons[1] == "JSON validity"
    assert reasons[-2:] == ["stop regression", "JSON regression"]  # the greedy run's outputs decide their order too
    # An adapter that writes prose: JSON validity first.
    prose = [_failed("greedy.stop_rate", "stop rate"),
             _failed("greedy.json_validity", "JSON validity", {"n": 35, "successes": 0, "prefix_json_valid_cut": 0})]
    assert decide(prose)[1][0] == "JSON validity"
    static = CheckResult(id="static.lora_rank", phase="static", name="LoRA rank", passed=False, gating=True,
                         summary="LoRA rank")
    assert decide(prose + [static])[1][0] == "LoRA rank"
    ok = CheckResult(id="greedy.stop_rate", phase="suite", name="stop rate", passed=True, gating=True, summary="ok")
    info = CheckResult(id="probe-3920.stop_rate", phase="suite", name="s", passed=True, gating=False, summary="i")
    assert decide([ok, info])[0] == "PROMOTE"
    assert decide([])[0] == "REJECT"


BLOCKS = "(root): Additional properties are not allowed ('blocks' was unexpected)"
COLUMN = "panels/0/column: 7 is greater than the maximum of 3"
NO_THEME = "(root): 'theme' is a required property"


def _layout(**changes) -> str:
    layout = {**json.loads(VALID), **changes}
    return json.dumps({k: v for k, v in layout.items() if v is not None})


def test_a_sample_keeps_its_first_schema_error_through_the_samples_file(tmp_path: Path) -> None:
    mismatch = _sample("greedy", 0, _layout(blocks=[{"text": "x"}]), "stop")
    assert mismatch.json_result == "schema_mismatch" and mismatch.schema_error == BLOCKS
    assert _sample("greedy", 1, VALID, "stop").schema_error is None
    assert _sample("greedy", 2, "not JSON", "stop").schema_error is None  # invalid, not a schema mismatch
    assert failed_sample(adapter="poster", run="greedy", index=3, model="poster", error="HTTP 500").schema_error is None
    # jsonschema quotes the offending value: a long one is cut in the middle, the verdict on it kept
    huge = _sample("greedy", 4, _layout(theme="x" * 2000), "stop").schema_error
    assert huge is not None and len(huge) == SCHEMA_ERROR_KEEP
    assert huge.startswith("theme: 'xxx") and " ... " in huge
    assert huge.endswith("is not one of ['light', 'dark', 'contrast']")
    samples_file = tmp_path / "samples.jsonl"
    samples_file.write_text(json.dumps(mismatch.to_dict()) + "\n")
    assert json.loads(samples_file.read_text())["schema_error"] == BLOCKS
    assert read_samples(samples_file) == [mismatch]


def test_json_validity_names_the_most_frequent_schema_errors() -> None:
    spec = CheckSpec("greedy.json_validity", "greedy", "json_validity", "floor", 0.9, True)
    plan = _plan({"greedy": 35}, [spec])
    texts = ([_layout(blocks=[1])] * 30 + [_layout(panels=[{"heading": "M", "column": 7}])] * 3
             + [_layout(theme=None), _layout(extra=1)])
    result = evaluate(spec, plan, {"greedy": [_sample("greedy", i, t, "stop") for i, t in enumerate(texts)]})
    assert not result.passed
    assert result.measured["schema_errors"] == [
        {"error": BLOCKS, "count": 30}, {"error": COLUMN, "count": 3}, {"error": NO_THEME, "count": 1}]
    assert result.summary.startswith("JSON validity (greedy): 0/35 = 0.0%")
    assert result.summary.endswith(f"NOT met; most frequent schema error: {BLOCKS} (30 of 35 outputs)")
    assert decide([result])[1] == [result.summary]  # the reason names it too
    # no schema mismatch: nothing to name
    clean = evaluate(spec, plan, {"greedy": [_sample("greedy", i, VALID, "stop") for i in range(35)]})
    assert clean.passed and clean.measured["schema_errors"] == [] and "schema error" not in clean.summary


def test_valid_json_then_text_is_told_apart_from_not_stopping() -> None:
    spec = CheckSpec("greedy.json_validity", "greedy", "json_validity", "floor", 0.9, True)
    plan = _plan({"greedy": 35}, [spec])
    run_on = [_sample("greedy", i, VALID + "\n### Layout:\n{", "length", 160) for i in range(35)]
    chatty = [_sample("greedy", i, VALID + "\nHope this layout helps!", "stop") for i in range(35)]
    assert all(s.prefix_json_valid for s in run_on + chatty)

    cut = evaluate(spec, plan, {"greedy": run_on})
    assert cut.detail == ("35 of 35 invalid outputs begin with a valid answer and then run on until cut at the "
                          "length limit: they would be valid had the adapter stopped")
    assert (cut.measured["prefix_json_valid_cut"], cut.measured["prefix_json_valid_stopped"]) == (35, 0)

    stopped = evaluate(spec, plan, {"greedy": chatty})
    assert stopped.detail == ("valid JSON followed by other text in 35 of 35 invalid outputs: the adapter stopped, "
                              "but not right after its answer")
    assert "had the adapter stopped" not in stopped.detail
    assert (stopped.measured["prefix_json_valid_cut"], stopped.measured["prefix_json_valid_stopped"]) == (0, 35)

    mixed = evaluate(spec, plan, {"greedy": run_on[:15] + chatty[15:]})
    assert mixed.detail.startswith("15 of 35 invalid outputs begin with a valid answer and then run on")
    assert "valid JSON followed by other text in 20 of 35 invalid outputs" in mixed.detail
    # Most of its invalid outputs stopped: the format, not stopping, is the root cause.
    stop_spec = CheckSpec("greedy.stop_rate", "greedy", "stop_rate", "floor", 0.9, True)
    stop = evaluate(stop_spec, plan, {"greedy": run_on[:15] + chatty[15:]})
    assert not stop.passed
    assert [r.split(":")[0] for r in decide([stop, mixed])[1]] == ["JSON validity (greedy)", "stop rate (greedy)"]


def test_empty_output_is_named_before_stopping_and_format() -> None:
    checks_ = [CheckSpec("greedy.stop_rate", "greedy", "stop_rate", "floor", 0.9, True),
               CheckSpec("greedy.json_validity", "greedy", "json_validity", "floor", 0.9, True),
               CheckSpec("greedy.runaway_rate", "greedy", "runaway_rate", "ceiling", 0.1, True),
               CheckSpec("all.non_empty", "all", "non_empty", "floor", 0.95, True, runs=("greedy",))]
    plan = _plan({"greedy": 35}, checks_)
    # 31 empty answers that stop at once, 4 that run on: every rate check fails
    samples = {"greedy": [_sample("greedy", i, "", "stop", 0) for i in range(31)]
               + [_sample("greedy", i, VALID + " more", "length", 160) for i in range(31, 35)]}
    results = [evaluate(spec, plan, samples) for spec in checks_]
    assert not any(r.passed for r in results)
    reasons = decide(results)[1]
    assert reasons[0].startswith("non-empty outputs (every request of the adapter): 4/35 = 11.4%")
    assert [r.split(" (")[0] for r in reasons] == ["non-empty outputs", "JSON validity", "stop rate", "runaway share"]
    # engine refusals and static facts still come first; suite failures keep their root-cause order
    engine = _failed("suite.engine_answers", "engine answered")
    static = CheckResult(id="static.lora_rank", phase="static", name="LoRA rank", passed=False, gating=True,
                         summary="LoRA rank")
    probe = _failed("probe-600.stop_rate", "probe stop")
    regression = _failed("regression.stop_rate", "regression")
    empty, json_check, stop = _failed("all.non_empty", "empty"), _failed("greedy.json_validity", "json"), \
        _failed("greedy.stop_rate", "stop")
    ordered = decide([regression, probe, json_check, stop, empty, engine, static])[1]
    assert ordered == ["LoRA rank", "engine answered", "empty", "json", "stop", "probe stop", "regression"]


def test_a_failure_only_on_long_inputs_is_named_as_such() -> None:
    def check(id_: str, passed: bool) -> CheckResult:
        return CheckResult(id=id_, phase="suite", name="stop rate", passed=passed, gating=True, summary=id_)

    long_only = decide([check("greedy.stop_rate", True), check("sampled.stop_rate", True),
                        check("probe-600.stop_rate", False), check("greedy.json_validity", False)])[1]
    assert long_only == ["greedy.json_validity", ("probe-600.stop_rate; fails only on long inputs: "
                                                  "greedy.stop_rate and sampled.stop_rate passed on the held-out prompts")]
    everywhere = decide([check("greedy.stop_rate", False), check("sampled.stop_rate", True),
                         check("probe-600.stop_rate", False)])[1]
    assert everywhere == ["greedy.stop_rate", "probe-600.stop_rate"]


# --------------------------------------------------------------------------- reports


def _report(verdict: str = "REJECT") -> dict:
    checks = [CheckResult(id="greedy.stop_rate", phase="suite", name="stop rate", passed=verdict == "PROMOTE",
                          gating=True, summary="stop rate (greedy): 0/35 = 0.0% <& \"quoted\">",
                          measured={"successes": 0, "n": 35, "rate": 0.0, "ci95_low": 0.0, "ci95_high": 0.099},
                          bar={"kind": "floor", "value": 0.9}).to_dict(),
              CheckResult(id="static.pad_eos", phase="static", name="pad", passed=False, gating=False, warning=True,
                          summary="pad token vs EOS: pad_token == eos_token").to_dict()]
    runs = [{"id": "greedy", "label": "greedy", "model": "poster", "n": 35, "planned": 35, "prompt_tokens_min": 90,
             "prompt_tokens_median": 150, "prompt_tokens_max": 217,
             "stop_rate": {"successes": 0, "n": 35, "rate": 0.0, "ci95_low": 0.0, "ci95_high": 0.099},
             "json_validity": {"successes": 0, "n": 35, "rate": 0.0, "ci95_low": 0.0, "ci95_high": 0.099},
             "runaway_rate": {"successes": 35, "n": 35, "rate": 1.0, "ci95_low": 0.9, "ci95_high": 1.0}},
            {"id": "probe-1024", "label": "long", "model": "poster", "n": 8, "planned": 8, "prompt_tokens_min": 1000,
             "prompt_tokens_median": 1010, "prompt_tokens_max": 1024,
             "stop_rate": {"successes": 8, "n": 8, "rate": 1.0, "ci95_low": 0.68, "ci95_high": 1.0}}]
    return {"adapter": "poster", "verdict": verdict, "reasons": [] if verdict == "PROMOTE" else [checks[0]["summary"]],
            "notes": ["pad token vs EOS: pad_token == eos_token"], "endpoint": "http://x", "started_at": "now",
            "checks": checks, "runs": runs, "timings": {"static": 1.0, "suite": 2.0, "total": 3.5},
            "contract": {"train_seq_len": 512, "max_input_tokens": 600}, "files": {"html": "r.html"}}


def test_junit_has_a_case_per_check_and_fails_the_verdict_on_reject() -> None:
    root = ET.fromstring(rep.to_junit(_report()))
    cases = {c.get("name"): c for c in root.iter("testcase")}
    assert set(cases) == {"greedy.stop_rate", "static.pad_eos", "verdict"}
    assert cases["greedy.stop_rate"].find("failure") is not None
    assert cases["static.pad_eos"].find("failure") is None  # a warning does not fail
    assert cases["verdict"].find("failure") is not None
    ok = ET.fromstring(rep.to_junit(_report("PROMOTE")))
    assert all(c.find("failure") is None for c in ok.iter("testcase") if c.get("name") != "static.pad_eos")


def test_html_is_self_contained_with_an_svg_chart() -> None:
    page = rep.to_html(_report())
    assert "<svg" in page and "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "").replace("http://x", "")
    assert "&lt;&amp; &quot;quoted&quot;&gt;" in page  # escaped
    svg = page[page.index("<svg"): page.index("</svg>") + 6]
    ET.fromstring(svg)  # well-formed
    assert svg.count("<circle") == 2  # stop rate at two input lengths
    index = rep.demo_index_html([_report(), {**_report("PROMOTE"), "adapter": "other"}], {"poster": "poster/report.html"})
    assert 'href="poster/report.html"' in index and "REJECT" in index and "PROMOTE" in index


def test_terminal_table_lists_checks_and_reasons() -> None:
    table = rep.terminal_table(_report())
    assert "FAIL greedy.stop_rate" in table and "0/35 = 0% [0%-10%]" in table
    assert "WARN static.pad_eos" in table and "VERDICT poster: REJECT" in table and "  1. stop rate" in table


def test_html_shows_a_checks_schema_errors_in_its_row() -> None:
    report = _report()
    errors = [{"error": BLOCKS, "count": 30}, {"error": "theme: 'x' is not one of ['light']", "count": 5}]
    report["checks"].append(CheckResult(
        id="greedy.json_validity", phase="suite", name="JSON validity", passed=False, gating=True,
        summary=f"JSON validity (greedy): 0/35; most frequent schema error: {BLOCKS} (30 of 35 outputs)",
        measured={"successes": 0, "n": 35, "rate": 0.0, "ci95_low": 0.0, "ci95_high": 0.099,
                  "schema_errors": errors}).to_dict())
    page = rep.to_html(report)
    row = next(r for r in page.split("<tr>") if "greedy.json_validity" in r)
    assert ("<li><code>(root): Additional properties are not allowed (&#x27;blocks&#x27; was unexpected)</code> "
            "(30)</li>") in row
    assert "<li><code>theme: &#x27;x&#x27; is not one of [&#x27;light&#x27;]</code> (5)</li>" in row
    assert "schema errors" not in next(r for r in page.split("<tr>") if "greedy.stop_rate" in r)


def test_the_verdict_block_names_the_baseline(tmp_path: Path) -> None:
    from loragate.acceptance.gate import choose_baseline
    from loragate.acceptance.promotion import PromotedEntry
    from loragate.core.engine import EngineModels, ServedModel
    from loragate.core.errors import GateError

    c = contract(tmp_path, name="poster-new")
    served = EngineModels("http://x", tuple(ServedModel(n, None, "base", None) for n in ("poster-good", "poster-new"))
                          + (ServedModel("base", None, None, 4096),))
    folder = tmp_path / "promoted"
    folder.mkdir()

    def promoted(*entries: PromotedEntry) -> None:
        (folder / "promoted.json").write_text(json.dumps({"adapters": {e.name: dataclasses.asdict(e) for e in entries}}))

    def entry(name: str, when: str) -> PromotedEntry:
        return PromotedEntry(name=name, path=name, output="json", sha256="ab" * 32, base_model="base",
                             record="r.json", promoted_at=when, prompt_template=TEMPLATE, smoke_prompt=None,
                             max_tokens=160, measured={"stop_rate": 1.0})

    def line(choice: str | None) -> str:
        report = {**_report(), "baseline": dataclasses.asdict(choose_baseline(c, served, folder, choice))}
        assert rep.baseline_line(report) in rep.to_html(report)
        lines = rep.terminal_table(report).splitlines()
        return lines[lines.index("VERDICT poster: REJECT") + 1]  # the line under the verdict

    assert line(None) == "  baseline: the base model base (nothing promoted for this task): runaway share only"
    promoted(entry("poster-good", "2026-01-02T10:11:12.345678+00:00"))
    assert line(None) == "  baseline: poster-good (promoted 2026-01-02 10:11 UTC, same task)"
    assert line("poster-good") == "  baseline: poster-good (--baseline poster-good)"
    assert line("base") == "  baseline: the base model base (--baseline base): runaway share only"
    assert line("none") == "  baseline: none (--baseline none): no regression checks"
    promoted(entry("poster-good", "2026-01-02T10:11:12+00:00"), entry("poster-new", "2026-02-03T04:05:06+00:00"))
    assert line(None) == ("  baseline: the promoted version of poster-new (promoted 2026-02-03 04:05 UTC, "
                          "sha256 abababababab): its recorded numbers")
    with pytest.raises(GateError, match="'poster-gone' is not served"):
        choose_baseline(c, served, folder, "poster-gone")
    assert "  baseline: none chosen (the gate stopped before planning the suite)" in \
        rep.terminal_table({**_report(), "baseline": None})


def test_gate_cli_takes_a_baseline_name_base_or_none(capsys: pytest.CaptureFixture[str]) -> None:
    from loragate.cli import build_parser

    argv = ["gate", "--endpoint", "http://x", "--adapter", "poster"]
    parser = build_parser(argv)
    assert parser.parse_args(argv).baseline is None
    for choice in ("poster-good", "base", "none"):
        assert parser.parse_args([*argv, "--baseline", choice]).baseline == choice
    with pytest.raises(SystemExit):
        parser.parse_args(["gate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--baseline NAME|base|none what the adapter is compared with: NAME, a served adapter" in help_text
    assert "'base', the base model" in help_text and "'none'" in help_text


def test_suite_plan_round_trips(tmp_path: Path) -> None:
    spec = CheckSpec("greedy.stop_rate", "greedy", "stop_rate", "floor", 0.9, True)
    plan = SuitePlan("http://x", (_plan({"greedy": 2}, [spec]),), concurrency=3)
    again = SuitePlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan and again.check_ids == ["poster/greedy.stop_rate"]


# --------------------------------------------------------------------------- chat adapters


def test_chat_prompts_become_conversations_sent_to_chat_completions(tmp_path: Path) -> None:
    c = contract(tmp_path, api="chat", prompt_template="{input}", system_prompt="Answer in JSON.",
                 user_template="Paper:\n{input}")
    f = tmp_path / "p.jsonl"
    convo = [{"role": "system", "content": "S"}, {"role": "user", "content": "Title: Z"}]
    f.write_text(json.dumps({"input": "Title: X"}) + "\n" + json.dumps({"messages": convo}) + "\n")
    records = read_prompts(f, c)
    assert json.loads(records[0].prompt) == [{"role": "system", "content": "Answer in JSON."},
                                            {"role": "user", "content": "Paper:\nTitle: X"}]
    assert records[0].input == "Title: X"
    assert json.loads(records[1].prompt) == convo and records[1].input == "Title: Z"
    run = RunSpec("greedy", "greedy", "chat", 0.0, 160, (RequestSpec(0, records[0].prompt),))
    body = request_body(run, run.requests[0], "chat")
    assert body == {"model": "chat", "messages": json.loads(records[0].prompt), "max_tokens": 160, "temperature": 0.0}
    assert "prompt" not in body and not FORBIDDEN_FIELDS & body.keys()
    from loragate.acceptance.runner import request_path

    plan = AdapterPlan("chat", "f", True, 4096, 160, Thresholds(), Baseline("none"), (run,), (), api="chat")
    assert request_path(plan) == "/v1/chat/completions"
    assert AdapterPlan.from_dict(plan.to_dict()).api == "chat"  # the suite child gets it through plan.json
    for bad in ({"prompt": "rendered"}, {"messages": []}, {"messages": [{"role": "assistant", "content": "x"}]}):
        f.write_text(json.dumps(bad) + "\n")
        with pytest.raises(PromptsError, match="p.jsonl:1"):
            read_prompts(f, c)


def test_the_demo_lengthener_lengthens_a_chat_adapters_user_turn(tmp_path: Path) -> None:
    c = contract(tmp_path, api="chat", prompt_template="{input}")
    records = [PromptRecord(json.dumps(c.render_messages(p.text)), p.text, None) for p in papers(6)]
    probes = DemoPaperLengthener(c, records, count_chars).build(400, 4, seed=3)
    assert len(probes) == 4
    for probe in probes:
        messages = json.loads(probe.prompt)
        assert [m["role"] for m in messages] == ["user"] and is_demo_paper(messages[0]["content"])
        assert probe.tokens == count_chars(probe.prompt) <= 400


def test_a_chat_template_the_engine_does_not_serve_is_reported(tmp_path: Path) -> None:
    from loragate.acceptance.static import check_chat_template

    adapter, base = tmp_path / "adapter", tmp_path / "base"
    adapter.mkdir()
    base.mkdir()
    c = contract(adapter, api="chat", prompt_template="{input}")
    assert check_chat_template(c, base).passed  # the adapter ships none: the engine's is used
    (adapter / "tokenizer_config.json").write_text(json.dumps({"chat_template": "[INST] {{ m }} [/INST]"}))
    assert not check_chat_template(c, base).passed  # the engine serves none to compare
    (base / "tokenizer_config.json").write_text(json.dumps({"chat_template": "<|user|>{{ m }}<|assistant|>"}))
    differs = check_chat_template(c, base)
    assert not differs.passed and not differs.gating and "differs" in differs.summary
    (base / "chat_template.jinja").write_text("[INST] {{ m }} [/INST]\n")
    assert check_chat_template(c, base).passed


def test_the_charts_legend_is_as_wide_as_its_longest_label() -> None:
    """A long adapter name widens the chart instead of being clipped at its right edge."""
    import re

    from loragate.acceptance.report import svg_chart

    def width(adapter: str) -> int:
        svg = svg_chart([{"adapter": adapter, "metric": m, "points": [(200.0, 1.0, 0.9, 1.0)]}
                         for m in ("stop_rate", "json_validity")])
        return int(re.search(r'<svg[^>]* width="(\d+)"', svg).group(1))

    short, long = width("a"), width("a-rather-long-adapter-name-of-a-team")
    assert short == 760
    label = "a-rather-long-adapter-name-of-a-team: JSON validity"
    assert long >= 760 - 190 + 30 + 6 * len(label) and long > short


def _finding(id_: str, summary: str, gating: bool = False) -> CheckResult:
    return CheckResult(id=f"diagnosis.{id_}", phase="diagnosis", name="diagnosis", passed=False, gating=gating,
                       warning=not gating, summary=summary)


def test_a_diagnosis_names_the_cause_before_its_symptoms() -> None:
    static_fail = CheckResult(id="static.lora_rank", phase="static", name="rank", passed=False, gating=True,
                              summary="rank")
    symptoms = [_failed("greedy.stop_rate", "stop rate"), _failed("greedy.json_validity", "JSON validity")]
    causes = [_finding("answer_not_learned", "answer never learned"), _finding("eos_not_learned", "EOS never learned")]
    verdict, reasons, notes = decide([*symptoms, *causes])
    assert verdict == "REJECT" and reasons[:2] == ["answer never learned", "EOS never learned"]
    assert "answer never learned" not in notes  # named once, as a reason
    # a static fact still comes first
    assert decide([static_fail, *symptoms, *causes])[1][0] == "rank"
    # a finding alone does not reject (the diagnosis explains) ...
    verdict, reasons, notes = decide([CheckResult(id="greedy.stop_rate", phase="suite", name="s", passed=True,
                                                  gating=True, summary="ok"), causes[1]])
    assert verdict == "PROMOTE" and reasons == [] and notes == ["EOS never learned"]
    # ... unless the contract gates on it
    assert decide([_finding("eos_not_learned", "EOS never learned", gating=True)])[0] == "REJECT"


def test_diagnosis_fields_of_a_contract(tmp_path: Path) -> None:
    from loragate.core.contracts import parse_contracts
    from loragate.core.errors import ContractError

    def parse(extra: dict) -> Contract:
        return parse_contracts({"base_model": "b", "adapters": {"a": {"output": "json", **extra}}},
                               tmp_path / "adapters.yaml")["a"]

    c = parse({"target_json_format": {"ensure_ascii": False, "separators": [",", ":"]}, "gate_on_diagnosis": True})
    assert c.gate_on_diagnosis and c.reference_text({"t": "é", "n": [1, 2]}) == '{"t":"é","n":[1,2]}'
    assert parse({}).reference_text({"t": "é"}) == '{"t": "\\u00e9"}'  # json.dumps' defaults
    assert parse({}).reference_text("as written") == "as written"
    for bad in ({"target_json_format": {"indent": True}}, {"target_json_format": {"width": 2}},
                {"target_json_format": {"separators": [","]}}, {"gate_on_diagnosis": "yes"}):
        with pytest.raises(ContractError, match="target_json_format|gate_on_diagnosis"):
            parse(bad)


def test_mean_interval_widens_with_spread_and_shrinks_with_prompts() -> None:
    from loragate.core.stats import mean_interval

    tight, wide = mean_interval([1.0, 1.1, 0.9, 1.0]), mean_interval([0.0, 2.0, 0.5, 1.5])
    assert tight.mean == pytest.approx(1.0) and wide.mean == pytest.approx(1.0)
    assert tight.high - tight.low < wide.high - wide.low
    assert mean_interval([1.0, 2.0] * 8).high - mean_interval([1.0, 2.0] * 8).low < wide.high - wide.low
    one = mean_interval([3.0])
    assert one.low == float("-inf") and one.high == float("inf")
    with pytest.raises(ValueError):
        mean_interval([])


def test_a_static_fact_comes_before_the_engine_refusing_the_load() -> None:
    refused = CheckResult(id="gate.load_into_engine", phase="gate", name="runtime load", passed=False, gating=True,
                          summary="runtime load: HTTP 500")
    rank = CheckResult(id="static.lora_rank", phase="static", name="rank", passed=False, gating=True,
                       summary="LoRA rank 64 above the served --max-lora-rank 16")
    down = CheckResult(id="gate.endpoint", phase="gate", name="endpoint", passed=False, gating=True,
                       summary="endpoint: down")
    assert decide([refused, rank])[1] == [rank.summary, refused.summary]
    assert decide([refused, rank, down])[1][0] == down.summary  # the gate not running at all: first
