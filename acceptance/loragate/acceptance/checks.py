"""Judged samples, and the checks computed from them.

Every completion is judged by :func:`loragate.core.judging.judge_completion`, the judging
the proxy's metrics use: *stopped*, *length* cut at ``max_tokens`` (a **runaway**) or at the
context, JSON *valid* / *invalid* / *schema_mismatch*. A request that failed (HTTP error,
timeout) counts as a failure on every check: it neither stopped, nor gave valid JSON, nor
stayed clear of a runaway.

Diagnosis (reported, not a second definition of validity): for a completion that is not valid
JSON, ``prefix_json_valid`` says whether it *begins* with a document that the same judging
finds valid, i.e. the answer was right and something followed it: when the completion was cut
at the length limit (``finish_reason`` ``length``) the adapter did not stop after its answer;
when it stopped, it wrote other text after the answer. ``schema_error`` keeps the judging's
first schema error of a ``schema_mismatch`` completion; a JSON-validity check counts them
(:data:`SCHEMA_ERRORS_KEEP` most frequent, ``measured["schema_errors"]``).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Sequence

from loragate.acceptance.plan import AdapterPlan, CheckSpec, RunSpec
from loragate.acceptance.results import CheckResult
from loragate.core.judging import JsonResult, LengthCause, judge_completion
from loragate.core.stats import Rate, meets_ceiling, meets_floor

#: Characters of each completion kept in the samples file.
TEXT_KEEP = 2000
#: Characters of a schema error kept (jsonschema's message quotes the offending value, whatever its size).
SCHEMA_ERROR_KEEP = 240
#: Distinct schema errors a JSON-validity check reports, most frequent first.
SCHEMA_ERRORS_KEEP = 3


@dataclass(frozen=True)
class Sample:
    """One judged completion (or a failed request: ``error`` set)."""

    adapter: str
    run: str
    index: int
    model: str
    prompt_tokens: int | None
    completion_tokens: int | None
    finish_reason: str | None
    text: str
    error: str | None
    stopped: bool
    runaway: bool
    context_cut: bool
    json_result: str | None
    #: The first schema error (``"<path>: <message>"``), set only when ``json_result`` is ``schema_mismatch``.
    schema_error: str | None
    prefix_json_valid: bool | None
    non_empty: bool
    expected_match: bool | None
    latency_s: float

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["text"] = self.text[:TEXT_KEEP]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Sample":
        return cls(**data)


def judge_sample(*, adapter: str, run: str, index: int, model: str, text: str, finish_reason: str | None,
                 prompt_tokens: int | None, completion_tokens: int | None, expects_json: bool,
                 json_schema: Mapping[str, Any] | None, max_model_len: int | None,
                 expected: Any = None, latency_s: float = 0.0) -> Sample:
    """Judge one completion with the shared judging, plus the prefix diagnosis."""
    judgement = judge_completion(
        text, finish_reason, expects_json=expects_json, json_schema=json_schema,
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, max_model_len=max_model_len,
    )
    prefix_valid = None
    if expects_json and not judgement.json_valid:
        prefix_valid = False
        stripped = text.lstrip()
        try:
            _, end = json.JSONDecoder().raw_decode(stripped)
        except (ValueError, RecursionError):
            end = 0
        if end:
            prefix = judge_completion(stripped[:end], "stop", expects_json=True, json_schema=json_schema)
            prefix_valid = prefix.json_valid
    match = None
    if expected is not None:
        try:
            match = json.loads(text.strip()) == expected
        except (ValueError, RecursionError):
            match = False
    return Sample(
        adapter=adapter, run=run, index=index, model=model, prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens, finish_reason=finish_reason, text=text, error=None,
        stopped=judgement.stopped,
        runaway=judgement.length_cause is LengthCause.MAX_TOKENS,
        context_cut=judgement.length_cause is LengthCause.CONTEXT,
        json_result=judgement.json_result.value if judgement.json_result is not None else None,
        schema_error=_clip(judgement.schema_error, SCHEMA_ERROR_KEEP),
        prefix_json_valid=prefix_valid, non_empty=bool(text.strip()), expected_match=match,
        latency_s=round(latency_s, 4),
    )


def _clip(text: str | None, keep: int) -> str | None:
    """``text`` cut to ``keep`` characters in its middle: a schema error's path and its verdict on
    the value (``... is not one of [...]``) are at its ends."""
    if text is None or len(text) <= keep:
        return text
    head = (keep - 5) // 2
    return text[:head] + " ... " + text[len(text) - (keep - 5 - head):]


def failed_sample(*, adapter: str, run: str, index: int, model: str, error: str, latency_s: float = 0.0) -> Sample:
    """A request that got no completion: a failure on every check."""
    return Sample(adapter=adapter, run=run, index=index, model=model, prompt_tokens=None, completion_tokens=None,
                  finish_reason=None, text="", error=error, stopped=False, runaway=True, context_cut=False,
                  json_result=None, schema_error=None, prefix_json_valid=None, non_empty=False, expected_match=None,
                  latency_s=round(latency_s, 4))


# --------------------------------------------------------------------------- rates


def _ok(sample: Sample, metric: str) -> bool:
    if sample.error is not None:
        return False
    if metric == "stop_rate":
        return sample.stopped
    if metric == "json_validity":
        return sample.json_result == JsonResult.VALID.value
    if metric == "non_empty":
        return sample.non_empty
    if metric == "expected_match":
        return bool(sample.expected_match)
    raise KeyError(metric)


def rate(samples: Sequence[Sample], metric: str) -> Rate:
    """Share of ``samples`` that succeed on ``metric`` (for ``runaway_rate``: that ran away)."""
    if metric == "runaway_rate":
        return Rate(sum(1 for s in samples if s.runaway or s.error is not None), len(samples))
    return Rate(sum(1 for s in samples if _ok(s, metric)), len(samples))


def _tokens(samples: Sequence[Sample]) -> dict[str, Any]:
    prompt = sorted(s.prompt_tokens for s in samples if s.prompt_tokens is not None)
    if not prompt:
        return {}
    return {"prompt_tokens_min": prompt[0], "prompt_tokens_median": prompt[len(prompt) // 2],
            "prompt_tokens_max": prompt[-1]}


def _run_label(run: RunSpec | None, run_id: str) -> str:
    return run.label if run is not None else run_id


def evaluate(spec: CheckSpec, plan: AdapterPlan, samples: Mapping[str, Sequence[Sample]]) -> CheckResult:
    """The result of one planned check from the adapter's judged samples, by run."""
    try:
        run = plan.run(spec.run) if spec.run != "all" else None
    except KeyError:
        run = None
    label = "every request of the adapter" if spec.run == "all" else _run_label(run, spec.run)
    base: dict[str, Any] = dict(id=f"{spec.id}", phase="suite", name=spec.name, gating=spec.gating)

    if spec.metric.startswith("regression_"):
        return _regression(spec, plan, samples, base)
    if spec.metric == "runaway_vs_baseline":
        return _runaway_vs_baseline(plan, samples, base)

    if spec.run == "all":
        chosen = [s for r in spec.runs for s in samples.get(r, ())]
    else:
        chosen = list(samples.get(spec.run, ()))
    planned = (sum(len(plan.run(r).requests) for r in spec.runs) if spec.run == "all"
               else len(run.requests) if run is not None else 0)
    r = rate(chosen, spec.metric)
    measured: dict[str, Any] = {**r.to_dict(), **_tokens(chosen), "planned": planned,
                                "errors": sum(1 for s in chosen if s.error is not None)}
    if run is not None and run.target_tokens is not None:
        measured["target_tokens"] = run.target_tokens
    problems = []
    if run is not None and run.problem:
        problems.append(run.problem)
    if len(chosen) < planned:
        problems.append(f"only {len(chosen)} of {planned} planned requests were judged")
    if measured["errors"]:
        problems.append(f"{measured['errors']} request(s) failed")
    detail = ""
    schema_error = ""
    if spec.metric == "json_validity":
        detail = _valid_prefix_detail(chosen, r, measured)
        schema_error = _schema_errors(chosen, r, measured)
    if spec.metric == "runaway_rate":
        measured["context_cut"] = sum(1 for s in chosen if s.context_cut)

    if spec.bar_kind == "floor":
        if spec.bar is None:
            raise ValueError(f"check {spec.id}: a floor bar needs a value")
        passed = meets_floor(r.successes, r.n, spec.bar) and not problems
        verdict = "met" if passed else "NOT met"
        summary = (f"{spec.name} ({label}): {r.describe()}; bar {spec.bar:.0%} on the 95% lower bound: {verdict}")
    elif spec.bar_kind == "ceiling":
        if spec.bar is None:
            raise ValueError(f"check {spec.id}: a ceiling bar needs a value")
        passed = meets_ceiling(r.successes, r.n, spec.bar) and not problems
        verdict = "met" if passed else "NOT met"
        summary = (f"{spec.name} ({label}): {r.describe()} end exactly at max_tokens; ceiling {spec.bar:.0%} "
                   f"on the 95% upper bound: {verdict}")
    else:
        passed = True
        summary = f"{spec.name} ({label}): {r.describe()} (reported, not gating)"
    summary += schema_error
    if problems:
        summary += "; " + "; ".join(problems)
        if spec.gating:
            passed = False
    bar = None if spec.bar_kind == "report" else {"kind": spec.bar_kind, "value": spec.bar}
    return CheckResult(**base, passed=passed, summary=summary, detail=detail, measured=measured, bar=bar)


