"""The shared judging of a completion: the definitions both the proxy and the gate use."""

import json

import pytest

from loragate.core.judging import (
    ConstraintResult,
    FinishClass,
    JsonResult,
    LengthCause,
    judge_completion,
    judge_constrained,
    judge_json,
)

SCHEMA = {
    "type": "object",
    "required": ["title"],
    "properties": {"title": {"type": "string"}, "column": {"type": "integer", "maximum": 3}},
}


@pytest.mark.parametrize(
    ("reason", "expected"),
    [("stop", FinishClass.STOP), ("length", FinishClass.LENGTH), ("abort", FinishClass.OTHER),
     (None, FinishClass.OTHER), ("tool_calls", FinishClass.OTHER)],
)
def test_finish_reason_maps_to_bounded_classes(reason, expected):
    j = judge_completion("x", reason, expects_json=False)
    assert j.finish is expected
    assert j.stopped is (expected is FinishClass.STOP)
    assert j.json_result is None


def test_length_cut_at_context_limit_is_told_apart_from_max_tokens():
    at_context = judge_completion("", "length", expects_json=False,
                                  prompt_tokens=4000, completion_tokens=96, max_model_len=4096)
    at_budget = judge_completion("", "length", expects_json=False,
                                 prompt_tokens=100, completion_tokens=96, max_model_len=4096)
    unknown = judge_completion("", "length", expects_json=False)
    assert at_context.length_cause is LengthCause.CONTEXT
    assert at_budget.length_cause is LengthCause.MAX_TOKENS
    assert unknown.length_cause is LengthCause.MAX_TOKENS
    assert judge_completion("", "stop", expects_json=False).length_cause is None


def test_json_valid_invalid_and_schema_mismatch():
    assert judge_json(' {"title": "a"}\n', SCHEMA) == (JsonResult.VALID, None)
    assert judge_json('{"title": "a"} trailing prose', SCHEMA)[0] is JsonResult.INVALID
    assert judge_json('{"title": "a", ', SCHEMA)[0] is JsonResult.INVALID
    assert judge_json("", SCHEMA)[0] is JsonResult.INVALID
    result, error = judge_json('{"title": "a", "column": 7}', SCHEMA)
    assert result is JsonResult.SCHEMA_MISMATCH
    assert error.startswith("column:")
    assert judge_json("[1, 2]", None) == (JsonResult.VALID, None)


def test_pathologically_nested_json_is_invalid_not_a_crash():
    deep = "[" * 100_000 + "]" * 100_000
    assert judge_json(deep, None)[0] in (JsonResult.VALID, JsonResult.INVALID)
    assert judge_json("[" * 100_000, None)[0] is JsonResult.INVALID


def test_judgement_of_a_demo_layout():
    layout = {"title": "T", "column": 2}
    j = judge_completion(json.dumps(layout), "stop", expects_json=True, json_schema=SCHEMA)
    assert j.stopped and j.json_valid and j.schema_error is None


def test_a_json_constraint_is_ignored_only_by_an_answer_that_ended_on_its_own_without_json():
    """The constraint's verdict tells the engine's fault from a cut and from the contract's schema."""
    assert judge_constrained('{"title": "a"}', "stop", None, SCHEMA) is ConstraintResult.VALID
    assert judge_constrained('{"x": 1}', "stop", None, None) is ConstraintResult.VALID
    # ended on the end-of-sequence token and not JSON: the engine did not honour the constraint
    assert judge_constrained("not json", "stop", None, SCHEMA) is ConstraintResult.IGNORED
    # cut before the JSON could close: max_tokens or the context, a stop string or token, an abort
    assert judge_constrained('{"title": "a', "length", None, SCHEMA) is ConstraintResult.CUT
    assert judge_constrained('{"title": "a"', "stop", "}", SCHEMA) is ConstraintResult.CUT
    assert judge_constrained('{"title": "a"', "stop", 7, SCHEMA) is ConstraintResult.CUT
    assert judge_constrained('{"title": ', "abort", None, SCHEMA) is ConstraintResult.CUT
    # JSON, as asked, but not the contract's shape: the engine never saw the contract's schema
    assert judge_constrained('{"column": 2}', "stop", None, SCHEMA) is ConstraintResult.SCHEMA_MISMATCH
    assert judge_constrained('{"column": 2}', "length", None, SCHEMA) is ConstraintResult.SCHEMA_MISMATCH
