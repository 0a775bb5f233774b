"""The running local stack's state file (``<home>/stack/state.json``), its lock, and reading it back."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from loragate.core import settings
from loragate.core.engine import EndpointError, fetch_models
from loragate.core.errors import StackError
from loragate.stack.plan import _STATE_VERSION, StackInfo
from loragate.stack.processes import _Proc

# --------------------------------------------------------------------------- state


def state_path() -> Path:
    return settings.stack_dir() / "state.json"


def _lock_path() -> Path:
    return settings.stack_dir() / "lock"


@contextlib.contextmanager
def _stack_lock(timeout_s: float, progress: "Any" = None) -> Iterator[None]:
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
    # it holds the proxy's admin key: readable by its owner only
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(json.dumps(state, indent=2))
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
        admin_key=state.get("admin_key") or None,
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
        models = fetch_models(vllm_url, timeout_s=timeout_s)
    except EndpointError:
        return None
    return tuple(m.id for m in models.models if m.id != base_model)


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
