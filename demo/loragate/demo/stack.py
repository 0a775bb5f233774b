"""The local stack's default: serving the current demo build."""

from __future__ import annotations

from loragate.core.errors import StackError
from loragate.stack import ServePlan


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
