"""Bad-input fuzzing: request bodies through a proxy to the real vLLM, SSE chunk boundaries, and
schemathesis over the OpenAPI surface the proxy passes through.

Properties held (hypothesis; example counts below, kept small for a 2-core CI):

- whatever body or content type a client sends, the proxy never answers 5xx of its own and
  never dies; every non-200 answer is an OpenAI-style ``{"error": {"message": ...}}``; every
  200 is the engine's answer passed through; and the completion counter grows by exactly the
  choices that finished (nothing lost, nothing invented) while in-flight gauges return to 0;
- any bytes, cut anywhere, pass through the stream reader unchanged and never make it raise;
  judging is total (any text, any ``finish_reason``) and "JSON valid" means ``json.loads`` parses;
- a real vLLM SSE stream cut at arbitrary byte boundaries (inside events, inside UTF-8
  characters, between the two newlines) gives :class:`loragate.core.sse.StreamTally` the same
  forwarded bytes, texts, finish reasons and usage, and so the same verdict of
  :func:`~loragate.core.judging.judge_completion`, as the stream in one piece;
- schemathesis, reading ``/openapi.json`` through the proxy (vLLM's document), generates
  requests for a few operations: none gets a 5xx.
"""

from __future__ import annotations

import json
from typing import Iterator

import httpx
import pytest
import schemathesis
from conftest import ProxyProcess, heldout, start_proxy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loragate.core.contracts import load_contracts
from loragate.core.judging import judge_completion
from loragate.core.sse import StreamTally

pytestmark = pytest.mark.stack

#: Examples per property (each one is a real request, most of them refused or tiny).
BODY_EXAMPLES = 150
RAW_EXAMPLES = 100
SPLIT_EXAMPLES = 300
SCHEMA_EXAMPLES = 25


def fuzz(examples: int) -> settings:
    """Hypothesis settings: ``examples`` examples, reproducible, no deadline (real requests)."""
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def proxy(stack, tmp_path_factory) -> Iterator[ProxyProcess]:
    p = start_proxy(stack.vllm_url, tmp_path_factory.mktemp("fuzz"), contracts=stack.contracts_file)
    try:
        yield p
    finally:
        p.stop()


class Tally:
    """What the fuzzing client saw: choices that finished in 200 answers."""

    def __init__(self) -> None:
        self.finished = 0
        self.requests = 0


def check_answer(resp: httpx.Response, tally: Tally) -> None:
    tally.requests += 1
    assert resp.status_code < 500, (resp.status_code, resp.text[:300])
    if resp.status_code != 200:
        error = resp.json()["error"]
        assert isinstance(error["message"], str) and error["message"]
        return
    if resp.headers.get("content-type", "").startswith("text/event-stream"):
        lines = [line[6:] for line in resp.text.split("\n") if line.startswith("data: ")]
        assert lines[-1] == "[DONE]", lines[-3:]
        finished = {c["index"] for line in lines[:-1] for c in json.loads(line).get("choices") or ()
                    if c.get("finish_reason")}
        tally.finished += len(finished)
    else:
        answer = resp.json()
        if "choices" in answer:
            tally.finished += sum(1 for c in answer["choices"] if c.get("finish_reason"))


def assert_nothing_lost(proxy: ProxyProcess, before: dict, tally: Tally) -> None:
    after = proxy.settled_scrape()
    total = sum(v for (n, _), v in after.items() if n == "loragate_completions_total") - \
        sum(v for (n, _), v in before.items() if n == "loragate_completions_total")
    assert total == tally.finished
    assert all(v == 0 for (n, _), v in after.items() if n == "loragate_requests_in_flight")
    requests = sum(v for (n, _), v in after.items() if n == "loragate_requests_total") - \
        sum(v for (n, _), v in before.items() if n == "loragate_requests_total")
    assert requests == tally.requests
    assert proxy.popen.poll() is None and httpx.get(f"{proxy.url}/health").status_code == 200


# --------------------------------------------------------------------------- request bodies

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
#: A budget that keeps every real generation tiny: small ints, or values the engine refuses.
max_tokens = st.integers(-2, 3) | st.text(max_size=4) | st.floats(-1, 3) | st.lists(st.integers(), max_size=2)
#: Requests the engine accepts: tiny real generations, streamed or not, one or two choices.
valid_bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(["poster-good", "poster-eos-masked", "poster-truncated", "loragate-demo-base"]),
     "prompt": st.text(min_size=1, max_size=30), "max_tokens": st.integers(1, 3)},
    optional={"stream": st.booleans(), "n": st.integers(1, 2), "temperature": st.just(0.7),
              "stream_options": st.sampled_from([None, {"include_usage": True}, {"include_usage": False}]),
              "stop": st.lists(st.text(min_size=1, max_size=3), max_size=2), "echo": st.booleans()})
