"""``loragate load``: a headless locust load of one adapter, judged against its load SLOs.

Prints the measured numbers against the contract's SLOs, writes the full result as JSON (with
locust's CSV/HTML and the raw samples) to the report folder, and exits 0 only when every SLO
holds and the proxy's counters match what locust saw (1: an SLO breached, 2: could not run).
"""

from __future__ import annotations

import argparse
import json
import textwrap
import time
from pathlib import Path

from loragate.core import settings
from loragate.core.contracts import load_contracts
from loragate.loadtest.measure import format_value as _fmt
from loragate.loadtest.prompts import LoadTestError, base_url, load_prompts
from loragate.loadtest.runner import DEFINITIONS, LoadResult, run_load


def configure(parser: argparse.ArgumentParser, name: str = "load") -> None:
    parser.add_argument("--endpoint", metavar="URL",
                        help="the proxy's base URL, e.g. http://127.0.0.1:8000 (default: the running local stack's)")
    parser.add_argument("--adapter", metavar="NAME", required=True, help="adapter (served model name) to load")
    parser.add_argument("--contracts", metavar="FILE", type=Path,
                        help="adapters file with the adapter's contract and SLOs (default: the local stack's / demo's)")
    parser.add_argument("--prompts", metavar="JSONL", type=Path,
                        help="prompts: {'input'} lines rendered with the contract's template, or {'prompt'} "
                             "lines sent as they are (default: the demo's held-out prompts)")
    parser.add_argument("--users", type=int, default=4, help="concurrent users, each streaming one request after another (4)")
    parser.add_argument("--spawn-rate", type=float, default=4.0, help="users started per second (4)")
    parser.add_argument("--duration", type=float, default=30.0, metavar="SECONDS",
                        help="seconds of load; requests running at the end still finish (30)")
    parser.add_argument("--max-tokens", type=int, default=None, help="max_tokens per request (default: the contract's)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    parser.add_argument("--metrics-url", metavar="URL",
                        help="the proxy's /metrics for the counter check (default: ENDPOINT/metrics)")
    parser.add_argument("--no-counter-check", action="store_true",
                        help="skip the proxy counter check (an endpoint that is not a loragate proxy)")
    parser.add_argument("--report-dir", metavar="DIR", type=Path,
                        help="where to write load.json, locust's CSV/HTML and the samples "
                             "(default: .loragate/reports/load-ADAPTER-TIME)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")


def _row(label: str, measured: str, bar: str = "", status: str = "") -> str:
    return f"  {label:<18} {measured:>14}  {bar:<14} {status}"


def render(result: LoadResult) -> str:
    """The human report: every SLO measured vs bar, then the other numbers."""
    m, cfg = result.metrics, result.config
    lines = [
        f"loragate load: {result.adapter} at {result.endpoint}: {cfg.get('users')} users, "
        f"{cfg.get('duration_s'):g} s, max_tokens {cfg.get('max_tokens')}, temperature {cfg.get('temperature'):g}",
        _row("SLO", "measured", "bar", ""),
    ]
    for check in result.checks:
        measured = "n/a" if check["measured"] is None else _fmt(check["measured"], check["unit"])
        op = "<=" if check["kind"] == "max" else ">="
        lines.append(_row(check["label"], measured, f"{op} {_fmt(check['bar'], check['unit'])}",
                          "ok" if check["passed"] else "BREACH"))
    counters = result.counters
    if counters.get("checked"):
        seen = counters["observed"]["completions"]
        lines.append(_row("proxy counters", f"{seen:g} vs {counters['expected']['completions']:g}",
                          "== locust", "ok" if counters["passed"] else "BREACH"))
    else:
        lines.append(_row("proxy counters", "not checked", "", ""))

    def num(key: str, unit: str) -> str:
        value = m.get(key)
        return "n/a" if value is None else _fmt(value, unit)

    lines += [
        "  measured:",
        f"    requests {m['requests']}, completed {m['completed']}, failed {m['failed']}, "
        f"in {m['duration_s']:.1f} s ({num('request_throughput', 'req/s')})",
        f"    TTFT p50 {num('ttft_p50_ms', 'ms')}, p95 {num('ttft_p95_ms', 'ms')}; "
        f"ITL p50 {num('itl_p50_ms', 'ms')}, p95 {num('itl_p95_ms', 'ms')}; "
        f"TPOT mean {num('tpot_mean_ms', 'ms')}",
        f"    e2e p50 {num('e2e_p50_ms', 'ms')}, p95 {num('e2e_p95_ms', 'ms')}; "
        f"output {m['output_tokens']} tokens, {num('output_tokens_per_s', 'tok/s')}; "
        f"goodput {num('goodput', 'req/s')}",
        f"    finish: stop {m['stop']}, length (max_tokens) {m['length']}, other {m['other']}; "
        f"stop share {num('stop_share', '%')}, max_tokens share {num('max_tokens_share', '%')}",
    ]
    for message, count in list(result.errors.items())[:5]:
        lines.append(f"    error x{count}: {message}")
    lines += textwrap.wrap(DEFINITIONS, width=100, initial_indent="  ", subsequent_indent="  ")
    if result.passed:
        lines.append("PASS: every load SLO holds")
    else:
        lines.append("FAIL: " + "; ".join(result.breaches))
    if "result" in result.report_files:
        lines.append(f"report: {result.report_files['result']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from loragate.cli.defaults import load_sources

    endpoint, default_contracts, default_prompts = load_sources(args.endpoint)
    if not endpoint:
        raise LoadTestError("no --endpoint given and no local stack runs (`loragate up` starts one)")
    endpoint = base_url(endpoint)
    contracts_file = args.contracts or default_contracts
    if contracts_file is None:
        raise LoadTestError("no --contracts given and no local stack or demo build to take them from")
    contract = load_contracts(contracts_file)[args.adapter]
    prompts_file = args.prompts or default_prompts
    if prompts_file is None:
        raise LoadTestError("no --prompts given and no demo held-out prompts to default to")
    prompts = load_prompts(prompts_file, contract)
    metrics_url = None if args.no_counter_check else (args.metrics_url or f"{endpoint}/metrics")
    report_dir = args.report_dir or (
        settings.reports_dir() / f"load-{args.adapter}-{time.strftime('%Y%m%d-%H%M%S')}")
    result = run_load(endpoint, args.adapter, contract, prompts, users=args.users,
                      spawn_rate=args.spawn_rate, duration_s=args.duration, metrics_url=metrics_url,
                      report_dir=report_dir, max_tokens=args.max_tokens, temperature=args.temperature)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(render(result))
    return 0 if result.passed else 1
