"""``loragate gate`` and ``loragate check-data``.

``gate`` exits 0 on PROMOTE, 1 on REJECT, 130 when interrupted (a REJECT), 2 when it could not
run (bad contracts, a report folder that cannot be written, ``--load`` without the load test),
3 on PROMOTE when ``--rollout-replica`` replicas did not all apply the new promoted set.
``check-data`` exits 0 when every target fits (and, with ``--contracts``/``--adapter``, no
target is empty and the share of targets judged valid JSON meets the contract's
``json_validity``), 1 when some would be cut (or a contract bar fails on the targets), 2 on bad
input (an unreadable file, bad contracts, an unknown adapter, one of the two options alone).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from loragate.core.errors import UsageError
from loragate.acceptance.plan import (
    DEFAULT_CONCURRENCY,
    DEFAULT_SEED,
    SAMPLED_TEMPERATURE,
)


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    if name == "gate":
        _configure_gate(parser)
    elif name == "diagnose":
        _configure_diagnose(parser)
    elif name == "check-data":
        _configure_check_data(parser)


def _configure_gate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint",
                   help="OpenAI-compatible base URL of the engine or the proxy (http://host:port[/v1]; "
                        "default: the local stack's proxy, when `loragate up` runs)")
    p.add_argument("--adapter", required=True, help="adapter name (served model name and contract name)")
    p.add_argument("--contracts", type=Path, help="adapters file (default: the local stack's / the demo build's)")
    p.add_argument("--prompts", type=Path,
                   help="held-out prompts JSONL, {'input': ...} per line (default: the demo build's heldout.jsonl, "
                        "when the contracts are the demo's; your own adapters need your own)")
    p.add_argument("--long-prompts", type=Path,
                   help="long inputs JSONL for the long-context probes (demo papers are lengthened without it)")
    p.add_argument("--report-dir", type=Path,
                   help="folder for report.json, junit.xml, report.html (default: .loragate/reports/<time>-<adapter>)")
    p.add_argument("--promote", action=argparse.BooleanOptionalAction, default=True,
                   help="on PROMOTE, write the promotion record and update the promoted set (values file for helm); "
                        "--no-promote only reports the verdict (default: promote)")
    p.add_argument("--promoted-dir", type=Path, help="promoted set folder (default: .loragate/promoted)")
    p.add_argument("--load-into-engine", action="store_true",
                   help="load the adapter through vLLM's runtime LoRA API when the engine does not serve it "
                        "(unloaded again unless promoted)")
    p.add_argument("--engine-url", help="URL for the runtime LoRA API (default: --endpoint; through the proxy it "
                                        "needs --admin-key)")
    p.add_argument("--engine-adapter-path", help="the adapter's folder as the engine sees it (default: the contract's path)")
    p.add_argument("--admin-key", help="the proxy's admin key (default: $LORAGATE_PROXY_ADMIN_KEY)")
    p.add_argument("--api-key", help="client API key for the endpoint (default: $LORAGATE_API_KEY)")
    p.add_argument("--max-lora-rank", type=int,
                   help="the engine's --max-lora-rank (default: read from the local stack or the demo manifest)")
    p.add_argument("--base-dir", type=Path, help="the base model's folder (default: the engine's root when local)")
    p.add_argument("--baseline", metavar="NAME|base|none",
                   help="what the adapter is compared with: NAME, a served adapter, run on the same prompts "
                        "(regression checks); 'base', the base model (its runaway share, reported); 'none'. "
                        "Default: the adapter's own promoted version (its recorded numbers), else the adapter "
                        "promoted last for the same task, else the base model. The verdict names it")
    p.add_argument("--temperature", type=float, default=SAMPLED_TEMPERATURE,
                   help="temperature of the sampled run (default %(default)s)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the first sampled request (default %(default)s)")
    p.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="requests in flight (default %(default)s)")
    p.add_argument("--suite-timeout", type=float, default=900.0, help="seconds the suite may take (default %(default)s)")
    p.add_argument("--load", action="store_true", help="also run the load test against the contract's SLOs")
    p.add_argument("--load-users", type=int, default=4)
    p.add_argument("--load-spawn-rate", type=float, default=4.0)
    p.add_argument("--load-duration", type=float, default=30.0, help="seconds of load (default %(default)s)")
    p.add_argument("--metrics-url", help="the proxy's /metrics for the load test's counter check")
    p.add_argument("--diagnosis", action=argparse.BooleanOptionalAction, default=True,
                   help="score reference answers with the engine's likelihoods to name the cause of a failure "
                        "(default: on; a contract with gate_on_diagnosis always runs it)")
    p.add_argument("--shadow", action="store_true",
                   help="judge the adapter (a candidate) on what it answered to live traffic as a proxy shadow: its "
                        "loragate_shadow_* counters from --metrics-url (a proxy's /metrics) or --prometheus URL (every "
                        "replica summed), the contract's bars plus the paired comparison with the live adapter; no "
                        "request is sent")
    p.add_argument("--prometheus", metavar="URL", help="with --shadow: Prometheus base URL to query")
    p.add_argument("--live", metavar="NAME", help="with --shadow: the live adapter shadowed (default: the only one)")
    p.add_argument("--rollout-replica", action="append", default=[], metavar="URL",
                   help="after a PROMOTE, wait until this replica's proxy (repeatable) applied the new promoted set "
                        "(its --promoted-set is the promoted folder's promoted-set.json); exit 3 when one did not")
    p.add_argument("--rollout-timeout", type=float, default=300.0,
                   help="seconds to wait for --rollout-replica (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print report.json to stdout instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def _configure_diagnose(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", help="OpenAI-compatible base URL of the engine or the proxy (default: the local "
                                      "stack's proxy, when `loragate up` runs)")
    p.add_argument("--adapter", required=True, help="adapter name (served model name and contract name)")
    p.add_argument("--contracts", type=Path, help="adapters file (default: the local stack's / the demo build's)")
    p.add_argument("--prompts", type=Path,
                   help="held-out prompts JSONL; lines with 'expected' give the reference answers (default: the "
                        "demo build's heldout.jsonl, when the contracts are the demo's)")
    p.add_argument("--baseline", metavar="NAME|base|none",
                   help="the promoted adapter to compare with (default: as the gate chooses it)")
    p.add_argument("--promoted-dir", type=Path, help="promoted set folder (default: .loragate/promoted)")
    p.add_argument("--base-dir", type=Path, help="the base model's folder, for its EOS token (default: the engine's "
                                                 "root when local)")
    p.add_argument("--api-key", help="client API key for the endpoint (default: $LORAGATE_API_KEY)")
    p.add_argument("--n", type=int, default=16, help="held-out prompts to score (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the diagnosis as JSON")


def _configure_check_data(p: argparse.ArgumentParser) -> None:
    from loragate.acceptance.data_check import FORMATS

    p.add_argument("--data", type=Path, required=True, help="training examples, JSONL")
    p.add_argument("--tokenizer", type=Path, required=True, help="folder of the (base model's) tokenizer")
    p.add_argument("--max-seq-length", type=int, required=True, help="the trainer's max_seq_length")
    p.add_argument("--format", choices=("auto", *FORMATS), default="auto",
                   help="the data's format: prompt-completion (strings), messages (conversational), "
                        "chat-prompt-completion (prompt and completion lists of messages), alpaca "
                        "(instruction/input/output); default: detected from the first line")
    p.add_argument("--prompt-field", default="prompt", help="prompt key of the prompt/completion formats")
    p.add_argument("--completion-field", default="completion",
                   help="completion key of the prompt/completion formats")
    p.add_argument("--no-eos", action="store_true",
                   help="the targets carry no EOS token (string formats; a chat template writes its own)")
    p.add_argument("--packing", action="store_true",
                   help="also count what packing does: examples concatenated, each followed by EOS, cut into "
                        "windows of max_seq_length")
    p.add_argument("--contracts", type=Path, metavar="FILE",
                   help="adapters file (with --adapter): also judge every target with the gate's judging, as if "
                        "the adapter wrote it and stopped; exit 1 when a target is empty or, for JSON output, "
                        "the share of valid targets is below the contract's json_validity")
    p.add_argument("--adapter", metavar="NAME", help="the adapter (with --contracts) whose contract judges the targets")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.command == "check-data":
        return _check_data(args)
    if args.command == "diagnose":
        return _diagnose(args)
    return _gate(args)


def _diagnose(args: argparse.Namespace) -> int:
    """Exit 0: no cause found; 1: a cause found; 2: the diagnosis cannot be made (or bad input)."""
    from loragate.acceptance.diagnosis import render_table
    from loragate.acceptance.gate import GateOptions, run_diagnosis
    from loragate.cli.defaults import default_endpoint, gate_options

    if args.n < 2:
        raise UsageError("--n must be at least 2 (the intervals are over prompts)")
    options = gate_options(GateOptions(
        endpoint=args.endpoint or default_endpoint(), adapter=args.adapter, contracts=args.contracts,
        prompts=args.prompts, promoted_dir=args.promoted_dir, api_key=args.api_key, base_dir=args.base_dir,
        baseline=args.baseline, max_lora_rank=0))
    diagnosis = run_diagnosis(options, n=args.n)
    print(json.dumps(diagnosis.to_dict(), indent=2) if args.json else render_table(args.adapter, diagnosis))
    if not diagnosis.available:
        return 2
    return 1 if diagnosis.findings else 0


def _check_data(args: argparse.Namespace) -> int:
    from loragate.acceptance.data_check import check_data

    result = check_data(args.data, args.tokenizer, args.max_seq_length, prompt_field=args.prompt_field,
                        completion_field=args.completion_field, add_eos=not args.no_eos,
                        format=args.format, packing=args.packing, contracts=args.contracts,
                        adapter=args.adapter)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.summary())
    return 0 if result.ok else 1


def _shadow_gate(args: argparse.Namespace) -> int:
    from loragate.acceptance.shadow_gate import ShadowGateOptions, run_shadow_gate
    from loragate.cli.defaults import default_contracts
    from loragate.core.engine import API_KEY_ENV, key_from_env

    contracts = args.contracts or default_contracts(None)
    if contracts is None:
        raise UsageError("no adapters file: pass --contracts FILE (the adapters' contracts)")
    result = run_shadow_gate(ShadowGateOptions(
        adapter=args.adapter, contracts=contracts, metrics_url=args.metrics_url, prometheus_url=args.prometheus,
        live=args.live, report_dir=args.report_dir, promote=args.promote, promoted_dir=args.promoted_dir,
        api_key=key_from_env(args.api_key, API_KEY_ENV)), quiet=args.quiet)
    print(json.dumps(result.report, indent=2, default=str) if args.json else result.table())
    sys.stdout.flush()
    return result.exit_code


def _gate(args: argparse.Namespace) -> int:
    from loragate.acceptance.gate import GateOptions, run_gate
    from loragate.cli.defaults import default_endpoint, gate_options

    if args.shadow:
        return _shadow_gate(args)
    for flag, value in (("--prometheus", args.prometheus), ("--live", args.live)):
        if value:
            raise UsageError(f"{flag} is for --shadow, which was not given")

    options = GateOptions(
        endpoint=args.endpoint or default_endpoint(), adapter=args.adapter, contracts=args.contracts, prompts=args.prompts,
        long_prompts=args.long_prompts, report_dir=args.report_dir, promote=args.promote,
        promoted_dir=args.promoted_dir, load=args.load, load_users=args.load_users,
        load_spawn_rate=args.load_spawn_rate, load_duration_s=args.load_duration, metrics_url=args.metrics_url,
        load_into_engine=args.load_into_engine, engine_url=args.engine_url,
        engine_adapter_path=args.engine_adapter_path, admin_key=args.admin_key, api_key=args.api_key,
        max_lora_rank=args.max_lora_rank, base_dir=args.base_dir, baseline=args.baseline,
        temperature=args.temperature, seed=args.seed, concurrency=args.concurrency,
        suite_timeout_s=args.suite_timeout, diagnosis=args.diagnosis,
    )
    result = run_gate(gate_options(options), quiet=args.quiet)
    if args.json:
        print(json.dumps(result.report, indent=2, default=str))
    else:
        print(result.table())
    sys.stdout.flush()
    revision = (result.promotion or {}).get("revision")
    if result.exit_code == 0 and args.rollout_replica and revision:
        return _wait_rollout(args, str(revision))
    return result.exit_code


def _wait_rollout(args: argparse.Namespace, revision: str) -> int:
    """The promoted set reached every --rollout-replica (0), or not (3)."""
    import os

    from loragate.core.rollout import fetch, wait

    key = args.api_key or os.environ.get("LORAGATE_API_KEY")
    result = wait(lambda: [fetch(url, key) for url in args.rollout_replica], revision,
                  timeout_s=args.rollout_timeout)
    for status in result.replicas:
        print(status.describe(revision))
    print(f"rollout of promoted set {revision}: " + ("done" if result.ok else "NOT done on every replica"))
    return 0 if result.ok else 3
