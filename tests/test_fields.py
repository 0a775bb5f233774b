"""What the proxy reads of a judged request, and how it gives a client the stream it asked for
(engine-free; tests/test_differential.py compares the same behaviour with vLLM's own answers)."""

from __future__ import annotations

import json

import pytest

from loragate.core.sse import HOLD_LIMIT, StreamTally
from loragate.server.fields import (
    Asked,
    FieldError,
    echoed_prefix,
    generated_part,
    read_fields,
    upstream_body,
)

FP = "vllm-0.32.0-abcd1234"


@pytest.mark.parametrize("request_, message", [
    ({"stream": 1}, "'stream'"),
    ({"stream": True, "stream_options": []}, "'stream_options'"),
    ({"stream": True, "stream_options": {"include_usage": "true"}}, "include_usage"),
    ({"stream": True, "stream_options": {"continuous_usage_stats": 1}}, "continuous_usage_stats"),
    ({"echo": "yes"}, "'echo'"),
    ({"echo": True, "max_tokens": "0"}, "'max_tokens'"),
    ({"echo": True, "max_tokens": False}, "'max_tokens'"),
    ({"echo": True, "max_tokens": 0.0}, "'max_tokens'"),
    ({"echo": True, "return_token_ids": "1"}, "return_token_ids"),
])
def test_a_field_the_proxy_reads_must_have_the_type_it_reads_it_as(request_, message):
    with pytest.raises(FieldError, match=message):
        read_fields(request_)


def test_max_tokens_is_only_read_with_echo():
    assert read_fields({"max_tokens": "16"}) == Asked()


def test_echo_with_max_tokens_0_is_a_scoring_request():
    asked = read_fields({"prompt": ["a", "b"], "echo": True, "max_tokens": 0, "logprobs": 1})
    assert asked.scoring and asked.echo and asked.prompts == ("a", "b")
    assert not read_fields({"prompt": "a", "echo": True, "max_tokens": 1}).scoring
    assert not read_fields({"prompt": "a", "echo": False, "max_tokens": 0}).scoring
    assert not read_fields({"prompt": "a", "max_tokens": 0}).scoring


def test_usage_is_forced_on_only_for_streams_that_did_not_ask_and_continuous_stats_go_off():
    for request in ({"stream": False}, {"stream": True, "stream_options": {"include_usage": True}},
                    {"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}):
        assert upstream_body(request, read_fields(request)) is None
    request = {"stream": True, "model": "m", "stream_options": {"continuous_usage_stats": True}}
    sent = json.loads(upstream_body(request, read_fields(request)))
    assert sent == {"stream": True, "model": "m",
                    "stream_options": {"include_usage": True, "continuous_usage_stats": False}}
    request = {"stream": True, "stream_options": None}
    assert json.loads(upstream_body(request, read_fields(request)))["stream_options"] == {"include_usage": True}


def test_the_echoed_prompt_of_each_choice():
    asked = read_fields({"prompt": ["P0", "P1"], "echo": True, "n": 2})
    # vLLM orders choices by prompt, then by n: choice i belongs to prompt i // n
    assert [echoed_prefix(asked, i, 4, chat=False, role=None) for i in range(4)] == ["P0", "P0", "P1", "P1"]
    assert echoed_prefix(asked, 0, 3, chat=False, role=None) is None  # not prompts x n: cannot tell
    tokens = read_fields({"prompt": [1, 2, 3], "echo": True})
    assert echoed_prefix(tokens, 0, 1, chat=False, role=None) is None  # echoed as text the proxy lacks
    ids = read_fields({"prompt": "P", "echo": True, "return_token_ids": True})
    assert echoed_prefix(ids, 0, 1, chat=False, role=None) == ""  # vLLM then echoes no text
    assert echoed_prefix(read_fields({"prompt": "P"}), 0, 1, chat=False, role=None) == ""


def test_a_chat_answer_echoes_the_last_message_only_when_it_has_the_answers_role():
    user = read_fields({"messages": [{"role": "user", "content": "hi"}], "echo": True})
    assert echoed_prefix(user, 0, 1, chat=True, role="assistant") == ""
    prefill = read_fields({"messages": [{"role": "user", "content": "hi"},
                                        {"role": "assistant", "content": '{"title": '}], "echo": True})
    assert echoed_prefix(prefill, 0, 1, chat=True, role="assistant") == '{"title": '
    parts = read_fields({"messages": [{"role": "assistant", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], "echo": True})
    assert echoed_prefix(parts, 0, 1, chat=True, role="assistant") == "a\nb"
    image = read_fields({"messages": [{"role": "assistant", "content": [{"type": "image_url"}]}], "echo": True})
    assert echoed_prefix(image, 0, 1, chat=True, role="assistant") is None


def test_the_generated_part_is_what_follows_the_echo():
    assert generated_part('P{"a": 1}', "P") == '{"a": 1}'
    assert generated_part('{"a": 1}', "") == '{"a": 1}'
    assert generated_part("Q...", "P") is None
    assert generated_part("anything", None) is None


# --------------------------------------------------------------------------- streams


def event(data: dict | str) -> bytes:
    return b"data: " + (data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))).encode() + b"\n\n"


def chunk(index: int, text: str, finish: str | None = None, fingerprint: bool = False, **extra) -> dict:
    c = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
         "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish,
                      "stop_reason": None}], **extra}
    if fingerprint:
        c["system_fingerprint"] = FP
    return c


