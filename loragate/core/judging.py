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

The schema's verdict is ``jsonschema``'s (the reference, and the source of every error message
in reports). A schema is compiled once (:class:`CompiledSchema`, :func:`compile_schema`; the
proxy compiles each contract's at start-up) and a document it matches is recognised by
``jsonschema-rs`` in well under the time the parse takes, where that validator's verdicts are
proven to be ``jsonschema``'s (tests/test_schema_judging.py); everything else is judged by
``jsonschema`` itself.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from typing import Any, Mapping

import jsonschema
import jsonschema_rs


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


class _PythonPattern:
    """``pattern`` for the compiled validator, with :func:`re.search`, as ``jsonschema`` checks it.

    Python's :mod:`re` and the Rust engine differ on what some patterns match (``$`` before a
    final newline, ``\\d`` and ``\\w`` beyond ASCII, Python-only syntax), so the compiled
    validator calls Python's for every ``pattern`` (and so for ``propertyNames``' patterns).
    """

    def __init__(self, parent_schema: Any, value: Any, schema_path: Any) -> None:
        self._search = re.compile(value).search

    def validate(self, instance: Any) -> None:
        if isinstance(instance, str) and self._search(instance) is None:
            raise ValueError("does not match the pattern")


#: Keywords the compiled validator checks exactly as ``jsonschema`` does for a draft (proven on
#: generated documents by tests/test_schema_judging.py), and where their values hold subschemas.
_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment", "deprecated", "readOnly",
                          "writeOnly", "format", "$defs", "definitions"})
_COMMON = frozenset({"type", "enum", "const", "properties", "required", "additionalProperties", "items", "contains",
                     "minItems", "maxItems", "uniqueItems", "minLength", "maxLength", "pattern", "minimum",
                     "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minProperties",
                     "maxProperties", "propertyNames", "allOf", "anyOf", "oneOf", "not", "if", "then", "else",
                     "$ref"}) | _ANNOTATIONS
_FAST_KEYWORDS: dict[type, frozenset[str]] = {
    jsonschema.Draft202012Validator: _COMMON | {"prefixItems", "minContains", "maxContains", "dependentRequired",
                                                "dependentSchemas"},
    jsonschema.Draft7Validator: _COMMON | {"additionalItems", "dependencies"},
}
#: Every keyword of any draft: one a draft's compiled validator is not proven on sends the schema
#: to ``jsonschema`` alone; any other key is a user's annotation, which both ignore.
_ALL_KEYWORDS = _COMMON | {
    "prefixItems", "minContains", "maxContains", "dependentRequired", "dependentSchemas", "additionalItems",
    "dependencies", "patternProperties", "unevaluatedProperties", "unevaluatedItems", "$dynamicRef",
    "$dynamicAnchor", "$recursiveRef", "$recursiveAnchor", "$anchor", "$id", "id", "$schema", "$vocabulary",
    "contentMediaType", "contentEncoding", "contentSchema", "divisibleBy", "disallow", "extends", "optional",
}
_SUBSCHEMA = frozenset({"additionalProperties", "items", "contains", "propertyNames", "not", "if", "then", "else",
                        "additionalItems"})
_SUBSCHEMA_LISTS = frozenset({"allOf", "anyOf", "oneOf", "prefixItems", "items"})
_SUBSCHEMA_MAPS = frozenset({"properties", "$defs", "definitions", "dependentSchemas", "dependencies"})
#: Keywords whose values hold numbers an instance is compared with.
_NUMBERS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "const", "enum"})


