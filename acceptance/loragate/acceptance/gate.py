"""The gate: static checks, the acceptance suite, optionally the load test, then a verdict.

``run_gate`` turns one adapter and an endpoint into PROMOTE or REJECT, with every reason and
its numbers, and writes the reports (:mod:`loragate.acceptance.report`). It fails closed:

- the endpoint is down or does not serve the adapter: REJECT (no request is sent);
- a static gating check fails: REJECT, the suite is not run;
- the suite is interrupted (Ctrl-C, SIGTERM, its pytest child killed, a timeout) or reports
  fewer checks than were planned: REJECT with what was measured so far;
- a report cannot be written: an error (non-zero exit) and no promotion.

Only a PROMOTE verdict (with ``promote``, the default) touches the promoted set
(:mod:`loragate.acceptance.promotion`), and only after every report file is written.

Phases and their timings (``report.json`` ``timings``, seconds): ``preflight`` (engine model
list, optional runtime load), ``static``, ``plan`` (prompts, probe sizing with the engine's
tokenizer), ``diagnosis`` (the engine's likelihoods of reference answers,
:mod:`loragate.acceptance.diagnosis`), ``suite`` (the pytest child), ``load``, ``report``,
``promotion``, ``total``.

The diagnosis explains: its findings are named first among the reasons of a REJECT (the cause
before its symptoms) and as notes otherwise; they reject only when the contract says
``gate_on_diagnosis: true`` (then a diagnosis that cannot be made rejects too: fail closed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import httpx

from loragate.acceptance import report as rep
from loragate.acceptance.checks import group_samples, run_summary
from loragate.acceptance.plan import (
    DEFAULT_CONCURRENCY,
    DEFAULT_SEED,
    SAMPLED_TEMPERATURE,
    AdapterPlan,
    Baseline,
    SuitePlan,
    build_adapter_plan,
)
from loragate.acceptance.results import CheckResult
from loragate.acceptance.suite_process import (
    DEFAULT_SUITE_TIMEOUT_S,
    SuiteRun,
    run_suite,
)
from loragate.core import engine as eng
from loragate.core import settings
from loragate.core.contracts import Contract, ContractSet, load_contracts
from loragate.core.errors import GateError, LoragateError, UsageError
from loragate.core.processes import sigterm_as_interrupt

VERDICT_PROMOTE = "PROMOTE"
VERDICT_REJECT = "REJECT"
#: Exit codes of ``loragate gate``: PROMOTE, REJECT, interrupted (REJECT). Errors exit 2.
EXIT_PROMOTE, EXIT_REJECT, EXIT_INTERRUPTED = 0, 1, 130
@dataclass
class GateOptions:
    """Everything the gate takes, explicitly: nothing here is filled from the local stack or
    the demo build (the CLI layer, :mod:`loragate.cli.defaults`, does that for ``loragate gate``)."""

    endpoint: str
    adapter: str
    #: The adapters file (contracts); required.
    contracts: Path | None = None
    #: Held-out prompts (JSONL, inputs never used in training); required.
    prompts: Path | None = None
    long_prompts: Path | None = None
    report_dir: Path | None = None
    promote: bool = True
    promoted_dir: Path | None = None
    load: bool = False
    load_users: int = 4
    load_spawn_rate: float = 4.0
    load_duration_s: float = 30.0
    metrics_url: str | None = None
    load_into_engine: bool = False
    #: URL for the runtime LoRA API (``None``: the endpoint; through the proxy it needs the admin key).
    engine_url: str | None = None
    #: The adapter's folder as the engine sees it (``None``: the contract's path).
    engine_adapter_path: str | None = None
    admin_key: str | None = None
    api_key: str | None = None
    #: The engine's ``--max-lora-rank`` (``None``: not known) and where it was read.
    max_lora_rank: int | None = None
    max_lora_rank_source: str = "--max-lora-rank"
    #: Makes long-context probes from the held-out inputs when no ``long_prompts`` are given
    #: (:data:`loragate.acceptance.prompts.LengthenerFactory`), e.g. the demo's paper lengthener.
    lengthener: Any = None
    base_dir: Path | None = None
    baseline: str | None = None
    temperature: float = SAMPLED_TEMPERATURE
    seed: int = DEFAULT_SEED
    concurrency: int = DEFAULT_CONCURRENCY
    suite_timeout_s: float = DEFAULT_SUITE_TIMEOUT_S
    #: Run the diagnosis phase (``--no-diagnosis`` turns it off, unless the contract gates on it).
    diagnosis: bool = True


@dataclass
class GateResult:
    """A verdict and where its reports are."""

    adapter: str
    verdict: str
    reasons: list[str]
    notes: list[str]
    checks: list[CheckResult]
    timings: dict[str, float]
    report_dir: Path
    report: dict[str, Any]
    exit_code: int
    promotion: dict[str, Any] | None = None
    interrupted: bool = False

    @property
    def passed(self) -> bool:
        return self.verdict == VERDICT_PROMOTE

    @property
    def decision(self) -> str:
        return self.verdict

    def table(self) -> str:
        return rep.terminal_table(self.report)


class _Progress:
    def __init__(self, adapter: str, quiet: bool = False) -> None:
        self.t0 = time.monotonic()
        self.adapter = adapter
        self.quiet = quiet

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[gate {self.adapter} {time.monotonic() - self.t0:5.1f}s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- inputs


def resolve_rank_limit(options: GateOptions) -> "Any":
    """The served ``--max-lora-rank`` as the caller stated it, and where it was read."""
    from loragate.acceptance.static import RankLimit

    if options.max_lora_rank is not None:
        return RankLimit(options.max_lora_rank, options.max_lora_rank_source)
    return RankLimit(None, "not given (--max-lora-rank)")


def _required(value: Any, what: str) -> Path:
    if not value:
        raise GateError(f"no {what}")
    path = Path(value)
    if not path.is_file():
        raise GateError(f"{what} {path} does not exist")
    return path


def _when(iso: str) -> str:
    """A promotion time (ISO 8601) to the minute, in UTC."""
    try:
        return dt.datetime.fromisoformat(iso).astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        return iso


def choose_baseline(contract: Contract, engine: eng.EngineModels, folder: Path, choice: str | None) -> Baseline:
    """What the adapter is compared with (see :class:`Baseline`): ``choice`` is ``--baseline``
    (``NAME`` of a served adapter, ``base``, ``none``), or ``None`` to choose: this adapter's
    promoted version, else the adapter promoted last for the same task, else the base model.
    The note names it for the reports (``baseline: ...`` under the verdict)."""
    from loragate.acceptance.promotion import read_promoted

    if choice == "none":
        return Baseline("none", note="none (--baseline none): no regression checks")
    if choice == "base":
        return Baseline("base", contract.base_model,
                        note=f"the base model {contract.base_model} (--baseline base): runaway share only")
    if choice:
        if engine.get(choice) is None:
            raise GateError(f"--baseline {choice!r} is not served by {engine.endpoint}")
        return Baseline("promoted", choice, note=f"{choice} (--baseline {choice})")
    promoted = read_promoted(folder)
    if contract.name in promoted:
        entry = promoted[contract.name]
        return Baseline("record", contract.name, recorded=dict(entry.measured),
                        note=f"the promoted version of {contract.name} (promoted {_when(entry.promoted_at)}, "
                             f"sha256 {entry.sha256[:12]}): its recorded numbers")
    # the same task: the same prompt form through the same API, on the same base (a completions
    # adapter asked through the chat template, or the reverse, is no comparison)
    same_task = [e for e in promoted.values()
                 if e.prompt_template == contract.prompt_template and e.api == contract.api
                 and engine.get(e.name) is not None and e.base_model == contract.base_model]
    if same_task:
        latest = max(same_task, key=lambda e: e.promoted_at)
        return Baseline("promoted", latest.name, note=f"{latest.name} (promoted {_when(latest.promoted_at)}, same task)")
    return Baseline("base", contract.base_model,
                    note=f"the base model {contract.base_model} (nothing promoted for this task): runaway share only")


def make_suite_plan(endpoint: str, adapters: Sequence[str], *, contracts: str | os.PathLike[str],
                    prompts: str | os.PathLike[str], long_prompts: str | os.PathLike[str] | None = None,
                    concurrency: int | None = None, api_key: str | None = None,
                    temperature: float = SAMPLED_TEMPERATURE, seed: int = DEFAULT_SEED,
                    promoted_dir: Path | None = None, baseline: str | None = None,
                    lengthener: Any = None) -> SuitePlan:
    """A suite plan for several adapters (what ``pytest acceptance/loragate/acceptance/suite`` runs without ``--lg-plan``)."""
    endpoint = eng.normalize_endpoint(endpoint)
    contract_set = load_contracts(_required(contracts, "adapters file (--contracts)"))
    engine_models = eng.fetch_models(endpoint, api_key)
    plans = []
    for name in adapters:
        contract = contract_set[name]
        plans.append(plan_adapter(
            contract, contract_set, engine_models, endpoint=endpoint,
            prompts=_required(prompts, "held-out prompts (--prompts)"),
            long_prompts=Path(long_prompts) if long_prompts else None, api_key=api_key,
            temperature=temperature, seed=seed, lengthener=lengthener,
            baseline=choose_baseline(contract, engine_models, promoted_dir or settings.promoted_dir(), baseline),
        ))
    return SuitePlan(endpoint=endpoint, adapters=tuple(plans), concurrency=concurrency or DEFAULT_CONCURRENCY)


def plan_adapter(contract: Contract, contract_set: ContractSet, engine_models: eng.EngineModels, *, endpoint: str,
                 prompts: Path, long_prompts: Path | None, api_key: str | None, temperature: float, seed: int,
                 baseline: Baseline, lengthener: Any = None) -> AdapterPlan:
    """Read the prompts, size the probes with the engine's tokenizer, and plan every run."""
    from loragate.acceptance.prompts import chat_messages, choose_lengthener, read_prompts

    heldout = read_prompts(prompts, contract)
    longs = read_prompts(long_prompts, contract) if long_prompts else None
    max_model_len = engine_models.max_model_len(contract.name) or engine_models.max_model_len(contract.base_model)
    if not max_model_len:
        raise eng.EndpointError(f"the engine reports no max_model_len for {contract.name} or {contract.base_model}")
    client = httpx.Client(headers=eng.auth_headers(api_key))
    cache: dict[str, int] = {}

    def count(prompt: str) -> int:
        if prompt not in cache:
            if contract.is_chat:  # the conversation with the engine's chat template applied
                cache[prompt] = eng.tokenize_count(client, endpoint, contract.name, messages=chat_messages(prompt))
            else:
                cache[prompt] = eng.tokenize_count(client, endpoint, contract.name, prompt)
        return cache[prompt]

    try:
        chosen, source = choose_lengthener(contract, heldout, count, longs, lengthener)
        return build_adapter_plan(contract, contracts_file=str(contract_set.source), max_model_len=max_model_len,
                                  heldout=heldout, lengthener=chosen, probe_source=source,
                                  count_tokens=count, baseline=baseline, temperature=temperature, seed=seed)
    finally:
        client.close()


