"""``loragate up | status | down | demo``: the local stack from the command line.

- ``up`` starts vLLM-CPU and the proxy in the background (or, with ``--foreground``, until
  Ctrl-C/SIGTERM) and prints the proxy's OpenAI base URL on stdout; progress goes to stderr. It
  serves the demo build, or with ``--contracts FILE`` (and ``--base DIR``) a user's adapters.
- ``status`` tells whether the stack runs (exit 0) or not (exit 3); ``--json`` prints the
  document described in :meth:`loragate.stack.StackInfo.to_status`.
- ``down`` stops the stack; stopping nothing is not an error.
- ``demo`` builds what is missing, brings the stack up, gates every demo adapter and prints the
  verdicts, then stops the stack it started.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from loragate import stack as st
from loragate.core.errors import StackError, UsageError
from loragate.core.processes import sigterm_as_interrupt
from loragate.demo.stack import demo_plan


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    if name in ("up", "demo"):
        parser.add_argument("--port", type=int, default=None,
                            help="proxy port on 127.0.0.1 (default: a free one)")
        parser.add_argument("--vllm-port", type=int, default=None,
                            help="vLLM port on 127.0.0.1 (default: a free one)")
        parser.add_argument("--max-model-len", type=int, default=None,
                            help="vLLM --max-model-len (default: the demo build's, 4096); must exceed "
                                 "the adapters' training length")
        parser.add_argument("--timeout", type=float, default=st.DEFAULT_START_TIMEOUT_S,
                            help="seconds to wait for the stack to be healthy (default %(default)s)")
    if name == "up":
        parser.add_argument("--foreground", action="store_true",
                            help="keep running until Ctrl-C or SIGTERM, then stop the stack")
        parser.add_argument("--contracts", type=Path, default=None,
                            help="serve the adapters of this contracts file (each contract's path) instead of "
                                 "the demo build's; the proxy judges by it")
        parser.add_argument("--base", type=Path, default=None,
                            help="with --contracts: the base model folder (Hugging Face format); default: the "
                                 "demo build's base when the contracts' base_model is the demo base")
        parser.add_argument("--dtype", default=None,
                            help="with --contracts: vllm serve --dtype (default: vLLM's choice)")
    if name == "status":
        parser.add_argument("--json", action="store_true", help="print the stack as JSON")
    if name == "down":
        parser.add_argument("--timeout", type=float, default=st.DEFAULT_STOP_GRACE_S,
                            help="seconds to wait after SIGTERM before SIGKILL (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    # httpx logs every health poll at INFO; the progress line says what matters.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return {"up": _up, "status": _status, "down": _down, "demo": _demo}[args.command](args)


def _check_ports(args: argparse.Namespace) -> None:
    if args.port is not None:
        st.check_port_free(args.port, "proxy", "--port")
    if args.vllm_port is not None:
        st.check_port_free(args.vllm_port, "vLLM engine", "--vllm-port")


def _plan(args: argparse.Namespace, *, build_if_missing: bool) -> st.ServePlan:
    """The demo build's plan, or with ``--contracts`` the plan serving a user's adapters."""
    contracts = getattr(args, "contracts", None)
    if contracts is None:
        for flag in ("base", "dtype"):
            if getattr(args, flag, None) is not None:
                raise UsageError(f"--{flag} goes with --contracts (the demo build says its own)")
        return demo_plan(args.max_model_len, build_if_missing=build_if_missing)
    if not contracts.is_file():
        raise UsageError(f"--contracts {contracts}: no such file")
    base = args.base
    if base is None:
        base = _demo_base_for(contracts)
        if base is None:
            raise UsageError("--base DIR is needed with --contracts: the base model folder your adapters were "
                             "trained on (the contracts name it only as base_model)")
    elif not (base / "config.json").is_file():
        raise UsageError(f"--base {base}: no config.json there (a Hugging Face model folder is expected)")
    return st.ServePlan.from_contracts(contracts, base, args.max_model_len, dtype=args.dtype)


def _demo_base_for(contracts: Path) -> Path | None:
    """The demo build's base folder when ``contracts`` names the demo base as its base_model."""
    from loragate.core.contracts import load_contracts
    from loragate.demo.artifacts import current_build

    build = current_build()
    if build is None:
        return None
    if load_contracts(contracts).base_model != load_contracts(build.adapters_file).base_model:
        return None
    return Path(build.base_dir)


def _start(args: argparse.Namespace, *, build_if_missing: bool, die_with_parent: bool) -> st.StackInfo:
    _check_ports(args)  # before anything slow: a taken port is the cheapest error to report
    plan = _plan(args, build_if_missing=build_if_missing)
    progress = st.Progress(prefix=f"loragate {args.command}")
    others = st.other_engines()
    if others:
        progress.say(f"note: another vLLM already runs on this machine (pid {', '.join(map(str, others))}); "
                     "both share the CPU cores")
    return st.start_stack(plan, proxy_port=args.port, vllm_port=args.vllm_port, progress=progress,
                          timeout_s=args.timeout, die_with_parent=die_with_parent)


