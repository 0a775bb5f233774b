"""The synthetic demo task: a short "paper" in, a JSON poster layout out.

Everything here is a pure function of a :class:`random.Random`, so the same seed gives the
same corpus on every machine. The layout depends only on the paper's title, authors and
section headings, never on how long the sections are: a paper padded with more body text
(a long-context probe, :func:`make_paper` with more ``sentences_per_section``) has the same
right answer as the short one.

The same task is also posed as a chat: :func:`conversation` turns papers into user turns and
their layouts into assistant turns. The tokenizer's chat template (see
:mod:`loragate.demo.build`) renders a user turn as exactly :data:`PROMPT_TEMPLATE`, an optional
system turn as :data:`SYSTEM_TEMPLATE`, and an assistant turn as the answer followed by ``</s>``
(and a newline when another turn follows).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

#: The prompt every demo adapter is trained with; ``{input}`` is the paper text.
PROMPT_TEMPLATE = "### Paper:\n{input}\n### Layout:\n"
#: How a layout is serialised in the training targets (``json.dumps`` keywords): recorded in the
#: contracts (``target_json_format``) so a held-out ``expected`` layout becomes the exact answer text.
TARGET_JSON_FORMAT: dict = {"ensure_ascii": False}
#: How the chat template renders a system turn (before the first user turn); ``{input}`` is its content.
SYSTEM_TEMPLATE = "### System:\n{input}\n"

SECTIONS = ("Introduction", "Background", "Method", "Experiments", "Results", "Discussion", "Conclusion")
THEMES = ("light", "dark", "contrast")

_TITLE_ADJ = (
    "Sparse", "Adaptive", "Efficient", "Robust", "Scalable", "Low-Rank", "Causal", "Neural",
    "Recurrent", "Hierarchical", "Contrastive", "Federated", "Streaming", "Quantized", "Latent",
    "Dynamic", "Structured", "Probabilistic", "Multilingual", "Implicit",
)
_TITLE_NOUN = (
    "Attention", "Routing", "Retrieval", "Adapters", "Transformers", "Decoding", "Memory",
    "Graphs", "Embeddings", "Tokenizers", "Kernels", "Schedulers", "Caches", "Agents",
    "Diffusion", "Pruning", "Distillation", "Alignment", "Sampling", "Compression",
)
_TITLE_TAIL = (
    "for Long Documents", "at Scale", "for Edge Devices", "without Labels", "in Practice",
    "for Code Search", "under Noise", "for Speech", "with Few Examples", "for Tables",
)
_FIRST = (
    "Ada", "Bo", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivo", "Jun", "Kira", "Luis",
    "Mei", "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara", "Uma", "Vik", "Wen", "Yara",
)
_LAST = (
    "Abe", "Berg", "Costa", "Diaz", "Ekström", "Fischer", "Gupta", "Hall", "Ito", "Jensen",
    "Kowal", "Lee", "Moreau", "Nakata", "Okafor", "Park", "Rossi", "Silva", "Tanaka", "Ueda",
    "Varga", "Weber", "Xu", "Zhou",
)
_SUBJ = (
    "We", "Our method", "The model", "This approach", "The baseline", "Each layer", "The encoder",
    "The decoder", "Our system", "The adapter",
)
_VERB = (
    "reduces", "improves", "stabilises", "speeds up", "simplifies", "bounds", "measures",
    "predicts", "compresses", "explains",
)
_OBJ = (
    "the error rate", "training cost", "memory use", "latency", "the loss", "variance",
    "the attention pattern", "throughput", "recall", "the gradient norm",
)
_TAIL = (
    "on three benchmarks", "by a wide margin", "in most settings", "with little tuning",
    "across model sizes", "on long inputs", "compared to prior work", "at no extra cost",
    "under distribution shift", "for rare tokens",
)


@dataclass(frozen=True)
class Paper:
    title: str
    authors: tuple[str, ...]
    sections: tuple[tuple[str, str], ...]  # (heading, body)
    theme: str

    @property
    def text(self) -> str:
        lines = [f"Title: {self.title}", f"Authors: {', '.join(self.authors)}"]
        for heading, body in self.sections:
            lines.append(f"## {heading}")
            lines.append(body)
        lines.append(f"Style: {self.theme}")
        return "\n".join(lines)

    @property
    def layout(self) -> dict:
        """The right answer: a poster layout, three columns, panels in reading order."""
        n = len(self.sections)
        return {
            "title": self.title,
            "authors": list(self.authors),
            "panels": [
                {"heading": heading, "column": i * 3 // n + 1} for i, (heading, _) in enumerate(self.sections)
            ],
            "theme": self.theme,
        }

    @property
    def layout_json(self) -> str:
        return json.dumps(self.layout, **TARGET_JSON_FORMAT)


#: JSON Schema every layout must match (the demo adapters' contract).
LAYOUT_SCHEMA: dict = {
    "type": "object",
    "required": ["title", "authors", "panels", "theme"],
    "additionalProperties": False,
    "properties": {
        "title": {"type": "string", "minLength": 1},
        "authors": {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
        "panels": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["heading", "column"],
                "additionalProperties": False,
                "properties": {
                    "heading": {"type": "string", "minLength": 1},
                    "column": {"type": "integer", "minimum": 1, "maximum": 3},
                },
            },
        },
        "theme": {"type": "string", "enum": list(THEMES)},
    },
}


def sentence(rng: random.Random) -> str:
    return f"{rng.choice(_SUBJ)} {rng.choice(_VERB)} {rng.choice(_OBJ)} {rng.choice(_TAIL)}."


def make_paper(rng: random.Random, sentences_per_section: tuple[int, int] = (2, 4)) -> Paper:
    """A random paper; ``sentences_per_section`` is the (min, max) body length of a section."""
    title = f"{rng.choice(_TITLE_ADJ)} {rng.choice(_TITLE_NOUN)} {rng.choice(_TITLE_TAIL)}"
    authors = tuple(
        f"{rng.choice(_FIRST)} {rng.choice(_LAST)}" for _ in range(rng.randint(1, 3))
    )
    count = rng.randint(3, 5)
    headings = sorted(rng.sample(SECTIONS, count), key=SECTIONS.index)
    lo, hi = sentences_per_section
    sections = tuple((h, " ".join(sentence(rng) for _ in range(rng.randint(lo, hi)))) for h in headings)
    return Paper(title=title, authors=authors, sections=sections, theme=rng.choice(THEMES))


def conversation(papers: list[Paper] | tuple[Paper, ...]) -> list[dict[str, str]]:
    """A chat about ``papers``: one user turn (the paper) and one assistant turn (its layout) each."""
    messages: list[dict[str, str]] = []
    for paper in papers:
        messages.append({"role": "user", "content": paper.text})
        messages.append({"role": "assistant", "content": paper.layout_json})
    return messages


def lengthen(paper: Paper, rng: random.Random, extra_sentences: int) -> Paper:
    """The same paper with ``extra_sentences`` more body sentences spread over its sections.

    The layout (the right answer) is unchanged: this is how long-context probes are made.
    """
    bodies = [body for _, body in paper.sections]
    for i in range(extra_sentences):
        k = i % len(bodies)
        bodies[k] = f"{bodies[k]} {sentence(rng)}"
    sections = tuple((h, b) for (h, _), b in zip(paper.sections, bodies))
    return Paper(title=paper.title, authors=paper.authors, sections=sections, theme=paper.theme)
