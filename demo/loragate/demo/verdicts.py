"""The demo's expected verdicts, and gating every demo adapter against the local stack.

``loragate demo`` and ``make demo`` run :func:`gate_all_demo` and check each verdict against
:data:`DEMO_EXPECTED`: the good adapters (``poster-good`` through completions, ``chat-good``
through chat) are promoted, each broken one is rejected with its failure named first
(``chat-eos-masked`` answers, then writes the next user turn until max_tokens: stop rate).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from loragate.acceptance import report as rep
from loragate.acceptance.gate import (
    VERDICT_PROMOTE,
    VERDICT_REJECT,
    GateOptions,
    GateResult,
    run_gate,
)
from loragate.core import settings
from loragate.core.errors import LoragateError

#: Expected demo verdicts and the reason named first for a REJECT: the diagnosis' cause.
DEMO_EXPECTED: dict[str, tuple[str, str | None]] = {
    "poster-good": (VERDICT_PROMOTE, None),
    "poster-eos-masked": (VERDICT_REJECT, "EOS never learned"),
    "poster-truncated": (VERDICT_REJECT, "answer never learned"),
    "chat-good": (VERDICT_PROMOTE, None),
    "chat-eos-masked": (VERDICT_REJECT, "EOS never learned"),
}


@dataclass
class DemoResults:
    """The verdict on every demo adapter, printable as a table."""

    results: list[GateResult]
    report_dir: Path
    index_html: Path | None = None
    errors: dict[str, str] = field(default_factory=dict)

    def __iter__(self) -> Iterator[GateResult]:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def as_expected(self, result: GateResult) -> bool:
        want, reason = DEMO_EXPECTED.get(result.adapter, (None, None))
        if want is None:
            return True
        if result.verdict != want:
            return False
        return reason is None or bool(result.reasons and result.reasons[0].startswith(reason))

    @property
    def ok(self) -> bool:
        return not self.errors and all(self.as_expected(r) for r in self.results) and \
            len(self.results) == len(DEMO_EXPECTED)

    def render(self) -> str:
        lines = ["", f"{'adapter':20} {'verdict':8} {'time':>7}  first reason"]
        for r in self.results:
            first = r.reasons[0] if r.reasons else "every gating check met its bar"
            mark = "" if self.as_expected(r) else "   <-- NOT the expected verdict"
            lines.append(f"{r.adapter:20} {r.verdict:8} {r.timings.get('total', 0):6.1f}s  {first}{mark}")
        for name, err in self.errors.items():
            lines.append(f"{name:20} {'ERROR':8} {'':>7}  {err}")
        lines.append("")
        for r in self.results:
            lines.append(f"{r.adapter}: {r.report_dir / 'report.html'}")
        if self.index_html:
            lines.append(f"all verdicts: {self.index_html}")
        promoted = [r.promotion["values"] for r in self.results if r.promotion and r.promotion.get("values")]
        if promoted:
            lines.append(f"promoted set (helm upgrade -f): {promoted[-1]}")
        return "\n".join(lines)


def gate_all_demo(info: Any, *, report_root: Path | None = None, promoted_dir: Path | None = None,
                  promote: bool = True, quiet: bool = False) -> DemoResults:
    """Gate every demo adapter against the local stack ``info``; PROMOTEs go to the promoted set."""
    from loragate.cli.defaults import gate_options
    from loragate.demo.artifacts import DEMO_ADAPTERS

    root = report_root or settings.reports_dir() / f"demo-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    results: list[GateResult] = []
    errors: dict[str, str] = {}
    for name in DEMO_ADAPTERS:
        options = GateOptions(endpoint=info.proxy_url, adapter=name, contracts=info.contracts_file,
                              prompts=info.heldout_prompts, report_dir=root / name, promote=promote,
                              promoted_dir=promoted_dir)
        try:
            result = run_gate(gate_options(options), quiet=quiet)
        except LoragateError as exc:
            errors[name] = str(exc)
            continue
        results.append(result)
        if result.interrupted:
            break
    index = None
    if results:
        index = root / "index.html"
        rep.write_file(index, rep.demo_index_html(
            [r.report for r in results], {r.adapter: f"{r.adapter}/report.html" for r in results}))
    return DemoResults(results=results, report_dir=root, index_html=index, errors=errors)
