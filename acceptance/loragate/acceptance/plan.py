"""What the acceptance suite sends and checks for one adapter: runs, requests and checks.

Runs of one adapter (every request uses the contract's prompt template, or for a chat
adapter its conversation through ``/v1/chat/completions``, and ``max_tokens``, never
``ignore_eos`` nor ``min_tokens``):

- ``greedy``: held-out prompts at temperature 0.
- ``sampled``: the next held-out prompts at :data:`SAMPLED_TEMPERATURE`, one fixed seed a
  request (``seed + index``), so a re-run sends exactly the same requests.
- ``probe-<L>``: held-out inputs made longer, each prompt at most ``L`` tokens, greedy, at
  several lengths beyond the training length up to near the served context. Probes up to the
  contract's ``max_input_tokens`` gate; longer ones are measured and reported only.
- ``baseline``: the same prompts as ``greedy`` on the adapter promoted now (regression) or,
  when none is, on the base model (its runaway share, reported beside the adapter's).

Sample sizes follow from the bars (:mod:`loragate.core.stats`): a run has the smallest
``n`` whose perfect result clears every gating bar judged on it, e.g. 35 for the default
0.90 stop-rate and JSON-validity bars and the 0.10 runaway ceiling, 16 for a long-context
probe's 0.80 bars. ``non_empty`` is judged on every request of the adapter together.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

from loragate.core import stats
from loragate.core.contracts import Contract, Thresholds

#: Temperature of the sampled run. The demo's good adapter is perfect at 0.1-0.2 (105/105 stopped and
#: valid), slips at 0.3 (33/35) and collapses by 0.5; set ``--temperature`` to what clients send.
SAMPLED_TEMPERATURE = 0.2
#: Seed of the first sampled request; request ``i`` uses ``seed + i``.
DEFAULT_SEED = 20261124
#: Requests in flight at once (vLLM batches them; 8 keeps a 2-core CPU engine busy).
DEFAULT_CONCURRENCY = 8
#: Prompts per report-only long-context probe (not gating, so no bar sets its size).
REPORT_PROBE_N = 8
#: Prompts of the base-model baseline (its runaway share is reported, never gating).
BASE_BASELINE_N = 16
#: Tokens kept free below the served context at the longest probe (prompt + max_tokens + this).
CONTEXT_MARGIN = 16
#: At most this many probe lengths.
MAX_PROBE_LENGTHS = 6

Metric = Literal["stop_rate", "json_validity", "runaway_rate", "non_empty", "expected_match",
                 "regression_stop_rate", "regression_json_validity", "runaway_vs_baseline"]

#: Human names of the metrics; reasons and tables start with them.
METRIC_NAMES: dict[str, str] = {
    "stop_rate": "stop rate",
    "json_validity": "JSON validity",
    "runaway_rate": "runaway share",
    "non_empty": "non-empty outputs",
    "expected_match": "exact answer",
    "regression_stop_rate": "stop rate regression",
    "regression_json_validity": "JSON validity regression",
    "runaway_vs_baseline": "runaway share vs baseline",
}


@dataclass(frozen=True)
class RequestSpec:
    """One completion request."""

    index: int
    prompt: str
    #: Prompt tokens as the engine counts them, when measured while planning (probes).
    prompt_tokens: int | None = None
    seed: int | None = None
    expected: Any = None


@dataclass(frozen=True)
class RunSpec:
    """A set of requests to one model with one set of sampling parameters."""

    id: str
    label: str
    model: str
    temperature: float
    max_tokens: int
    requests: tuple[RequestSpec, ...]
    #: For probes: the length every prompt is at most, in tokens.
    target_tokens: int | None = None
    #: Why the run could not be built as planned (too few long inputs); its checks fail if gating.
    problem: str | None = None


@dataclass(frozen=True)
class CheckSpec:
    """One check on one run: its metric, its bar and whether it gates."""

    id: str
    run: str
    metric: str
    #: ``floor`` (95% lower bound >= value), ``ceiling`` (95% upper bound <= value),
    #: ``max_drop`` (rate points below the baseline's), ``report`` (no bar).
    bar_kind: Literal["floor", "ceiling", "max_drop", "report"]
    bar: float | None
    gating: bool
    #: For ``non_empty``: the runs pooled together.
    runs: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return METRIC_NAMES[self.metric]


@dataclass(frozen=True)
class Baseline:
    """What the adapter is compared with.

    ``kind``: ``promoted`` (another promoted adapter, run live on the same prompts),
    ``record`` (this adapter's own promoted version: its recorded numbers), ``base`` (the base
    model, runaway share only), ``none``.
    """

    kind: Literal["promoted", "record", "base", "none"]
    model: str | None = None
    #: For ``record``: the promoted version's measured greedy rates, e.g. ``{"stop_rate": 1.0}``.
    recorded: Mapping[str, float] = field(default_factory=dict)
    #: What it is and how it was chosen, as the reports name it (``baseline: ...`` under the verdict).
    note: str = ""


@dataclass(frozen=True)
class AdapterPlan:
    adapter: str
    contracts_file: str
    expects_json: bool
    max_model_len: int
    max_tokens: int
    thresholds: Thresholds
    baseline: Baseline
    runs: tuple[RunSpec, ...]
    checks: tuple[CheckSpec, ...]
    #: How long inputs were made (a line for the report).
    probe_source: str = ""
    max_input_tokens: int | None = None
    train_seq_len: int | None = None
    #: ``completions`` or ``chat``: the API every request goes through (a chat request's prompt
    #: is its conversation as a JSON array, :func:`loragate.acceptance.prompts.render`).
    api: str = "completions"

    def run(self, run_id: str) -> RunSpec:
        for run in self.runs:
            if run.id == run_id:
                return run
        raise KeyError(run_id)

    @property
    def request_count(self) -> int:
        return sum(len(r.requests) for r in self.runs)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["thresholds"] = dataclasses.asdict(self.thresholds)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AdapterPlan":
        runs = tuple(
            RunSpec(**{**r, "requests": tuple(RequestSpec(**q) for q in r["requests"])}) for r in data["runs"]
        )
        checks = tuple(CheckSpec(**{**c, "runs": tuple(c.get("runs") or ())}) for c in data["checks"])
        return cls(
            adapter=data["adapter"], contracts_file=data["contracts_file"], expects_json=data["expects_json"],
            max_model_len=data["max_model_len"], max_tokens=data["max_tokens"],
            thresholds=Thresholds(**data["thresholds"]), baseline=Baseline(**data["baseline"]),
            runs=runs, checks=checks, probe_source=data.get("probe_source", ""),
            max_input_tokens=data.get("max_input_tokens"), train_seq_len=data.get("train_seq_len"),
            api=data.get("api", "completions"),
        )


@dataclass(frozen=True)
class SuitePlan:
    """Everything the pytest suite runs: one :class:`AdapterPlan` per adapter."""

    endpoint: str
    adapters: tuple[AdapterPlan, ...]
    concurrency: int = DEFAULT_CONCURRENCY
    #: Seconds one request may take before it counts as an error.
    request_timeout_s: float = 300.0

    def to_dict(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "concurrency": self.concurrency,
                "request_timeout_s": self.request_timeout_s,
                "adapters": [a.to_dict() for a in self.adapters]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SuitePlan":
        return cls(endpoint=data["endpoint"], concurrency=int(data["concurrency"]),
                   request_timeout_s=float(data["request_timeout_s"]),
                   adapters=tuple(AdapterPlan.from_dict(a) for a in data["adapters"]))

    @property
    def check_ids(self) -> list[str]:
        return [f"{a.adapter}/{c.id}" for a in self.adapters for c in a.checks]


# --------------------------------------------------------------------------- sizes


def heldout_sample_size(contract: Contract) -> int:
    """Prompts of the greedy and the sampled run: enough for every gating bar judged on them."""
    t = contract.thresholds
    sizes = [stats.required_n_floor(t.stop_rate), stats.required_n_ceiling(t.max_runaway_rate)]
    if contract.expects_json:
        sizes.append(stats.required_n_floor(t.json_validity))
    return max(sizes)


def probe_sample_size(contract: Contract) -> int:
    """Prompts of a gating long-context probe."""
    t = contract.thresholds
    sizes = [stats.required_n_floor(t.long_context_stop_rate)]
    if contract.expects_json:
        sizes.append(stats.required_n_floor(t.long_context_json_validity))
    return max(sizes)


def probe_lengths(contract: Contract, max_model_len: int, longest_heldout: int) -> list[tuple[int, bool]]:
    """``(length, gating)`` of each probe, ascending: beyond training, up to near the context.

    The ladder starts at the training length (twice the longest held-out prompt when none is
    declared or the held-out prompts already exceed it), doubles, and always includes the
    contract's ``max_input_tokens`` and the longest prompt the engine can take with
    ``max_tokens`` of output.
    """
    ceiling = max_model_len - contract.max_tokens - CONTEXT_MARGIN
    if ceiling <= longest_heldout:
        return []
    promise = contract.max_input_tokens
    # When the held-out prompts already exceed the training length, they cover it; start beyond them.
    start = contract.train_seq_len or 0
    if start <= longest_heldout:
        start = 2 * longest_heldout
    fixed = {min(start, ceiling), ceiling}
    if promise is not None and longest_heldout < promise <= ceiling:
        fixed.add(promise)
    points = set(fixed)
    length = start * 2
    while length < ceiling:
        # A doubling within 25% of a fixed point (start, promise, ceiling) adds nothing new.
        if all(not (f / 1.25 < length < f * 1.25) for f in fixed):
            points.add(length)
        length *= 2
    ordered = sorted(points)
    if len(ordered) > MAX_PROBE_LENGTHS:  # keep both ends and the promise, thin out the middle
        keep = {ordered[0], ordered[-1]} | ({promise} if promise in ordered else set())
        middle = [x for x in ordered if x not in keep]
        room = MAX_PROBE_LENGTHS - len(keep)
        picked = {middle[round(i * (len(middle) - 1) / max(1, room - 1))] for i in range(room)} if room > 0 else set()
        ordered = sorted(keep | picked)
    gate_up_to = promise if promise is not None else ceiling
    return [(length, length <= gate_up_to) for length in ordered]


def suite_checks(contract: Contract, runs: Sequence[RunSpec], baseline: Baseline,
                 probe_gating: Mapping[str, bool]) -> list[CheckSpec]:
    """The checks of one adapter's runs (see the module docstring)."""
    t = contract.thresholds
    checks: list[CheckSpec] = []
    candidate_runs = [r.id for r in runs if r.id != "baseline"]
    for run in runs:
        if run.id in ("greedy", "sampled"):
            checks.append(CheckSpec(f"{run.id}.stop_rate", run.id, "stop_rate", "floor", t.stop_rate, True))
            if contract.expects_json:
                checks.append(CheckSpec(f"{run.id}.json_validity", run.id, "json_validity", "floor",
                                        t.json_validity, True))
            checks.append(CheckSpec(f"{run.id}.runaway_rate", run.id, "runaway_rate", "ceiling",
                                    t.max_runaway_rate, True))
            if any(r.expected is not None for r in run.requests):
                checks.append(CheckSpec(f"{run.id}.expected_match", run.id, "expected_match", "report", None, False))
        elif run.id.startswith("probe-"):
            gating = probe_gating[run.id]
            checks.append(CheckSpec(f"{run.id}.stop_rate", run.id, "stop_rate", "floor" if gating else "report",
                                    t.long_context_stop_rate if gating else None, gating))
            if contract.expects_json:
                checks.append(CheckSpec(f"{run.id}.json_validity", run.id, "json_validity",
                                        "floor" if gating else "report",
                                        t.long_context_json_validity if gating else None, gating))
    checks.append(CheckSpec("all.non_empty", "all", "non_empty", "floor", t.non_empty_rate, True,
                            runs=tuple(candidate_runs)))
    if baseline.kind in ("promoted", "record"):
        checks.append(CheckSpec("regression.stop_rate", "greedy", "regression_stop_rate", "max_drop",
                                t.max_regression, True))
        if contract.expects_json:
            checks.append(CheckSpec("regression.json_validity", "greedy", "regression_json_validity", "max_drop",
                                    t.max_regression, True))
    if baseline.kind in ("promoted", "base"):
        checks.append(CheckSpec("baseline.runaway_rate", "greedy", "runaway_vs_baseline", "report", None, False))
    return checks


