"""``loragate gate --shadow``: a candidate adapter's verdict from what it answered to live traffic.

The proxy's shadows (:mod:`loragate.server.shadow`) send a sampled share of a live adapter's
requests to the candidate as well, judge the candidate's answers with the gate's judging (by the
candidate's contract) and count them in the ``loragate_shadow_*`` series. This gate reads those
counters, from one proxy's ``/metrics`` or from Prometheus (``sum`` over every replica), and
decides with the candidate's contract bars:

- ``shadow.sample_size``: at least as many judged shadow answers (and paired answers) as the bars
  need to be shown at all (:func:`required_shadow_n`); fewer: REJECT (fail closed);
- ``shadow.stop_rate``, ``shadow.json_validity`` (a JSON contract): the Wilson lower bound clears
  the contract's bar; ``shadow.runaway_rate``: the Wilson upper bound of the share cut at
  ``max_tokens`` stays under ``max_runaway_rate``. A shadow the engine did not answer counts as a
  failure on each (as a failed request does in the suite);
- ``shadow.paired_stop_rate`` (and ``shadow.paired_json_validity`` when both adapters' contracts
  expect JSON): on the same requests, the difference candidate minus live with its 95% interval
  by Newcombe's hybrid score method for paired proportions (:class:`~loragate.core.stats.PairedDifference`);
  met when the interval's lower bound is at or above ``-max_regression`` (the candidate is shown to
  be no worse than the live adapter by more than the contract allows).

The counters are totals since each proxy started (Prometheus: the sum of what every replica
exports now); a proxy restart starts them again, so the gate judges what the running proxies saw.
The reports and the promotion record are the gate's (:mod:`loragate.acceptance.report`,
:mod:`loragate.acceptance.promotion`); ``report.json`` has the counts read under ``shadow``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import httpx
from prometheus_client.parser import text_string_to_metric_families

from loragate.acceptance import report as rep
from loragate.acceptance.results import CheckResult
from loragate.core import metric_names as names
from loragate.core import settings
from loragate.core.contracts import Contract, load_contracts
from loragate.core.errors import GateError, LoragateError, UsageError
from loragate.core.stats import (
    PairedDifference,
    Rate,
    meets_ceiling,
    meets_floor,
    required_n_ceiling,
    required_n_floor,
    required_n_paired,
)

#: Counters the gate reads, by what it keeps of their labels (besides ``candidate`` and ``live``).
_SERIES = {
    names.SHADOW_REQUESTS: ("outcome",),
    names.SHADOW_COMPLETIONS: ("finish_reason",),
    names.SHADOW_LENGTH_CUTOFFS: ("cause",),
    names.SHADOW_JSON_OUTPUTS: ("result",),
    names.SHADOW_PAIRED: ("metric", "pair"),
}


@dataclass
class ShadowCounts:
    """One (candidate, live) pair's shadow counters: ``{series: {label values: count}}``."""

    live: str
    series: dict[str, dict[tuple[str, ...], float]] = field(default_factory=dict)

    def get(self, series: str, *labels: str) -> int:
        return int(round(self.series.get(series, {}).get(labels, 0.0)))

    def total(self, series: str) -> int:
        return int(round(sum(self.series.get(series, {}).values())))

    def paired(self, metric: str) -> PairedDifference:
        """The candidate as the first rate, the live adapter as the second."""
        g = lambda pair: self.get(names.SHADOW_PAIRED, metric, pair)  # noqa: E731
        return PairedDifference(g("both"), g("candidate_only"), g("live_only"), g("neither"))

    def to_dict(self) -> dict[str, Any]:
        return {"live": self.live, "series": {s: {",".join(k): v for k, v in sorted(vals.items())}
                                              for s, vals in sorted(self.series.items())}}


def _add(out: dict[str, ShadowCounts], live: str, series: str, key: tuple[str, ...], value: float) -> None:
    counts = out.setdefault(live, ShadowCounts(live))
    bucket = counts.series.setdefault(series, {})
    bucket[key] = bucket.get(key, 0.0) + value


