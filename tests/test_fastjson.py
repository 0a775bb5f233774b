"""The hot path's JSON parsing gives exactly the standard library's result (server/fastjson.py)."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loragate.core.fastjson import loads
from loragate.core.sse import StreamTally

#: Documents msgspec refuses and json accepts, and big integers (orjson made floats of them):
#: each must parse to json's value.
ONLY_JSON_TAKES = [
    b'{"x": NaN}', b'[Infinity, -Infinity]', b"[1e400]", b'{"n": 123456789012345678901234567890}',
    b"-9223372036854775809", '{"s": "\\ud800"}'.encode(), '{"a": 1}'.encode("utf-16"),
]


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("doc", ONLY_JSON_TAKES)
def test_what_msgspec_refuses_still_parses_as_json_does(doc):
    assert same(loads(doc), json.loads(doc))


json_docs = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)


@given(value=json_docs, as_bytes=st.booleans())
def test_any_document_parses_to_the_standard_librarys_value(value, as_bytes):
    doc = json.dumps(value)  # NaN and Infinity included, as json writes them
    assert same(loads(doc.encode() if as_bytes else doc), json.loads(doc))


@given(raw=st.binary(max_size=40))
def test_whatever_json_refuses_is_refused_with_a_value_error(raw):
    try:
        expected = json.loads(raw)
    except ValueError:
        with pytest.raises(ValueError):
            loads(raw)
    else:
        assert same(loads(raw), expected)


def test_nesting_too_deep_for_json_is_a_recursion_error_and_the_stream_reader_survives_it():
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(RecursionError):
        loads(deep)
    tally = StreamTally()
    stream = (b'data: {"model": "m", "choices": [{"index": 0, "text": "{}", "finish_reason": null}]}\n\n'
              b"data: {\"x\": " + deep + b"}\n\n"
              b'data: {"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]}\n\ndata: [DONE]\n\n')
    assert tally.feed(stream) == stream  # forwarded whole, the deep event unread
    assert tally.outputs() == [("{}", "stop")] and tally.done and tally.model == "m"