def _suite_completeness(plan: SuitePlan, run: SuiteRun) -> CheckResult:
    planned = plan.check_ids
    got = [c for c in planned if c in run.results]
    code = run.returncode
    how = (f"killed by signal {-code}" if code is not None and code < 0 else f"pytest exit code {code}")
    problems = []
    if run.interrupted:
        problems.append("the gate was interrupted")
    if run.timed_out:
        problems.append("the suite ran past its time limit")
    if len(got) < len(planned):
        problems.append(f"only {len(got)} of {len(planned)} planned checks reported ({how})")
    elif run.finished_status is None:
        problems.append(f"the suite did not finish ({how})")
    elif code not in (0, 1) or run.finished_status != code:
        problems.append(f"the suite ended abnormally ({how})")
    else:
        failed = any(r.failed_gate for r in run.results.values())
        if (code == 0) == failed:
            problems.append(f"pytest's exit code {code} disagrees with the checks it reported")
    if problems:
        return CheckResult(id="suite.complete", phase="suite", name="suite completed", passed=False, gating=True,
                           summary="suite completed: no; " + "; ".join(problems) + " (a partial suite never promotes)",
                           measured={"planned": len(planned), "reported": len(got), "returncode": code})
    return CheckResult(id="suite.complete", phase="suite", name="suite completed", passed=True, gating=True,
                       summary=f"suite completed: all {len(planned)} planned checks reported",
                       measured={"planned": len(planned), "reported": len(got), "returncode": code})


