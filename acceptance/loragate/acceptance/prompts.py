"""Held-out prompts and long-context probe prompts, in the adapter's own prompt template.

A prompts file is JSONL, one example a line: ``{"input": "..."}`` (rendered through the
contract's ``prompt_template``, exactly as in training; for a chat contract, into its
``system_prompt`` and ``user_template`` turns) or ``{"prompt": "..."}`` already in the template
(it must start and end as the template does), or, for a chat contract, ``{"messages": [...]}``
(OpenAI chat format, the conversation up to the turn the adapter answers, taken as it is).
``expected`` (optional) is the right answer, for a reported, never gating, exact-match share.

A chat request's "prompt" in a plan is its conversation as a JSON array (:func:`render`,
:func:`chat_messages`): one string identifies, counts and sends it like a completion prompt.

Long-context probes need the same task at more input tokens:

- a ``--long-prompts`` JSONL of long inputs, picked by their token count (any task);
- or a task-specific lengthener the caller passes (:data:`LengthenerFactory`): the demo's
  lengthens its papers with more body sentences, so the right answer does not change
  (:mod:`loragate.demo.lengthen`; ``loragate gate`` passes it).

Lengths are measured with the engine's own tokenizer (``/tokenize``), so a probe sized at
``L`` tokens is at most ``L`` tokens as the engine sees it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from loragate.core.contracts import PROMPT_INPUT_FIELD, Contract
from loragate.core.errors import GateError
from loragate.core.jsonl import read_objects


class PromptsError(GateError):
    """A prompts file is missing, malformed, or too small for the sample sizes the bars need."""


@dataclass(frozen=True)
class PromptRecord:
    """One held-out example: its input (``None`` when only the rendered prompt is known)."""

    prompt: str
    input: str | None
    expected: Any = None


def render(contract: Contract, text: str) -> str:
    """A plan's prompt for ``text``: the rendered prompt (completions), or the conversation as a
    JSON array (chat)."""
    if contract.is_chat:
        return json.dumps(contract.render_messages(text), ensure_ascii=False)
    return contract.render_prompt(text)


def chat_messages(prompt: str) -> list[dict[str, Any]]:
    """The conversation a chat plan's prompt holds (see :func:`render`)."""
    messages = json.loads(prompt)
    if not isinstance(messages, list):
        raise ValueError("a chat prompt is a JSON array of messages")
    return messages


def _last_user_text(messages: list[Any]) -> str | None:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user" and isinstance(message.get("content"), str):
            return message["content"]
    return None


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
            records.append(PromptRecord(render(contract, text), text, data.get("expected")))
            continue
        if contract.is_chat:
            messages = data.get("messages")
            if not (isinstance(messages, list) and messages and all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)):
                raise PromptsError(f"{source}:{number}: {contract.name} is a chat adapter: each line needs a string "
                                   "'input' or 'messages' (a list of {role, content} turns)")
            if messages[-1].get("role") != "user":
                raise PromptsError(f"{source}:{number}: 'messages' must end with the user turn the adapter answers")
            records.append(PromptRecord(json.dumps(messages, ensure_ascii=False), _last_user_text(messages),
                                        data.get("expected")))
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


#: Makes a task-specific :class:`Lengthener` from the held-out records, with a line saying
#: what it does, or returns None when the records are not its task's.
LengthenerFactory = Callable[[Contract, Sequence["PromptRecord"], "TokenCounter"], "tuple[Lengthener, str] | None"]


def choose_lengthener(contract: Contract, records: Sequence[PromptRecord], count: TokenCounter,
                      long_prompts: Sequence[PromptRecord] | None = None,
                      factory: LengthenerFactory | None = None) -> tuple[Lengthener, str]:
    """The way long inputs are made for this task, and a line saying which."""
    if long_prompts:
        return FileLengthener(long_prompts, count), f"{len(long_prompts)} inputs from --long-prompts"
    if factory is not None and (made := factory(contract, records, count)) is not None:
        return made
    return NoLengthener(), "no long inputs: pass --long-prompts JSONL to probe long contexts"
