"""Engine turns (loragate.server.turns): a scoring request waits for the engine to be free of
other generating requests, holds new ones back while it waits and runs, and a cancelled wait
holds nothing."""

from __future__ import annotations

import asyncio

import pytest

from loragate.server.turns import EngineTurns, needs_turn_alone


@pytest.mark.parametrize("body, alone", [
    ({"prompt": "x"}, False),
    ({"prompt": "x", "logprobs": 1}, False),          # sampled tokens' log-probabilities only
    ({"prompt": "x", "echo": True}, False),           # echo without log-probabilities
    ({"prompt": "x", "echo": True, "logprobs": 0}, True),
    ({"prompt": "x", "prompt_logprobs": 0}, True),
    ({"messages": [], "prompt_logprobs": 1}, True),
    ({"prompt": "x", "prompt_logprobs": None}, False),
])
def test_which_requests_need_the_engine_alone(body, alone) -> None:
    assert needs_turn_alone(body) is alone


def test_a_scoring_turn_waits_for_shared_turns_and_holds_new_ones_back() -> None:
    async def scenario() -> list[str]:
        turns, order = EngineTurns(), []
        first = await turns.enter(False)

        async def score() -> None:
            t = await turns.enter(True)
            order.append("score in")
            await asyncio.sleep(0.01)
            order.append("score out")
            turns.leave(t)

        async def late() -> None:
            t = await turns.enter(False)
            order.append("late in")
            turns.leave(t)

        scoring = asyncio.create_task(score())
        await asyncio.sleep(0.01)
        assert turns.waiting_alone == 1 and order == []  # the scoring request waits for the first
        late_task = asyncio.create_task(late())
        await asyncio.sleep(0.01)
        assert order == []  # the late request waits behind the scoring one
        turns.leave(first)
        await asyncio.gather(scoring, late_task)
        assert turns.shared == 0 and turns.waiting_alone == 0
        return order

    assert asyncio.run(scenario()) == ["score in", "score out", "late in"]


def test_a_cancelled_scoring_wait_releases_the_requests_behind_it() -> None:
    async def scenario() -> None:
        turns = EngineTurns()
        first = await turns.enter(False)
        scoring = asyncio.create_task(turns.enter(True))
        await asyncio.sleep(0.01)
        late = asyncio.create_task(turns.enter(False))
        await asyncio.sleep(0.01)
        assert not late.done()
        scoring.cancel()  # the client went away while waiting
        await asyncio.sleep(0.01)
        assert late.done() and turns.shared == 2 and turns.waiting_alone == 0
        turns.leave(first)
        turns.leave(await late)

    asyncio.run(scenario())


@pytest.mark.parametrize("body, refused", [
    ({"prompt": "x", "echo": True, "logprobs": 1, "n": 2}, True),
    ({"prompt": "x", "prompt_logprobs": 0, "best_of": 3}, True),
    ({"prompt": "x", "prompt_logprobs": 0, "n": 1}, False),
    ({"prompt": "x", "logprobs": 1, "n": 4}, False),  # no prompt log-probabilities: batching is safe
    ({"prompt": ["a", "b"], "echo": True, "logprobs": 1, "max_tokens": 0}, True),  # lm-eval's batched scoring
    ({"prompt": [[1, 2], [3]], "prompt_logprobs": 0}, True),
    ({"prompt": [1, 2, 3], "prompt_logprobs": 0}, False),  # one prompt of token ids
    ({"prompt": ["a", "b"], "logprobs": 1}, False),
])
def test_prompt_logprobs_with_several_sequences_are_refused(body, refused) -> None:
    from loragate.server.turns import refusal

    assert (refusal(body) is not None) is refused