def usage_event() -> bytes:
    return event({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m", "choices": [],
                  "usage": {"prompt_tokens": 3, "total_tokens": 7, "completion_tokens": 4},
                  "system_fingerprint": FP})


def vllm_stream(n: int, include_usage: bool) -> list[bytes]:
    """What vLLM sends for ``n`` choices of two tokens each, the first choice finishing first:
    the fingerprint on each choice's last event without include_usage, on the usage event with it."""
    events = []
    for index in range(n):
        events.append(event(chunk(index, "a")))
    events.append(event(chunk(0, "b", "stop", fingerprint=not include_usage)))
    for index in range(1, n):
        events.append(event(chunk(index, "c")))
        events.append(event(chunk(index, "d", "length", fingerprint=not include_usage)))
    if include_usage:
        events.append(usage_event())
    return [*events, event("[DONE]")]


@pytest.mark.parametrize("n", [1, 3])
def test_a_stream_with_usage_forced_on_reaches_the_client_as_vllm_sends_it_without(n):
    tally = StreamTally(strip_usage=True)
    out = b"".join(tally.feed(e) for e in vllm_stream(n, include_usage=True)) + tally.rest()
    assert out == b"".join(vllm_stream(n, include_usage=False))
    assert tally.usage["completion_tokens"] == 4 and tally.complete and tally.done


def test_the_fingerprint_is_put_back_whatever_the_network_cut():
    raw = b"".join(vllm_stream(2, include_usage=True))
    want = b"".join(vllm_stream(2, include_usage=False))
    for step in (1, 7, 64):
        tally = StreamTally(strip_usage=True)
        out = b"".join(tally.feed(raw[i:i + step]) for i in range(0, len(raw), step)) + tally.rest()
        assert out == want


def test_events_are_held_only_from_a_choices_last_event_to_the_usage_event():
    tally = StreamTally(strip_usage=True)
    first, second = vllm_stream(2, include_usage=True)[:2]
    assert tally.feed(first) == first and tally.feed(second) == second  # nothing held before a finish
    assert tally.feed(event(chunk(0, "b", "stop"))) == b""  # held: its fingerprint comes later
    assert tally.feed(event(chunk(1, "c"))) == b""  # held behind it: the order stays the engine's
    out = tally.feed(usage_event())
    assert out == event(chunk(0, "b", "stop", fingerprint=True)) + event(chunk(1, "c"))


def test_held_events_go_out_as_sent_when_no_usage_event_comes():
    tally = StreamTally(strip_usage=True)
    last = event(chunk(0, "b", "stop"))
    assert tally.feed(last) == b""
    assert tally.feed(event("[DONE]")) == last + event("[DONE]")
    broken = StreamTally(strip_usage=True)
    broken.feed(last)
    assert broken.release() == last and broken.release() == b""


def test_what_is_held_is_bounded():
    tally = StreamTally(strip_usage=True)
    assert tally.feed(event(chunk(0, "b", "stop"))) == b""
    big = event(chunk(1, "x" * (HOLD_LIMIT + 1)))
    out = tally.feed(big)
    assert out == event(chunk(0, "b", "stop")) + big  # released as the engine sent it
    assert tally.feed(event(chunk(1, "y"))) == event(chunk(1, "y"))  # and no more holding


def test_a_client_that_asked_for_usage_gets_the_engines_stream_byte_for_byte():
    raw = vllm_stream(2, include_usage=True)
    tally = StreamTally(strip_usage=False)
    assert b"".join(tally.feed(e) for e in raw) + tally.rest() == b"".join(raw)


def test_a_streams_choices_keep_their_stop_reason_and_role():
    tally = StreamTally()
    tally.feed(event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}))
    tally.feed(event({"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": "stop",
                                   "stop_reason": "}"}]}))
    assert tally.chat and tally.choices[0].role == "assistant" and tally.choices[0].stop_reason == "}"
