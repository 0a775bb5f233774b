"""Options, the plan, and the judged samples of the acceptance suite.

Options: ``--endpoint URL`` ``--adapter NAME`` (repeatable) ``--contracts FILE`` ``--prompts JSONL``
``--long-prompts JSONL`` ``--concurrency N``, or ``--lg-plan FILE`` (a plan written by the gate,
which then ignores the others). ``--lg-results FILE`` receives one JSON line per check as it
is decided, then ``{"event": "finished", "exitstatus": N}``; ``--lg-samples FILE`` every judged
completion. The API key for the endpoint comes from ``$LORAGATE_API_KEY``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import pytest

from loragate.acceptance.checks import Sample, group_samples
from loragate.acceptance.plan import AdapterPlan, CheckSpec, SuitePlan
from loragate.acceptance.results import CheckResult
from loragate.core.engine import API_KEY_ENV

_PLAN_KEY = pytest.StashKey[SuitePlan]()
_RESULTS_KEY = pytest.StashKey[Path | None]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("loragate", "loragate acceptance suite")
    group.addoption("--endpoint", help="OpenAI-compatible base URL (the proxy or vLLM)")
    group.addoption("--adapter", action="append", default=[], help="adapter to test (repeatable)")
    group.addoption("--contracts", help="adapters file (required without --lg-plan)")
    group.addoption("--prompts", help="held-out prompts JSONL (required without --lg-plan)")
    group.addoption("--long-prompts", help="long inputs JSONL for long-context probes")
    group.addoption("--lengthener", help="MODULE:FUNCTION making long-context probes from the held-out inputs "
                                         "(a LengthenerFactory; the demo's: loragate.demo.lengthen:demo_lengthener)")
    group.addoption("--concurrency", type=int, default=None, help="requests in flight")
    group.addoption("--lg-plan", help="a plan written by `loragate gate` (overrides the options above)")
    group.addoption("--lg-results", help="JSONL file receiving each check's result")
    group.addoption("--lg-samples", help="JSONL file receiving every judged completion")


def _build_plan(config: pytest.Config) -> SuitePlan:
    plan_file = config.getoption("--lg-plan")
    if plan_file:
        return SuitePlan.from_dict(json.loads(Path(plan_file).read_text()))
    endpoint, adapters = config.getoption("--endpoint"), config.getoption("--adapter")
    if not endpoint or not adapters:
        raise pytest.UsageError("the acceptance suite needs --endpoint URL and --adapter NAME (or --lg-plan FILE)")
    from loragate.acceptance.gate import make_suite_plan

    try:
        lengthener = None
        if config.getoption("--lengthener"):
            import importlib

            module, _, name = config.getoption("--lengthener").partition(":")
            lengthener = getattr(importlib.import_module(module), name)
        return make_suite_plan(
            endpoint, adapters, contracts=config.getoption("--contracts"), prompts=config.getoption("--prompts"),
            long_prompts=config.getoption("--long-prompts"), concurrency=config.getoption("--concurrency"),
            api_key=os.environ.get(API_KEY_ENV), lengthener=lengthener,
        )
    except Exception as exc:  # a LoragateError says what to fix
        raise pytest.UsageError(f"cannot plan the acceptance suite: {exc}") from None


def _emit(config: pytest.Config, record: dict[str, Any]) -> None:
    path = config.stash.get(_RESULTS_KEY, None)
    if path is None:
        return
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def pytest_configure(config: pytest.Config) -> None:
    if not (config.getoption("--lg-plan") or config.getoption("--endpoint")):
        return  # collection only (e.g. --help); the usage error comes at collection
    plan = _build_plan(config)
    config.stash[_PLAN_KEY] = plan
    results = config.getoption("--lg-results")
    config.stash[_RESULTS_KEY] = Path(results) if results else None
    _emit(config, {"event": "started", "checks": plan.check_ids, "pid": os.getpid()})


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "check_spec" not in metafunc.fixturenames:
        return
    plan = metafunc.config.stash.get(_PLAN_KEY, None)
    if plan is None:
        raise pytest.UsageError("the acceptance suite needs --endpoint URL and --adapter NAME (or --lg-plan FILE)")
    params = [(a.adapter, c) for a in plan.adapters for c in a.checks]
    metafunc.parametrize("adapter_name,check_spec", params, ids=[f"{a}/{c.id}" for a, c in params])


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if session.config.stash.get(_PLAN_KEY, None) is not None:
        _emit(session.config, {"event": "finished", "exitstatus": int(exitstatus)})


@pytest.fixture(scope="session")
def suite_plan(pytestconfig: pytest.Config) -> SuitePlan:
    return pytestconfig.stash[_PLAN_KEY]


@pytest.fixture(scope="session")
def samples(suite_plan: SuitePlan, pytestconfig: pytest.Config) -> dict[str, dict[str, list[Sample]]]:
    """Every planned request, sent once for the whole session, judged: ``{adapter: {run: [Sample]}}``."""
    from loragate.acceptance.runner import run_plan
    from loragate.core.contracts import load_contracts

    schemas = {}
    for a in suite_plan.adapters:
        contract = load_contracts(a.contracts_file)[a.adapter]
        schemas[a.adapter] = contract.json_schema
    out = pytestconfig.getoption("--lg-samples")
    judged = run_plan(suite_plan, schemas, api_key=os.environ.get(API_KEY_ENV),
                      samples_file=Path(out) if out else None)
    return group_samples(judged)


@pytest.fixture
def adapter_plan(suite_plan: SuitePlan, adapter_name: str) -> AdapterPlan:
    return next(a for a in suite_plan.adapters if a.adapter == adapter_name)


@pytest.fixture
def record_check(pytestconfig: pytest.Config, adapter_name: str) -> Iterator[Any]:
    """Call with a :class:`CheckResult`; it is written to ``--lg-results`` at once."""

    def record(result: CheckResult) -> None:
        _emit(pytestconfig, {"event": "check", "adapter": adapter_name, "result": result.to_dict()})

    yield record


__all__ = ["CheckSpec"]