def _engine_answers(samples: Sequence[Any]) -> CheckResult:
    """Every request the suite sent got a completion. Failed requests already fail every rate
    check (fail closed); this check names the engine, not the adapter, as their cause."""
    failed = [s for s in samples if s.error is not None]
    measured = {"requests": len(samples), "failed": len(failed)}
    if not failed:
        return CheckResult(id="suite.engine_answers", phase="suite", name="engine answered", passed=True,
                           gating=True, summary=f"engine answered: all {len(samples)} requests", measured=measured)
    return CheckResult(id="suite.engine_answers", phase="suite", name="engine answered", passed=False, gating=True,
                       summary=f"engine answered: {len(samples) - len(failed)}/{len(samples)} requests; "
                               f"{len(failed)} failed (first: {failed[0].error}); the rates below count them as "
                               "failures, so they say nothing yet about the adapter", measured=measured)


# --------------------------------------------------------------------------- verdict


#: Causes, in the order reasons name them: the gate could not run, the static facts of the
#: adapter, the engine's refusals, then (suite) empty output, the outputs run by run (stopping,
#: then format, unless the format is the root cause), the regression against the baseline.
_PHASE_RANK = {"gate": 0, "static": 1, "diagnosis": 2, "suite": 3, "shadow": 3, "load": 4}


