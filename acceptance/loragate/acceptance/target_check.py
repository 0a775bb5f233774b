"""``check-data --contracts``: the training targets judged as the gate judges the adapter's outputs.

An adapter learns to write what its targets hold. Each example's target (the completion; for
the conversational formats the last assistant turn) is judged by
:func:`loragate.core.judging.judge_completion`, the judging of the proxy's metrics and of the
gate, as if the adapter had written it and stopped (``finish_reason == "stop"``), against the
adapter's contract (its ``output`` and ``json_schema``).

Categories; every target is counted in exactly one, and they add up to ``total``:

- ``empty``: nothing but whitespace (the gate's non-empty check fails on such an output).
- Only when the contract's output is JSON (:attr:`~loragate.core.contracts.Contract.expects_json`),
  for the non-empty targets:

  - ``valid``: the judging finds it valid (parses as JSON and matches the contract's schema);
  - ``schema_mismatch``: parses as JSON but breaks the schema (``schema_error``: the judging's
    message for the first such target, e.g. ``(root): Additional properties are not allowed
    ('blocks' was unexpected)``);
  - ``fenced``: not JSON as a whole, and starts with a markdown code fence (```````json ...```````);
  - ``text_around_json``: not JSON as a whole, not fenced, but holds a JSON object or array with
    other text before and/or after it (an answer followed by an explanation, a chatty preamble);
  - ``not_json``: the rest.

  The last three are one verdict of the judging (``invalid``) told apart for the reader; they
  never change what counts as valid.

Bars (``ok`` is false, and ``check-data`` exits 1, when one fails):

- no target may be empty, whatever the contract's output: an empty target teaches the adapter
  to stop at once, and no training set needs one;
- JSON output: the share of valid targets, ``valid / total``, must be at least the contract's
  ``thresholds.json_validity``. It is the exact share of the whole training set, not a sample,
  so no confidence interval applies (the gate's bars use one on the outputs it samples).

The contract's other bars (stop rate, runaways, long-context probes, regression) are about
what the served adapter does, not what its targets hold; the length checks of ``check-data``
cover what truncation does to the targets and their EOS.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from loragate.core.contracts import Contract
from loragate.core.judging import JsonResult, judge_completion

#: The categories of a JSON contract's non-empty targets, in the order they are reported.
JSON_CATEGORIES = ("valid", "schema_mismatch", "fenced", "text_around_json", "not_json")
#: Markdown code fence (a target that starts with one is ``fenced``).
FENCE = "```"
#: Positions of ``{``/``[`` tried when looking for a JSON document inside a target's text.
MAX_EMBEDDED_TRIES = 64


@dataclass(frozen=True)
class TargetCounts:
    """How the training targets of one adapter fare under the gate's judging (see the module docstring).

    The JSON categories (``valid`` ... ``not_json``) are ``None`` when the contract's output is
    not JSON: then only ``empty`` is counted.
    """

    #: The adapter whose contract judged the targets, and the adapters file it is in.
    adapter: str
    contracts: str
    #: The contract's ``output`` (``json`` | ``text``) and ``api`` (``completions`` | ``chat``).
    output: str
    api: str
    #: Targets judged: one per example.
    total: int
    #: Targets that are empty or whitespace only.
    empty: int
    #: Whether the contract has a ``json_schema`` (JSON output) that ``valid`` includes.
    has_json_schema: bool = False
    valid: int | None = None
    schema_mismatch: int | None = None
    fenced: int | None = None
    text_around_json: int | None = None
    not_json: int | None = None
    #: The judging's first schema error of the first ``schema_mismatch`` target.
    schema_error: str | None = None
    #: The contract's ``thresholds.json_validity`` (JSON output), else ``None``.
    json_validity_floor: float | None = None
    #: 1-based line of the first target in each category other than ``valid``.
    first_lines: Mapping[str, int] = field(default_factory=dict)

    @property
    def expects_json(self) -> bool:
        return self.valid is not None

    @property
    def json_validity(self) -> float | None:
        """Share of the targets judged valid (JSON output), ``None`` otherwise."""
        if self.valid is None:
            return None
        return self.valid / self.total if self.total else 0.0

    @property
    def problems(self) -> list[str]:
        """One line for each bar that fails (empty when ``ok``)."""
        found = []
        if self.empty:
            found.append(f"{self.empty} of {self.total} targets are empty (first at line {self.first_lines['empty']}): "
                         "the adapter learns to stop without answering")
        share, floor = self.json_validity, self.json_validity_floor
        if share is not None and floor is not None and share < floor:
            found.append(f"{self.valid} of {self.total} targets are valid JSON ({share:.1%}), below the contract's "
                         f"json_validity {floor:g}: the adapter learns to write what the gate rejects")
        return found

    @property
    def ok(self) -> bool:
        """No target is empty and, for JSON output, the valid share meets ``json_validity``."""
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter, "contracts": self.contracts, "output": self.output, "api": self.api,
            "total": self.total, "empty": self.empty, "valid": self.valid, "schema_mismatch": self.schema_mismatch,
            "fenced": self.fenced, "text_around_json": self.text_around_json, "not_json": self.not_json,
            "schema_error": self.schema_error, "json_validity": self.json_validity,
            "json_validity_floor": self.json_validity_floor, "first_lines": dict(self.first_lines),
            "ok": self.ok, "problems": self.problems,
        }

    def summary_lines(self) -> list[str]:
        """The counts, for the terminal (the verdict is :meth:`verdict_line`)."""
        rows = [("empty", "empty")]
        if self.expects_json:
            rows += [("valid", "valid JSON, schema included" if self.has_json_schema else "valid JSON"),
                     ("schema_mismatch", "schema mismatch"), ("fenced", "in a ``` code fence"),
                     ("text_around_json", "JSON with text around it"), ("not_json", "not JSON")]
        width = max(len(label) for _, label in rows) + 1
        lines = [f"contract: {self.adapter} (output {self.output}, api {self.api}) in {self.contracts}",
                 "  targets judged as the gate judges outputs, as if the adapter wrote them and stopped:"]
        for category, label in rows:
            line = f"    {label + ':':<{width}} {getattr(self, category)} of {self.total}"
            if category in self.first_lines:
                line += f" (first at line {self.first_lines[category]})"
            if category == "schema_mismatch" and self.schema_error:
                line += f"; first error: {self.schema_error}"
            lines.append(line)
        return lines

    def verdict_line(self) -> str:
        if not self.ok:
            return "PROBLEM: " + "; ".join(self.problems) + "."
        if not self.expects_json:
            return "OK: no target is empty."
        assert self.json_validity is not None and self.json_validity_floor is not None
        return (f"OK: no target is empty; {self.valid} of {self.total} targets are valid JSON "
                f"({self.json_validity:.1%}), at least the contract's json_validity {self.json_validity_floor:g}.")


def judge_targets(targets: Iterable[tuple[int, str]], contract: Contract, *, contracts: str = "") -> TargetCounts:
    """Judge ``(line, target text)`` pairs against ``contract`` (see the module docstring)."""
    counts = dict.fromkeys(("empty", "non_empty", *JSON_CATEGORIES), 0)
    first_lines: dict[str, int] = {}
    schema_error = None
    total = 0
    for line, text in targets:
        total += 1
        category, error = _category(text, contract)
        counts[category] += 1
        if category not in ("valid", "non_empty"):
            first_lines.setdefault(category, line)
        if error is not None and schema_error is None:
            schema_error = error
    if not contract.expects_json:
        return TargetCounts(adapter=contract.name, contracts=contracts, output=contract.output, api=contract.api,
                            total=total, empty=counts["empty"], first_lines=first_lines)
    return TargetCounts(
        adapter=contract.name, contracts=contracts, output=contract.output, api=contract.api, total=total,
        empty=counts["empty"], has_json_schema=contract.json_schema is not None, valid=counts["valid"],
        schema_mismatch=counts["schema_mismatch"], fenced=counts["fenced"],
        text_around_json=counts["text_around_json"], not_json=counts["not_json"], schema_error=schema_error,
        json_validity_floor=contract.thresholds.json_validity, first_lines=first_lines,
    )


def _category(text: str, contract: Contract) -> tuple[str, str | None]:
    """The category of one target (``non_empty`` when the output is not JSON), and the schema error
    when it breaks the schema."""
    if not text.strip():
        return "empty", None
    if not contract.expects_json:
        return "non_empty", None
    judgement = judge_completion(text, "stop", expects_json=True, json_schema=contract.json_schema)
    if judgement.json_result is JsonResult.VALID:
        return "valid", None
    if judgement.json_result is JsonResult.SCHEMA_MISMATCH:
        return "schema_mismatch", judgement.schema_error
    stripped = text.strip()
    if stripped.startswith(FENCE):
        return "fenced", None
    if _holds_json(stripped):
        return "text_around_json", None
    return "not_json", None


def _holds_json(text: str) -> bool:
    """Whether a JSON object or array starts somewhere in ``text`` (diagnosis only)."""
    decoder = json.JSONDecoder()
    tries = 0
    for at, char in enumerate(text):
        if char not in "{[":
            continue
        try:
            decoder.raw_decode(text, at)
        except (ValueError, RecursionError):
            tries += 1
            if tries >= MAX_EMBEDDED_TRIES:
                return False
            continue
        return True
    return False
