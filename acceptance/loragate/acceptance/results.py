"""The result of one gate check, whatever phase produced it (static, suite, load).

A check is *gating* when its failure rejects the adapter; a non-gating check is measured and
reported only (long-context probes beyond the contract's promise, the baseline's runaway
share). A *warning* is a non-gating finding worth a reader's attention (``pad_token ==
eos_token``); it is listed under the report's notes, never under its reasons.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

Phase = Literal["static", "diagnosis", "suite", "load", "gate", "shadow"]


@dataclass(frozen=True)
class CheckResult:
    """One check: what was measured, the bar, and whether it passed."""

    #: Stable identifier, ``<phase or run>.<metric>``, e.g. ``greedy.stop_rate``, ``static.lora_rank``.
    id: str
    phase: Phase
    #: Human name of the metric, e.g. ``stop rate``; reasons start with it.
    name: str
    passed: bool
    gating: bool
    #: One line with the numbers, e.g. ``stop rate (greedy, 35 held-out prompts): 0/35 = 0.0% ...``.
    summary: str
    detail: str = ""
    warning: bool = False
    #: Numbers behind the summary (successes, n, rate, ci95_low, ci95_high, ...).
    measured: Mapping[str, Any] = field(default_factory=dict)
    #: The bar: ``{"kind": "floor"|"ceiling"|"max_drop"|"limit", "value": ...}``; ``None`` when none.
    bar: Mapping[str, Any] | None = None

    @property
    def failed_gate(self) -> bool:
        return self.gating and not self.passed

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "phase": self.phase, "name": self.name, "passed": self.passed,
            "gating": self.gating, "warning": self.warning, "summary": self.summary,
            "detail": self.detail, "measured": dict(self.measured),
            "bar": dict(self.bar) if self.bar is not None else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CheckResult":
        return cls(
            id=str(data["id"]), phase=data["phase"], name=str(data["name"]), passed=bool(data["passed"]),
            gating=bool(data["gating"]), summary=str(data["summary"]), detail=str(data.get("detail", "")),
            warning=bool(data.get("warning", False)), measured=dict(data.get("measured") or {}),
            bar=dict(data["bar"]) if data.get("bar") is not None else None,
        )