def read_metrics_text(text: str, candidate: str) -> dict[str, ShadowCounts]:
    """The candidate's shadow counters in a Prometheus exposition, by live adapter."""
    out: dict[str, ShadowCounts] = {}
    wanted = {names.total(s): s for s in _SERIES}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            series = wanted.get(s.name)
            if series is None or s.labels.get("candidate") != candidate:
                continue
            _add(out, s.labels.get("live", ""), series, tuple(s.labels.get(k, "") for k in _SERIES[series]), s.value)
    return out


def _promql_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def read_prometheus(url: str, candidate: str, *, timeout_s: float = 30.0,
                    headers: Mapping[str, str] | None = None) -> dict[str, ShadowCounts]:
    """The candidate's shadow counters summed over every replica Prometheus scrapes, by live adapter."""
    out: dict[str, ShadowCounts] = {}
    api = url.rstrip("/") + "/api/v1/query"
    with httpx.Client(timeout=timeout_s, headers=dict(headers or {})) as client:
        for series, labels in _SERIES.items():
            query = (f"sum by (live, {', '.join(labels)}) "
                     f"({names.total(series)}{{candidate={_promql_string(candidate)}}})")
            try:
                resp = client.get(api, params={"query": query})
                resp.raise_for_status()
                data = resp.json()
                if data.get("status") != "success":
                    raise ValueError(data.get("error") or "status is not success")
                for item in data["data"]["result"]:
                    metric = item["metric"]
                    _add(out, metric.get("live", ""), series, tuple(metric.get(k, "") for k in labels),
                         float(item["value"][1]))
            except (httpx.HTTPError, ValueError, KeyError, TypeError, IndexError) as exc:
                raise GateError(f"cannot read {names.total(series)} from Prometheus at {url}: {exc}") from None
    return out


def read_proxy_metrics(url: str, candidate: str, *, timeout_s: float = 30.0,
                       headers: Mapping[str, str] | None = None) -> dict[str, ShadowCounts]:
    try:
        resp = httpx.get(url, timeout=timeout_s, headers=dict(headers or {}))
        resp.raise_for_status()
    except httpx.HTTPError as exc:
        raise GateError(f"cannot read the proxy's metrics at {url}: {exc}") from None
    return read_metrics_text(resp.text, candidate)


def required_shadow_n(contract: Contract, live_json: bool) -> dict[str, int]:
    """The fewest judged shadow answers (``answers``) and paired answers (``pairs``) that let a
    perfect candidate meet every bar: the Wilson bars' sample sizes, and for the paired
    comparison the pairs whose all-concordant run has a lower bound at ``-max_regression``."""
    t = contract.thresholds
    answers = [required_n_floor(t.stop_rate), required_n_ceiling(t.max_runaway_rate)]
    if contract.expects_json:
        answers.append(required_n_floor(t.json_validity))
    return {"answers": max(answers), "pairs": required_n_paired(t.max_regression)}


def _floor_check(id_: str, name: str, rate: Rate, bar: float, failed: int) -> CheckResult:
    passed = meets_floor(rate.successes, rate.n, bar)
    failed_note = f" ({failed} shadow(s) the engine did not answer counted as failures)" if failed else ""
    return CheckResult(id=id_, phase="shadow", name=name, passed=passed, gating=True,
                       summary=f"{name} (shadowed live requests): {rate.describe()}; bar {bar:.0%} on the 95% lower "
                               f"bound: {'met' if passed else 'NOT met'}{failed_note}",
                       measured={**rate.to_dict(), "failed_shadows": failed}, bar={"kind": "floor", "value": bar})


def _paired_check(id_: str, name: str, diff: PairedDifference, live: str, max_drop: float) -> CheckResult:
    low, high = diff.interval
    passed = diff.n > 0 and low >= -max_drop - 1e-12
    summary = (f"{name} vs live {live} (same requests): candidate {diff.first.describe()}, live "
               f"{diff.second.describe()}; difference {diff.value:+.1%} [95% CI {low:+.1%} to {high:+.1%}, Newcombe "
               f"paired]; allowed drop {max_drop:.0%} on the lower bound: {'met' if passed else 'NOT met'}")
    return CheckResult(id=id_, phase="shadow", name=name, passed=passed, gating=True, summary=summary,
                       measured=diff.to_dict(), bar={"kind": "max_drop", "value": max_drop})