def _valid_prefix_detail(chosen: Sequence[Sample], r: Rate, measured: dict[str, Any]) -> str:
    """Invalid outputs that begin with a valid answer, by what followed it: a cut at the length
    limit (the adapter did not stop) or other text before the adapter stopped."""
    cut = sum(1 for s in chosen if s.prefix_json_valid and s.finish_reason == "length")
    stopped = sum(1 for s in chosen if s.prefix_json_valid and s.stopped)
    measured["prefix_json_valid_cut"] = cut
    measured["prefix_json_valid_stopped"] = stopped
    invalid = r.n - r.successes
    parts = []
    if cut:
        parts.append(f"{cut} of {invalid} invalid outputs begin with a valid answer and then run on until cut at "
                     "the length limit: they would be valid had the adapter stopped")
    if stopped:
        parts.append(f"valid JSON followed by other text in {stopped} of {invalid} invalid outputs: the adapter "
                     "stopped, but not right after its answer")
    return "; ".join(parts)


def _schema_errors(chosen: Sequence[Sample], r: Rate, measured: dict[str, Any]) -> str:
    """The most frequent schema errors into ``measured``; the summary's clause naming the first."""
    counts = Counter(s.schema_error for s in chosen if s.schema_error)
    top = counts.most_common(SCHEMA_ERRORS_KEEP)
    measured["schema_errors"] = [{"error": error, "count": n} for error, n in top]
    if not top:
        return ""
    error, n = top[0]
    return f"; most frequent schema error: {error} ({n} of {r.n} outputs)"


