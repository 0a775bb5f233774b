"""``loragate bench``: the benchmarks (:mod:`loragate.bench`), with the local stack as their input."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from loragate.bench import (
    BENCHMARKS,
    bench_proxy,
    bench_shadow,
    bench_shadow_stack,
    bench_stack,
    bench_verdict,
    chunk_costs,
    print_tables,
    split_cpus,
)
from loragate.bench.peers import PEERS
from loragate.core import settings
from loragate.core.errors import LoragateError


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    # No argparse choices here: with nargs="*" argparse checks the empty default against them
    # and refuses a bare `loragate bench`; the names are checked in run().
    parser.add_argument("which", nargs="*", metavar="{proxy,stack,verdict,shadow,shadow-stack}",
                        help="benchmarks to run (default: all five; stack, verdict and shadow-stack need `loragate up`)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--requests", type=int, default=400, help="requests per block (proxy benchmark)")
    parser.add_argument("--rounds", type=int, default=3, help="direct/proxy block pairs per setting")
    parser.add_argument("--chunks", type=int, default=16, help="SSE chunks per short streamed answer (proxy benchmark)")
    parser.add_argument("--long-chunks", type=int, default=128,
                        help="SSE chunks per long streamed answer; the two give the CPU per chunk (proxy benchmark)")
    parser.add_argument("--itl-ms", type=float, default=0.0,
                        help="the bench upstream paces streamed tokens this far apart, as an engine does "
                             "(proxy benchmark; default 0: instant)")
    parser.add_argument("--shared-cpus", action="store_true",
                        help="proxy: run the proxy on the same CPUs as the bench client and upstream (default: "
                             "the proxy alone on the last CPU, the client and upstream on the others); stack: "
                             "leave the engine's API server and engine core floating (default: on the engine's "
                             "cores, the proxy on the others)")
    parser.add_argument("--shadow-share", type=float, default=1.0,
                        help="shadow benchmark: the share of live requests shadowed (default 1: every one)")
    parser.add_argument("--shadow-candidate", default="poster-eos-masked",
                        help="shadow-stack benchmark: the candidate shadowing --adapter (default: the demo's "
                             "runaway, the most tokens a candidate can cost)")
    parser.add_argument("--peers", nargs="*", default=list(PEERS), metavar="{" + ",".join(PEERS) + "}",
                        help="proxy: pass-through peers measured in the same rounds (default: %(default)s; "
                             "none with a bare --peers); one neither installed nor set up is left out with a note")
    parser.add_argument("--no-peer-setup", action="store_true",
                        help="proxy: use only peers already installed (default: fetch Debian's nginx and "
                             "vllm-router from PyPI into the loragate home when missing)")
    parser.add_argument("--also-without-schema", action="store_true",
                        help="proxy: also measure, in the same rounds, a second proxy whose contract has no JSON "
                             "Schema (what judging against the schema costs)")
    parser.add_argument("--adapter", default="poster-good", help="adapter for the stack and verdict benchmarks")
    parser.add_argument("--stack-requests", type=int, default=16)
    parser.add_argument("--stack-concurrency", type=int, default=4)
    parser.add_argument("--out", type=Path, help="JSON result file (default: .loragate/reports/bench-<time>.json)")



def run(args: argparse.Namespace) -> int:
    unknown = [name for name in args.which if name not in BENCHMARKS]
    if unknown:
        raise LoragateError(f"unknown benchmark {', '.join(map(repr, unknown))}: choose from {', '.join(BENCHMARKS)}")
    which = args.which or list(BENCHMARKS)
    from loragate.bench.upstream import MAX_CHUNKS

    for flag, value in (("--chunks", args.chunks), ("--long-chunks", args.long_chunks)):
        if not 1 <= value <= MAX_CHUNKS:
            raise LoragateError(f"{flag} must be between 1 and {MAX_CHUNKS}, not {value}")
    if not 0 <= args.itl_ms <= 1000:
        raise LoragateError(f"--itl-ms must be between 0 and 1000, not {args.itl_ms:g}")
    unknown_peers = [name for name in args.peers if name not in PEERS]
    if unknown_peers:
        raise LoragateError(f"unknown peer {', '.join(map(repr, unknown_peers))}: choose from {', '.join(PEERS)}")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the tables
    import platform

    result: dict = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if "proxy" in which:
        from loragate.bench.peers import prepare
        from loragate.demo.data import LAYOUT_SCHEMA  # the demo adapters' contract: what the proxy judges

        placement = split_cpus(shared=args.shared_cpus)
        result["proxy_placement"] = placement.as_json() if placement else None
        peers, notes = prepare(list(dict.fromkeys(args.peers)), setup=not args.no_peer_setup)
        for note in notes:
            print(f"[bench proxy] left out: {note}", file=sys.stderr, flush=True)
        result["proxy_peers"] = [{"name": p.name, "version": p.version, "source": p.source} for p in peers]
        result["proxy_peers_left_out"] = notes
        result["proxy"] = bench_proxy(args.concurrency, args.requests, args.rounds, args.chunks, args.long_chunks,
                                      args.itl_ms, placement, peers, json_schema=LAYOUT_SCHEMA,
                                      without_schema=args.also_without_schema)
        result["proxy_chunk_cost"] = chunk_costs(result["proxy"])
    if "shadow" in which:
        placement = split_cpus(shared=args.shared_cpus)
        if not 0 < args.shadow_share <= 1:
            raise LoragateError(f"--shadow-share must be in (0, 1], not {args.shadow_share:g}")
        result["shadow"] = bench_shadow(args.concurrency, args.requests, args.rounds, placement, args.shadow_share)
    if "stack" in which or "verdict" in which or "shadow-stack" in which:
        from loragate.stack import running_stack

        info = running_stack()
        if info is None:
            raise LoragateError("the stack and verdict benchmarks need the local stack: run `loragate up` first")
    if "stack" in which:
        result["stack"] = bench_stack(info, args.adapter, args.stack_requests, args.stack_concurrency, args.rounds,
                                      shared_cpus=args.shared_cpus)
    if "shadow-stack" in which:
        if not 0 < args.shadow_share <= 1:
            raise LoragateError(f"--shadow-share must be in (0, 1], not {args.shadow_share:g}")
        result["shadow_stack"] = bench_shadow_stack(info, args.adapter, args.shadow_candidate, args.shadow_share,
                                                    args.stack_requests, args.stack_concurrency, args.rounds)
    out = args.out or settings.reports_dir() / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    if "verdict" in which:
        result["verdict"] = bench_verdict(info, args.adapter, out.with_name(f"{out.stem}-gate-{args.adapter}"))
    print_tables(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nresults: {out}")
    return 0