def _cause_rank(run: str, metric: str) -> int:
    if run == "suite":  # the engine's refusals, a suite that did not report every check
        return 0
    if metric == "non_empty":  # an empty answer fails every format check after it
        return 1
    if run in ("greedy", "sampled") or run.startswith("probe-"):
        return 2
    if run == "regression":
        return 3
    return 4


def _order_key(check: CheckResult, checks: Sequence[CheckResult]) -> tuple:
    if check.phase == "diagnosis":  # answer_not_learned before eos_not_learned, as the diagnosis names them
        return (_PHASE_RANK["diagnosis"], 0, 0, 0, [c.id for c in checks].index(check.id))
    """Root causes first (:func:`_cause_rank`); the adapter's runs greedy, sampled, then probes
    by length.

    Within a run the stop rate comes before JSON validity, unless the format is the root cause:
    when most invalid outputs do not begin with a valid answer that was then cut at the length
    limit, JSON validity is named first (for the regression checks: as on the greedy run they
    compare).
    """
    run, _, metric = check.id.partition(".")
    json_first = True
    outputs = "greedy" if run == "regression" else run
    json_check = next((c for c in checks if c.id == f"{outputs}.json_validity"), None)
    if json_check is not None:
        m = json_check.measured
        invalid = (m.get("n") or 0) - (m.get("successes") or 0)
        json_first = not (invalid and (m.get("prefix_json_valid_cut") or 0) * 2 >= invalid)
    metric_rank = {"json_validity": 0 if json_first else 1, "stop_rate": 1 if json_first else 0}.get(metric, 2)
    run_rank = {"greedy": 0, "sampled": 1}.get(run, 2)
    probe_len = int(run[len("probe-"):]) if run.startswith("probe-") and run[len("probe-"):].isdigit() else 0
    if check.id == "gate.load_into_engine":  # the engine refusing the load: after the static facts that explain it
        return (_PHASE_RANK["static"], 99, 0, 0, 0)
    return (_PHASE_RANK[check.phase], _cause_rank(run, metric), run_rank, probe_len, metric_rank)


def _long_inputs_only(check: CheckResult, checks: Sequence[CheckResult]) -> list[str]:
    """For a failed long-context probe: the held-out runs' checks of the same metric, when every
    one of them passed (the failure is then on long inputs only); else ``[]``."""
    run, _, metric = check.id.partition(".")
    if not run.startswith("probe-"):
        return []
    held_out = [c for c in checks if c.id in (f"greedy.{metric}", f"sampled.{metric}")]
    return [c.id for c in held_out] if held_out and all(c.passed for c in held_out) else []


def _reason(check: CheckResult, checks: Sequence[CheckResult]) -> str:
    text = check.summary + (f" ({check.detail})" if check.detail else "")
    passed_short = _long_inputs_only(check, checks)
    if passed_short:
        text += f"; fails only on long inputs: {' and '.join(passed_short)} passed on the held-out prompts"
    return text


def _is_finding(check: CheckResult) -> bool:
    """A diagnosis finding: a cause the engine's likelihoods name (gating or not)."""
    return check.phase == "diagnosis" and not check.passed and check.id != "diagnosis.available"


def decide(checks: Sequence[CheckResult]) -> tuple[str, list[str], list[str]]:
    """``(verdict, reasons, notes)``: PROMOTE only when no gating check failed. The reasons of a
    REJECT begin with the diagnosis' findings (gating or not: they are the cause of the failures
    after them), after any static failure or failure of the gate itself."""
    failed = [c for c in checks if c.failed_gate]
    if failed:
        failed = sorted({id(c): c for c in [*failed, *(c for c in checks if _is_finding(c))]}.values(),
                        key=lambda c: _order_key(c, checks))
    reasons = [_reason(c, checks) for c in failed]
    notes = [c.summary + (f" ({c.detail})" if c.detail else "") for c in checks if c.warning and c not in failed]
    if not checks:
        return VERDICT_REJECT, ["nothing was checked"], notes
    return (VERDICT_REJECT if failed else VERDICT_PROMOTE), reasons, notes


