"""``loragate check-data``: does every training example fit the sequence length it is trained at?

A trainer truncates each example (prompt + completion + EOS) to ``max_seq_length`` from the
right. An example that does not fit loses the end of its *target*: with the EOS cut the
adapter never learns to stop; with the whole completion cut (prompt alone at or beyond the
limit) it learns to continue the prompt instead of answering. Nothing in a loss curve shows
this, so it is counted here, before (or after) training.

Tokenization mirrors how an engine sees the example: the prompt with the tokenizer's special
tokens (BOS), the completion without, then one EOS token (``--no-eos`` leaves it out).

Counts reported:

- ``fit``: prompt + completion + EOS within ``max_seq_length``.
- ``target_cut``: the rest: at least the EOS of the target is cut (so ``fit + target_cut = total``).
- ``target_fully_cut``: the prompt alone fills ``max_seq_length``: no target token is trained.
- ``eos_only_cut``: the completion fits but its EOS does not: the adapter cannot learn to stop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from loragate.core.errors import LoragateError
from loragate.core.jsonl import read_objects
from loragate.core.stats import percentile


class DataCheckError(LoragateError):
    """The data, the tokenizer or the options of ``check-data`` are unusable."""


@dataclass(frozen=True)
class LengthStats:
    """Token-length distribution: min, median (p50), 95th percentile and max, in tokens."""

    min: int
    p50: float
    p95: float
    max: int

    @classmethod
    def of(cls, values: Sequence[int]) -> "LengthStats":
        ordered = sorted(values)
        return cls(min=ordered[0], p50=_pct(ordered, 50), p95=_pct(ordered, 95),
                   max=ordered[-1])

    def to_dict(self) -> dict[str, float]:
        return {"min": self.min, "p50": self.p50, "p95": self.p95, "max": self.max}


@dataclass(frozen=True)
class DataCheckResult:
    """What ``check-data`` found for one JSONL at one ``max_seq_length``."""

    source: str
    max_seq_length: int
    total: int
    fit: int
    target_cut: int
    target_fully_cut: int
    eos_only_cut: int
    prompt_tokens: LengthStats
    completion_tokens: LengthStats
    example_tokens: LengthStats
    #: 1-based line numbers of the first examples whose target is cut (at most 10).
    first_cut_lines: tuple[int, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        """No example has any part of its target (EOS included) cut."""
        return self.target_cut == 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "max_seq_length": self.max_seq_length, "total": self.total,
            "fit": self.fit, "target_cut": self.target_cut, "target_fully_cut": self.target_fully_cut,
            "eos_only_cut": self.eos_only_cut, "ok": self.ok,
            "prompt_tokens": self.prompt_tokens.to_dict(),
            "completion_tokens": self.completion_tokens.to_dict(),
            "example_tokens": self.example_tokens.to_dict(),
            "first_cut_lines": list(self.first_cut_lines),
        }

    def summary(self) -> str:
        """Human-readable lines for the terminal."""
        def dist(s: LengthStats) -> str:
            return f"min {s.min}, p50 {s.p50:g}, p95 {s.p95:g}, max {s.max}"

        lines = [
            f"{self.source}: {self.total} examples at max_seq_length {self.max_seq_length}",
            f"  fit (prompt + completion + EOS):  {self.fit} of {self.total}",
            f"  target cut (at least its EOS):    {self.target_cut} of {self.total}",
            f"    whole target cut (prompt >= max_seq_length): {self.target_fully_cut}",
            f"    only the EOS cut (cannot learn to stop):     {self.eos_only_cut}",
            f"  prompt tokens:     {dist(self.prompt_tokens)}",
            f"  completion tokens: {dist(self.completion_tokens)}",
            f"  example tokens:    {dist(self.example_tokens)}",
        ]
        if self.ok:
            lines.append("OK: every target fits.")
        else:
            where = ", ".join(map(str, self.first_cut_lines))
            lines.append(f"PROBLEM: {self.target_cut} of {self.total} examples would have their target cut "
                         f"(first at line(s) {where}); raise max_seq_length to at least "
                         f"{self.example_tokens.max} or shorten the examples.")
        return "\n".join(lines)


def read_examples(path: str | os.PathLike[str], prompt_field: str = "prompt",
                  completion_field: str = "completion") -> list[tuple[int, str, str]]:
    """``(line number, prompt, completion)`` of every non-blank line of a JSONL file."""
    source = Path(path)
    rows: list[tuple[int, str, str]] = []
    for number, record in read_objects(source, what="data file", error=DataCheckError):
        values = []
        for name in (prompt_field, completion_field):
            value = record.get(name)
            if not isinstance(value, str):
                found = ", ".join(sorted(record)) or "none"
                raise DataCheckError(f"{source}:{number}: field {name!r} missing or not a string "
                                     f"(fields found: {found}); choose fields with --prompt-field/--completion-field")
            values.append(value)
        rows.append((number, values[0], values[1]))
    if not rows:
        raise DataCheckError(f"{source}: no examples")
    return rows


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """A local Hugging Face tokenizer (never fetched from a hub)."""
    folder = Path(path)
    if not folder.is_dir():
        raise DataCheckError(f"tokenizer folder not found: {folder}")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises many kinds for a folder without a tokenizer
        raise DataCheckError(f"cannot load a tokenizer from {folder}: {exc}") from None


def check_examples(rows: Iterable[tuple[int, str, str]], tokenizer: Any, max_seq_length: int, *,
                   add_eos: bool = True, source: str = "data") -> DataCheckResult:
    """Count what fits ``max_seq_length`` (see the module docstring for the definitions)."""
    if max_seq_length < 1:
        raise DataCheckError(f"max_seq_length must be positive, got {max_seq_length}")
    rows = list(rows)
    if add_eos and tokenizer.eos_token_id is None:
        raise DataCheckError("the tokenizer has no EOS token; pass --no-eos if the targets carry none")
    prompts = tokenizer([p for _, p, _ in rows])["input_ids"]
    completions = tokenizer([c for _, _, c in rows], add_special_tokens=False)["input_ids"]
    eos = 1 if add_eos else 0
    prompt_lens, completion_lens, totals = [], [], []
    fit = fully = eos_only = 0
    cut_lines: list[int] = []
    for (line, _, _), p, c in zip(rows, prompts, completions):
        total = len(p) + len(c) + eos
        prompt_lens.append(len(p))
        completion_lens.append(len(c))
        totals.append(total)
        if total <= max_seq_length:
            fit += 1
            continue
        if len(p) >= max_seq_length:
            fully += 1
        elif eos and len(p) + len(c) == max_seq_length:
            eos_only += 1
        if len(cut_lines) < 10:
            cut_lines.append(line)
    return DataCheckResult(
        source=source, max_seq_length=max_seq_length, total=len(rows), fit=fit,
        target_cut=len(rows) - fit, target_fully_cut=fully, eos_only_cut=eos_only,
        prompt_tokens=LengthStats.of(prompt_lens), completion_tokens=LengthStats.of(completion_lens),
        example_tokens=LengthStats.of(totals), first_cut_lines=tuple(cut_lines),
    )


def check_data(data: str | os.PathLike[str], tokenizer_dir: str | os.PathLike[str], max_seq_length: int, *,
               prompt_field: str = "prompt", completion_field: str = "completion",
               add_eos: bool = True) -> DataCheckResult:
    """Read a JSONL of examples and count what fits ``max_seq_length`` with this tokenizer."""
    rows = read_examples(data, prompt_field, completion_field)
    tokenizer = load_tokenizer(tokenizer_dir)
    return check_examples(rows, tokenizer, max_seq_length, add_eos=add_eos, source=str(data))


def _pct(ordered: Sequence[int], q: float) -> float:
    value = percentile(ordered, q)
    return float("nan") if value is None else float(value)