def shadow_checks(contract: Contract, live: Contract | None, counts: ShadowCounts) -> list[CheckResult]:
    """The checks of one candidate on one live adapter's shadow counters (module docstring)."""
    t = contract.thresholds
    c = counts
    failed = sum(c.get(names.SHADOW_REQUESTS, o) for o in ("upstream_error", "refused", "invalid_response"))
    answers = c.total(names.SHADOW_COMPLETIONS)
    n = answers + failed
    live_json = bool(live and live.expects_json)
    need = required_shadow_n(contract, live_json)
    stop = c.paired("stop")
    checks = []
    short = []
    if n < need["answers"]:
        short.append(f"{n} judged shadow answers, the bars need at least {need['answers']}")
    if stop.n < need["pairs"]:
        short.append(f"{stop.n} paired answers, the comparison with {c.live} needs at least {need['pairs']}")
    skipped = c.get(names.SHADOW_REQUESTS, "skipped")
    measured = {"answers": n, "pairs": stop.n, "required": need, "skipped": skipped, "failed_shadows": failed}
    checks.append(CheckResult(
        id="shadow.sample_size", phase="shadow", name="shadow sample size", passed=not short, gating=True,
        summary=("shadow sample size: " + ("; ".join(short) + " (too few to show the bars: fail closed)" if short
                                          else f"{n} judged answers, {stop.n} paired (need {need['answers']} "
                                               f"and {need['pairs']})")
                 + (f"; {skipped} sampled request(s) skipped at max_in_flight" if skipped else "")),
        measured=measured))
    checks.append(_floor_check("shadow.stop_rate", "stop rate",
                               Rate(c.get(names.SHADOW_COMPLETIONS, "stop"), n), t.stop_rate, failed))
    if contract.expects_json:
        valid = c.get(names.SHADOW_JSON_OUTPUTS, "valid")
        checks.append(_floor_check("shadow.json_validity", "JSON validity",
                                   Rate(valid, c.total(names.SHADOW_JSON_OUTPUTS) + failed), t.json_validity, failed))
    runaway = Rate(c.get(names.SHADOW_LENGTH_CUTOFFS, "max_tokens") + failed, n)
    passed = meets_ceiling(runaway.successes, runaway.n, t.max_runaway_rate)
    checks.append(CheckResult(
        id="shadow.runaway_rate", phase="shadow", name="runaway share", passed=passed, gating=True,
        summary=f"runaway share (shadowed live requests): {runaway.describe()} end exactly at max_tokens; ceiling "
                f"{t.max_runaway_rate:.0%} on the 95% upper bound: {'met' if passed else 'NOT met'}",
        measured=runaway.to_dict(), bar={"kind": "ceiling", "value": t.max_runaway_rate}))
    checks.append(_paired_check("shadow.paired_stop_rate", "stop rate difference", stop, c.live, t.max_regression))
    if contract.expects_json and live_json:
        checks.append(_paired_check("shadow.paired_json_validity", "JSON validity difference",
                                    c.paired("json_valid"), c.live, t.max_regression))
    return checks


@dataclass
class ShadowGateOptions:
    """What ``loragate gate --shadow`` takes."""

    adapter: str
    contracts: Path
    #: One proxy's ``/metrics`` URL, or (``prometheus``) a Prometheus base URL: exactly one.
    metrics_url: str | None = None
    prometheus_url: str | None = None
    #: The live adapter the candidate shadows (``None``: the only one it shadows).
    live: str | None = None
    report_dir: Path | None = None
    promote: bool = True
    promoted_dir: Path | None = None
    #: Sent as ``Authorization: Bearer`` to the metrics source (a proxy without public metrics).
    api_key: str | None = None


