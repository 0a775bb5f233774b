"""Held-out prompts and long-context probe prompts, in the adapter's own prompt template.

A prompts file is JSONL, one example a line: ``{"input": "..."}`` (rendered through the
contract's ``prompt_template``, exactly as in training) or ``{"prompt": "..."}`` already in
the template (it must start and end as the template does). ``expected`` (optional) is the
right answer, for a reported, never gating, exact-match share.

Long-context probes need the same task at more input tokens:

- demo-format inputs (``Title:/Authors:/## Section/Style:`` papers) are lengthened with more
  body sentences (:func:`loragate.demo.data.lengthen`): the right answer does not change;
- other tasks give a ``--long-prompts`` JSONL of long inputs, picked by their token count.

Lengths are measured with the engine's own tokenizer (``/tokenize``), so a probe sized at
``L`` tokens is at most ``L`` tokens as the engine sees it.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from loragate.contracts import PROMPT_INPUT_FIELD, Contract
from loragate.errors import GateError
from loragate.jsonl import read_objects


class PromptsError(GateError):
    """A prompts file is missing, malformed, or too small for the sample sizes the bars need."""


@dataclass(frozen=True)
class PromptRecord:
    """One held-out example: its input (``None`` when only the rendered prompt is known)."""

    prompt: str
    input: str | None
    expected: Any = None


def _template_parts(template: str) -> tuple[str, str]:
    before, _, after = template.partition(PROMPT_INPUT_FIELD)
    return before, after


def read_prompts(path: str | os.PathLike[str], contract: Contract) -> list[PromptRecord]:
    """Every example of a prompts JSONL, rendered in ``contract``'s template."""
    source = Path(path)
    before, after = _template_parts(contract.prompt_template)
    records: list[PromptRecord] = []
    for number, data in read_objects(source, what="prompts file", error=PromptsError,
                                     expected="a JSON object with 'input' or 'prompt'"):
        text = data.get("input")
        if isinstance(text, str):
            records.append(PromptRecord(contract.render_prompt(text), text, data.get("expected")))
            continue
        prompt = data.get("prompt")
        if not isinstance(prompt, str):
            raise PromptsError(f"{source}:{number}: needs a string 'input' (or a 'prompt' already in the template)")
        if not (prompt.startswith(before) and prompt.endswith(after) and len(prompt) >= len(before) + len(after)):
            raise PromptsError(
                f"{source}:{number}: 'prompt' does not follow {contract.name}'s prompt_template "
                f"{contract.prompt_template!r}; give the raw text as 'input' so the gate renders it as in training"
            )
        inner = prompt[len(before): len(prompt) - len(after)] if after else prompt[len(before):]
        records.append(PromptRecord(prompt, inner, data.get("expected")))
    if not records:
        raise PromptsError(f"{source}: no prompts")
    return records


# --------------------------------------------------------------------------- long inputs

#: Counts tokens of a rendered prompt as the engine does.
TokenCounter = Callable[[str], int]


@dataclass(frozen=True)
class Probe:
    """One probe prompt: the rendered prompt, its engine token count, and its expected answer."""

    prompt: str
    tokens: int
    expected: Any = None


class Lengthener(Protocol):
    """Builds ``n`` prompts of at most ``target`` tokens (as close to it as it can)."""

    def build(self, target: int, n: int, seed: int) -> list[Probe]: ...


_DEMO_PAPER = re.compile(r"^Title: [^\n]+\nAuthors: [^\n]+\n(?:## [^\n]+\n[^\n]*\n)+Style: [^\n]+$")


def is_demo_paper(text: str) -> bool:
    """Whether ``text`` is a paper in the demo task's format (see :mod:`loragate.demo.data`)."""
    return bool(_DEMO_PAPER.match(text))