#: Anything near the completions schema: wrong types, unknown fields, nonsense values.
wild_bodies = st.fixed_dictionaries(
    {"max_tokens": max_tokens},
    optional={
        "model": st.sampled_from(["poster-good", "poster-eos-masked", "loragate-demo-base", "no-such-model", ""])
        | json_values,
        "prompt": st.text(max_size=40) | st.lists(st.integers(-5, 70000), max_size=6)
        | st.lists(st.text(max_size=10), min_size=1, max_size=2) | json_values,
        "stream": st.booleans() | json_values,
        "n": st.integers(-1, 2) | st.text(max_size=3),
        "stream_options": st.none() | st.just({"include_usage": True}) | json_values,
        "response_format": st.sampled_from([{"type": "json_object"}, {"type": "text"}, {"type": 5}, "json"]),
        "temperature": st.floats(-1, 3) | st.text(max_size=3),
        "messages": json_values,
        "extra": json_values,
    })
completion_bodies = valid_bodies | wild_bodies


def test_arbitrary_completion_bodies_never_break_the_proxy(proxy):
    before, tally = proxy.scrape(), Tally()
    with httpx.Client(timeout=60) as client:

        @fuzz(BODY_EXAMPLES)
        @given(body=completion_bodies, path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
        def prop(body, path):
            check_answer(client.post(f"{proxy.url}{path}", json=body), tally)

        prop()
    assert_nothing_lost(proxy, before, tally)
    print(f"\n{tally.requests} fuzzed bodies, {tally.finished} choices finished and counted")


def test_arbitrary_bytes_and_content_types_get_clear_errors(proxy):
    before, tally = proxy.scrape(), Tally()
    with httpx.Client(timeout=60) as client:

        @fuzz(RAW_EXAMPLES)
        @given(raw=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()),
               ctype=st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain",
                                      "application/x-www-form-urlencoded", "", "APPLICATION/JSON"]))
        def prop(raw, ctype):
            resp = client.post(f"{proxy.url}/v1/completions", content=raw, headers={"content-type": ctype})
            check_answer(resp, tally)
            if not ctype.lower().startswith("application/json"):
                assert resp.status_code == 415
            elif resp.status_code != 200:
                assert resp.status_code in (400, 404, 422), resp.text  # the proxy's or the engine's refusal

        prop()
    assert_nothing_lost(proxy, before, tally)


# --------------------------------------------------------------------------- SSE boundaries


@pytest.fixture(scope="module")
def recorded(stack) -> tuple[bytes, dict]:
    """A real vLLM SSE stream (two choices, usage included) and the same request unstreamed."""
    prompt = heldout(stack, 1, offset=2)[0]
    body = {"model": "poster-good", "prompt": prompt, "max_tokens": 60, "temperature": 0.8, "seed": 7, "n": 2}
    with httpx.stream("POST", f"{stack.vllm_url}/v1/completions", timeout=120,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as resp:
        assert resp.status_code == 200
        raw = b"".join(resp.iter_raw())
    whole = httpx.post(f"{stack.vllm_url}/v1/completions", json=body, timeout=120).json()
    return raw, whole


def tally_of(pieces: list[bytes], strip_usage: bool) -> tuple[bytes, StreamTally]:
    tally = StreamTally(strip_usage)
    out = b"".join(tally.feed(p) for p in pieces)
    return out + tally.rest(), tally


def test_the_recorded_stream_reads_as_the_unstreamed_answer(stack, recorded):
    raw, whole = recorded
    out, tally = tally_of([raw], strip_usage=False)
    assert out == raw and tally.complete and tally.model == "poster-good"
    assert [t for t, _ in tally.outputs()] == [c["text"] for c in sorted(whole["choices"], key=lambda c: c["index"])]
    assert tally.usage["completion_tokens"] == whole["usage"]["completion_tokens"]


@fuzz(SPLIT_EXAMPLES)
@given(data=st.data(), strip_usage=st.booleans())
def test_any_chunking_of_a_real_stream_gives_the_same_verdict(stack, recorded, data, strip_usage):
    raw, _ = recorded
    contract = load_contracts(stack.contracts_file)["poster-good"]
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(raw)), max_size=60))))
    pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)])]
    out_one, one = tally_of([raw], strip_usage)
    out_cut, cut = tally_of(pieces, strip_usage)
    assert out_cut == out_one
    assert cut.outputs() == one.outputs() and cut.usage == one.usage and cut.model == one.model
    assert cut.complete == one.complete
    verdicts = [[judge_completion(text, reason, expects_json=True, json_schema=contract.json_schema)
                 for text, reason in t.outputs()] for t in (one, cut)]
    assert verdicts[0] == verdicts[1]
    forwarded = [json.loads(e[6:]) for e in out_cut.split(b"\n\n") if e.startswith(b"data: {")]
    usage_only = [e for e in forwarded if e.get("usage") and not e.get("choices")]
    assert len(usage_only) == (0 if strip_usage else 1)


