"""The one judging of a completion: did it stop, is it JSON, does it match the schema.

The proxy's metrics and the gate's acceptance checks both call :func:`judge_completion`,
so a dashboard and a verdict can never disagree on what "stopped" or "valid JSON" means.

Definitions:

- **stopped**: the engine reported ``finish_reason == "stop"`` (EOS or a stop string).
- **length** cut: ``finish_reason == "length"``; its cause is ``context`` when prompt plus
  completion tokens reached the served ``max_model_len``, otherwise ``max_tokens`` (the
  request's own budget ran out: a runaway when the model should have stopped).
- **JSON valid**: the whole completion text, stripped of surrounding whitespace, parses with
  :func:`json.loads` *and*, when the contract has a JSON Schema, validates against it.
  ``invalid`` means it does not parse; ``schema_mismatch`` that it parses but breaks the schema.
  Only adapters whose contract expects JSON are judged; for others the result is ``None``.
- **JSON constraint** (a request that asked for JSON with ``response_format``): see
  :func:`judge_constrained`, which tells a constraint the engine ignored from an answer cut
  before its JSON could close and from JSON that breaks the adapter's contract schema.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from typing import Any, Mapping

import jsonschema


class FinishClass(str, Enum):
    """Bounded ``finish_reason`` label values."""

    STOP = "stop"
    LENGTH = "length"
    OTHER = "other"  # abort, error, tool_calls, missing, anything new


class LengthCause(str, Enum):
    """Why a ``length`` completion was cut."""

    MAX_TOKENS = "max_tokens"
    CONTEXT = "context"


class JsonResult(str, Enum):
    """Outcome of JSON judging, for adapters whose contract expects JSON."""

    VALID = "valid"
    INVALID = "invalid"
    SCHEMA_MISMATCH = "schema_mismatch"


class ConstraintResult(str, Enum):
    """How the answer to a request that asked for JSON (``response_format``) turned out."""

    #: It parses (and matches the adapter's contract schema, when it has one).
    VALID = "valid"
    #: It ended on its own (``finish_reason`` stop on the end-of-sequence token) and is not JSON:
    #: the engine did not honour the constraint.
    IGNORED = "ignored"
    #: It is not JSON, but was ended before the JSON could close: ``finish_reason`` length
    #: (max_tokens or the context limit), a stop string or stop token the request named, or
    #: anything else that is not the model's own end (an abort).
    CUT = "cut"
    #: It is JSON, as the request asked, but breaks the adapter's contract schema, which the
    #: engine never saw (the request's own schema is not checked: the proxy never runs a
    #: client's schema).
    SCHEMA_MISMATCH = "schema_mismatch"


@dataclass(frozen=True, slots=True)
class Judgement:
    """The verdict on one completion choice."""

    finish: FinishClass
    #: Set only when ``finish`` is LENGTH.
    length_cause: LengthCause | None
    #: ``None`` when the contract does not expect JSON.
    json_result: JsonResult | None
    #: The first schema error, for reports; ``None`` unless ``json_result`` is SCHEMA_MISMATCH.
    schema_error: str | None = None

    @property
    def stopped(self) -> bool:
        return self.finish is FinishClass.STOP

    @property
    def json_valid(self) -> bool:
        return self.json_result is JsonResult.VALID


def classify_finish(finish_reason: str | None) -> FinishClass:
    """Map the engine's ``finish_reason`` onto the bounded :class:`FinishClass` values."""
    if finish_reason == "stop":
        return FinishClass.STOP
    if finish_reason == "length":
        return FinishClass.LENGTH
    return FinishClass.OTHER


def length_cause(
    *,
    prompt_tokens: int | None,
    completion_tokens: int | None,
    max_model_len: int | None,
) -> LengthCause:
    """Tell a cut at the context limit from a cut at the request's ``max_tokens``.

    Without token counts or a known ``max_model_len`` the cut is attributed to ``max_tokens``
    (the request's own budget), which is what a length cut is unless the context is full.
    """
    if (
        prompt_tokens is not None
        and completion_tokens is not None
        and max_model_len is not None
        and prompt_tokens + completion_tokens >= max_model_len
    ):
        return LengthCause.CONTEXT
    return LengthCause.MAX_TOKENS


@lru_cache(maxsize=256)
def _validator_for(schema_json: str) -> jsonschema.protocols.Validator:
    schema = json.loads(schema_json)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema)


def judge_json(text: str, schema: Mapping[str, Any] | None = None) -> tuple[JsonResult, str | None]:
    """Judge ``text`` as a JSON document, optionally against ``schema``."""
    try:
        document = json.loads(text.strip())
    except (ValueError, RecursionError):
        return JsonResult.INVALID, None
    if schema is None:
        return JsonResult.VALID, None
    validator = _validator_for(json.dumps(schema, sort_keys=True))
    error = jsonschema.exceptions.best_match(validator.iter_errors(document))
    if error is None:
        return JsonResult.VALID, None
    where = "/".join(str(p) for p in error.absolute_path) or "(root)"
    return JsonResult.SCHEMA_MISMATCH, f"{where}: {error.message}"


def judge_completion(
    text: str,
    finish_reason: str | None,
    *,
    expects_json: bool,
    json_schema: Mapping[str, Any] | None = None,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
    max_model_len: int | None = None,
) -> Judgement:
    """Judge one completion choice: its finish, its length cause, and its JSON result."""
    finish = classify_finish(finish_reason)
    cause = None
    if finish is FinishClass.LENGTH:
        cause = length_cause(
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, max_model_len=max_model_len
        )
    json_result = schema_error = None
    if expects_json:
        json_result, schema_error = judge_json(text, json_schema)
    return Judgement(finish=finish, length_cause=cause, json_result=json_result, schema_error=schema_error)


def judge_constrained(
    text: str,
    finish_reason: str | None,
    stop_reason: object = None,
    json_schema: Mapping[str, Any] | None = None,
) -> ConstraintResult:
    """Judge the answer to a request that asked for JSON (see :class:`ConstraintResult`).

    ``stop_reason`` is vLLM's: ``None`` when a ``stop`` answer ended on the end-of-sequence
    token, else the stop string or token id the request named that ended it. ``json_schema``
    is the adapter's contract schema, if any.
    """
    result, _ = judge_json(text, json_schema)
    if result is JsonResult.VALID:
        return ConstraintResult.VALID
    if result is JsonResult.SCHEMA_MISMATCH:
        return ConstraintResult.SCHEMA_MISMATCH
    if finish_reason == "stop" and stop_reason is None:
        return ConstraintResult.IGNORED
    return ConstraintResult.CUT
