"""The local stack's processes: ports, spawning, process trees, stopping, leftover shared memory."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from loragate.core.errors import PortInUseError, StackError
from loragate.core.processes import free_port, set_pdeathsig  # noqa: F401  (free_port: the stack's API)
from loragate.stack.plan import HOST, LOG_TAIL_LINES

# --------------------------------------------------------------------------- ports


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
                preexec_fn=set_pdeathsig if die_with_parent else None,
            )
        except OSError as exc:
            raise StackError(f"cannot start the {role} ({cmd[0]}): {exc}") from None
    return popen, _Proc(role, popen.pid, _create_time(popen.pid), str(log_path))


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