def run_shadow_gate(options: ShadowGateOptions, *, quiet: bool = False) -> Any:
    """The candidate's verdict from its shadow counters, with the gate's reports and promotion."""
    from loragate.acceptance import gate as g

    started_at, t0 = g._now(), time.monotonic()
    contract_set = load_contracts(options.contracts)
    if options.adapter not in contract_set:
        raise UsageError(f"{options.adapter!r} is not an adapter of {options.contracts}")
    contract = contract_set[options.adapter]
    if bool(options.metrics_url) == bool(options.prometheus_url):
        raise UsageError("--shadow reads one source: pass --metrics-url (a proxy's /metrics) or --prometheus URL")
    source = str(options.metrics_url or options.prometheus_url)
    progress = g._Progress(contract.name, quiet)
    folder = rep.prepare_dir(Path(options.report_dir) if options.report_dir else g.default_report_dir(contract.name))
    headers = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else None
    checks: list[CheckResult] = []
    counts: ShadowCounts | None = None
    progress(f"shadow: reading {contract.name}'s shadow counters from {source}")
    try:
        by_live = (read_proxy_metrics(source, contract.name, headers=headers) if options.metrics_url
                   else read_prometheus(source, contract.name, headers=headers))
    except GateError as exc:
        by_live = {}
        checks.append(g._gate_check("gate.shadow_source", "shadow counters", f"shadow counters: {exc}"))
    if not checks:
        lives = sorted(by_live)
        if options.live is not None:
            lives = [x for x in lives if x == options.live]
        if len(lives) > 1:
            raise UsageError(f"{contract.name} shadows several live adapters ({', '.join(lives)}): pass --live NAME")
        if not lives:
            checks.append(g._gate_check(
                "gate.shadow_source", "shadow counters",
                f"shadow counters: {source} has no shadow series of {contract.name}"
                + (f" shadowing {options.live}" if options.live else "") + " (no proxy shadows it)"))
        else:
            counts = by_live[lives[0]]
            live_contract = contract_set[counts.live] if counts.live in contract_set else None
            checks += shadow_checks(contract, live_contract, counts)
    verdict, reasons, notes = g.decide(checks)
    timings = {"shadow": round(time.monotonic() - t0, 2), "total": round(time.monotonic() - t0, 2)}
    report = rep.gate_report(
        adapter=contract.name, verdict=verdict, reasons=reasons, notes=notes, endpoint=source, started_at=started_at,
        finished_at=g._now(), interrupted=False, contract_set=contract_set, contract=contract,
        engine={"shadow_source": source}, baseline={"kind": "live", "model": counts.live if counts else options.live,
                                                    "note": "the live adapter, on the same requests"},
        runs=[], sampling={"mode": "shadow"}, probe_source=None, checks=checks, timings=timings, folder=folder)
    report["shadow"] = counts.to_dict() if counts is not None else None
    exit_code = g.EXIT_PROMOTE if verdict == g.VERDICT_PROMOTE else g.EXIT_REJECT
    g._write_reports(report, folder)
    promotion = None
    if verdict == g.VERDICT_PROMOTE and options.promote:
        promotion, failed = _promote(contract, contract_set.adapters_dir, options, report, checks, folder, source)
        if failed:
            exit_code = 2
        else:
            progress(f"promoted: {promotion['record']}")
        report["promotion"] = promotion
        g._write_reports(report, folder)
    return g.GateResult(adapter=contract.name, verdict=verdict, reasons=reasons, notes=notes, checks=checks,
                        timings=timings, report_dir=folder, report=report, exit_code=exit_code, promotion=promotion)


def _promote(contract: Contract, adapters_dir: Path, options: ShadowGateOptions, report: Mapping[str, Any],
             checks: list[CheckResult], folder: Path, source: str) -> tuple[dict[str, Any], bool]:
    from loragate.acceptance.promotion import promote

    measured: dict[str, float] = {}
    for c in checks:
        if "rate" in c.measured:
            measured[c.id] = float(c.measured["rate"])
            if c.id in ("shadow.stop_rate", "shadow.json_validity"):
                measured[c.id.split(".", 1)[1]] = float(c.measured["rate"])
    try:
        done = promote(contract, adapters_dir=adapters_dir,
                       folder=Path(options.promoted_dir).resolve() if options.promoted_dir else settings.promoted_dir(),
                       thresholds=report["thresholds"], measured=measured,
                       checks=[c.to_dict() for c in checks if c.gating], smoke_prompt=None,
                       report=str(folder / "report.json"), endpoint=source)
    except LoragateError as exc:
        return {"error": str(exc)}, True
    except OSError as exc:
        return {"error": f"cannot write the promoted set: {exc}"}, True
    return done.to_dict(), False