def _gate_check(id_: str, name: str, summary: str) -> CheckResult:
    return CheckResult(id=id_, phase="gate", name=name, passed=False, gating=True, summary=summary)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def default_report_dir(adapter: str) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return settings.reports_dir() / f"{stamp}-{adapter}"


@dataclass
class _Run:
    """One gate run as it goes: its inputs, then what each phase found."""

    options: GateOptions
    endpoint: str
    contract_set: ContractSet
    contract: Contract
    prompts: Path
    folder: Path
    promoted_folder: Path
    api_key: str | None
    admin_key: str | None
    progress: Callable[[str], None]
    timings: dict[str, float] = field(default_factory=dict)
    checks: list[CheckResult] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    engine_info: dict[str, Any] = field(default_factory=dict)
    models: eng.EngineModels | None = None
    plan: AdapterPlan | None = None
    baseline: Baseline | None = None
    diagnosis: Any = None
    loaded_here: bool = False
    #: a loaded adapter that was promoted stays served (the promoted set serves it)
    keep_loaded: bool = False
    phase: str = ""

    @property
    def rejected(self) -> bool:
        return any(c.failed_gate for c in self.checks)

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """The one timing wrapper: ``timings[name]`` gets the phase's seconds, however it ends."""
        self.phase, t0 = name, time.monotonic()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.monotonic() - t0, 2)


def _preflight(run: _Run) -> None:
    """The engine, and the adapter on it (loaded at run time when asked)."""
    contract, endpoint = run.contract, run.endpoint
    run.progress(f"preflight: {endpoint}/v1/models")
    try:
        run.models = eng.fetch_models(endpoint, run.api_key)
    except eng.EndpointError as exc:
        run.checks.append(_gate_check("gate.endpoint", "endpoint", f"endpoint: {exc}"))
        return
    if run.options.load_into_engine and run.models.get(contract.name) is None:
        admin_url = eng.normalize_endpoint(run.options.engine_url) if run.options.engine_url else endpoint
        path = run.options.engine_adapter_path or str(contract.path)
        run.progress(f"preflight: loading {contract.name} from {path} through {admin_url}/v1/load_lora_adapter")
        try:
            eng.load_adapter(admin_url, contract.name, path, admin_key=run.admin_key)
            run.loaded_here = True
            run.models = eng.fetch_models(endpoint, run.api_key)
        except eng.EndpointError as exc:
            run.checks.append(_gate_check("gate.load_into_engine", "runtime load", f"runtime load: {exc}"))
    models = run.models
    base = models.get(contract.base_model)
    run.engine_info = {"endpoint": endpoint, "base_model": contract.base_model, "base_root": base.root if base else None,
                       "max_model_len": models.max_model_len(contract.name) or models.max_model_len(contract.base_model),
                       "adapters": [m.id for m in models.adapters], "loaded_by_gate": run.loaded_here}


def _static(run: _Run) -> None:
    """Static checks (base model, rank, target modules, tokenizer, lengths)."""
    from loragate.acceptance.static import StaticInputs, run_static_checks

    assert run.models is not None
    limit = resolve_rank_limit(run.options)
    run.engine_info["max_lora_rank"] = limit.value
    run.engine_info["max_lora_rank_source"] = limit.source
    run.checks += run_static_checks(StaticInputs(
        contract=run.contract, engine=run.models, rank_limit=limit,
        base_dir=Path(run.options.base_dir) if run.options.base_dir else None,
        engine_adapter_path=run.options.engine_adapter_path,
    ), run.progress)
    if run.rejected:
        run.checks.append(CheckResult(id="suite.complete", phase="suite", name="suite completed", passed=False,
                                      gating=True, summary="suite completed: not run, a static check failed"))


def _plan(run: _Run) -> None:
    """Held-out prompts, long-context probes sized with the engine's tokenizer, the baseline."""
    assert run.models is not None
    run.progress("plan: held-out prompts, long-context probes sized with the engine's tokenizer")
    options = run.options
    run.baseline = choose_baseline(run.contract, run.models, run.promoted_folder, options.baseline)
    try:
        run.plan = plan_adapter(run.contract, run.contract_set, run.models, endpoint=run.endpoint, prompts=run.prompts,
                                long_prompts=Path(options.long_prompts) if options.long_prompts else None,
                                api_key=run.api_key, temperature=options.temperature, seed=options.seed,
                                baseline=run.baseline, lengthener=options.lengthener)
    except eng.EndpointError as exc:
        run.checks.append(_gate_check("gate.plan", "plan", f"plan: {exc}"))


