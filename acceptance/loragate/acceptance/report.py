"""The gate's reports: JSON, JUnit XML, a terminal table and a self-contained HTML page.

Files of one gate run (all in its report folder)::

    report.json     the verdict, reasons with numbers, every check, runs, the baseline, timings {phase: s}
    junit.xml       one test case per check (gating failures are failures) and one for the verdict
    report.html     summary, chart of stop rate and JSON validity per input length, every check
    plan.json       what the suite was asked to send; samples.jsonl every judged completion
    suite.xml       the pytest suite's own JUnit XML; suite.log its output

Every file is written atomically; a write that fails raises :class:`ReportError` (the gate
then exits non-zero and promotes nothing).
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from loragate.core.errors import GateError

#: Colours of the chart's adapters, in order.
PALETTE = ("#1b7f3b", "#b3261e", "#8a5a00", "#1d4ed8", "#6b21a8", "#0f766e")


class ReportError(GateError):
    """A report file could not be written."""


def write_file(path: Path, text: str) -> None:
    """Atomic write of a report file (``ReportError`` on failure)."""
    from loragate.acceptance.promotion import atomic_write

    try:
        atomic_write(path, text.encode("utf-8"))
    except OSError as exc:
        raise ReportError(f"cannot write the report {path}: {exc.strerror or exc}") from None


def prepare_dir(path: Path) -> Path:
    """Create the report folder and prove it writable, before any slow work."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise ReportError(f"report folder {path} is not writable: {exc.strerror or exc}") from None
    return path.resolve()


# --------------------------------------------------------------------------- JSON / JUnit


def to_json(report: Mapping[str, Any]) -> str:
    return json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n"


def to_junit(report: Mapping[str, Any]) -> str:
    """JUnit XML: a test suite per phase, a test case per check, and the verdict."""
    root = ET.Element("testsuites", name=f"loragate gate {report['adapter']}")
    by_phase: dict[str, list[Mapping[str, Any]]] = {}
    for check in report["checks"]:
        by_phase.setdefault(check["phase"], []).append(check)
    for phase, checks in by_phase.items():
        failures = sum(1 for c in checks if c["gating"] and not c["passed"])
        suite = ET.SubElement(root, "testsuite", name=f"{report['adapter']}.{phase}", tests=str(len(checks)),
                              failures=str(failures), errors="0", skipped="0",
                              time=f"{report['timings'].get(phase, 0.0):.3f}")
        for c in checks:
            case = ET.SubElement(suite, "testcase", classname=f"loragate.{phase}.{report['adapter']}", name=c["id"])
            if c["gating"] and not c["passed"]:
                failure = ET.SubElement(case, "failure", message=c["summary"], type="GateCheckFailed")
                failure.text = "\n".join(x for x in (c["summary"], c.get("detail") or "") if x)
            else:
                out = ET.SubElement(case, "system-out")
                out.text = c["summary"] + (f"\n{c['detail']}" if c.get("detail") else "")
    verdict_suite = ET.SubElement(root, "testsuite", name=f"{report['adapter']}.verdict", tests="1",
                                  failures="0" if report["verdict"] == "PROMOTE" else "1", errors="0", skipped="0",
                                  time=f"{report['timings'].get('total', 0.0):.3f}")
    case = ET.SubElement(verdict_suite, "testcase", classname=f"loragate.verdict.{report['adapter']}", name="verdict")
    if report["verdict"] != "PROMOTE":
        failure = ET.SubElement(case, "failure", message="REJECT: " + "; ".join(report["reasons"][:3]), type="Reject")
        failure.text = "\n".join(report["reasons"])
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


# --------------------------------------------------------------------------- terminal


def _measured_cell(check: Mapping[str, Any]) -> str:
    m = check.get("measured") or {}
    if "successes" in m and "n" in m:
        return f"{m['successes']}/{m['n']} = {m['rate']:.0%} [{m['ci95_low']:.0%}-{m['ci95_high']:.0%}]"
    if "candidate" in m and isinstance(m["candidate"], Mapping) and "baseline_rate" in m:
        return f"{m['candidate']['rate']:.0%} vs {m['baseline_rate']:.0%}"
    return ""


def _bar_cell(check: Mapping[str, Any]) -> str:
    bar = check.get("bar")
    if not bar or bar.get("value") is None:
        return "-" if check["gating"] else "reported"
    kind, value = bar["kind"], bar["value"]
    if kind == "floor":
        return f">= {value:.0%} (low)"
    if kind == "ceiling":
        return f"<= {value:.0%} (high)"
    if kind == "max_drop":
        return f"drop <= {value:.0%}"
    return f"<= {value}"