sse_fragments = st.lists(st.sampled_from([
    b"data: ", b"{", b"}", b'"choices": ', b'[{"index": 0, "text": "a", "finish_reason": null}]',
    b'"choices": "x"', b'"index": "0"', b'"delta": {"content": "b"}', b'"delta": 5', b'"usage": {"x": 1}',
    b'"model": 3', b'"finish_reason": "stop"', b"\n", b"\n\n", b"data: [DONE]\n\n", b"\xff\xfe", b": ping\n\n",
    b",", b"[", b"]", b"null",
]) | st.binary(max_size=8), max_size=40).map(b"".join)


@fuzz(SPLIT_EXAMPLES)
@given(raw=sse_fragments, cuts=st.lists(st.integers(0, 400), max_size=20))
def test_any_bytes_pass_through_the_stream_reader_unchanged(raw, cuts):
    """Garbage, half-events, wrong types: the reader never raises and forwards every byte once."""
    cuts = sorted({c for c in cuts if c <= len(raw)})
    pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)])]
    out, tally = tally_of(pieces, strip_usage=False)
    assert out == raw
    for text, reason in tally.outputs():
        judge_completion(text, reason, expects_json=True)


@fuzz(SPLIT_EXAMPLES)
@given(text=st.text(max_size=200) | json_values.map(json.dumps),
       reason=st.none() | st.sampled_from(["stop", "length", "abort", ""]) | st.text(max_size=5),
       prompt_tokens=st.none() | st.integers(0, 5000), completion_tokens=st.none() | st.integers(0, 5000))
def test_judging_is_total_and_json_valid_means_it_parses(text, reason, prompt_tokens, completion_tokens):
    j = judge_completion(text, reason, expects_json=True, prompt_tokens=prompt_tokens,
                         completion_tokens=completion_tokens, max_model_len=4096)
    try:
        json.loads(text.strip())
        parses = True
    except ValueError:
        parses = False
    assert j.json_valid == parses
    assert (j.length_cause is not None) == (reason == "length")
    assert j.stopped == (reason == "stop")


# --------------------------------------------------------------------------- schemathesis

#: Operations of vLLM's OpenAPI document fuzzed through the proxy.
OPERATIONS = (("POST", "/v1/completions"), ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/v1/models"))
#: Fields that could make one generated request run for minutes on a CPU; capped.
BUDGET_CAPS = {"max_tokens": 3, "min_tokens": 3, "n": 2, "best_of": 2, "logprobs": 2, "prompt_logprobs": 2}


def bounded(body: object) -> object:
    if not isinstance(body, dict):
        return body
    body = dict(body)
    if not isinstance(body.get("max_tokens"), int) or isinstance(body.get("max_tokens"), bool):
        body["max_tokens"] = 2
    for field, cap in BUDGET_CAPS.items():
        value = body.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value > cap:
            body[field] = cap
    body.pop("ignore_eos", None)
    return body


def test_schemathesis_over_the_proxied_openapi_document(proxy):
    schema = schemathesis.openapi.from_url(f"{proxy.url}/openapi.json")
    counts: dict[tuple[str, str], int] = {}
    statuses: dict[int, int] = {}
    for method, path in OPERATIONS:
        operation = schema[path][method]

        @fuzz(SCHEMA_EXAMPLES)
        @given(case=operation.as_strategy())
        def prop(case):
            case.body = bounded(case.body)
            response = case.call(base_url=proxy.url, timeout=60)
            assert response.status_code < 500, (method, path, case.body, response.text[:300])
            counts[(method, path)] = counts.get((method, path), 0) + 1
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        prop()
    assert set(counts) == set(OPERATIONS)
    proxy.settled_scrape()  # asserts every in-flight gauge returns to 0
    print(f"\nschemathesis: {counts}, answers by status {statuses}")