def _diagnose(run: _Run) -> None:
    """The diagnosis (:mod:`loragate.acceptance.diagnosis`) on the held-out prompts' references."""
    from loragate.acceptance import diagnosis as dg

    assert run.plan is not None and run.models is not None and run.baseline is not None
    run.diagnosis = dg.diagnose_adapter(
        run.contract, run.endpoint, run.prompts, run.models, baseline=run.baseline,
        base_dir=Path(run.options.base_dir) if run.options.base_dir else None, api_key=run.api_key,
        progress=run.progress)
    run.checks += dg.diagnosis_checks(run.contract, run.diagnosis)


def _suite(run: _Run) -> None:
    """The acceptance suite on the plan, in its pytest child (:mod:`loragate.acceptance.suite_process`)."""
    from loragate.acceptance.runner import read_samples

    assert run.plan is not None
    suite_plan = SuitePlan(endpoint=run.endpoint, adapters=(run.plan,), concurrency=run.options.concurrency)
    suite = run_suite(suite_plan, run.folder, api_key=run.api_key, timeout_s=run.options.suite_timeout_s,
                      progress=run.progress)
    run.checks += [suite.results[i] for i in suite_plan.check_ids if i in suite.results]
    run.checks.append(_suite_completeness(suite_plan, suite))
    answered = read_samples(run.folder / "samples.jsonl")
    run.checks.append(_engine_answers(answered))
    samples = group_samples(answered).get(run.contract.name, {})
    run.runs = [run_summary(r, samples.get(r.id, []), run.contract.expects_json) for r in run.plan.runs]
    if suite.interrupted:
        raise KeyboardInterrupt


def _load(run: _Run) -> None:
    """The load test against the contract's SLOs (``--load``); not run for an adapter rejected already."""
    if run.rejected:
        run.checks.append(CheckResult(id="load.slo", phase="load", name="load SLOs", passed=False, gating=True,
                                      summary="load SLOs: not run, the adapter is rejected already"))
        return
    run.checks.append(_run_load(run.options, run.endpoint, run.contract, run.plan, run.folder, run.progress))


#: The gate's phases in order, each with when it runs.
PHASES: tuple[tuple[str, Callable[[_Run], bool], Callable[[_Run], None]], ...] = (
    ("preflight", lambda run: True, _preflight),
    ("static", lambda run: run.models is not None, _static),
    ("plan", lambda run: run.models is not None and not run.rejected, _plan),
    ("diagnosis", lambda run: run.plan is not None and (run.options.diagnosis or run.contract.gate_on_diagnosis),
     _diagnose),
    ("suite", lambda run: run.plan is not None, _suite),
    ("load", lambda run: run.options.load, _load),
)


def run_gate(options: GateOptions, *, quiet: bool = False) -> GateResult:
    """Gate one adapter (see the module docstring): the :data:`PHASES`, a verdict, the reports,
    the promotion. Raises :class:`LoragateError` only for problems with the gate's own inputs or
    outputs (contracts, prompts, report folder)."""
    started_at = _now()
    t_total = time.monotonic()
    contract_set = load_contracts(_required(options.contracts, "adapters file: pass --contracts FILE"))
    contract = contract_set[options.adapter]
    check_usage(options, contract)
    run = _Run(
        options=options, endpoint=eng.normalize_endpoint(options.endpoint), contract_set=contract_set,
        contract=contract,
        prompts=_required(options.prompts, "held-out prompts: pass --prompts JSONL (inputs never used in training)"),
        folder=rep.prepare_dir(Path(options.report_dir) if options.report_dir else default_report_dir(contract.name)),
        promoted_folder=Path(options.promoted_dir).resolve() if options.promoted_dir else settings.promoted_dir(),
        api_key=eng.key_from_env(options.api_key, eng.API_KEY_ENV),
        admin_key=eng.key_from_env(options.admin_key, eng.ADMIN_KEY_ENV),
        progress=_Progress(options.adapter, quiet),
    )
    try:
        return _gate_and_report(run, options, started_at, t_total)
    except BaseException:
        # whatever stops the run (a bad prompts file, an unwritable report, an interrupt while
        # reporting), an adapter the gate loaded does not stay served
        if run.loaded_here and not run.keep_loaded:
            _unload_quietly(options, run.endpoint, contract.name, run.admin_key, run.progress)
        raise


