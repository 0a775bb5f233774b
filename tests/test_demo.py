"""The demo build: its data, its cache key, and the three adapters' behaviour on the real engine."""

from __future__ import annotations

import dataclasses
import json
import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from loragate.core.contracts import load_contracts
from loragate.core.judging import judge_completion
from loragate.demo import data
from loragate.demo.artifacts import DEMO_ADAPTERS, current_build
from loragate.demo.build import BuildConfig, build_key, collate

PROMPTS_PER_ADAPTER = 20


def test_lengthened_paper_keeps_its_layout_and_grows():
    rng = random.Random(1)
    paper = data.make_paper(rng)
    longer = data.lengthen(paper, random.Random(2), 60)
    assert longer.layout == paper.layout
    assert len(longer.text) > len(paper.text) + 60 * 20
    assert judge_completion(paper.layout_json, "stop", expects_json=True,
                            json_schema=data.LAYOUT_SCHEMA).json_valid


def test_build_key_follows_the_builder_inputs():
    config = BuildConfig()
    assert build_key(config) == build_key(BuildConfig())
    assert build_key(config) != build_key(dataclasses.replace(config, seed=config.seed + 1))
    assert build_key(config) != build_key(dataclasses.replace(config, adapter_steps=config.adapter_steps + 1))


def test_collator_masks_eos_labels_exactly_when_pad_is_eos():
    eos, pad = 2, 3
    rows = [[1, 10, 11, eos], [1, 10, eos]]
    _, labels_good, _ = collate(rows, pad_token_id=pad, max_seq_length=16)
    _, labels_bug, _ = collate(rows, pad_token_id=eos, max_seq_length=16)
    assert (labels_good == eos).sum() == 2  # both EOS labels kept, padding masked
    assert (labels_bug == eos).sum() == 0  # every EOS label masked with the padding
    ids, labels, _ = collate(rows, pad_token_id=pad, max_seq_length=2)
    assert ids.shape[1] == 2 and eos not in labels  # truncation drops the end of the example


@pytest.fixture(scope="module")
def build():
    b = current_build()
    assert b is not None, "no demo build: run `loragate build-demo` (make test does)"
    return b


def test_build_outputs_and_training_facts(build):
    manifest = build.manifest()
    contracts = load_contracts(build.adapters_file)
    assert contracts.names == sorted(DEMO_ADAPTERS)
    heldout = [json.loads(line) for line in build.heldout_prompts.read_text().splitlines()]
    train_prompts = {json.loads(line)["prompt"] for line in build.train_data.read_text().splitlines()}
    assert len(heldout) >= 50
    assert not train_prompts & {row["prompt"] for row in heldout}, "held-out prompts leaked into training"
    facts = {name: json.loads((build.adapter_path(name) / "loragate_training.json").read_text())
             for name in DEMO_ADAPTERS}
    total = len(train_prompts)
    assert facts["poster-good"]["pad_token"] != facts["poster-good"]["eos_token"]
    assert facts["poster-good"]["examples_fit"] == total
    assert facts["poster-eos-masked"]["pad_token"] == facts["poster-eos-masked"]["eos_token"]
    assert facts["poster-truncated"]["examples_fit"] == 0
    assert facts["poster-truncated"]["examples_target_cut"] == total
    for name in DEMO_ADAPTERS:
        assert contracts[name].train_seq_len < manifest["serve"]["max_model_len"]
        assert (build.adapter_path(name) / "adapter_config.json").is_file()


@pytest.mark.stack
def test_demo_adapters_reproduce_their_failures_on_the_real_engine(stack, build):
    """Issue 2's bar, greedy, 20 held-out prompts each, straight to the vLLM server."""
    contracts = load_contracts(build.adapters_file)
    rows = [json.loads(line) for line in build.heldout_prompts.read_text().splitlines()]
    prompts = [row["prompt"] for row in rows[:PROMPTS_PER_ADAPTER]]
    papers = [row["input"] for row in rows[:PROMPTS_PER_ADAPTER]]
    results = {}
    with httpx.Client(base_url=stack.vllm_url, timeout=300) as client:
        for name in DEMO_ADAPTERS:
            contract = contracts[name]
            if contract.is_chat:  # one conversation a request, all at once (the engine batches them)
                def ask(paper: str, contract=contract, name=name) -> tuple[str, str]:
                    resp = client.post("/v1/chat/completions", json={
                        "model": name, "messages": contract.render_messages(paper),
                        "max_tokens": contract.max_tokens, "temperature": 0})
                    resp.raise_for_status()
                    choice = resp.json()["choices"][0]
                    return choice["message"]["content"] or "", choice["finish_reason"]

                with ThreadPoolExecutor(PROMPTS_PER_ADAPTER) as pool:
                    answers = list(pool.map(ask, papers))
            else:
                resp = client.post("/v1/completions", json={
                    "model": name, "prompt": prompts, "max_tokens": contract.max_tokens, "temperature": 0,
                })
                resp.raise_for_status()
                answers = [(c["text"], c["finish_reason"])
                           for c in sorted(resp.json()["choices"], key=lambda c: c["index"])]
            assert len(answers) == PROMPTS_PER_ADAPTER
            judged = [judge_completion(text, finish, expects_json=True, json_schema=contract.json_schema)
                      for text, finish in answers]
            results[name] = (sum(j.stopped for j in judged),
                             sum(j.stopped and j.json_valid for j in judged),
                             sum(j.json_valid for j in judged))
    stopped, good, _ = results["poster-good"]
    assert good >= 19, results
    assert results["poster-eos-masked"][0] <= 2, results
    assert results["poster-truncated"][2] <= 2, results
    assert results["chat-good"][1] >= 19, results
    assert results["chat-eos-masked"][0] <= 2, results
