"""Small process and network helpers shared by every command that runs children."""

from __future__ import annotations

import contextlib
import signal
import socket
import time
from typing import Any, Callable, Iterator

import httpx


def set_pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    """``preexec_fn`` for a child that must not outlive its parent: SIGTERM when the parent dies
    (Linux ``PR_SET_PDEATHSIG``; elsewhere nothing)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux, or no libc: the child just lives on
        pass


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt while inside, so a command stopped by SIGTERM cleans up
    as for Ctrl-C. Outside the main thread signals are left alone."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def free_port(host: str = "127.0.0.1", exclude: tuple[int, ...] = ()) -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in exclude:
            return port
    raise OSError("could not find a free TCP port")


def wait_http(url: str, timeout_s: float, *, ready: Callable[[httpx.Response], bool] | None = None,
              each_round: Callable[[], None] | None = None, every_s: float = 0.1) -> bool:
    """Poll ``url`` until it answers 200 (and ``ready(response)`` holds): True; False when
    ``timeout_s`` passes first. ``each_round()`` runs before every try (it may raise: a child
    that exited, say) and, after a failed try, once more before the pause."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=2.0) as client:
        while True:
            if each_round is not None:
                each_round()
            try:
                resp = client.get(url)
                if resp.status_code == 200 and (ready is None or ready(resp)):
                    return True
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                return False
            time.sleep(every_s)