def run_diagnosis(options: GateOptions, *, n: int | None = None, quiet: bool = False) -> Any:
    """``loragate diagnose``: the gate's diagnosis phase alone, on an adapter the endpoint serves
    (:mod:`loragate.acceptance.diagnosis`), compared with the baseline the gate would choose."""
    from loragate.acceptance import diagnosis as dg

    contract = load_contracts(_required(options.contracts, "adapters file: pass --contracts FILE"))[options.adapter]
    prompts = _required(options.prompts, "held-out prompts: pass --prompts JSONL")
    endpoint = eng.normalize_endpoint(options.endpoint)
    api_key = eng.key_from_env(options.api_key, eng.API_KEY_ENV)
    models = eng.fetch_models(endpoint, api_key)
    if models.get(contract.name) is None:
        names = ", ".join(m.id for m in models.adapters) or "none"
        raise UsageError(f"{options.endpoint} does not serve adapter {contract.name!r} (it serves: {names})")
    folder = Path(options.promoted_dir).resolve() if options.promoted_dir else settings.promoted_dir()
    baseline = choose_baseline(contract, models, folder, options.baseline)
    return dg.diagnose_adapter(contract, endpoint, prompts, models, baseline=baseline,
                               base_dir=Path(options.base_dir) if options.base_dir else None, api_key=api_key,
                               limit=n or dg.DEFAULT_DIAGNOSIS_PROMPTS, progress=_Progress(contract.name, quiet))


def check_usage(options: GateOptions, contract: Contract) -> None:
    """Mistakes of the command itself, found before anything touches the engine: each raises
    :class:`UsageError` (exit 2), never a verdict, so a CI script can tell a bad command from a
    bad adapter."""
    if options.max_lora_rank is None:
        raise UsageError(f"the engine's --max-lora-rank is not known ({options.max_lora_rank_source}): pass "
                         "--max-lora-rank N, the value vllm serve runs with")
    for flag, value in (("--engine-url", options.engine_url), ("--engine-adapter-path", options.engine_adapter_path)):
        if value and not options.load_into_engine:
            raise UsageError(f"{flag} is for --load-into-engine, which was not given")
    if options.load_into_engine:
        return
    try:
        models = eng.fetch_models(eng.normalize_endpoint(options.endpoint),
                                  eng.key_from_env(options.api_key, eng.API_KEY_ENV))
    except eng.EndpointError:
        return  # an unreachable endpoint is the preflight's to report (and a REJECT: fail closed)
    if models.get(contract.name) is None:
        names = ", ".join(m.id for m in models.adapters) or "none"
        raise UsageError(f"{options.endpoint} does not serve adapter {contract.name!r} (it serves: {names}); "
                         "pass --load-into-engine to load it from its contract's path for this run, or serve it")


def _gate_and_report(run: _Run, options: GateOptions, started_at: str, t_total: float) -> GateResult:
    """The phases, the verdict, the reports and the promotion of one gate run."""
    contract, contract_set = run.contract, run.contract_set
    interrupted = False
    with sigterm_as_interrupt():
        try:
            for name, when, step in PHASES:
                if when(run):
                    with run.timed(name):
                        step(run)
        except KeyboardInterrupt:
            interrupted = True
            run.progress("interrupted: stopping, the verdict is REJECT")
            run.checks.append(_gate_check(
                "gate.interrupted", "interrupted",
                f"interrupted during {run.phase}: the gate did not finish; a partial gate never promotes"))

    # ---- verdict and reports
    t_report = time.monotonic()
    verdict, reasons, notes = decide(run.checks)
    run.timings["total"] = round(time.monotonic() - t_total, 2)
    report = rep.gate_report(
        adapter=contract.name, verdict=verdict, reasons=reasons, notes=notes, endpoint=run.endpoint,
        started_at=started_at, finished_at=_now(), interrupted=interrupted, contract_set=contract_set,
        contract=contract, engine=run.engine_info, baseline=dataclasses.asdict(run.baseline) if run.baseline else None,
        runs=run.runs, sampling={"temperature": options.temperature, "seed": options.seed,
                                 "concurrency": options.concurrency},
        probe_source=run.plan.probe_source if run.plan else None, checks=run.checks, timings=run.timings,
        folder=run.folder, diagnosis=run.diagnosis.to_dict() if run.diagnosis is not None else None)
    exit_code = EXIT_PROMOTE if verdict == VERDICT_PROMOTE else (EXIT_INTERRUPTED if interrupted else EXIT_REJECT)
    _write_reports(report, run.folder)
    run.timings["report"] = round(time.monotonic() - t_report, 2)

    promotion = None
    if verdict == VERDICT_PROMOTE and options.promote:
        with run.timed("promotion"):
            promotion, failed = _promote(run, report)
        if failed:
            exit_code = 2
        report["promotion"] = promotion
        _write_reports(report, run.folder)  # the report now names the record (or the failure)
    run.keep_loaded = bool(promotion and promotion.get("record"))
    if run.loaded_here and not run.keep_loaded:
        # Loaded for this run only: an adapter that was not promoted is not left serving.
        _unload_quietly(options, run.endpoint, contract.name, run.admin_key, run.progress)
        run.loaded_here = False
    return GateResult(adapter=contract.name, verdict=verdict, reasons=reasons, notes=notes, checks=run.checks,
                      timings=run.timings, report_dir=run.folder, report=report, exit_code=exit_code,
                      promotion=promotion, interrupted=interrupted)


