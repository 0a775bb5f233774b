"""Send a plan's requests to the endpoint, a fixed number in flight, and judge each answer.

Requests go to ``POST /v1/completions`` with exactly: ``model``, ``prompt`` (already in the
adapter's template), ``max_tokens`` (the contract's), ``temperature`` and, for sampled runs,
``seed``; a chat adapter's go to ``POST /v1/chat/completions`` with ``messages`` instead of
``prompt``, and its answer is judged on ``message.content``. Nothing else: never ``ignore_eos`` or ``min_tokens``, which would hide the very
failures the gate looks for. A request that fails is recorded as a failed sample; nothing is
retried.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypedDict

import httpx

from loragate.acceptance.checks import Sample, failed_sample, judge_sample
from loragate.acceptance.plan import AdapterPlan, RequestSpec, RunSpec, SuitePlan
from loragate.acceptance.prompts import chat_messages
from loragate.core.engine import auth_headers

#: Request fields the gate must never send (they would force or hide stopping).
FORBIDDEN_FIELDS = frozenset({"ignore_eos", "min_tokens"})


def request_path(plan: AdapterPlan) -> str:
    """Where an adapter's requests go."""
    return "/v1/chat/completions" if plan.api == "chat" else "/v1/completions"


def request_body(run: RunSpec, request: RequestSpec, api: str = "completions") -> dict[str, Any]:
    """The JSON body of one completion (or chat completion) request."""
    body: dict[str, Any] = {"model": run.model}
    if api == "chat":
        body["messages"] = chat_messages(request.prompt)
    else:
        body["prompt"] = request.prompt
    body.update(max_tokens=run.max_tokens, temperature=run.temperature)
    if request.seed is not None:
        body["seed"] = request.seed
    if FORBIDDEN_FIELDS & body.keys():  # pragma: no cover - a guard against a future edit
        raise AssertionError(f"the gate must never send {sorted(FORBIDDEN_FIELDS & body.keys())}")
    return body


class _SampleIdent(TypedDict):
    """The fields that name a sample, shared by :func:`judge_sample` and :func:`failed_sample`."""

    adapter: str
    run: str
    index: int
    model: str


async def _one(client: httpx.AsyncClient, url: str, plan: AdapterPlan, run: RunSpec, request: RequestSpec,
               schema: Mapping[str, Any] | None) -> Sample:
    t0 = time.perf_counter()
    ident = _SampleIdent(adapter=plan.adapter, run=run.id, index=request.index, model=run.model)
    try:
        resp = await client.post(url + request_path(plan), json=request_body(run, request, plan.api))
    except httpx.HTTPError as exc:
        return failed_sample(**ident, error=f"{type(exc).__name__}: {exc}"[:300], latency_s=time.perf_counter() - t0)
    latency = time.perf_counter() - t0
    if resp.status_code != 200:
        return failed_sample(**ident, error=f"HTTP {resp.status_code}: {resp.text[:300]}", latency_s=latency)
    try:
        data = resp.json()
        choice = data["choices"][0]
        usage = data.get("usage") or {}
        text = (choice.get("message") or {}).get("content") if plan.api == "chat" else choice.get("text")
        if not isinstance(text, str):
            raise TypeError("choice has no text" if plan.api != "chat" else "choice has no message content")
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        return failed_sample(**ident, error=f"unusable completion answer: {exc}", latency_s=latency)
    return judge_sample(
        **ident, text=text, finish_reason=choice.get("finish_reason"),
        prompt_tokens=usage.get("prompt_tokens"), completion_tokens=usage.get("completion_tokens"),
        expects_json=plan.expects_json, json_schema=schema, max_model_len=plan.max_model_len,
        expected=request.expected, latency_s=latency,
    )


async def run_plan_async(plan: SuitePlan, schemas: Mapping[str, Mapping[str, Any] | None], *,
                         api_key: str | None = None,
                         on_sample: Callable[[Sample], None] | None = None) -> list[Sample]:
    """Every request of every adapter's runs, ``plan.concurrency`` in flight; samples in plan order.

    Long prompts go first so the engine's batch is never left waiting on one long prefill at the end.
    """
    jobs = [(a, run, req) for a in plan.adapters for run in a.runs for req in run.requests]
    order = sorted(range(len(jobs)), key=lambda i: -(jobs[i][2].prompt_tokens or 0))
    results: list[Sample | None] = [None] * len(jobs)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in order:
        queue.put_nowait(i)
    url = plan.endpoint
    limits = httpx.Limits(max_connections=plan.concurrency, max_keepalive_connections=plan.concurrency)
    async with httpx.AsyncClient(timeout=plan.request_timeout_s, limits=limits, headers=auth_headers(api_key)) as client:
        async def worker() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                adapter, run, req = jobs[i]
                sample = await _one(client, url, adapter, run, req, schemas.get(adapter.adapter))
                results[i] = sample
                if on_sample is not None:
                    on_sample(sample)

        await asyncio.gather(*(worker() for _ in range(max(1, plan.concurrency))))
    return [s for s in results if s is not None]


def run_plan(plan: SuitePlan, schemas: Mapping[str, Mapping[str, Any] | None], *, api_key: str | None = None,
             samples_file: Path | None = None) -> list[Sample]:
    """:func:`run_plan_async` from synchronous code; each sample is appended to ``samples_file`` as judged."""
    handle = samples_file.open("a", encoding="utf-8") if samples_file is not None else None

    def write(sample: Sample) -> None:
        if handle is not None:
            handle.write(json.dumps(sample.to_dict(), ensure_ascii=False) + "\n")
            handle.flush()

    try:
        return asyncio.run(run_plan_async(plan, schemas, api_key=api_key, on_sample=write))
    finally:
        if handle is not None:
            handle.close()


def read_samples(path: Path) -> list[Sample]:
    """Samples written by :func:`run_plan` (a torn last line, from a killed writer, is skipped)."""
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        try:
            out.append(Sample.from_dict(json.loads(line)))
        except (ValueError, TypeError, KeyError):
            continue
    return out


def all_requests(plan: SuitePlan) -> Iterable[tuple[AdapterPlan, RunSpec, RequestSpec]]:
    return ((a, run, req) for a in plan.adapters for run in a.runs for req in run.requests)