def _fast_keywords_only(schema: Any, allowed: frozenset[str], root: bool = True) -> bool:
    """Whether every keyword of ``schema`` and its subschemas is one ``allowed`` holds, every
    ``$ref`` points inside the document, every ``multipleOf`` is an integer and every number a
    value is compared with is below :data:`EXACT_LIMIT`."""
    if isinstance(schema, bool):
        return True
    if not isinstance(schema, Mapping):
        return False
    for key, value in schema.items():
        if key in ("$schema", "$id") and root:
            continue
        if key not in allowed:
            if key in _ALL_KEYWORDS:
                return False
            continue  # an annotation of the user's own, ignored by both
        if key == "$ref" and not (isinstance(value, str) and value.startswith("#")):
            return False
        if key == "multipleOf" and (isinstance(value, bool) or not isinstance(value, int)):
            return False  # a float divisor: jsonschema divides in floats, jsonschema-rs does not
        if key in _NUMBERS and not _exact_numbers(value):
            return False
        if key in _SUBSCHEMA_LISTS and isinstance(value, list):
            subschemas: list = value
        elif key in _SUBSCHEMA_MAPS and isinstance(value, Mapping):
            # draft 7's dependencies map to schemas or to lists of property names
            subschemas = [v for v in value.values() if not (key == "dependencies" and isinstance(v, list))]
        elif key in _SUBSCHEMA:
            subschemas = [value]
        else:
            continue
        if not all(_fast_keywords_only(sub, allowed, root=False) for sub in subschemas):
            return False
    return True


#: Numbers from this magnitude up lose their exactness in a double, and jsonschema-rs compares
#: them otherwise than Python does (a float against an integer of the same value, a float's
#: remainder): a document with a float this large, or a schema with a number this large, is
#: judged by ``jsonschema`` alone.
EXACT_LIMIT = 2 ** 53


class _ForReference(Exception):
    """The document holds a number jsonschema-rs does not judge as ``jsonschema`` does: a float of
    :data:`EXACT_LIMIT` or more, or one that is not finite (NaN, infinities, a literal beyond a
    double's range), which ``json.loads`` accepts and jsonschema-rs (holding JSON, which has
    none) does not. Not a ValueError: that would mean "not JSON"."""


def _checked_float(literal: str) -> float:
    value = float(literal)  # what json.loads makes of a number with a fraction or an exponent
    if not -EXACT_LIMIT < value < EXACT_LIMIT:  # NaN included
        raise _ForReference(literal)
    return value


def _constant(constant: str) -> float:
    raise _ForReference(constant)  # NaN, Infinity, -Infinity


#: ``json.loads`` as it is (``json.loads(s)`` is ``JSONDecoder().decode(s)``), but that it stops
#: at a float the compiled validator must not judge.
_CHECKED_DECODER = json.JSONDecoder(parse_float=_checked_float, parse_constant=_constant)