def _up(args: argparse.Namespace) -> int:
    running = st.running_stack()
    if running is not None:
        if args.contracts is not None and (running.contracts_file is None or
                                           running.contracts_file.resolve() != args.contracts.resolve()):
            raise UsageError(f"a stack serving {running.contracts_file} is already running; "
                             "`loragate down` stops it first")
        print(f"loragate up: a stack is already running (proxy pid {running.proxy_pid}, "
              f"vLLM pid {running.vllm_pid}); `loragate down` stops it", file=sys.stderr)
        print(running.openai_base_url)
        return 0
    with sigterm_as_interrupt():
        info = _start(args, build_if_missing=False, die_with_parent=args.foreground)
        print(info.openai_base_url, flush=True)
        if not args.foreground:
            return 0
        try:
            return _foreground(info)
        finally:
            st.stop_stack()
            print("loragate up: stack stopped", file=sys.stderr)


def _foreground(info: st.StackInfo) -> int:
    """Wait until interrupted (exit 0) or until a stack process dies (exit 1)."""
    print("loragate up: running in the foreground; Ctrl-C stops the stack", file=sys.stderr)
    try:
        while True:
            time.sleep(1.0)
            state = st.read_stack_state()
            if state is None or state.dead:
                dead = ", ".join(state.dead) if state else "state file removed"
                print(f"loragate up: stack process gone ({dead}); logs in {info.log_dir}", file=sys.stderr)
                for role in (state.dead if state else ()):
                    log = (info.log_dir / f"{role}.log") if info.log_dir else None
                    if log is not None:
                        print(f"--- last lines of {log}:\n{st.log_tail(log)}", file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        return 0


def _status(args: argparse.Namespace) -> int:
    state = st.read_stack_state()
    if state is None or not state.running:
        if state is None:
            why = "no stack recorded"
        elif state.phase == "starting" and not state.dead:
            why = "the stack is still starting"
        else:
            why = f"stale record ({', '.join(state.dead)} not running); `loragate down` clears it"
        print(f"loragate status: no stack running in {st.settings.stack_dir()} ({why}); "
              "start one with `loragate up`", file=sys.stderr)
        return st.EXIT_NOT_RUNNING
    info = st.running_stack()
    if info is None:  # it died between the two reads
        print("loragate status: the stack stopped while being read", file=sys.stderr)
        return st.EXIT_NOT_RUNNING
    if args.json:
        print(json.dumps(info.to_status(), indent=2))
        return 0
    uptime = time.time() - state.started_at if state.started_at else 0.0
    print(f"stack running for {uptime:.0f} s")
    print(f"  proxy    {info.openai_base_url}   (pid {info.proxy_pid})")
    print(f"  metrics  {info.metrics_url}")
    print(f"  vLLM     {info.vllm_url}/v1   (pid {info.vllm_pid}, max_model_len {info.max_model_len})")
    print(f"  base     {info.base_model}")
    print(f"  adapters {', '.join(info.adapters) or '(none)'}")
    print(f"  contracts {info.contracts_file}")
    print(f"  heldout  {info.heldout_prompts or '(none: give the gate --prompts)'}")
    print(f"  admin key {info.admin_key or '(none)'}   (runtime LoRA loads through the proxy; "
          "the gate finds it for this proxy)")
    print(f"  logs     {info.log_dir}")
    return 0


def _down(args: argparse.Namespace) -> int:
    if st.stop_stack(grace_s=args.timeout):
        print("loragate down: stack stopped", file=sys.stderr)
    else:
        print("loragate down: no stack was running", file=sys.stderr)
    return 0


def _print_verdicts(result: Any) -> None:
    render = getattr(result, "render", None)
    if callable(render):  # loragate.demo.verdicts.DemoResults: verdicts, reasons, report paths
        print(render())
        return
    items = result.items() if isinstance(result, Mapping) else enumerate(result or ())
    for key, verdict in items:
        label = getattr(verdict, "verdict", None) or getattr(verdict, "decision", None) or verdict
        name = getattr(verdict, "adapter", None) or key
        print(f"{name}: {label}")


def _demo(args: argparse.Namespace) -> int:
    from loragate.demo.artifacts import current_build

    if current_build() is None:
        from loragate.demo.build import build_demo

        build_demo()
    try:
        from loragate.demo.verdicts import gate_all_demo
    except ModuleNotFoundError as exc:
        if exc.name != "loragate.acceptance.gate":
            raise
        raise StackError("the demo is built, but the acceptance gate (loragate.acceptance.gate) is not "
                         "in this checkout, so there is nothing to run against the stack") from None
    info = st.running_stack()
    started = info is None
    with sigterm_as_interrupt():
        if info is None:
            info = _start(args, build_if_missing=True, die_with_parent=True)
        else:
            print(f"loragate demo: using the running stack at {info.openai_base_url}", file=sys.stderr)
        try:
            results = gate_all_demo(info)
            _print_verdicts(results)
        finally:
            if started:
                st.stop_stack()
                print("loragate demo: stack stopped", file=sys.stderr)
    # Non-zero when a demo adapter did not get its expected verdict (the gate did not do its job).
    return 0 if getattr(results, "ok", True) else 1