def build_adapter_plan(contract: Contract, *, contracts_file: str, max_model_len: int,
                       heldout: Sequence[Any], lengthener: Any, probe_source: str,
                       count_tokens: Any, baseline: Baseline, temperature: float = SAMPLED_TEMPERATURE,
                       seed: int = DEFAULT_SEED) -> AdapterPlan:
    """The runs and checks of one adapter.

    ``heldout`` are :class:`loragate.acceptance.prompts.PromptRecord` s; ``lengthener`` builds
    probe prompts; ``count_tokens`` measures a prompt as the engine does.
    """
    from loragate.acceptance.prompts import PromptsError

    n = heldout_sample_size(contract)
    if len(heldout) < n:
        raise PromptsError(
            f"{contract.name}: the bars need {n} held-out prompts per run (the smallest sample whose 95% "
            f"lower bound can clear them), the prompts file has {len(heldout)}"
        )
    greedy_prompts = list(heldout[:n])
    rest = list(heldout[n:2 * n])
    sampled_prompts = rest if len(rest) == n else greedy_prompts  # reuse with other seeds when short
    runs: list[RunSpec] = [
        RunSpec("greedy", f"greedy, {n} held-out prompts", contract.name, 0.0, contract.max_tokens,
                tuple(RequestSpec(i, r.prompt, expected=r.expected) for i, r in enumerate(greedy_prompts))),
        RunSpec("sampled", f"temperature {temperature:g}, seeds {seed}+i, {n} held-out prompts", contract.name,
                temperature, contract.max_tokens,
                tuple(RequestSpec(i, r.prompt, seed=seed + i, expected=r.expected)
                      for i, r in enumerate(sampled_prompts))),
    ]
    longest = max(count_tokens(r.prompt) for r in greedy_prompts)
    gating_n = probe_sample_size(contract)
    probe_gating: dict[str, bool] = {}
    for length, gating in probe_lengths(contract, max_model_len, longest):
        want = gating_n if gating else REPORT_PROBE_N
        probes = lengthener.build(length, want, seed)
        run_id = f"probe-{length}"
        problem = None
        if len(probes) < want:
            problem = (f"only {len(probes)} of {want} prompts of at most {length} tokens could be built "
                       f"({probe_source})")
        label = f"long context, prompts <= {length} tokens" + ("" if gating else " (reported, not gating)")
        runs.append(RunSpec(run_id, label, contract.name, 0.0, contract.max_tokens,
                            tuple(RequestSpec(i, p.prompt, prompt_tokens=p.tokens, expected=p.expected)
                                  for i, p in enumerate(probes)),
                            target_tokens=length, problem=problem))
        probe_gating[run_id] = gating
    if baseline.kind in ("promoted", "base") and baseline.model:
        bn = n if baseline.kind == "promoted" else min(n, BASE_BASELINE_N)
        what = "promoted adapter" if baseline.kind == "promoted" else "base model"
        runs.append(RunSpec("baseline", f"{what} {baseline.model}, greedy, {bn} of the same prompts",
                            baseline.model, 0.0, contract.max_tokens,
                            tuple(RequestSpec(i, r.prompt, expected=r.expected) for i, r in enumerate(greedy_prompts[:bn]))))
    checks = suite_checks(contract, runs, baseline, probe_gating)
    return AdapterPlan(
        adapter=contract.name, contracts_file=contracts_file, expects_json=contract.expects_json,
        max_model_len=max_model_len, max_tokens=contract.max_tokens, thresholds=contract.thresholds,
        baseline=baseline, runs=tuple(runs), checks=tuple(checks), probe_source=probe_source,
        max_input_tokens=contract.max_input_tokens, train_seq_len=contract.train_seq_len, api=contract.api,
    )