def _exact_numbers(value: Any) -> bool:
    """Whether every number in ``value`` (a keyword's value: a bound, a const, an enum) is below
    :data:`EXACT_LIMIT` in magnitude."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return -EXACT_LIMIT < value < EXACT_LIMIT
    if isinstance(value, list):
        return all(_exact_numbers(v) for v in value)
    if isinstance(value, Mapping):
        return all(_exact_numbers(v) for v in value.values())
    return True


def _compile_fast(schema: Any, reference: type) -> Any:
    """The compiled (``jsonschema-rs``) validator for ``schema``, or None where its verdicts are
    not proven to be ``reference``'s: another draft than 2020-12 or 7, a keyword outside
    :data:`_FAST_KEYWORDS`, a ``$ref`` out of the document, or a schema it refuses."""
    allowed = _FAST_KEYWORDS.get(reference)
    if allowed is None or not _fast_keywords_only(schema, allowed):
        return None
    cls = jsonschema_rs.Draft202012Validator if reference is jsonschema.Draft202012Validator \
        else jsonschema_rs.Draft7Validator
    # the draft is the one jsonschema picked (it reads $schema, 2020-12 when unknown or absent);
    # formats are annotations only, as in jsonschema without a format checker
    fast_schema = {k: v for k, v in schema.items() if k != "$schema"}
    try:
        return cls(fast_schema, validate_formats=False, offline=True, keywords={"pattern": _PythonPattern})
    except Exception:  # anything it cannot compile is judged by jsonschema alone
        return None


class CompiledSchema:
    """A contract's JSON Schema, compiled once: the verdict from ``jsonschema-rs`` where it can
    give it, the first error (and every verdict it cannot give) from ``jsonschema``.

    ``jsonschema`` (Python) is the reference: its verdicts, and its error message for reports.
    Validating in Python costs about 100 µs for the demo layout, fifty times the parse; the
    compiled validator takes under 1 µs. It answers only "valid" on its own: a document it
    finds invalid, or must not take (a lone surrogate, a float of 2**53 or more or not finite), is judged
    by ``jsonschema``, which gives the error message. So the two can only disagree where
    the compiled validator calls valid what ``jsonschema`` does not, which :func:`_compile_fast`
    rules out by keeping it to the keywords proven alike (tests/test_schema_judging.py); any other
    schema is judged by ``jsonschema`` alone.
    """

    __slots__ = ("fast", "reference", "schema")

    def __init__(self, schema: Mapping[str, Any]) -> None:
        schema = json.loads(json.dumps(schema))  # a private copy: what it was compiled from stays put
        self.schema = schema
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        self.reference: jsonschema.protocols.Validator = cls(schema)
        self.fast = _compile_fast(schema, cls)

    def first_error(self, document: Any, checked: bool = False) -> str | None:
        """``None`` when ``document`` matches the schema, else its first error as ``path: message``.

        Only a document ``checked`` to hold no float the compiled validator judges otherwise
        (:data:`EXACT_LIMIT`) is judged by it.
        """
        if checked and self.fast is not None:
            try:
                if self.fast.is_valid(document):
                    return None
            except Exception:  # a document it cannot take (a lone surrogate): jsonschema judges it
                pass
        return self.reference_error(document)

    def reference_error(self, document: Any) -> str | None:
        """``jsonschema``'s verdict alone: ``None`` or the first error as ``path: message``.

        A document ``jsonschema`` cannot check (it raises: a float ``multipleOf`` of an infinity
        or NaN, which ``json.loads`` reads from ``Infinity``, ``NaN`` or ``1e400``) does not
        match: its message says why, and the judging never raises into the proxy's counting.
        """
        try:
            error = jsonschema.exceptions.best_match(self.reference.iter_errors(document))
        except (ArithmeticError, ValueError) as exc:
            return f"(root): cannot be checked against the schema ({type(exc).__name__}: {exc})"
        if error is None:
            return None
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        return f"{where}: {error.message}"


@lru_cache(maxsize=256)
def _compiled(schema_json: str) -> CompiledSchema:
    return CompiledSchema(json.loads(schema_json))


def compile_schema(schema: Mapping[str, Any] | CompiledSchema) -> CompiledSchema:
    """``schema`` compiled (the same object for equal schemas, up to 256 of them)."""
    if isinstance(schema, CompiledSchema):
        return schema
    return _compiled(json.dumps(schema, sort_keys=True))


def judge_json(text: str, schema: Mapping[str, Any] | CompiledSchema | None = None) -> tuple[JsonResult, str | None]:
    """Judge ``text`` as a JSON document, optionally against ``schema``.

    A schema judged often (a contract's, on the proxy's every completion) is best passed
    compiled (:func:`compile_schema`): a plain mapping is looked up by its JSON text each time.
    """
    stripped = text.strip()
    checked = True
    try:
        try:
            document = _CHECKED_DECODER.decode(stripped)
        except _ForReference:
            checked = False
            document = json.loads(stripped)
    except (ValueError, RecursionError):
        return JsonResult.INVALID, None
    if schema is None:
        return JsonResult.VALID, None
    error = compile_schema(schema).first_error(document, checked)
    if error is None:
        return JsonResult.VALID, None
    return JsonResult.SCHEMA_MISMATCH, error


def judge_completion(
    text: str,
    finish_reason: str | None,
    *,
    expects_json: bool,
    json_schema: Mapping[str, Any] | CompiledSchema | None = None,
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
    json_schema: Mapping[str, Any] | CompiledSchema | None = None,
) -> ConstraintResult:
    """Judge the answer to a request that asked for JSON (see :class:`ConstraintResult`).

    ``stop_reason`` is vLLM's: ``None`` when a ``stop`` answer ended on the end-of-sequence
    token, else the stop string or token id the request named that ended it. ``json_schema``
    is the adapter's contract schema, if any (best passed compiled, as for :func:`judge_json`).
    """
    result, _ = judge_json(text, json_schema)
    if result is JsonResult.VALID:
        return ConstraintResult.VALID
    if result is JsonResult.SCHEMA_MISMATCH:
        return ConstraintResult.SCHEMA_MISMATCH
    if finish_reason == "stop" and stop_reason is None:
        return ConstraintResult.IGNORED
    return ConstraintResult.CUT
