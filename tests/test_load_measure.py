"""The load test's definitions, without a server: stream timing as ``vllm bench serve``,
percentiles, the summary, SLO checks, prompts and the request body."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from loragate.core.contracts import Contract, LoadSLO
from loragate.loadtest.measure import (
    RequestSample,
    StreamError,
    StreamTimer,
    percentile,
    slo_checks,
    summarize,
)
from loragate.loadtest.prompts import (
    FORBIDDEN_BODY_KEYS,
    LoadTestError,
    base_url,
    completion_body,
    load_prompts,
)


def _event(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


def _chunk(text: str, finish: str | None = None) -> bytes:
    return _event({"choices": [{"index": 0, "text": text, "finish_reason": finish}]})


def test_stream_timer_follows_vllm_bench_serve() -> None:
    """TTFT = first chunk with choices - send; ITL = gaps between such chunks; e2e = last such
    chunk - send; the usage chunk (choices: []) and [DONE] are no tokens."""
    timer = StreamTimer(sent_mono=100.0, sent_wall=1_000.0)
    timer.feed(b": keep-alive\n\n", 100.05)              # SSE comment: ignored
    timer.feed(_chunk("{"), 100.2)                      # first token
    timer.feed(_chunk("\"a\"")[:10], 100.25)            # an event split over two pieces ...
    timer.feed(_chunk("\"a\"")[10:] + _chunk("}"), 100.3)  # ... and two events in one piece
    timer.feed(_chunk("", "stop"), 100.5)
    timer.feed(_event({"choices": [], "usage": {"completion_tokens": 4, "prompt_tokens": 9}}), 100.6)
    timer.feed(_event("[DONE]"), 100.7)
    s = timer.result()
    assert s.ok and s.error is None
    assert s.ttft_s == pytest.approx(0.2)
    assert s.e2e_s == pytest.approx(0.5)                # last chunk with choices, not usage/[DONE]
    assert s.itl_s == pytest.approx([0.1, 0.0, 0.2])    # the split event arrived complete at 100.3
    assert s.output_tokens == 4 and s.tokens_from_usage
    assert s.tpot_s == pytest.approx((0.5 - 0.2) / 3)
    assert s.finish_reason == "stop" and timer.done
    assert s.done_at == pytest.approx(1_000.5)


def test_stream_timer_failures() -> None:
    no_finish = StreamTimer(0.0, 0.0)
    no_finish.feed(_chunk("a") + _chunk("b"), 1.0)
    s = no_finish.result()
    assert not s.ok and "finish_reason" in s.error and s.ttft_s == 1.0
    assert s.output_tokens == 2 and not s.tokens_from_usage  # no usage: chunks with text

    empty = StreamTimer(0.0, 0.0)
    empty.feed(_event({"choices": [], "usage": {"completion_tokens": 0}}), 1.0)
    assert not empty.result().ok and "first token" in empty.result().error

    with pytest.raises(StreamError, match="boom"):
        StreamTimer(0.0, 0.0).feed(_event({"error": {"message": "boom"}}), 1.0)
    with pytest.raises(StreamError, match="not JSON"):
        StreamTimer(0.0, 0.0).feed(b"data: {oops\n\n", 1.0)

    length = StreamTimer(0.0, 0.0)
    length.feed(_chunk("x", "length"), 1.0)
    assert length.result().finish_reason == "length"
    other = StreamTimer(0.0, 0.0)
    other.feed(_chunk("x", "abort"), 1.0)
    assert other.result().finish_reason == "other"


def test_percentile_matches_numpy_linear() -> None:
    rng = random.Random(7)
    for n in (1, 2, 3, 10, 101):
        values = [rng.expovariate(1.0) for _ in range(n)]
        for q in (0, 5, 50, 95, 99, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def _sample(sent: float, ttft: float, e2e: float, tokens: int, finish: str = "stop",
            itl: list[float] | None = None, ok: bool = True) -> RequestSample:
    return RequestSample(ok=ok, sent_at=sent, ttft_s=ttft if ok else None, e2e_s=e2e if ok else None,
                         itl_s=itl or [], output_tokens=tokens if ok else 0,
                         finish_reason=finish if ok else None, error=None if ok else "HTTP 500: x")


def test_summary_goodput_shares_and_checks() -> None:
    slo = LoadSLO(ttft_p50_ms=1000, ttft_p95_ms=500, itl_p95_ms=50, max_error_rate=0.2,
                  min_output_tokens_per_s=10, max_runaway_share=0.5)
    samples = [
        _sample(0.0, 0.1, 1.0, 10, itl=[0.1] * 9),           # TPOT 0.1 s > 50 ms: not good
        _sample(0.0, 0.2, 0.65, 10, itl=[0.05] * 9),         # TPOT 50 ms: good
        _sample(1.0, 0.9, 1.0, 1, finish="length"),          # TTFT 900 ms > 500: not good
        _sample(2.0, 0, 0, 0, ok=False),                     # failed
    ]
    m = summarize(samples, slo)
    assert (m["requests"], m["completed"], m["failed"]) == (4, 3, 1)
    assert m["error_rate"] == 0.25
    assert m["duration_s"] == pytest.approx(2.0)             # first send 0.0, last done 2.0 (failed)
    assert m["output_tokens"] == 21 and m["output_tokens_per_s"] == pytest.approx(10.5)
    assert m["good_requests"] == 1 and m["goodput"] == pytest.approx(0.5)
    assert m["stop"] == 2 and m["length"] == 1
    assert m["stop_share"] == pytest.approx(2 / 3) and m["max_tokens_share"] == pytest.approx(1 / 3)
    assert m["ttft_p50_ms"] == pytest.approx(200)
    assert m["itl_samples"] == 18 and m["itl_p95_ms"] == pytest.approx(100)
    assert m["tpot_mean_ms"] == pytest.approx((100 + 50) / 2)  # one-token request has no TPOT
    checks = {c.name: c for c in slo_checks(m, slo)}
    failed = sorted(n for n, c in checks.items() if not c.passed)
    assert failed == ["itl_p95_ms", "max_error_rate", "ttft_p95_ms"]
    assert checks["max_error_rate"].describe() == "error rate: 25.0% > bar 20.0%"
    assert checks["min_output_tokens_per_s"].describe() == "output tokens/s: 10.5 tok/s >= bar 10.0 tok/s"


def test_nothing_measured_fails_closed() -> None:
    m = summarize([], LoadSLO())
    assert m["requests"] == 0 and m["ttft_p95_ms"] is None
    checks = slo_checks(m, LoadSLO())
    assert not any(c.passed for c in checks)
    assert "not measured" in checks[0].describe()


def test_request_body_never_forces_length() -> None:
    body = completion_body("poster-good", "### Paper:\nx\n### Layout:\n", 160, 0.0)
    assert not FORBIDDEN_BODY_KEYS & body.keys()
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == "poster-good" and body["max_tokens"] == 160


def test_base_url() -> None:
    assert base_url("http://h:1/v1/") == "http://h:1"
    assert base_url("http://h:1") == "http://h:1"
    with pytest.raises(LoadTestError):
        base_url("h:1")


def test_prompts_rendered_with_the_contract(tmp_path: Path) -> None:
    contract = Contract(name="a", path=tmp_path, base_model="b", prompt_template="<<{input}>>")
    f = tmp_path / "p.jsonl"
    f.write_text('{"input": "x"}\n\n{"prompt": "as is"}\n{"input": "y", "prompt": "ignored"}\n')
    assert load_prompts(f, contract) == ["<<x>>", "as is", "<<y>>"]
    only_input = tmp_path / "i.jsonl"
    only_input.write_text('{"input": "x"}\n')
    with pytest.raises(LoadTestError, match="contract"):
        load_prompts(only_input)
    for bad, why in (("[1]\n", "expected an object"), ("{\n", "not valid JSON"), ('{"prompt": ""}\n', "non-empty"),
                     ("\n", "no prompts")):
        f.write_text(bad)
        with pytest.raises(LoadTestError, match=why):
            load_prompts(f, contract)
    with pytest.raises(LoadTestError, match="not found"):
        load_prompts(tmp_path / "missing.jsonl")


def test_chat_prompts_and_bodies(tmp_path: Path) -> None:
    from loragate.loadtest.prompts import CHAT_COMPLETIONS_PATH, request_path, write_prompts

    c = Contract(name="c", path=tmp_path, base_model="b", api="chat", system_prompt="S", user_template="U {input}")
    f = tmp_path / "p.jsonl"
    convo = [{"role": "user", "content": "hi"}]
    f.write_text(json.dumps({"input": "x"}) + "\n" + json.dumps({"messages": convo}) + "\n")
    prompts = load_prompts(f, c)
    assert [json.loads(p) for p in prompts] == [c.render_messages("x"), convo]
    body = completion_body("c", prompts[1], 16, 0.0, "chat")
    assert body["messages"] == convo and "prompt" not in body and body["stream"] is True
    assert request_path("chat") == CHAT_COMPLETIONS_PATH and request_path("completions") == "/v1/completions"
    out = write_prompts(prompts, tmp_path / "w.jsonl", "chat")  # what the runner hands locust
    assert load_prompts(out, None, "chat") == prompts
    f.write_text(json.dumps({"prompt": "rendered"}) + "\n")
    with pytest.raises(LoadTestError, match="chat adapter"):
        load_prompts(f, c)


def test_stream_timer_counts_chat_deltas() -> None:
    timer = StreamTimer(0.0, 0.0)
    chunk = {"choices": [{"index": 0, "delta": {"content": "{"}, "finish_reason": None}]}
    last = {"choices": [{"index": 0, "delta": {"content": "}"}, "finish_reason": "stop"}]}
    timer.feed(f"data: {json.dumps(chunk)}\n\ndata: {json.dumps(last)}\n\ndata: [DONE]\n\n".encode(), 0.5)
    sample = timer.result(200)
    assert sample.ok and sample.finish_reason == "stop" and timer.text_chunks == 2