def _regression(spec: CheckSpec, plan: AdapterPlan, samples: Mapping[str, Sequence[Sample]],
                base: dict[str, Any]) -> CheckResult:
    metric = spec.metric[len("regression_"):]
    name = METRIC_NAME[metric]
    cand = rate(samples.get("greedy", ()), metric)
    baseline = plan.baseline
    if baseline.kind == "record":
        if metric not in baseline.recorded:
            return CheckResult(**base, passed=False, summary=(
                f"{spec.name}: the promoted version's record has no {name}; cannot compare"),
                bar={"kind": "max_drop", "value": spec.bar})
        ref_value = float(baseline.recorded[metric])
        ref_desc = f"{ref_value:.1%} recorded when {plan.adapter} was promoted"
    else:
        ref = rate(samples.get("baseline", ()), metric)
        if ref.n == 0:
            return CheckResult(**base, passed=False, summary=f"{spec.name}: the baseline {baseline.model} was not measured",
                               bar={"kind": "max_drop", "value": spec.bar})
        ref_value = ref.value
        ref_desc = f"{ref.describe()} for the promoted {baseline.model}"
    drop = ref_value - cand.value
    if spec.bar is None:
        raise ValueError(f"check {spec.id}: a max_drop bar needs a value")
    passed = cand.n > 0 and drop <= spec.bar + 1e-9
    summary = (f"{spec.name}: {cand.describe()} vs {ref_desc}; drop {max(0.0, drop):.1%}, "
               f"allowed {spec.bar:.0%}: {'met' if passed else 'NOT met'}")
    return CheckResult(**base, passed=passed, summary=summary,
                       measured={"candidate": cand.to_dict(), "baseline_rate": round(ref_value, 4),
                                 "baseline": baseline.model, "drop": round(drop, 4)},
                       bar={"kind": "max_drop", "value": spec.bar})


def _runaway_vs_baseline(plan: AdapterPlan, samples: Mapping[str, Sequence[Sample]],
                         base: dict[str, Any]) -> CheckResult:
    cand = rate(samples.get("greedy", ()), "runaway_rate")
    ref = rate(samples.get("baseline", ()), "runaway_rate")
    who = "promoted adapter" if plan.baseline.kind == "promoted" else "base model"
    summary = (f"runaway share vs baseline: {plan.adapter} {cand.describe()}; {who} {plan.baseline.model} "
               f"{ref.describe()} on the same prompts (reported, not gating)")
    return CheckResult(**base, passed=True, summary=summary,
                       measured={"candidate": cand.to_dict(), "baseline": ref.to_dict(),
                                 "baseline_model": plan.baseline.model})


METRIC_NAME = {"stop_rate": "stop rate", "json_validity": "JSON validity"}


def run_summary(run: RunSpec, samples: Sequence[Sample], expects_json: bool) -> dict[str, Any]:
    """Per-run numbers for reports and charts."""
    out: dict[str, Any] = {"id": run.id, "label": run.label, "model": run.model, "temperature": run.temperature,
                           "target_tokens": run.target_tokens, "planned": len(run.requests), "n": len(samples),
                           "problem": run.problem, **_tokens(samples),
                           "stop_rate": rate(samples, "stop_rate").to_dict(),
                           "runaway_rate": rate(samples, "runaway_rate").to_dict(),
                           "errors": sum(1 for s in samples if s.error is not None)}
    if expects_json:
        out["json_validity"] = rate(samples, "json_validity").to_dict()
    completion = [s.completion_tokens for s in samples if s.completion_tokens is not None]
    if completion:
        out["completion_tokens_mean"] = round(sum(completion) / len(completion), 1)
    return out


def group_samples(samples: Iterable[Sample]) -> dict[str, dict[str, list[Sample]]]:
    """``{adapter: {run: [samples in request order]}}``."""
    out: dict[str, dict[str, list[Sample]]] = {}
    for s in samples:
        out.setdefault(s.adapter, {}).setdefault(s.run, []).append(s)
    for runs in out.values():
        for lst in runs.values():
            lst.sort(key=lambda s: s.index)
    return out
