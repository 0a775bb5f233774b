"""Defaults from the local stack and the demo build: the one module that fills them.

The gate (:mod:`loragate.acceptance`) and the load test (:mod:`loragate.loadtest`) take
explicit inputs. When ``loragate gate`` or ``loragate load`` is run without some of them, this
module fills what the local stack (``loragate up``) or the current demo build can tell, and
says where each value came from. Nothing else outside the CLI layer and the demo reads the
local stack or the demo build (``tests/test_layout.py`` checks the imports).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from loragate.core.engine import ADMIN_KEY_ENV
from loragate.core.errors import GateError, UsageError


def local_stack_for(endpoint: str | None) -> Any:
    """The local stack's :class:`~loragate.stack.StackInfo` when ``endpoint`` is its proxy or
    its engine (any running stack when ``endpoint`` is None), else None."""
    from loragate.stack import running_stack

    try:
        info = running_stack(refresh_adapters=False)
    except Exception:  # noqa: BLE001 - a broken state file is no stack
        return None
    if info is None:
        return None
    if endpoint is None:
        return info
    endpoint = endpoint.rstrip("/").removesuffix("/v1")
    return info if endpoint in (info.proxy_url.rstrip("/"), info.vllm_url.rstrip("/")) else None


def default_endpoint() -> str:
    """The local stack's proxy URL; a :class:`UsageError` when no stack runs."""
    stack = local_stack_for(None)
    if stack is None:
        raise UsageError("no --endpoint given and no local stack runs (`loragate up` starts one): "
                         "pass --endpoint URL, the engine's or the proxy's OpenAI base URL")
    return str(stack.proxy_url)


def demo_build_for(contracts_file: Path) -> Any:
    """The demo build whose adapters file is ``contracts_file``, if any."""
    from loragate.demo.artifacts import DemoBuild

    root = contracts_file.resolve().parent.parent
    build = DemoBuild(root)
    return build if build.is_complete() and build.adapters_file.resolve() == contracts_file.resolve() else None


def default_contracts(endpoint: str | None) -> Path | None:
    """The local stack's adapters file, else the current demo build's, else None."""
    stack = local_stack_for(endpoint)
    if stack is not None and stack.contracts_file:
        return Path(stack.contracts_file)
    from loragate.demo.artifacts import current_build

    build = current_build()
    return build.adapters_file if build is not None else None


def default_prompts(contracts_file: Path, endpoint: str | None) -> Path | None:
    """The demo build's held-out prompts when ``contracts_file`` is that build's adapters file."""
    build = demo_build_for(contracts_file)
    if build is not None:
        return build.heldout_prompts
    stack = local_stack_for(endpoint)
    if stack is not None and stack.heldout_prompts and stack.contracts_file \
            and Path(stack.contracts_file).resolve() == contracts_file.resolve():
        return Path(stack.heldout_prompts)
    return None


def rank_limit(endpoint: str, contracts_file: Path) -> tuple[int | None, str]:
    """The engine's ``--max-lora-rank`` and where it was read: the local stack's vLLM command
    line, else the demo build's serve manifest, else unknown."""
    stack = local_stack_for(endpoint)
    if stack is not None:
        try:
            import psutil

            cmd = psutil.Process(stack.vllm_pid).cmdline()
        except Exception:  # noqa: BLE001 - the process may be gone
            cmd = []
        if cmd:
            if "--max-lora-rank" in cmd:
                i = cmd.index("--max-lora-rank")
                return int(cmd[i + 1]), f"the local stack's vLLM command line (pid {stack.vllm_pid})"
            return None, (f"the local stack's vLLM (pid {stack.vllm_pid}) runs with vLLM's default, "
                          "not stated on its command line")
    build = demo_build_for(contracts_file)
    if build is not None:
        try:
            return int(build.manifest()["serve"]["max_lora_rank"]), \
                f"the demo build's serve manifest ({build.manifest_path})"
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return None, "not given with --max-lora-rank, and the endpoint is not the local stack"


def gate_options(options: Any) -> Any:
    """``options`` (:class:`~loragate.acceptance.gate.GateOptions`) with what was not given
    filled from the local stack and the demo build."""
    from loragate.demo.lengthen import demo_lengthener

    endpoint = options.endpoint
    contracts = Path(options.contracts) if options.contracts else default_contracts(endpoint)
    if contracts is None:
        raise GateError("no adapters file: pass --contracts FILE (the adapters' contracts)")
    prompts = Path(options.prompts) if options.prompts else default_prompts(contracts, endpoint)
    if prompts is None:
        raise GateError("no held-out prompts: pass --prompts JSONL (inputs never used in training)")
    changes: dict[str, Any] = {"contracts": contracts, "prompts": prompts}
    if options.max_lora_rank is None:
        changes["max_lora_rank"], changes["max_lora_rank_source"] = rank_limit(endpoint, contracts)
    if options.lengthener is None:
        changes["lengthener"] = demo_lengthener
    stack = local_stack_for(endpoint)
    through_stack_proxy = stack is not None and endpoint.rstrip("/").removesuffix("/v1") == stack.proxy_url.rstrip("/")
    if options.metrics_url is None and options.load and through_stack_proxy:
        changes["metrics_url"] = stack.metrics_url
    if options.admin_key is None and not os.environ.get(ADMIN_KEY_ENV) and through_stack_proxy:
        changes["admin_key"] = stack.admin_key  # the key `loragate up` made for its proxy
    return dataclasses.replace(options, **changes)


def load_sources(endpoint: str | None) -> tuple[str | None, Path | None, Path | None]:
    """(endpoint, contracts file, prompts file) for ``loragate load`` when not given: the local
    stack's proxy and files, else the current demo build's files."""
    stack = local_stack_for(None)
    if stack is not None and stack.contracts_file is not None:
        return (endpoint or stack.proxy_url, Path(stack.contracts_file),
                Path(stack.heldout_prompts) if stack.heldout_prompts else None)
    from loragate.demo.artifacts import current_build

    build = current_build()
    if build is not None:
        return endpoint, build.adapters_file, build.heldout_prompts
    return endpoint, None, None
