"""An engine answer read for judging, and its choices judged: one reading for live requests and shadows.

:func:`whole_answer` reads a non-streamed completions or chat answer (what the engine answered
decides: a choice with ``text`` is a completion, one with a ``message`` a chat answer);
:func:`judge_outputs` judges each choice on its generated part (an echoed prompt left out) with
the one shared :func:`~loragate.core.judging.judge_completion`, by an adapter's contract: its
schema as :class:`~loragate.server.adapters.AdapterNames` compiled it at start-up, its context
limit as the engine serves it.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

from loragate.core.judging import ConstraintResult, Judgement, judge_completion, judge_constrained
from loragate.server.adapters import AdapterNames
from loragate.server.fields import Asked, echoed_prefix, generated_part


class Output(NamedTuple):
    """One choice of an answer as the engine sent it, for judging."""

    text: str
    finish_reason: str | None
    #: vLLM's stop_reason: the stop string or token id that ended it (None: the end-of-sequence token)
    stop_reason: object
    #: a chat answer's role (None for a completion)
    role: str | None


class Answer(NamedTuple):
    """A whole answer's choices, usage report and kind."""

    outputs: list[Output]
    usage: dict
    chat: bool
    model: object


def whole_answer(answer: Any) -> Answer:
    """The choices of a parsed non-streamed answer; ``KeyError``/``TypeError``/``AttributeError``
    when it is not a completions or chat answer."""
    choices = answer["choices"]
    usage = answer.get("usage") or {}
    outputs: list[Output] = []
    chat = False
    for c in choices:
        if "text" in c:
            outputs.append(Output(c["text"] or "", c.get("finish_reason"), c.get("stop_reason"), None))
        else:
            message = c.get("message") or {}
            chat = True
            outputs.append(Output(message.get("content") or "", c.get("finish_reason"),
                                  c.get("stop_reason"), message.get("role")))
    return Answer(outputs, usage if isinstance(usage, dict) else {}, chat, answer.get("model"))


def judge_outputs(outputs: list[Output], usage: Mapping[str, Any], chat: bool, asked: Asked,
                  names: AdapterNames, adapter: str,
                  constrained: bool) -> list[tuple[Judgement, ConstraintResult | None]]:
    """Each choice judged on its generated part by ``adapter``'s contract (JSON, its compiled
    schema, its context limit), all three read from ``names``; with ``constrained`` (the request
    asked for JSON) also :func:`judge_constrained`, against the same compiled schema."""
    usage = usage if isinstance(usage, Mapping) else {}
    contract = names.contract(adapter)
    json_contract = bool(contract and contract.expects_json)
    schema = names.schema(adapter)
    context_limit = names.context_limit(adapter)
    prompt_tokens = usage.get("prompt_tokens")
    completion_tokens = usage.get("completion_tokens")
    per_choice = completion_tokens // len(outputs) if completion_tokens and len(outputs) > 1 else completion_tokens
    judged: list[tuple[Judgement, ConstraintResult | None]] = []
    for i, out in enumerate(outputs):
        generated = generated_part(out.text, echoed_prefix(asked, i, len(outputs), chat, out.role))
        judgement = judge_completion(generated or "", out.finish_reason,
                                     expects_json=json_contract and generated is not None,
                                     json_schema=schema, prompt_tokens=prompt_tokens,
                                     completion_tokens=per_choice, max_model_len=context_limit)
        result = None
        if constrained and generated is not None:
            result = judge_constrained(generated, out.finish_reason, out.stop_reason, schema)
        judged.append((judgement, result))
    return judged
