"""``loragate build-demo``: build (or reuse) the demo tokenizer, base model and adapters."""

from __future__ import annotations

import argparse
import json


def configure(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--force", action="store_true", help="rebuild even when a cached build matches")
    parser.add_argument("--json", action="store_true", help="print the build's paths and timings as JSON")


def run(args: argparse.Namespace) -> int:
    from loragate.demo.build import build_demo

    build = build_demo(force=args.force)
    info = {
        "root": str(build.root),
        "base_model": str(build.base_dir),
        "adapters_file": str(build.adapters_file),
        "heldout_prompts": str(build.heldout_prompts),
        "train_data": str(build.train_data),
        "chat_train_data": str(build.chat_train_data),
        "timings": build.manifest()["timings"],
    }
    print(json.dumps(info, indent=2) if args.json else f"demo build ready: {build.root}")
    return 0