def _status(check: Mapping[str, Any]) -> str:
    if check.get("warning"):
        return "WARN"
    if not check["gating"]:
        return "info"
    return "pass" if check["passed"] else "FAIL"


def baseline_line(report: Mapping[str, Any]) -> str:
    """What the adapter was compared with, as the verdict block names it."""
    baseline = report.get("baseline")
    if not baseline:
        return "baseline: none chosen (the gate stopped before planning the suite)"
    return f"baseline: {baseline.get('note') or baseline.get('model') or baseline['kind']}"


def terminal_table(report: Mapping[str, Any], width: int = 100) -> str:
    """The checks as a table, then the verdict, the baseline and the reasons."""
    lines = [f"loragate gate {report['adapter']} @ {report['endpoint']}"]
    lines.append(f"{'':4} {'check':34} {'measured [95% CI]':28} {'bar':16}")
    for c in report["checks"]:
        measured = _measured_cell(c)
        if not measured:
            text = c["summary"].split(": ", 1)[-1]
            measured = text if len(text) <= 44 else text[:41] + "..."
            lines.append(f"{_status(c):4} {c['id']:34} {measured}")
        else:
            lines.append(f"{_status(c):4} {c['id']:34} {measured:28} {_bar_cell(c):16}")
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in report["timings"].items())
    lines.append(f"time: {timings}")
    lines.append(f"VERDICT {report['adapter']}: {report['verdict']}")
    lines.append(f"  {baseline_line(report)}")
    for i, reason in enumerate(report["reasons"], 1):
        lines.append(f"  {i}. {reason}")
    for note in report.get("notes") or ():
        lines.append(f"  note: {note}")
    files = report.get("files") or {}
    if files.get("html"):
        lines.append(f"report: {files['html']}")
    promotion = report.get("promotion")
    if promotion and promotion.get("record"):
        lines.append(f"promoted: record {promotion['record']}; chart values {promotion['values']}")
    elif promotion and promotion.get("error"):
        lines.append(f"promotion FAILED: {promotion['error']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- chart


def chart_series(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Points of stop rate and JSON validity by input length for one adapter (greedy runs)."""
    out = []
    points: dict[str, list[tuple[float, float, float, float]]] = {"stop_rate": [], "json_validity": []}
    for run in report.get("runs") or ():
        if run["id"] not in ("greedy",) and not run["id"].startswith("probe-"):
            continue
        x = run.get("prompt_tokens_median")
        if not x or not run.get("n"):
            continue
        for metric in points:
            r = run.get(metric)
            if r:
                points[metric].append((float(x), r["rate"], r["ci95_low"], r["ci95_high"]))
    for metric, pts in points.items():
        if pts:
            out.append({"adapter": report["adapter"], "metric": metric, "points": sorted(pts)})
    return out


def svg_chart(series: Sequence[Mapping[str, Any]], marks: Sequence[tuple[float, str]] = (),
              width: int = 760, height: int = 320) -> str:
    """An inline SVG line chart: rate (0-1) against prompt tokens (log scale), 95% CI whiskers.

    The legend's column is as wide as its longest label (11 px sans-serif, ~6.5 px a character),
    so the chart widens beyond ``width`` rather than clip a long adapter name."""
    longest = max((len(f"{s['adapter']}: JSON validity") for s in series), default=0)
    left, right, top, bottom = 56, max(190, 50 + math.ceil(6.5 * longest)), 16, 44
    pw, ph = width - left - 190, height - top - bottom
    width = left + pw + right
    xs = [p[0] for s in series for p in s["points"]] + [m[0] for m in marks]
    if not xs:
        return "<p>No measurements to chart.</p>"
    lo_x = 2 ** math.floor(math.log2(max(1.0, min(xs))))
    hi_x = 2 ** math.ceil(math.log2(max(xs) + 1))

    def sx(x: float) -> float:
        return left + pw * (math.log2(max(x, lo_x)) - math.log2(lo_x)) / max(1e-9, math.log2(hi_x) - math.log2(lo_x))

    def sy(y: float) -> float:
        return top + ph * (1 - y)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="stop rate and JSON validity by input length">',
             '<style>text{font:11px sans-serif;fill:#333}.grid{stroke:#ddd}.mark{stroke:#888;stroke-dasharray:2 3}</style>']
    for i in range(0, 11, 2):
        y = sy(i / 10)
        parts.append(f'<line class="grid" x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{i * 10}%</text>')
    tick = lo_x
    while tick <= hi_x:
        x = sx(tick)
        parts.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + ph}"/>')
        parts.append(f'<text x="{x:.1f}" y="{top + ph + 14}" text-anchor="middle">{int(tick)}</text>')
        tick *= 2
    parts.append(f'<text x="{left + pw / 2:.1f}" y="{height - 6}" text-anchor="middle">prompt tokens (median of each run, log scale)</text>')
    for x, label in marks:
        px = sx(x)
        parts.append(f'<line class="mark" x1="{px:.1f}" x2="{px:.1f}" y1="{top}" y2="{top + ph}"/>')
        parts.append(f'<text x="{px + 3:.1f}" y="{top + 10}" transform="rotate(90 {px + 3:.1f} {top + 10})">{html.escape(label)}</text>')
    adapters = list(dict.fromkeys(s["adapter"] for s in series))
    legend_y = top + 4
    for s in series:
        color = PALETTE[adapters.index(s["adapter"]) % len(PALETTE)]
        dash = "" if s["metric"] == "stop_rate" else ' stroke-dasharray="6 4"'
        pts = s["points"]
        path = " ".join(f"{'M' if i == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for i, (x, y, _, _) in enumerate(pts))
        parts.append(f'<path d="{path}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
        for x, y, lo, hi in pts:
            px = sx(x)
            parts.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{sy(lo):.1f}" y2="{sy(hi):.1f}" stroke="{color}" stroke-opacity="0.5"/>')
            shape = (f'<circle cx="{px:.1f}" cy="{sy(y):.1f}" r="3.5" fill="{color}"/>' if s["metric"] == "stop_rate"
                     else f'<rect x="{px - 3:.1f}" y="{sy(y) - 3:.1f}" width="6" height="6" fill="white" stroke="{color}" stroke-width="1.5"/>')
            parts.append(f'{shape}')
        name = "stop rate" if s["metric"] == "stop_rate" else "JSON validity"
        lx = left + pw + 12
        parts.append(f'<line x1="{lx}" x2="{lx + 24}" y1="{legend_y:.1f}" y2="{legend_y:.1f}" stroke="{color}" stroke-width="2"{dash}/>')
        parts.append(f'<text x="{lx + 30}" y="{legend_y + 4:.1f}">{html.escape(s["adapter"])}: {name}</text>')
        legend_y += 16
    parts.append("</svg>")
    return "\n".join(parts)


# --------------------------------------------------------------------------- diagnosis

_ROLE_COLORS = {"candidate": "#b3261e", "base": "#6b7280", "promoted": "#1b7f3b"}


def diagnosis_svg(diagnoses: Sequence[tuple[str, Mapping[str, Any]]], width: int = 760) -> str:
    """Two panels per adapter row: p(stop) after a complete reference answer (log scale, 1e-10
    to 1: median and the 95% interval of the geometric mean) and reference NLL (nats/token: mean
    and 95% interval), for the candidate, the base model and the promoted adapter."""
    rows = [(name, m) for name, d in diagnoses if d.get("available") for m in d.get("models") or ()]
    if not rows:
        return ""

    def label(name: str, m: Mapping[str, Any]) -> str:
        return name if m["role"] == "candidate" else f"  {m['role']}: {m['model']}"

    label_w = max(120, 16 + math.ceil(6.5 * max(len(label(n, m)) for n, m in rows)))
    gap, top, row_h = 30, 34, 18
    width = max(width, label_w + gap + 20 + 2 * 220)
    pw = (width - label_w - gap - 20) // 2
    height = top + row_h * len(rows) + 34
    nll_max = max(2.0, math.ceil(max(m["nll"]["ci95_high"] for _, m in rows) * 2) / 2)
    x0p, x0n = label_w, label_w + pw + gap

    def sp(log10_p: float) -> float:
        return x0p + pw * (min(0.0, max(-10.0, log10_p)) + 10) / 10

    def sn(v: float) -> float:
        return x0n + pw * min(max(v, 0.0), nll_max) / nll_max

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             'role="img" aria-label="diagnosis: p(EOS) after a complete answer and reference NLL">',
             '<style>text{font:11px sans-serif;fill:#333}.grid{stroke:#ddd}</style>',
             f'<text x="{x0p}" y="12">p(EOS) after a complete answer (log scale)</text>',
             f'<text x="{x0n}" y="12">reference NLL, nats/token (lower: answer learned)</text>']
    bottom = top + row_h * len(rows)
    for e in range(-10, 1, 2):
        x = sp(e)
        parts.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{top - 8}" y2="{bottom}"/>')
        parts.append(f'<text x="{x:.1f}" y="{bottom + 14}" text-anchor="middle">1e{e}</text>')
    steps = int(nll_max / 0.5)
    for i in range(steps + 1):
        x = sn(i * 0.5)
        parts.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{top - 8}" y2="{bottom}"/>')
        parts.append(f'<text x="{x:.1f}" y="{bottom + 14}" text-anchor="middle">{i * 0.5:g}</text>')
    for i, (name, m) in enumerate(rows):
        y = top + row_h * i + row_h / 2
        color = _ROLE_COLORS.get(m["role"], "#333")
        parts.append(f'<text x="{label_w - 8}" y="{y + 4:.1f}" text-anchor="end" xml:space="preserve">'
                     f'{html.escape(label(name, m))}</text>')
        lp = m["stop_log10_p"]
        parts.append(f'<line x1="{sp(lp["ci95_low"]):.1f}" x2="{sp(lp["ci95_high"]):.1f}" y1="{y:.1f}" y2="{y:.1f}" '
                     f'stroke="{color}" stroke-width="2" stroke-opacity="0.5"/>')
        parts.append(f'<circle cx="{sp(math.log10(max(m["stop_p_median"], 1e-30))):.1f}" cy="{y:.1f}" r="4" fill="{color}"/>')
        nl = m["nll"]
        parts.append(f'<line x1="{sn(nl["ci95_low"]):.1f}" x2="{sn(nl["ci95_high"]):.1f}" y1="{y:.1f}" y2="{y:.1f}" '
                     f'stroke="{color}" stroke-width="2" stroke-opacity="0.5"/>')
        parts.append(f'<rect x="{sn(nl["mean"]) - 4:.1f}" y="{y - 4:.1f}" width="8" height="8" fill="{color}"/>')
    parts.append("</svg>")
    return "\n".join(parts)


def diagnosis_section(report: Mapping[str, Any]) -> str:
    """The report's diagnosis: findings, a table per model, the chart."""
    d = report.get("diagnosis")
    if not d:
        return ""
    if not d.get("available"):
        return f"<h2>Diagnosis</h2><p class=muted>Diagnosis not available: {html.escape(d.get('reason') or '')}</p>"
    findings = "".join(f"<li>{html.escape(f['text'])}</li>" for f in d.get("findings") or ()) or "<li>no cause found</li>"
    rows = "".join(
        f"<tr><td>{html.escape(m['role'])}</td><td><code>{html.escape(m['model'])}</code></td>"
        f"<td>{m['stop_p_median']:.2g}</td><td>{m['stop_top1_share']:.0%}</td>"
        f"<td>{m['nll']['mean']:.3f} [{m['nll']['ci95_low']:.3f}-{m['nll']['ci95_high']:.3f}]</td><td>{m['n']}</td></tr>"
        for m in d.get("models") or ())
    return (f"<h2>Diagnosis</h2><p class=muted>The engine's likelihoods of {html.escape(d.get('reference_source') or '')}, "
            f"followed by the stop token <code>{html.escape(d.get('stop_token') or '')}</code> ({d.get('seconds', 0):.1f}s). "
            "p(EOS): probability of the stop token right after a complete answer; NLL: negative log-likelihood of the "
            "answer, nats per token. Bars: 95% intervals over prompts.</p>"
            f"<ul>{findings}</ul>"
            "<table><tr><th>role</th><th>model</th><th>p(EOS) median</th><th>EOS top-1</th>"
            f"<th>reference NLL mean [95% CI]</th><th>prompts</th></tr>{rows}</table>"
            + diagnosis_svg([(report["adapter"], d)]))


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#1f2328;max-width:1100px}
h1{font-size:20px;margin:0 0 8px}h2{font-size:16px;margin:24px 0 8px}
.verdict{display:inline-block;padding:4px 12px;border-radius:4px;font-weight:700;color:#fff}
.PROMOTE{background:#1b7f3b}.REJECT{background:#b3261e}
table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #e5e7eb;padding:4px 6px;text-align:left;vertical-align:top}
th{background:#f6f8fa}.FAIL{color:#b3261e;font-weight:700}.pass{color:#1b7f3b}.WARN{color:#8a5a00;font-weight:700}.info{color:#555}
code{font-size:12px}.muted{color:#666}ul.errors{margin:2px 0;padding-left:18px}
"""


def _schema_errors_cell(check: Mapping[str, Any]) -> str:
    """A JSON-validity check's most frequent schema errors, with counts."""
    errors = (check.get("measured") or {}).get("schema_errors") or ()
    if not errors:
        return ""
    items = "".join(f"<li><code>{html.escape(e['error'])}</code> ({e['count']})</li>" for e in errors)
    return f"<br><span class=muted>most frequent schema errors:</span><ul class=errors>{items}</ul>"


def _checks_table(checks: Iterable[Mapping[str, Any]]) -> str:
    rows = []
    for c in checks:
        status = _status(c)
        detail = f"<br><span class=muted>{html.escape(c['detail'])}</span>" if c.get("detail") else ""
        detail += _schema_errors_cell(c)
        rows.append(f"<tr><td class={status}>{status}</td><td><code>{html.escape(c['id'])}</code></td>"
                    f"<td>{html.escape(c['summary'])}{detail}</td></tr>")
    return "<table><tr><th></th><th>check</th><th>result</th></tr>" + "".join(rows) + "</table>"


def _runs_table(runs: Iterable[Mapping[str, Any]]) -> str:
    def pct(r: Mapping[str, Any] | None) -> str:
        return "-" if not r else f"{r['successes']}/{r['n']} ({r['rate']:.0%})"

    rows = []
    for r in runs:
        tokens = (f"{r.get('prompt_tokens_min')}-{r.get('prompt_tokens_max')}" if r.get("prompt_tokens_min") is not None else "-")
        rows.append(f"<tr><td><code>{html.escape(r['id'])}</code></td><td>{html.escape(r['label'])}</td>"
                    f"<td>{html.escape(r['model'])}</td><td>{tokens}</td><td>{pct(r.get('stop_rate'))}</td>"
                    f"<td>{pct(r.get('json_validity'))}</td><td>{pct(r.get('runaway_rate'))}</td>"
                    f"<td>{r.get('completion_tokens_mean', '-')}</td></tr>")
    return ("<table><tr><th>run</th><th>what</th><th>model</th><th>prompt tokens</th><th>stopped</th>"
            "<th>valid JSON</th><th>runaway</th><th>mean output tokens</th></tr>" + "".join(rows) + "</table>")


def _marks(report: Mapping[str, Any]) -> list[tuple[float, str]]:
    marks = []
    contract = report.get("contract") or {}
    if contract.get("train_seq_len"):
        marks.append((float(contract["train_seq_len"]), f"trained at {contract['train_seq_len']}"))
    if contract.get("max_input_tokens"):
        marks.append((float(contract["max_input_tokens"]), f"promised {contract['max_input_tokens']}"))
    return marks


def to_html(report: Mapping[str, Any]) -> str:
    """One gate run as a self-contained page (no external resources)."""
    reasons = "".join(f"<li>{html.escape(r)}</li>" for r in report["reasons"]) or "<li>every gating check met its bar</li>"
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in report.get("notes") or ())
    timings = ", ".join(f"{html.escape(k)} {v:.1f}s" for k, v in report["timings"].items())
    promotion = report.get("promotion") or {}
    promo = ""
    if promotion.get("record"):
        promo = (f"<p>Promoted: record <code>{html.escape(promotion['record'])}</code>, chart values "
                 f"<code>{html.escape(promotion['values'])}</code> (<code>helm upgrade -f</code>).</p>")
    elif promotion.get("error"):
        promo = f"<p class=FAIL>Promotion failed: {html.escape(promotion['error'])}</p>"
    chart = svg_chart(chart_series(report), _marks(report))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>loragate gate: {html.escape(report['adapter'])} {report['verdict']}</title>
<style>{_CSS}</style></head><body>
<h1>{html.escape(report['adapter'])} <span class="verdict {report['verdict']}">{report['verdict']}</span></h1>
<p class=muted>endpoint {html.escape(report['endpoint'])} · started {html.escape(report['started_at'])} · {timings}</p>
<p>{html.escape(baseline_line(report))}</p>
<h2>Reasons</h2><ol>{reasons}</ol>
{f'<h2>Notes</h2><ul>{notes}</ul>' if notes else ''}
{promo}
<h2>Stop rate and JSON validity by input length</h2>
<p class=muted>Greedy runs: held-out prompts, then long-context probes. Whiskers: 95% Wilson interval.
Solid line and dots: stop rate; dashed line and squares: JSON validity.</p>
{chart}
{diagnosis_section(report)}
<h2>Checks</h2>{_checks_table(report['checks'])}
<h2>Runs</h2>{_runs_table(report.get('runs') or ())}
</body></html>
"""


def demo_index_html(reports: Sequence[Mapping[str, Any]], links: Mapping[str, str]) -> str:
    """One page for several gate runs: verdicts, first reason, and one chart of every adapter."""
    rows = []
    for r in reports:
        first = html.escape(r["reasons"][0]) if r["reasons"] else "every gating check met its bar"
        link = links.get(r["adapter"])
        name = f'<a href="{html.escape(link)}">{html.escape(r["adapter"])}</a>' if link else html.escape(r["adapter"])
        rows.append(f"<tr><td>{name}</td><td><span class='verdict {r['verdict']}'>{r['verdict']}</span></td>"
                    f"<td>{first}</td><td>{r['timings'].get('total', 0):.1f}s</td></tr>")
    series = [s for r in reports for s in chart_series(r)]
    marks = _marks(reports[0]) if reports else []
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>loragate demo: gate verdicts</title><style>{_CSS}</style></head><body>
<h1>loragate demo: gate verdicts</h1>
<table><tr><th>adapter</th><th>verdict</th><th>first reason</th><th>gate time</th></tr>{''.join(rows)}</table>
<h2>Stop rate and JSON validity per adapter and input length</h2>
<p class=muted>Greedy runs; whiskers: 95% Wilson interval; solid: stop rate, dashed: JSON validity.</p>
{svg_chart(series, marks)}
{_demo_diagnosis(reports)}
</body></html>
"""


def _demo_diagnosis(reports: Sequence[Mapping[str, Any]]) -> str:
    diagnoses = [(r["adapter"], r["diagnosis"]) for r in reports if (r.get("diagnosis") or {}).get("available")]
    if not diagnoses:
        return ""
    return ("<h2>Diagnosis: why</h2><p class=muted>p(EOS) right after a complete reference answer and the answer's "
            "NLL, per adapter: red the adapter, grey the base model, green the promoted adapter; bars: 95% intervals "
            "over prompts. A cause found is each REJECT's first reason above.</p>" + diagnosis_svg(diagnoses))


def gate_report(*, adapter: str, verdict: str, reasons: Sequence[str], notes: Sequence[str], endpoint: str,
                started_at: str, finished_at: str, interrupted: bool, contract_set: Any, contract: Any,
                engine: Mapping[str, Any], baseline: Mapping[str, Any] | None, runs: Sequence[Mapping[str, Any]],
                sampling: Mapping[str, Any], probe_source: str | None, checks: Sequence[Any],
                timings: Mapping[str, float], folder: Path,
                diagnosis: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``report.json``'s content for one gate run (the HTML, JUnit and terminal views render it)."""
    return {
        "adapter": adapter,
        "verdict": verdict,
        "reasons": list(reasons),
        "notes": list(notes),
        "endpoint": endpoint,
        "started_at": started_at,
        "finished_at": finished_at,
        "interrupted": interrupted,
        "contract": {"file": str(contract_set.source), "path": str(contract.path), "base_model": contract.base_model,
                     "output": contract.output, "max_tokens": contract.max_tokens,
                     "train_seq_len": contract.train_seq_len, "max_input_tokens": contract.max_input_tokens,
                     "prompt_template": contract.prompt_template, "api": contract.api,
                     "system_prompt": contract.system_prompt, "user_template": contract.user_template},
        "thresholds": dataclasses.asdict(contract.thresholds),
        "engine": dict(engine),
        "baseline": dict(baseline) if baseline else None,
        "sample_sizes": {r["id"]: r["planned"] for r in runs},
        "sampling": dict(sampling),
        "probe_source": probe_source,
        "checks": [c.to_dict() for c in checks],
        "runs": list(runs),
        "diagnosis": dict(diagnosis) if diagnosis is not None else None,
        "timings": timings,
        "files": {"json": str(folder / "report.json"), "junit": str(folder / "junit.xml"),
                  "html": str(folder / "report.html"), "samples": str(folder / "samples.jsonl"),
                  "plan": str(folder / "plan.json"), "suite_junit": str(folder / "suite.xml"),
                  "suite_log": str(folder / "suite.log")},
        "promotion": None,
    }
