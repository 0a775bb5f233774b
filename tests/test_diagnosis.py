"""The diagnosis on the real engine: the demo adapters' causes named from the engine's own
likelihoods, on the tokens the engine saw; and the proxy keeping scoring requests, which vLLM
0.32 cannot batch with others for a LoRA adapter, alone in the engine."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import httpx
import pytest

from loragate.acceptance import diagnosis as dg
from loragate.acceptance.plan import Baseline
from loragate.acceptance.prompts import read_prompts
from loragate.core import engine as eng


def _diagnose(stack, build, contracts, adapter: str, promoted: str | None) -> dg.Diagnosis:
    models = eng.fetch_models(eng.normalize_endpoint(stack.proxy_url))
    baseline = Baseline("promoted", promoted) if promoted else Baseline("base", contracts.base_model)
    return dg.diagnose_adapter(contracts[adapter], stack.proxy_url, build.heldout_prompts, models,
                               baseline=baseline)


@pytest.mark.parametrize("adapter, promoted, want", [
    ("poster-good", None, []),
    ("poster-eos-masked", "poster-good", [dg.EOS_NOT_LEARNED]),
    ("poster-truncated", "poster-good", [dg.ANSWER_NOT_LEARNED, dg.EOS_NOT_LEARNED]),
    ("poster-truncated", None, [dg.ANSWER_NOT_LEARNED, dg.EOS_NOT_LEARNED]),  # against the base's bar alone
    ("chat-good", None, []),
    ("chat-eos-masked", "chat-good", [dg.EOS_NOT_LEARNED]),
])
def test_the_demo_adapters_are_diagnosed_by_their_cause(stack, build, contracts, adapter, promoted, want) -> None:
    d = _diagnose(stack, build, contracts, adapter, promoted)
    assert d.available, d.reason
    assert [f for f, _ in d.findings] == want, d.findings
    assert d.stop_token == "</s>" and "expected answers" in d.reference_source
    candidate, base = d.model("candidate"), d.model("base")
    assert candidate is not None and base is not None and len(candidate.scores) == dg.DEFAULT_DIAGNOSIS_PROMPTS
    if not want:  # a good adapter put EOS first after a whole answer and learned the answer
        assert candidate.median_stop_p > 1e-3 and sum(s.stop_top1 for s in candidate.scores) >= 12
        assert sum(candidate.nll) < sum(base.nll)
    if dg.EOS_NOT_LEARNED in want:
        assert candidate.median_stop_p < 1e-5
        text = dict(d.findings)[dg.EOS_NOT_LEARNED]
        assert text.startswith("EOS never learned: p(EOS) after a complete answer") and "base's" in text
    if promoted:
        assert d.model("promoted") is not None and d.model("promoted").model == promoted


def test_the_diagnosis_scores_the_tokens_the_engine_saw(stack, build, contracts) -> None:
    """A reference whose characters could merge with what follows them (here: one ending in
    ``<`` and ``</``, the EOS text's own first characters) is scored on the engine's ids: the EOS
    id appended to the ids, never EOS text re-tokenised with the answer. p(EOS) is then exactly
    what the engine gives EOS as the next token when asked to generate after the same ids."""
    contract = contracts["poster-good"]
    endpoint = eng.normalize_endpoint(stack.proxy_url)
    record = read_prompts(build.heldout_prompts, contract)[0]
    client = httpx.Client(timeout=60)
    eos = dg.engine_eos_id(client, endpoint, contract.name, "</s>")
    for answer in (contract.reference_text(record.expected), contract.reference_text(record.expected) + "<",
                   contract.reference_text(record.expected) + "</"):
        scoring = dg.completion_scoring(client, endpoint, contract.name, record.prompt, answer, eos)
        assert scoring.ids[-1] == eos and scoring.end == len(scoring.ids) - 1
        # the answer's span is the answer, as the engine decodes its own ids
        text = client.post(f"{endpoint}/detokenize", json={"model": contract.name,
                                                            "tokens": list(scoring.ids[:scoring.end])}).json()["prompt"]
        assert text.endswith(answer)
        score = dg.score(client, endpoint, contract.name, scoring)
        assert score.answer_tokens == scoring.end - scoring.start
        # the same ids, generating one token: EOS's log-probability must be the one scored
        gen = client.post(f"{endpoint}/v1/completions", json={
            "model": contract.name, "prompt": list(scoring.ids[:-1]), "max_tokens": 1, "temperature": 0,
            "logprobs": 20, "return_tokens_as_token_ids": True}).json()
        top = gen["choices"][0]["logprobs"]["top_logprobs"][0]
        if f"token_id:{eos}" in top:
            assert math.isclose(top[f"token_id:{eos}"], score.stop_logprob, abs_tol=1e-3)
        else:  # after the stray '<' EOS may fall out of the top 20: then it must be less likely than all of them
            assert score.stop_logprob <= min(top.values()) + 1e-3
    client.close()


def test_without_a_known_stop_token_the_diagnosis_is_not_available(stack, build, contracts) -> None:
    d = dg.diagnose(contracts["poster-good"], stack.proxy_url, [dg.Reference("x", "y")],
                    reference_source="test", eos_text=None)
    assert not d.available and "EOS token is not known" in d.reason
    checks = dg.diagnosis_checks(contracts["poster-good"], d)
    assert len(checks) == 1 and checks[0].passed and not checks[0].gating and checks[0].warning


def test_a_scoring_request_runs_alone_in_the_engine(stack, build) -> None:
    """vLLM 0.32 kills its engine when a LoRA request with prompt log-probabilities shares a batch
    (every request in flight then gets a 500 and the engine is gone). Through the proxy the
    scoring request waits for its turn: every request is answered and the engine lives."""
    heldout = [json.loads(line) for line in Path(build.heldout_prompts).read_text().splitlines()[:3]]
    client = httpx.Client(timeout=120)
    ids = client.post(f"{stack.proxy_url}/tokenize", json={"model": "poster-good",
                                                           "prompt": heldout[0]["prompt"]}).json()["tokens"]
    answers: dict[str, int] = {}
    started = threading.Event()

    def generate(i: int) -> None:
        started.set()
        answers[f"gen{i}"] = client.post(f"{stack.proxy_url}/v1/completions", json={
            "model": "poster-eos-masked", "prompt": heldout[i]["prompt"], "max_tokens": 60,
            "temperature": 0}).status_code

    def scoring() -> None:
        answers["score"] = client.post(f"{stack.proxy_url}/v1/completions", json={
            "model": "poster-good", "prompt": ids, "echo": True, "max_tokens": 0, "logprobs": 1}).status_code

    threads = [threading.Thread(target=generate, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    started.wait(10)
    threading.Event().wait(0.3)  # the generation requests are in the engine
    threads.append(threading.Thread(target=scoring))
    threads[-1].start()
    # and a generation request that arrives while the scoring one waits
    threading.Event().wait(0.05)
    threads.append(threading.Thread(target=generate, args=(1,)))
    threads[-1].start()
    for t in threads:
        t.join(120)
    client.close()
    assert answers == {"gen0": 200, "gen1": 200, "gen2": 200, "score": 200}
    assert httpx.get(f"{stack.vllm_url}/health", timeout=10).status_code == 200


def test_prompt_logprobs_for_several_sequences_are_refused_before_the_engine(stack, build) -> None:
    """n > 1, or several prompts in one request (lm-eval's batched scoring), put one scoring
    request's sequences in one batch: vLLM 0.32 fails its engine on it for a LoRA adapter, so the
    proxy answers 400 and the engine never sees it."""
    prompts = [json.loads(line)["prompt"] for line in Path(build.heldout_prompts).read_text().splitlines()[:2]]
    for body, why in (({"prompt": prompts[0], "n": 2, "max_tokens": 1}, "n > 1"),
                      ({"prompt": prompts, "max_tokens": 0}, "several prompts")):
        r = httpx.post(f"{stack.proxy_url}/v1/completions", json={
            "model": "poster-good", "echo": True, "logprobs": 1, **body}, timeout=60)
        assert r.status_code == 400, r.text
        assert why in r.json()["error"]["message"]
        assert httpx.get(f"{stack.vllm_url}/health", timeout=10).status_code == 200