def parse_demo_paper(text: str) -> Any:
    """The :class:`loragate.demo.data.Paper` that renders to ``text``."""
    from loragate.demo.data import Paper

    lines = text.split("\n")
    title, authors = lines[0][len("Title: "):], tuple(lines[1][len("Authors: "):].split(", "))
    sections, i = [], 2
    while lines[i].startswith("## "):
        sections.append((lines[i][3:], lines[i + 1]))
        i += 2
    paper = Paper(title=title, authors=authors, sections=tuple(sections), theme=lines[i][len("Style: "):])
    if paper.text != text:
        raise ValueError("not a demo paper")
    return paper


class DemoPaperLengthener:
    """Lengthens demo-format papers with more body sentences until the prompt has ``target`` tokens."""

    #: Probes land within this many tokens under their target (one body sentence is ~10 tokens).
    TOLERANCE = 24

    def __init__(self, contract: Contract, records: Sequence[PromptRecord], count: TokenCounter) -> None:
        self.contract = contract
        self.records = [r for r in records if r.input is not None and is_demo_paper(r.input)]
        self.count = count

    def _prompt(self, paper: Any, extra: int, seed: int) -> str:
        from loragate.demo.data import lengthen

        # A fresh generator per call: the first ``extra`` sentences are the same for every
        # ``extra``, so the prompt grows monotonically and a bisection finds the largest fit.
        return self.contract.render_prompt(lengthen(paper, random.Random(seed), extra).text)

    def build(self, target: int, n: int, seed: int) -> list[Probe]:
        probes: list[Probe] = []
        for index, record in enumerate(self.records):
            if len(probes) >= n:
                break
            paper = parse_demo_paper(record.input)
            rng_seed = seed * 1_000_003 + index
            base = self.count(record.prompt)
            if base > target:
                continue
            lo, lo_tokens = 0, base          # largest known ``extra`` that fits
            hi = max(1, (target - base) // 8 + 1)  # an ``extra`` that does not fit (found below)
            while True:
                tokens = self.count(self._prompt(paper, hi, rng_seed))
                if tokens > target:
                    break
                lo, lo_tokens, hi = hi, tokens, hi * 2
            while hi - lo > 1 and target - lo_tokens > self.TOLERANCE:
                mid = (lo + hi) // 2
                tokens = self.count(self._prompt(paper, mid, rng_seed))
                if tokens <= target:
                    lo, lo_tokens = mid, tokens
                else:
                    hi = mid
            probes.append(Probe(self._prompt(paper, lo, rng_seed), lo_tokens, record.expected))
        return probes


class FileLengthener:
    """Picks long inputs from a JSONL (``--long-prompts``) by their token count."""

    def __init__(self, records: Sequence[PromptRecord], count: TokenCounter) -> None:
        self.records = list(records)
        self.count = count
        self._tokens: list[int] | None = None

    def build(self, target: int, n: int, seed: int) -> list[Probe]:
        if self._tokens is None:
            self._tokens = [self.count(r.prompt) for r in self.records]
        # The longest inputs that fit, at most 25% under the target, longest first.
        fits = sorted(((t, i) for i, t in enumerate(self._tokens) if 0.75 * target <= t <= target), reverse=True)
        return [Probe(self.records[i].prompt, t, self.records[i].expected) for t, i in fits[:n]]


class NoLengthener:
    """No way to make long inputs: every probe comes back empty (and gating probes fail)."""

    def build(self, target: int, n: int, seed: int) -> list[Probe]:
        return []


def choose_lengthener(contract: Contract, records: Sequence[PromptRecord], count: TokenCounter,
                      long_prompts: Sequence[PromptRecord] | None = None) -> tuple[Lengthener, str]:
    """The way long inputs are made for this task, and a line saying which."""
    if long_prompts:
        return FileLengthener(long_prompts, count), f"{len(long_prompts)} inputs from --long-prompts"
    demo = [r for r in records if r.input is not None and is_demo_paper(r.input)]
    if demo:
        return DemoPaperLengthener(contract, records, count), "held-out demo papers lengthened with more body text"
    return NoLengthener(), "no long inputs: pass --long-prompts JSONL to probe long contexts"
