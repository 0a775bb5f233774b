"""``loragate check-data``: does every training example fit the sequence length it is trained at?

A trainer truncates each example to ``max_seq_length`` from the right. An example that does
not fit loses the end of its *target*: with the EOS cut the adapter never learns to stop; with
the whole target cut (prompt alone at or beyond the limit) it learns to continue the prompt
instead of answering. Nothing in a loss curve shows this, so it is counted here.

Formats (detected from the first line's keys, every line must match; ``--format`` forces one):

- ``prompt-completion`` (TRL, strings): the prompt with the tokenizer's special tokens (BOS),
  the completion without, then one EOS (``--no-eos`` leaves it out). Target: completion + EOS.
- ``alpaca`` (``instruction``/``input``/``output``): the prompt is the standard Alpaca template
  (the no-input variant when ``input`` is empty), then as ``prompt-completion``.
- ``messages`` (TRL conversational) and ``chat-prompt-completion`` (``prompt`` and
  ``completion`` lists of messages): the tokenizer's chat template over the whole
  conversation. Targets: the assistant turns (of the completion, for the latter). A turn's
  tokens run from the rendering of the conversation before it (with the generation prompt)
  to the rendering up to and including it; its EOS is whatever the template writes.

Counts reported:

- ``fit``: the (last) target and its EOS within ``max_seq_length``.
- ``target_cut``: the rest: at least the last token of the (last) target, its EOS for the
  string formats, is cut (``fit + target_cut = total``).
- ``target_fully_cut``: no target token within ``max_seq_length`` (the prompt fills it).
- ``eos_only_cut``: the target fits but its EOS does not: the adapter cannot learn to stop.
- ``target_tokens_cut`` of ``target_tokens``: target tokens beyond ``max_seq_length``, overall.
- conversational: ``assistant_turns``, ``assistant_turns_cut``, ``last_turn_cut`` (= ``target_cut``),
  ``every_turn_cut`` (even the first assistant turn is cut), ``last_turn_without_eos``.
- ``--packing`` (examples concatenated, each followed by EOS, cut into windows of
  ``max_seq_length``): ``windows``, ``examples_split`` across a window boundary,
  ``targets_straddling`` one (a target's tokens in two windows). The exit status stays that
  of the truncation counts.

Lengths (min/p50/p95/max): prompt (tokens before the first target), completion (target
tokens, EOS excluded for the string formats) and whole example.

With an adapter's contract (``--contracts FILE --adapter NAME``), each example's target text
(the completion or ``output``; for the conversational formats the last assistant turn's
content) is also judged with the gate's judging (:mod:`loragate.acceptance.target_check`):
empty targets, and for JSON output valid / schema mismatch / fenced / text around the JSON /
not JSON; ``ok`` then also needs no empty target and the valid share at least the contract's
``json_validity``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from loragate.acceptance.target_check import TargetCounts, judge_targets
from loragate.core.contracts import load_contracts
from loragate.core.errors import LoragateError
from loragate.core.jsonl import read_objects
from loragate.core.stats import percentile

#: The formats ``check-data`` reads (``--format``).
FORMATS = ("prompt-completion", "messages", "chat-prompt-completion", "alpaca")
CONVERSATIONAL = ("messages", "chat-prompt-completion")

#: The standard Alpaca prompt (Stanford Alpaca, alpaca-lora), with and without an input.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


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
    def of(cls, values: Sequence[int]) -> LengthStats:
        ordered = sorted(values)
        return cls(min=ordered[0], p50=_pct(ordered, 50), p95=_pct(ordered, 95),
                   max=ordered[-1])

    def to_dict(self) -> dict[str, float]:
        return {"min": self.min, "p50": self.p50, "p95": self.p95, "max": self.max}


@dataclass(frozen=True)
class ConversationCounts:
    """Assistant-turn counts of a conversational check."""

    assistant_turns: int
    assistant_turns_cut: int
    last_turn_cut: int
    every_turn_cut: int
    last_turn_without_eos: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class PackingCounts:
    """What cutting the concatenated examples into windows of ``max_seq_length`` does."""

    tokens: int
    windows: int
    examples_split: int
    targets_straddling: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


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
    format: str = "prompt-completion"
    #: How the format was chosen, e.g. "detected from the keys prompt/completion".
    format_origin: str = ""
    target_tokens: int = 0
    target_tokens_cut: int = 0
    #: The smallest max_seq_length at which every target and its EOS fit.
    needed_max_seq_length: int = 0
    conversation: ConversationCounts | None = None
    packing: PackingCounts | None = None
    #: The targets judged against an adapter's contract (``--contracts``/``--adapter``), else None.
    targets: TargetCounts | None = None

    @property
    def fits(self) -> bool:
        """No example has any part of its target (EOS included) cut."""
        return self.target_cut == 0

    @property
    def ok(self) -> bool:
        """Every target fits and, when judged against a contract, its bars hold (the exit status)."""
        return self.fits and (self.targets is None or self.targets.ok)

    @property
    def conversational(self) -> bool:
        return self.format in CONVERSATIONAL

    def format_line(self) -> str:
        return f"format: {self.format} ({self.format_origin})" if self.format_origin else f"format: {self.format}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "max_seq_length": self.max_seq_length, "total": self.total,
            "fit": self.fit, "target_cut": self.target_cut, "target_fully_cut": self.target_fully_cut,
            "eos_only_cut": self.eos_only_cut, "ok": self.ok, "fits": self.fits,
            "prompt_tokens": self.prompt_tokens.to_dict(),
            "completion_tokens": self.completion_tokens.to_dict(),
            "example_tokens": self.example_tokens.to_dict(),
            "first_cut_lines": list(self.first_cut_lines),
            "format": self.format, "format_origin": self.format_origin,
            "target_tokens": self.target_tokens, "target_tokens_cut": self.target_tokens_cut,
            "needed_max_seq_length": self.needed_max_seq_length,
            "conversation": self.conversation.to_dict() if self.conversation else None,
            "packing": self.packing.to_dict() if self.packing else None,
            "targets": self.targets.to_dict() if self.targets else None,
        }

    def summary(self) -> str:
        """Human-readable lines for the terminal."""
        def dist(s: LengthStats) -> str:
            return f"min {s.min}, p50 {s.p50:g}, p95 {s.p95:g}, max {s.max}"

        if self.conversational:
            fit_label, fully_label = "last assistant turn + EOS", "no assistant token fits"
            prompt_label, completion_label = "prompt", "assistant"  # prompt: before the first target turn
        else:
            fit_label, fully_label = "prompt + completion + EOS", "prompt >= max_seq_length"
            prompt_label, completion_label = "prompt", "completion"
        lines = [
            self.format_line(),
            f"{self.source}: {self.total} examples at max_seq_length {self.max_seq_length}",
            f"  fit ({fit_label}):  {self.fit} of {self.total}",
            f"  target cut (at least its EOS):    {self.target_cut} of {self.total}",
            f"    whole target cut ({fully_label}): {self.target_fully_cut}",
            f"    only the EOS cut (cannot learn to stop):     {self.eos_only_cut}",
        ]
        c = self.conversation
        if c is not None:
            lines += [
                f"    every assistant turn cut:                    {c.every_turn_cut}",
                f"  assistant turns: {c.assistant_turns}, cut: {c.assistant_turns_cut}",
            ]
        lines.append(f"  target tokens cut: {self.target_tokens_cut} of {self.target_tokens}")
        width = max(len(prompt_label), len(completion_label), len("example")) + len(" tokens:")
        for label, stats in ((prompt_label, self.prompt_tokens), (completion_label, self.completion_tokens),
                             ("example", self.example_tokens)):
            lines.append(f"  {label + ' tokens:':<{width}} {dist(stats)}")
        p = self.packing
        if p is not None:
            lines.append(f"  packing: {p.tokens} tokens in {p.windows} windows of {self.max_seq_length}: "
                         f"{p.examples_split} examples split across a window boundary, "
                         f"{p.targets_straddling} targets straddle one")
        if c is not None and c.last_turn_without_eos:
            lines.append(f"note: in {c.last_turn_without_eos} of {self.total} examples the chat template writes no "
                         f"EOS in the last assistant turn: only its end-of-turn token can teach the adapter to stop.")
        t = self.targets
        if t is not None:
            lines += t.summary_lines()
            if t.api == "chat" and not self.conversational:
                lines.append(f"note: the contract serves {t.adapter} through /v1/chat/completions (api: chat), "
                             f"but the data is {self.format}: a chat adapter is trained on conversations.")
            elif t.api != "chat" and self.conversational:
                lines.append(f"note: the contract serves {t.adapter} through /v1/completions with its "
                             f"prompt_template, but the data is {self.format} (conversations).")
        if self.fits:
            lines.append("OK: every target fits.")
        else:
            where = ", ".join(map(str, self.first_cut_lines))
            lines.append(f"PROBLEM: {self.fit} of {self.total} fit; {self.target_cut} examples would have their "
                         f"target cut (first at line(s) {where}); raise max_seq_length to at least "
                         f"{self.needed_max_seq_length} or shorten the examples.")
        if t is not None:
            lines.append(t.verdict_line())
        return "\n".join(lines)


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class DataFile:
    """The examples of a data file in one format.

    ``rows`` are ``(line, prompt, completion)`` strings for ``prompt-completion`` and ``alpaca``
    (the Alpaca prompt already rendered), ``(line, messages, first_target_message)`` for the
    conversational formats, plus the line's ``tools``/``chat_template_kwargs`` for the template.
    """

    format: str
    origin: str
    rows: list[tuple[Any, ...]]


def read_examples(path: str | os.PathLike[str], prompt_field: str = "prompt",
                  completion_field: str = "completion") -> list[tuple[int, str, str]]:
    """``(line number, prompt, completion)`` of every non-blank line of a prompt/completion JSONL."""
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


def detect_format(record: dict[str, Any], prompt_field: str = "prompt",
                  completion_field: str = "completion") -> str | None:
    """The format one line's object is in (TRL's order: prompt/completion first), or ``None``."""
    prompt, completion = record.get(prompt_field), record.get(completion_field)
    if isinstance(prompt, str) and isinstance(completion, str):
        return "prompt-completion"
    if isinstance(prompt, list) and isinstance(completion, list):
        return "chat-prompt-completion"
    if isinstance(record.get("messages"), list):
        return "messages"
    if (isinstance(record.get("instruction"), str) and isinstance(record.get("output"), str)
            and isinstance(record.get("input", ""), (str, type(None)))):
        return "alpaca"
    return None


def read_data(path: str | os.PathLike[str], format: str | None = None, *, prompt_field: str = "prompt",
              completion_field: str = "completion") -> DataFile:
    """Read a JSONL in ``format`` (``None``/``"auto"``: detected from the first line)."""
    source = Path(path)
    forced = format not in (None, "auto")
    if forced and format not in FORMATS:
        raise DataCheckError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    chosen: str | None = format if forced else None
    origin = "forced with --format" if forced else ""
    first_line = 0
    rows: list[tuple[Any, ...]] = []
    for number, record in read_objects(source, what="data file", error=DataCheckError):
        where = f"{source}:{number}"
        found = detect_format(record, prompt_field, completion_field)
        if chosen is None:
            if found is None:
                raise DataCheckError(_no_format(where, record, prompt_field, completion_field))
            chosen, first_line = found, number
            origin = f"detected from {_keys(found, record, prompt_field, completion_field)}; --format to force"
        problem = _mismatch(chosen, record, prompt_field, completion_field)
        if problem and forced:
            raise DataCheckError(f"{where}: not a {chosen} example: {problem}")
        if problem and found is not None:
            raise DataCheckError(f"{where}: mixed formats: this line is {found}, line {first_line} is {chosen}; "
                                 "one format a file (--format to force one)")
        if problem:
            raise DataCheckError(f"{where}: does not match the detected format {chosen} (line {first_line}): {problem}")
        rows.append(_row(chosen, number, where, record, prompt_field, completion_field))
    if not rows or chosen is None:
        raise DataCheckError(f"{source}: no examples")
    return DataFile(format=chosen, origin=origin, rows=rows)


def _keys(fmt: str, record: dict[str, Any], prompt_field: str, completion_field: str) -> str:
    if fmt == "prompt-completion":
        return f"the keys {prompt_field}/{completion_field}"
    if fmt == "chat-prompt-completion":
        return f"the keys {prompt_field}/{completion_field} (lists of messages)"
    if fmt == "messages":
        return "the key messages"
    return "the keys instruction/input/output" if "input" in record else "the keys instruction/output"


def _no_format(where: str, record: dict[str, Any], prompt_field: str, completion_field: str) -> str:
    found = ", ".join(sorted(record)) or "none"
    return (f"{where}: field {prompt_field!r} missing or not a string and no other format matches "
            f"(fields found: {found}); expected {prompt_field}/{completion_field} (strings or lists of messages), "
            "messages, or instruction/input/output; choose fields with --prompt-field/--completion-field")


def _mismatch(fmt: str, record: dict[str, Any], prompt_field: str, completion_field: str) -> str:
    """Why ``record`` is not a ``fmt`` example ('' when it is)."""
    found = ", ".join(sorted(record)) or "none"
    if fmt in ("prompt-completion", "chat-prompt-completion"):
        kind, kind_name = (str, "a string") if fmt == "prompt-completion" else (list, "a list of messages")
        for name in (prompt_field, completion_field):
            if not isinstance(record.get(name), kind):
                return f"field {name!r} missing or not {kind_name} (fields found: {found})"
        return ""
    if fmt == "messages":
        return "" if isinstance(record.get("messages"), list) else \
            f"field 'messages' missing or not a list of messages (fields found: {found})"
    for name in ("instruction", "output"):
        if not isinstance(record.get(name), str):
            return f"field {name!r} missing or not a string (fields found: {found})"
    if not isinstance(record.get("input", ""), (str, type(None))):
        return "field 'input' is not a string"
    return ""


def _row(fmt: str, number: int, where: str, record: dict[str, Any], prompt_field: str,
         completion_field: str) -> tuple[Any, ...]:
    if fmt == "prompt-completion":
        return (number, record[prompt_field], record[completion_field])
    if fmt == "alpaca":
        return (number, alpaca_prompt(record["instruction"], record.get("input") or ""), record["output"])
    if fmt == "messages":
        messages, first_target = record["messages"], 0
    else:
        messages, first_target = record[prompt_field] + record[completion_field], len(record[prompt_field])
    for index, message in enumerate(messages, start=1):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content", ""), (str, list, type(None)))):
            raise DataCheckError(f"{where}: message {index} is not a {{role, content}} object")
    if not any(m["role"] == "assistant" for m in messages[first_target:]):
        what = "its completion has" if fmt == "chat-prompt-completion" else "it has"
        raise DataCheckError(f"{where}: {what} no assistant turn: nothing to train")
    template_kwargs = dict(record.get("chat_template_kwargs") or {})
    if record.get("tools") is not None:
        template_kwargs["tools"] = record["tools"]
    return (number, messages, first_target, template_kwargs)


def target_texts(dataset: DataFile) -> list[tuple[int, str]]:
    """``(line, target text)`` of every example: what the adapter is trained to write.

    The completion (``output`` for Alpaca) of the string formats, without the EOS a trainer
    appends; for the conversational formats the content of the last assistant turn (the one an
    example's fit is judged on), text parts joined when the content is a list of parts.
    """
    if dataset.format not in CONVERSATIONAL:
        return [(row[0], row[2]) for row in dataset.rows]
    texts = []
    for row in dataset.rows:
        line, messages, first_target = row[0], row[1], row[2]
        last = [m for m in messages[first_target:] if m["role"] == "assistant"][-1]
        texts.append((line, _content_text(last.get("content"))))
    return texts


def _content_text(content: Any) -> str:
    """A message's text: a string as it is, a list of parts as its text parts joined, else empty."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part if isinstance(part, str) else str(part.get("text") or "")
                       for part in content if isinstance(part, str) or
                       (isinstance(part, dict) and part.get("type", "text") == "text"))
    return ""


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The standard Alpaca prompt (the no-input variant when ``input`` is empty)."""
    if input:
        return ALPACA_PROMPT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """A local Hugging Face tokenizer (never fetched from a hub)."""
    folder = Path(path)
    if not folder.is_dir():
        raise DataCheckError(f"tokenizer folder not found: {folder}")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # noqa: BLE001  (transformers raises many kinds for a folder without one)
        raise DataCheckError(f"cannot load a tokenizer from {folder}: {exc}") from None


# --------------------------------------------------------------------------- counting


@dataclass(frozen=True)
class _Example:
    """One tokenized example: its length, prompt and target spans (token offsets)."""

    line: int
    length: int
    prompt: int
    completion: int
    #: [start, end) of each target (the assistant turns; completion + EOS for strings).
    targets: tuple[tuple[int, int], ...]
    #: Offset of the last target's (last) EOS token, None when it has none.
    eos_at: int | None
    ends_with_eos: bool


def check_examples(rows: Iterable[tuple[int, str, str]], tokenizer: Any, max_seq_length: int, *,
                   add_eos: bool = True, source: str = "data", format: str = "prompt-completion",
                   format_origin: str = "", packing: bool = False) -> DataCheckResult:
    """Count what fits ``max_seq_length`` for string prompt/completion rows (see the module docstring)."""
    _check_length(max_seq_length)
    rows = list(rows)
    if add_eos and tokenizer.eos_token_id is None:
        raise DataCheckError("the tokenizer has no EOS token; pass --no-eos if the targets carry none")
    prompts = tokenizer([p for _, p, _ in rows])["input_ids"]
    completions = tokenizer([c for _, _, c in rows], add_special_tokens=False)["input_ids"]
    eos = 1 if add_eos else 0
    examples = []
    for (line, _, _), p, c in zip(rows, prompts, completions):
        end = len(p) + len(c) + eos
        examples.append(_Example(line=line, length=end, prompt=len(p), completion=len(c),
                                 targets=((len(p), end),), eos_at=end - 1 if eos else None,
                                 ends_with_eos=bool(eos)))
    return _count(examples, max_seq_length, tokenizer, source=source, format=format,
                  format_origin=format_origin, packing=packing)


def check_conversations(rows: Iterable[tuple[Any, ...]], tokenizer: Any, max_seq_length: int, *,
                        source: str = "data", format: str = "messages", format_origin: str = "",
                        packing: bool = False) -> DataCheckResult:
    """Count what fits for ``(line, messages, first_target_message[, template kwargs])`` rows.

    Each assistant turn from ``first_target_message`` on is a target; its tokens are located by
    rendering the conversation before it (with the generation prompt) and up to it with the
    tokenizer's chat template, as a trainer applies it over the whole conversation.
    """
    _check_length(max_seq_length)
    if not getattr(tokenizer, "chat_template", None):
        raise DataCheckError("the tokenizer has no chat template: conversational data needs one "
                             "(chat_template.jinja or chat_template in tokenizer_config.json)")
    eos_id = tokenizer.eos_token_id
    examples = []
    for row in rows:
        line, messages, first_target = row[0], row[1], row[2]
        kwargs = row[3] if len(row) > 3 else {}
        examples.append(_conversation(f"{source}:{line}", line, messages, first_target, kwargs, tokenizer, eos_id))
    return _count(examples, max_seq_length, tokenizer, source=source, format=format,
                  format_origin=format_origin, packing=packing)


def _conversation(where: str, line: int, messages: list[dict[str, Any]], first_target: int,
                  kwargs: dict[str, Any], tokenizer: Any, eos_id: int | None) -> _Example:
    full = _render(where, tokenizer, messages, False, kwargs)
    targets_text: list[tuple[str, str, int]] = []
    for i in range(first_target, len(messages)):
        if messages[i]["role"] != "assistant":
            continue
        upto = _render(where, tokenizer, messages[: i + 1], False, kwargs)
        if not full.startswith(upto):
            raise DataCheckError(f"{where}: the chat template renders the conversation up to message {i + 1} "
                                 "differently from the same messages within the whole conversation: "
                                 "the assistant turn's tokens cannot be located")
        before = _render(where, tokenizer, messages[:i], True, kwargs, empty_ok=i == 0)
        if not upto.startswith(before):
            before = _render(where, tokenizer, messages[:i], False, kwargs, empty_ok=i == 0)
        if not upto.startswith(before):
            raise DataCheckError(f"{where}: the chat template's rendering of the messages before message {i + 1} "
                                 "is not the start of the rendering that includes it: the assistant turn's "
                                 "tokens cannot be located")
        targets_text.append((before, upto, i + 1))
    texts = [full] + [t for before, upto, _ in targets_text for t in (before, upto)]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    full_ids = ids[0]
    spans = []
    for k, (_, _, index) in enumerate(targets_text):
        start, end = len(ids[1 + 2 * k]), min(len(ids[2 + 2 * k]), len(full_ids))
        if end <= start:
            raise DataCheckError(f"{where}: the chat template renders no tokens for the assistant turn "
                                 f"(message {index}): it cannot be trained; check the tokenizer's chat template")
        spans.append((start, end))
    last_start, last_end = spans[-1]
    eos_at = None
    if eos_id is not None:
        positions = [j for j in range(last_start, last_end) if full_ids[j] == eos_id]
        eos_at = positions[-1] if positions else None
    return _Example(line=line, length=len(full_ids), prompt=spans[0][0],
                    completion=sum(e - s for s, e in spans), targets=tuple(spans), eos_at=eos_at,
                    ends_with_eos=bool(full_ids) and full_ids[-1] == eos_id)


def _render(where: str, tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool,
            kwargs: dict[str, Any], empty_ok: bool = False) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                             **kwargs)
    except Exception as exc:  # noqa: BLE001  (jinja's raise_exception, template errors, bad kwargs)
        if empty_ok and not messages:
            return ""
        raise DataCheckError(f"{where}: the chat template cannot render this conversation: {exc}") from None
    if not isinstance(text, str):
        raise DataCheckError(f"{where}: the chat template returned {type(text).__name__}, not text")
    return text


def _count(examples: list[_Example], max_seq_length: int, tokenizer: Any, *, source: str, format: str,
           format_origin: str, packing: bool) -> DataCheckResult:
    length = max_seq_length
    fit = fully = eos_only = every = turns = turns_cut = no_eos = 0
    target_tokens = target_cut_tokens = needed = 0
    cut_lines: list[int] = []
    for ex in examples:
        last_end = ex.targets[-1][1]
        needed = max(needed, last_end)
        turns += len(ex.targets)
        for start, end in ex.targets:
            target_tokens += end - start
            target_cut_tokens += max(0, end - max(start, length))
            turns_cut += end > length
        no_eos += ex.eos_at is None
        if last_end <= length:
            fit += 1
            continue
        if ex.targets[0][0] >= length:
            fully += 1
        elif ex.eos_at == length:
            eos_only += 1
        every += ex.targets[0][1] > length
        if len(cut_lines) < 10:
            cut_lines.append(ex.line)
    conversational = format in CONVERSATIONAL
    conversation = ConversationCounts(
        assistant_turns=turns, assistant_turns_cut=turns_cut, last_turn_cut=len(examples) - fit,
        every_turn_cut=every, last_turn_without_eos=no_eos) if conversational else None
    return DataCheckResult(
        source=source, max_seq_length=length, total=len(examples), fit=fit,
        target_cut=len(examples) - fit, target_fully_cut=fully, eos_only_cut=eos_only,
        prompt_tokens=LengthStats.of([e.prompt for e in examples]),
        completion_tokens=LengthStats.of([e.completion for e in examples]),
        example_tokens=LengthStats.of([e.length for e in examples]), first_cut_lines=tuple(cut_lines),
        format=format, format_origin=format_origin, target_tokens=target_tokens,
        target_tokens_cut=target_cut_tokens, needed_max_seq_length=needed, conversation=conversation,
        packing=_pack(examples, length, tokenizer.eos_token_id) if packing else None,
    )


def _pack(examples: list[_Example], length: int, eos_id: int | None) -> PackingCounts:
    """Concatenate the examples, each followed by EOS (unless it ends with one), cut every ``length``."""
    offset = split = straddling = 0
    for ex in examples:
        size = ex.length + (0 if ex.ends_with_eos or eos_id is None else 1)
        split += _crosses(offset, offset + size, length)
        straddling += any(_crosses(offset + s, offset + e, length) for s, e in ex.targets)
        offset += size
    return PackingCounts(tokens=offset, windows=-(-offset // length), examples_split=split,
                         targets_straddling=straddling)


def _crosses(start: int, end: int, length: int) -> bool:
    """Tokens ``[start, end)`` fall in more than one window of ``length``."""
    return end - start > 0 and start // length != (end - 1) // length


def _check_length(max_seq_length: int) -> None:
    if max_seq_length < 1:
        raise DataCheckError(f"max_seq_length must be positive, got {max_seq_length}")


def check_data(data: str | os.PathLike[str], tokenizer_dir: str | os.PathLike[str], max_seq_length: int, *,
               prompt_field: str = "prompt", completion_field: str = "completion",
               add_eos: bool = True, format: str | None = None, packing: bool = False,
               contracts: str | os.PathLike[str] | None = None, adapter: str | None = None) -> DataCheckResult:
    """Read a JSONL of examples (``format`` or detected) and count what fits ``max_seq_length``;
    with ``contracts`` and ``adapter`` (both or neither) also judge the targets against that
    adapter's contract."""
    _check_length(max_seq_length)
    if (contracts is None) != (adapter is None):
        given, missing = ("--contracts", "--adapter NAME") if adapter is None else ("--adapter", "--contracts FILE")
        raise DataCheckError(f"{given} needs {missing}: the targets are judged against one adapter's contract "
                             "in an adapters file; pass both or neither")
    contract_set = load_contracts(contracts) if contracts is not None else None
    contract = contract_set[adapter] if contract_set is not None and adapter is not None else None
    dataset = read_data(data, format, prompt_field=prompt_field, completion_field=completion_field)
    tokenizer = load_tokenizer(tokenizer_dir)
    if dataset.format in CONVERSATIONAL:
        result = check_conversations(dataset.rows, tokenizer, max_seq_length, source=str(data),
                                     format=dataset.format, format_origin=dataset.origin, packing=packing)
    else:
        result = check_examples(dataset.rows, tokenizer, max_seq_length, add_eos=add_eos, source=str(data),
                                format=dataset.format, format_origin=dataset.origin, packing=packing)
    if contract_set is None or contract is None:
        return result
    return replace(result, targets=judge_targets(target_texts(dataset), contract, contracts=str(contract_set.source)))


def _pct(ordered: Sequence[int], q: float) -> float:
    value = percentile(ordered, q)
    return float("nan") if value is None else float(value)