def _promote(run: _Run, report: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """Record the promotion and update the promoted set: (what to report, whether it failed)."""
    from loragate.acceptance.promotion import promote

    try:
        done = promote(run.contract, adapters_dir=run.contract_set.adapters_dir, folder=run.promoted_folder,
                       thresholds=report["thresholds"], measured=_measured_numbers(run.checks),
                       checks=[c.to_dict() for c in run.checks if c.gating], smoke_prompt=_smoke_prompt(run.plan),
                       report=str(run.folder / "report.json"), endpoint=run.endpoint)
    except LoragateError as exc:
        return {"error": str(exc)}, True
    except OSError as exc:
        return {"error": f"cannot write the promoted set: {exc}"}, True
    run.progress(f"promoted: {done.record_path}")
    return done.to_dict(), False


def _write_reports(report: Mapping[str, Any], folder: Path) -> None:
    rep.write_file(folder / "report.json", rep.to_json(report))
    rep.write_file(folder / "junit.xml", rep.to_junit(report))
    rep.write_file(folder / "report.html", rep.to_html(report))


def _unload_quietly(options: GateOptions, endpoint: str, name: str, admin_key: str | None,
                    progress: Callable[[str], None]) -> None:
    admin_url = eng.normalize_endpoint(options.engine_url) if options.engine_url else endpoint
    try:
        eng.unload_adapter(admin_url, name, admin_key=admin_key)
        progress(f"unloaded {name}: it was loaded for this gate run and was not promoted")
    except eng.EndpointError as exc:
        progress(f"warning: could not unload {name}: {exc}")


def _measured_numbers(checks: Sequence[CheckResult]) -> dict[str, float]:
    """Rates of the suite's checks for the promotion record; greedy rates also under their metric name."""
    out: dict[str, float] = {}
    for c in checks:
        if c.phase == "suite" and "rate" in c.measured:
            out[c.id] = float(c.measured["rate"])
            if c.id.startswith("greedy."):
                out[c.id.split(".", 1)[1]] = float(c.measured["rate"])
    return out


def _smoke_prompt(plan: AdapterPlan | None) -> str | None:
    if plan is None:
        return None
    greedy = plan.run("greedy")
    return greedy.requests[0].prompt if greedy.requests else None


def _run_load(options: GateOptions, endpoint: str, contract: Contract, plan: AdapterPlan | None, folder: Path,
              progress: Callable[[str], None]) -> CheckResult:
    try:
        from loragate.loadtest.runner import run_load
    except ImportError as exc:
        raise GateError(f"--load needs loragate.loadtest.runner.run_load, which cannot be imported: {exc}") from None
    prompts = [q.prompt for q in plan.run("greedy").requests] if plan else []
    metrics_url = options.metrics_url
    progress(f"load: {options.load_users} users for {options.load_duration_s:.0f}s")
    try:
        result = run_load(endpoint, contract.name, contract, prompts, users=options.load_users,
                          spawn_rate=options.load_spawn_rate, duration_s=options.load_duration_s,
                          metrics_url=metrics_url, report_dir=folder / "load")
    except LoragateError as exc:
        return CheckResult(id="load.slo", phase="load", name="load SLOs", passed=False, gating=True,
                           summary=f"load SLOs: the load test could not run: {exc}")
    summary = ("load SLOs: all met" if result.passed else "load SLOs: " + "; ".join(result.breaches))
    return CheckResult(id="load.slo", phase="load", name="load SLOs", passed=bool(result.passed), gating=True,
                       summary=summary, measured=result.to_dict())
