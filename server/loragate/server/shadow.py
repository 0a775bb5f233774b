"""Shadows: a candidate adapter judged on the live traffic of another, before any client sees it.

A shadow (``shadows`` in :mod:`loragate.server.config`) names a ``live`` adapter, a ``candidate``,
the ``share`` of the live adapter's judged requests to shadow and ``max_in_flight``. For a sampled
request, once the live request has been sent and the engine's answer head is in, the proxy sends
the same request body to the same route with ``model`` set to the candidate, not streamed
(``stream`` false, ``stream_options`` left out; everything else as the client sent it). The
candidate runs on the same engine as the live adapter, in the same batches.

What holds:

- The client never sees a shadow: its answer, headers and counters are the live request's
  alone. A shadow is its own task: a client that goes away cancels its live request, never its
  shadow, and a shadow that fails changes nothing of the live request.
- A shadow takes an ordinary shared engine turn (:class:`~loragate.server.turns.EngineTurns`),
  like any generating request. Requests for prompt log-probabilities (which run alone) and
  scoring requests (``echo`` with ``max_tokens`` 0: nothing generated) are never shadowed.
- At most ``max_in_flight`` shadows of a pair run at once (waiting for a turn included); a
  sampled request beyond them is skipped and counted (``outcome="skipped"``), never queued.
- The candidate's answer is judged with the one :func:`~loragate.core.judging.judge_completion`
  **by the candidate's contract** (JSON, its compiled schema, its context limit): it is the candidate's
  verdict, as ``loragate gate`` would judge it. The live answer stays judged by the live
  adapter's contract; their paired outcome on the same request is counted per choice.
- Everything is counted in the ``loragate_shadow_*`` series (:mod:`loragate.core.metric_names`),
  labelled ``candidate`` and ``live``, in one synchronous step once both answers are judged;
  the live adapter's series never move for a shadow. Each shadow is logged as its own line
  (``"event": "shadow"``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from typing import Any, Iterable, Sequence

from loragate.core import fastjson
from loragate.core.contracts import ContractSet
from loragate.core.judging import FinishClass, JsonResult
from loragate.server.adapters import AdapterNames
from loragate.server.answers import judge_outputs, whole_answer
from loragate.server.config import ConfigError, ShadowConfig
from loragate.server.fields import Asked
from loragate.server.metrics import ProxyMetrics
from loragate.server.turns import EngineTurns, needs_turn_alone
from loragate.server.upstream import Upstream, UpstreamError

access_log = logging.getLogger("loragate.proxy.requests")

#: The live answer's outcome per choice, as a shadow pairs it: (stopped, JSON valid or None when
#: its contract does not expect JSON); ``None``: the live answer was not judged.
LiveOutcome = list[tuple[bool, bool | None]] | None


def _pair(live: bool, candidate: bool) -> str:
    if live and candidate:
        return "both"
    if live:
        return "live_only"
    return "candidate_only" if candidate else "neither"


class Shadows:
    """The configured shadows of one proxy: sampling, the in-flight bound, the shadow tasks."""

    def __init__(self, configs: Sequence[ShadowConfig], contracts: ContractSet | None, metrics: ProxyMetrics,
                 *, log_requests: bool = True, rng: random.Random | None = None) -> None:
        for c in configs:
            for role, name in (("live", c.live), ("candidate", c.candidate)):
                if contracts is None or name not in contracts:
                    raise ConfigError(f"shadow {role} {name!r} is not an adapter of the contracts: shadows pair "
                                      "contract adapters only")
        self.configs = tuple(configs)
        self._by_live: dict[str, list[ShadowConfig]] = {}
        for c in self.configs:
            self._by_live.setdefault(c.live, []).append(c)
        self._metrics = metrics
        self._log_requests = log_requests
        self._random = rng or random.Random()
        self._running: dict[tuple[str, str], int] = {}
        self._tasks: set[asyncio.Task] = set()
        for c in self.configs:
            contract = contracts[c.candidate] if contracts is not None else None
            metrics.init_shadow(c.candidate, c.live, bool(contract and contract.expects_json))

    def __bool__(self) -> bool:
        return bool(self.configs)

    @property
    def tasks(self) -> frozenset[asyncio.Task]:
        """Shadow tasks running now."""
        return frozenset(self._tasks)

    def sample(self, live: str, request: dict, asked: Asked) -> list[ShadowConfig]:
        """The shadows to run for a judged request to the adapter labelled ``live``."""
        configs = self._by_live.get(live)
        if not configs or asked.scoring or needs_turn_alone(request):
            return []
        return [c for c in configs if c.share >= 1.0 or self._random.random() < c.share]

    def start(self, picked: Iterable[ShadowConfig], *, upstream: Upstream, turns: EngineTurns,
              names: AdapterNames, target: bytes, headers: list[tuple[bytes, bytes]], request: dict,
              asked: Asked, live: "asyncio.Future[LiveOutcome]") -> None:
        """Start a task for each picked shadow, or count it skipped when its pair runs
        ``max_in_flight`` shadows already."""
        for c in picked:
            key = (c.candidate, c.live)
            if self._running.get(key, 0) >= c.max_in_flight:
                self._metrics.shadow_requests.labels(c.candidate, c.live, "skipped").inc()
                self._log(c, "skipped", time.perf_counter())
                continue
            self._running[key] = self._running.get(key, 0) + 1
            self._metrics.shadows_in_flight.labels(c.candidate, c.live).inc()
            task = asyncio.get_running_loop().create_task(
                self._run(c, upstream, turns, names, target, headers, request, asked, live))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, c: ShadowConfig, upstream: Upstream, turns: EngineTurns, names: AdapterNames,
                   target: bytes, headers: list[tuple[bytes, bytes]], request: dict, asked: Asked,
                   live: "asyncio.Future[LiveOutcome]") -> None:
        started = time.perf_counter()
        # built here, in the shadow's task: the live request's path only starts it
        shadow = {k: v for k, v in request.items() if k != "stream_options"}
        shadow["model"] = c.candidate
        shadow["stream"] = False
        body = json.dumps(shadow).encode()
        m = self._metrics
        outcome = "cancelled"  # logged only: a shadow cancelled at shutdown is not counted
        details: dict[str, Any] = {}
        try:
            turn = await turns.enter(False)
            try:
                resp = await upstream.send("POST", target, headers, body)
                try:
                    content = await resp.read()
                finally:
                    resp.close()
            except UpstreamError as exc:
                outcome = "upstream_error"
                details["error"] = exc.kind
                m.shadow_requests.labels(c.candidate, c.live, outcome).inc()
                return
            finally:
                turns.leave(turn)
            if resp.status != 200:
                outcome = "refused"
                details["status"] = resp.status
                m.shadow_requests.labels(c.candidate, c.live, outcome).inc()
                return
            try:
                answer = whole_answer(fastjson.loads(content))
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
                outcome = "invalid_response"
                m.shadow_requests.labels(c.candidate, c.live, outcome).inc()
                return
            judged = judge_outputs(answer.outputs, answer.usage, answer.chat, asked, names, c.candidate,
                                   constrained=False)
            live_outcome = await asyncio.shield(live)
            # every count of this shadow in one synchronous step
            outcome = "judged"
            m.shadow_requests.labels(c.candidate, c.live, outcome).inc()
            for j, _ in judged:
                m.shadow_completions.labels(c.candidate, c.live, j.finish.value).inc()
                if j.length_cause is not None:
                    m.shadow_length_cutoffs.labels(c.candidate, c.live, j.length_cause.value).inc()
                if j.json_result is not None:
                    m.shadow_json_outputs.labels(c.candidate, c.live, j.json_result.value).inc()
            tokens = answer.usage.get("completion_tokens")
            if isinstance(tokens, int) and not isinstance(tokens, bool):
                m.shadow_output_tokens.labels(c.candidate, c.live).inc(tokens)
            if live_outcome is not None:
                for (live_stop, live_json), (j, _) in zip(live_outcome, judged):
                    m.shadow_paired.labels(c.candidate, c.live, "stop", _pair(live_stop, j.stopped)).inc()
                    if live_json is not None and j.json_result is not None:
                        m.shadow_paired.labels(c.candidate, c.live, "json_valid",
                                               _pair(live_json, j.json_result is JsonResult.VALID)).inc()
            details["finish_reason"] = ",".join(j.finish.value for j, _ in judged)
            results = [j.json_result.value for j, _ in judged if j.json_result is not None]
            details["json_result"] = ",".join(results) or None
            details["paired"] = live_outcome is not None
        finally:
            self._running[(c.candidate, c.live)] -= 1
            m.shadows_in_flight.labels(c.candidate, c.live).dec()
            self._log(c, outcome, started, **details)

    def _log(self, c: ShadowConfig, outcome: str, started: float, **details: Any) -> None:
        if not self._log_requests:
            return
        access_log.info(json.dumps({
            "event": "shadow", "shadow": True, "live": c.live, "candidate": c.candidate, "outcome": outcome,
            **details, "latency_ms": round((time.perf_counter() - started) * 1e3, 2)}))

    async def close(self) -> None:
        """Cancel the shadows still running (at shutdown)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


def live_outcome_of(judged: Iterable[tuple[Any, Any]]) -> LiveOutcome:
    """A live answer's judged choices as a shadow pairs them."""
    return [(j.finish is FinishClass.STOP, None if j.json_result is None else j.json_result is JsonResult.VALID)
            for j, _ in judged]
