"""The compiled schema validator gives exactly ``jsonschema``'s verdicts and error messages.

:func:`loragate.core.judging.judge_json` lets ``jsonschema-rs`` answer "valid" for the schemas
whose keywords it checks as ``jsonschema`` does and judges everything else with ``jsonschema``.
These tests judge generated documents (built from each schema and mutated here and there: most
near-valid, many valid) and arbitrary JSON, as completion texts, both ways: through the judging
and through the reference (``json.loads``, then ``jsonschema``'s first error, as the judging
was defined before the compiled validator), and require the same verdict and the same message
for every one. The schemas cover the demo contract's and ones exercising references, enums,
patterns (whose Python and Rust meanings differ), formats, numbers past 64 bits and numbers
that are not finite, in drafts 2020-12 and 7; and schemas the compiled validator is kept away
from (pattern properties, float ``multipleOf``, numbers past 2**53, ``unevaluatedProperties``,
draft 4, content).
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loragate.core.judging import CompiledSchema, JsonResult, compile_schema, judge_completion, judge_json
from loragate.demo.data import LAYOUT_SCHEMA

RICH_2020 = {
    "$id": "https://example.com/poster.schema.json",
    "$defs": {
        "panel": {"type": "object", "required": ["heading", "column"], "additionalProperties": False,
                  "properties": {"heading": {"type": "string", "minLength": 1, "maxLength": 12},
                                 "column": {"type": "integer", "minimum": 1, "maximum": 3},
                                 "width": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}}},
        "code": {"type": "string", "pattern": "^[A-Z]{3}$"},
    },
    "type": "object",
    "required": ["title", "panels"],
    "properties": {
        "title": {"type": "string", "minLength": 1, "description": "what the poster is called"},
        "panels": {"type": "array", "items": {"$ref": "#/$defs/panel"}, "minItems": 1, "maxItems": 4,
                   "uniqueItems": True},
        "theme": {"enum": ["light", "dark", 3, None, [1, 2], {"a": 1}]},
        "version": {"const": 2},
        "code": {"$ref": "#/$defs/code"},
        "not_code": {"not": {"$ref": "#/$defs/code"}},
        "digits": {"type": "string", "pattern": "^\\d+$"},
        "tag": {"not": {"pattern": "^\\w+$"}},
        "when": {"type": "string", "format": "date"},
        "contact": {"type": "string", "format": "email"},
        "count": {"type": "integer", "multipleOf": 3, "minimum": -(2 ** 53) + 1, "maximum": 2 ** 53 - 1},
        "big": {"type": "number", "maximum": 2 ** 52, "exclusiveMinimum": -(2 ** 52) + 0.5},
        "upper": {"maximum": 3},
        "multiple": {"type": "number", "multipleOf": 3},
        "ids": {"type": "array", "uniqueItems": True},
        "not_number": {"not": {"type": "number"}},
        "pair": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False},
        "tags": {"type": "array", "contains": {"const": "x"}, "minContains": 1, "maxContains": 2},
        "size": {"oneOf": [{"type": "integer", "maximum": 10}, {"type": "integer", "minimum": 5}]},
        "label": {"anyOf": [{"type": "string", "maxLength": 3}, {"type": "null"}]},
        "meta": {"type": "object", "propertyNames": {"pattern": "^[a-z]+$"},
                 "additionalProperties": {"type": ["string", "boolean"]}, "minProperties": 1, "maxProperties": 3,
                 "dependentRequired": {"a": ["b"]}, "dependentSchemas": {"c": {"required": ["d"]}}},
        "kind": {"type": "string", "x-note": "an annotation of the user's own"},
    },
    "if": {"properties": {"kind": {"const": "big"}}, "required": ["kind"]},
    "then": {"properties": {"panels": {"minItems": 2}}},
    "else": {"properties": {"panels": {"maxItems": 3}}},
    "additionalProperties": {"type": "boolean"},
}

DRAFT_7 = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "definitions": {"name": {"type": "string", "pattern": "^[A-Za-z ]+$", "minLength": 1}},
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"$ref": "#/definitions/name", "maxLength": 1},  # draft 7: a $ref's siblings are ignored
        "point": {"type": "array", "items": [{"type": "number"}, {"type": "number"}], "additionalItems": False},
        "nums": {"type": "array", "items": {"type": "integer", "exclusiveMinimum": 0}, "uniqueItems": True},
        "born": {"type": "string", "format": "date-time"},
        "email": {"type": "string", "format": "email"},
        "not_email": {"not": {"format": "email"}},  # formats are annotations: never valid
        "flag": {"const": True},
        "level": {"enum": [1, 2.5, "high"]},
    },
    "dependencies": {"email": ["name"], "point": {"required": ["nums"]}},
    "additionalProperties": False,
}

#: Schemas the compiled validator is proven on: it must be in use for each.
FAST = {"demo layout": LAYOUT_SCHEMA, "2020-12 refs/enums/patterns/formats": RICH_2020, "draft 7": DRAFT_7}

#: Schemas it is kept away from: each but draft 4 (not proven, so not used) with documents
#: among the generated ones on which the two validators disagree.
REFERENCE_ONLY = {
    "pattern properties": {"type": "object", "patternProperties": {"^a$": {"type": "integer"}}},
    "float multipleOf": {"type": "number", "multipleOf": 0.1},
    "a bound past 2**53": {"type": "number", "maximum": 2 ** 64},
    "an enum past 2**53": {"enum": [2 ** 63, "x"]},
    "unevaluated properties": {"properties": {"a": {}}, "unevaluatedProperties": {"type": "integer"},
                               "anyOf": [{"properties": {"b": {"type": "string"}}}, {"required": ["c"]}]},
    "draft 4": {"$schema": "http://json-schema.org/draft-04/schema#", "type": "object",
                "properties": {"n": {"type": "integer", "maximum": 3, "exclusiveMaximum": True}}},
    "draft 7 content": {"$schema": "http://json-schema.org/draft-07/schema#", "type": "string",
                        "contentMediaType": "application/json"},
}

#: Strings for each pattern: matches, and the cases where Python's ``re`` and the Rust engine
#: part ways (``$`` before a final newline, ``\d`` and ``\w`` beyond ASCII).
PATTERN_STRINGS = {
    "^[A-Z]{3}$": ["ABC", "ABC\n", "AB", "abc", "ÀBC", "ABCD"],
    "^\\d+$": ["123", "١٢٣", "12a", "12\n", ""],
    "^\\w+$": ["abc", "é", "a b", "ab\n", "_", "a-b", "", "!"],
    "^[a-z]+$": ["a", "b\n", "B", "é", "ab"],
    "^[A-Za-z ]+$": ["Ada Lovelace", "Ada\n", "Ada1", "A"],
    "^a$": ["a", "a\n", "aa"],
}
#: Values anywhere: types the schemas do not expect, numbers at and past 64 bits and a double's
#: precision, numbers that are not finite, a lone surrogate.
EDGE_VALUES: list[Any] = [
    None, True, False, 0, 1, -1, 2, 3, 1.0, 2.5, 0.3, -0.0, 2 ** 53, 2 ** 53 + 1, 2 ** 63, 2 ** 64, 2 ** 64 + 1,
    2 ** 70, -(2 ** 63) - 1, 10 ** 400, 2.0 ** 63, 2.0 ** 64, 2.0 ** 70, -(2.0 ** 70), 1e308, 1e-320, float("inf"), float("-inf"), float("nan"), "", "a", "x",
    "abc\n", "١٢٣", "\ud800", "2026-12-07", "not a date", "a@b.c", [], {}, [1, 1.0], [True, 1],
    [{"a": 1}, {"a": 1.0}], {"a": 1}, [2 ** 63, 2.0 ** 63], [2 ** 70, 2.0 ** 70],
]
EXTRA_KEYS = ["extra", "a", "b", "c", "d", "a\n", "Z", "kind", "title"]
#: Completion texts as a model may write them, numbers past a double's range included.
_POSTER = '{"title": "T", "panels": [{"heading": "H", "column": 1}], '
TEXTS = [_POSTER + '"upper": 1e999}', _POSTER + '"not_number": NaN}', _POSTER + '"not_number": -Infinity}',
         _POSTER + '"multiple": 1.1805916207174113e21}', _POSTER + '"multiple": 9.3e18}',
         _POSTER + '"ids": [9223372036854775808, 9.223372036854776e18]}', _POSTER + '"ids": [1, 1.0]}',
         _POSTER + '"big": 1e999}', _POSTER + '"big": -1e999}', '{"title": "T", "panels": [{"heading": "H", "column": 1, "width": NaN}]}',
         '{"name": "Ada", "point": [1, Infinity]}', '{"n": 1E+400}', '1e999', '-Infinity', 'NaN',
         _POSTER + '"big": 1' + "0" * 320 + '.5}',
         '{"n": 3}', '{"n": 2}', '{"a\\n": "x"}', '{"a": 1, "b": "x"}', '{"c": 1, "a": 2}', '0.3', '"[1, 2]"']


def reference_judgement(text: str, schema: dict) -> tuple[JsonResult, str | None]:
    """The judging as defined: ``json.loads``, then ``jsonschema`` alone (the schema as the
    judging compiles it, keys sorted), its best match as ``path: message``."""
    try:
        document = json.loads(text.strip())
    except (ValueError, RecursionError):
        return JsonResult.INVALID, None
    schema = json.loads(json.dumps(schema, sort_keys=True))
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        error = jsonschema.exceptions.best_match(cls(schema).iter_errors(document))
    except (ArithmeticError, ValueError) as exc:  # a document jsonschema cannot check does not match
        return JsonResult.SCHEMA_MISMATCH, f"(root): cannot be checked against the schema ({type(exc).__name__}: {exc})"
    if error is None:
        return JsonResult.VALID, None
    return JsonResult.SCHEMA_MISMATCH, f"{'/'.join(str(p) for p in error.absolute_path) or '(root)'}: {error.message}"


def outcome(judge: Any, text: str, schema: Any) -> Any:
    """What ``judge(text, schema)`` returns (neither the judging nor the reference raises:
    a document ``jsonschema`` cannot check, a float ``multipleOf`` of an infinity, is a mismatch)."""
    return judge(text, schema)


@pytest.mark.parametrize("text", ["Infinity", "-Infinity", "NaN", "1e400", '{"x": 1e400}'])
def test_a_document_jsonschema_cannot_check_is_a_mismatch_not_an_exception(text):
    """``jsonschema`` raises on a float ``multipleOf`` of a non-finite number (OverflowError,
    ValueError); the proxy judges every answer, so the judging must give a verdict instead."""
    schema = {"multipleOf": 0.1, "properties": {"x": {"multipleOf": 0.1}}}
    result, error = judge_json(text, schema)
    assert result is JsonResult.SCHEMA_MISMATCH
    assert error is not None and "cannot be checked against the schema" in error
    assert (result, error) == reference_judgement(text, schema)


def _resolve(ref: str, root: dict) -> Any:
    node: Any = root
    for part in ref.lstrip("#").split("/")[1:]:
        node = node[part]
    return node


def near(schema: Any, root: dict, rng: random.Random, depth: int = 0) -> Any:
    """A document for ``schema``: built from its keywords, with a wrong value here and there."""
    if depth > 6 or not isinstance(schema, dict) or rng.random() < 0.015:
        return rng.choice(EDGE_VALUES)
    if "$ref" in schema and rng.random() < 0.9:
        return near(_resolve(schema["$ref"], root), root, rng, depth + 1)
    if "enum" in schema and rng.random() < 0.95:
        return rng.choice(schema["enum"])
    if "const" in schema and rng.random() < 0.95:
        return schema["const"]
    for key in ("oneOf", "anyOf", "allOf"):
        if key in schema and rng.random() < 0.7:
            return near(rng.choice(schema[key]), root, rng, depth + 1)
    if "pattern" in schema:
        return rng.choice(PATTERN_STRINGS[schema["pattern"]])
    if "not" in schema and "pattern" in schema["not"]:
        strings = PATTERN_STRINGS[schema["not"]["pattern"]]
        unmatched = [s for s in strings if not re.search(schema["not"]["pattern"], s)]
        return rng.choice(unmatched if rng.random() < 0.7 else strings)
    if "not" in schema and "type" in schema["not"] and rng.random() < 0.9:
        return rng.choice(["s", None, True, [1], {}])
    if "not" in schema and "$ref" in schema["not"] and rng.random() < 0.3:
        return near(_resolve(schema["not"]["$ref"], root), root, rng, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = rng.choice(kind)
    if kind is None:
        kind = ("object" if {"properties", "patternProperties", "dependencies"} & set(schema) else
                "array" if "items" in schema else rng.choice(["integer", "number", "string", "object"]))
    if kind == "object":
        return _object(schema, root, rng, depth)
    if kind == "array":
        return _array(schema, root, rng, depth)
    off = rng.random() < 0.03  # a value just out of the keyword's range
    if kind == "string":
        if "format" in schema or "format" in schema.get("not", {}):
            return rng.choice(["2026-12-07", "2026-12-07T10:00:00Z", "a@b.c", "not one", ""])
        lo, hi = schema.get("minLength", 0), schema.get("maxLength", 6)
        n = rng.choice([lo - 1, hi + 1]) if off else rng.randint(lo, hi)
        return "".join(rng.choice("ab É\n") for _ in range(max(0, n)))
    if kind in ("integer", "number"):
        lo = next((schema[k] for k in ("minimum", "exclusiveMinimum") if k in schema), -5)
        hi = next((schema[k] for k in ("maximum", "exclusiveMaximum") if k in schema), 12)
        value = rng.choice([lo, hi, lo + 1, hi - 1, rng.randint(-5, 12)])
        if "multipleOf" in schema and rng.random() < 0.7:
            value = rng.randint(-4, 4) * schema["multipleOf"]
        if off:
            value += rng.choice([1, -1, 0.5, 2 ** -40])
        return float(value) if kind == "number" and rng.random() < 0.3 else value
    if kind == "boolean":
        return rng.choice([True, False])
    return None


def _object(schema: dict, root: dict, rng: random.Random, depth: int) -> dict:
    props, required = schema.get("properties", {}), set(schema.get("required", []))
    doc = {k: near(sub, root, rng, depth + 1) for k, sub in props.items()
           if (k in required and rng.random() < 0.98) or rng.random() < 0.25}
    for pattern, sub in schema.get("patternProperties", {}).items():
        doc[rng.choice(PATTERN_STRINGS[pattern])] = near(sub, root, rng, depth + 1)
    if "propertyNames" in schema:
        for _ in range(rng.randint(1, 3)):
            doc[rng.choice(PATTERN_STRINGS[schema["propertyNames"]["pattern"]] + EXTRA_KEYS)] = near(
                schema.get("additionalProperties", {}), root, rng, depth + 1)
    if rng.random() < 0.05:
        doc[rng.choice(EXTRA_KEYS)] = near(schema.get("additionalProperties", {}), root, rng, depth + 1)
    return doc


def _array(schema: dict, root: dict, rng: random.Random, depth: int) -> list:
    prefix = schema.get("prefixItems") or (schema["items"] if isinstance(schema.get("items"), list) else [])
    items = schema.get("items") if isinstance(schema.get("items"), dict) else schema.get("contains", {})
    lo, hi = schema.get("minItems", schema.get("minContains", 0)), schema.get("maxItems", schema.get("maxContains", 4))
    n = rng.choice([lo - 1, hi + 1]) if rng.random() < 0.05 else rng.randint(lo, hi)
    if schema.get("items") is False or "additionalItems" in schema:
        n = min(n, len(prefix))
    doc = [near(prefix[i] if i < len(prefix) else items, root, rng, depth + 1) for i in range(max(0, n))]
    if doc and rng.random() < 0.05:
        doc.append(doc[0])  # against uniqueItems
    return doc


def _texts(schema: dict, seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [json.dumps(near(schema, schema, rng)) for _ in range(n)] + TEXTS


@pytest.mark.parametrize("name", list(FAST))
def test_the_compiled_validator_judges_generated_documents_as_jsonschema_does(name):
    schema = FAST[name]
    compiled = compile_schema(schema)
    assert compiled.fast is not None, "the compiled validator must be in use for this schema"
    verdicts = {result: 0 for result in JsonResult}
    for text in _texts(schema, seed=sorted(FAST).index(name), n=3000):
        got = outcome(judge_json, text, compiled)
        assert got == outcome(reference_judgement, text, schema), text
        assert outcome(judge_json, text, schema) == got  # a schema passed as a mapping: the same
        verdicts[got[0] if isinstance(got, tuple) else JsonResult.INVALID] += 1
    # not a vacuous comparison: the generated documents are many of each kind
    assert verdicts[JsonResult.VALID] >= 150 and verdicts[JsonResult.SCHEMA_MISMATCH] >= 300, verdicts


@pytest.mark.parametrize("name", list(REFERENCE_ONLY))
def test_schemas_the_compiled_validator_differs_on_are_judged_by_jsonschema_alone(name):
    schema = REFERENCE_ONLY[name]
    assert compile_schema(schema).fast is None
    for text in _texts(schema, seed=7, n=300):
        assert outcome(judge_json, text, schema) == outcome(reference_judgement, text, schema), text


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6)
    | st.sampled_from(EDGE_VALUES + [s for strings in PATTERN_STRINGS.values() for s in strings]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(EXTRA_KEYS + ["heading", "column", "panels", "name", "meta", "theme"]) | st.text(max_size=3),
        inner, max_size=5),
    max_leaves=20)


@settings(max_examples=400, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(document=_json, name=st.sampled_from(sorted(FAST) + sorted(REFERENCE_ONLY)))
def test_any_json_value_gets_the_reference_verdict(document, name):
    schema = {**FAST, **REFERENCE_ONLY}[name]
    text = json.dumps(document)
    assert outcome(judge_json, text, schema) == outcome(reference_judgement, text, schema)


def test_the_demo_layouts_verdicts_and_messages():
    good = {"title": "T", "authors": ["A"], "panels": [{"heading": "H", "column": 3}], "theme": "dark"}
    compiled = compile_schema(LAYOUT_SCHEMA)
    assert judge_json(json.dumps(good), compiled) == (JsonResult.VALID, None)
    assert judge_json(json.dumps({**good, "theme": "pink"}), compiled) == (
        JsonResult.SCHEMA_MISMATCH, "theme: 'pink' is not one of ['light', 'dark', 'contrast']")
    bad_column = {**good, "panels": [{"heading": "H", "column": 4}]}
    assert judge_json(json.dumps(bad_column), compiled) == (
        JsonResult.SCHEMA_MISMATCH, "panels/0/column: 4 is greater than the maximum of 3")
    j = judge_completion(json.dumps(good), "stop", expects_json=True, json_schema=compiled)
    assert j.json_valid and j.schema_error is None


def test_a_schema_is_compiled_once_and_a_changed_one_anew():
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    first = compile_schema(schema)
    assert compile_schema(dict(schema)) is first and compile_schema(first) is first
    assert isinstance(first, CompiledSchema)
    schema["required"] = ["n"]  # the caller's dict changed: judged by what it holds now
    assert judge_json("{}", schema)[0] is JsonResult.SCHEMA_MISMATCH
    assert judge_json("{}", first) == (JsonResult.VALID, None)


# --------------------------------------------------------------------------- the proxy's judging


def test_the_proxy_judges_live_and_shadow_answers_with_the_schema_compiled_at_start_up(tmp_path, monkeypatch):
    import asyncio

    from loragate.core.contracts import load_contracts
    from loragate.core.judging import ConstraintResult
    from loragate.server.adapters import AdapterNames
    from loragate.server.answers import Output, judge_outputs
    from loragate.server.fields import Asked
    from loragate.server.upstream import Upstream

    path = tmp_path / "adapters.yaml"
    path.write_text(json.dumps({"base_model": "base", "adapters_dir": ".", "adapters": {
        "poster": {"path": "poster", "output": "json", "json_schema": LAYOUT_SCHEMA},
        "prose": {"path": "prose", "output": "text"}}}))

    async def upstream() -> Upstream:  # never reached: the names below are the contracts'
        return Upstream("http://127.0.0.1:9", read_timeout_s=1)

    names = AdapterNames(load_contracts(path), asyncio.run(upstream()))
    compiled = names.schema("poster")
    assert compiled is compile_schema(LAYOUT_SCHEMA) and compiled.fast is not None
    assert names.schema("prose") is None and names.schema("unknown") is None

    good = {"title": "T", "authors": ["A"], "panels": [{"heading": "H", "column": 3}], "theme": "dark"}
    outputs = [Output(json.dumps(good), "stop", None, None),
               Output(json.dumps({**good, "theme": "pink"}), "stop", None, None)]
    # live requests (constrained or not) and shadows judge through judge_outputs, by adapter name
    judged = judge_outputs(outputs, {}, False, Asked(), names, "poster", constrained=True)
    assert [(j.json_result, c) for j, c in judged] == [
        (JsonResult.VALID, ConstraintResult.VALID), (JsonResult.SCHEMA_MISMATCH, ConstraintResult.SCHEMA_MISMATCH)]
    assert judged[1][0].schema_error == "theme: 'pink' is not one of ['light', 'dark', 'contrast']"  # jsonschema's

    # what judges is the compiled schema the names hold, not the contract's mapping compiled anew
    stricter = CompiledSchema({**LAYOUT_SCHEMA, "required": [*LAYOUT_SCHEMA["required"], "subtitle"]})
    monkeypatch.setattr(names, "schema", lambda name: stricter if name == "poster" else None)
    (j, constrained), = judge_outputs(outputs[:1], {}, False, Asked(), names, "poster", constrained=True)
    assert j.json_result is JsonResult.SCHEMA_MISMATCH and constrained is ConstraintResult.SCHEMA_MISMATCH
    assert j.schema_error == "(root): 'subtitle' is a required property"


@settings(max_examples=300, derandomize=True, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list('{}[]",:0123456789.eE+-aNIfinty \n\t\ufeff\\u')), max_size=24))
def test_any_text_gets_the_reference_verdict(text):
    """The judging parses as ``json.loads`` does, whatever the text (near-JSON, bare constants,
    a byte-order mark): what it calls valid, invalid or a mismatch is the reference's."""
    for schema in (LAYOUT_SCHEMA, RICH_2020):
        assert outcome(judge_json, text, schema) == outcome(reference_judgement, text, schema)
    try:
        json.loads(text.strip())
        parses = True
    except (ValueError, RecursionError):
        parses = False
    assert judge_json(text) == ((JsonResult.VALID if parses else JsonResult.INVALID), None)
