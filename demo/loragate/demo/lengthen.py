"""Long-context probes for the demo task: the held-out papers, lengthened with more body text.

The gate needs the same task at more input tokens to probe long contexts. For the demo's papers
(``Title:/Authors:/## Section/Style:``) that is easy without changing the right answer: more
body sentences (:func:`loragate.demo.data.lengthen`). :func:`demo_lengthener` is the
:data:`loragate.acceptance.prompts.LengthenerFactory` that ``loragate gate`` passes to the gate;
it declines (None) for any other task's prompts.
"""

from __future__ import annotations

import random
import re
from typing import Any, Sequence

from loragate.acceptance.prompts import Lengthener, Probe, PromptRecord, TokenCounter, render
from loragate.core.contracts import Contract
from loragate.demo.data import Paper, lengthen

_DEMO_PAPER = re.compile(r"^Title: [^\n]+\nAuthors: [^\n]+\n(?:## [^\n]+\n[^\n]*\n)+Style: [^\n]+$")


def is_demo_paper(text: str) -> bool:
    """Whether ``text`` is a paper in the demo task's format (see :mod:`loragate.demo.data`)."""
    return bool(_DEMO_PAPER.match(text))


def parse_demo_paper(text: str) -> Any:
    """The :class:`loragate.demo.data.Paper` that renders to ``text``."""
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
        # A fresh generator per call: the first ``extra`` sentences are the same for every
        # ``extra``, so the prompt grows monotonically and a bisection finds the largest fit.
        return render(self.contract, lengthen(paper, random.Random(seed), extra).text)

    def build(self, target: int, n: int, seed: int) -> list[Probe]:
        probes: list[Probe] = []
        for index, record in enumerate(self.records):
            if len(probes) >= n:
                break
            if record.input is None:  # __init__ keeps only records with an input
                raise ValueError("a demo-paper record without an input")
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



def demo_lengthener(contract: Contract, records: Sequence[PromptRecord],
                    count: TokenCounter) -> tuple[Lengthener, str] | None:
    """The demo papers' lengthener when the held-out inputs are demo papers, else None."""
    if any(r.input is not None and is_demo_paper(r.input) for r in records):
        return DemoPaperLengthener(contract, records, count), "held-out demo papers lengthened with more body text"
    return None
