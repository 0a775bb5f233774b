"""The acceptance suite's pytest child process: the one module that owns it.

The gate plans in-process (:func:`loragate.acceptance.gate.plan_adapter`), then runs the plan as
``pytest acceptance/loragate/acceptance/suite`` in a child process, reading each check's result
from the JSONL file the child writes as it goes. The child is kept, rather than running the
plan with plain calls, for isolation: a run that hangs on an engine can be stopped at its
timeout or by Ctrl-C/SIGTERM (its whole process group is killed) while the gate still holds
every result written so far and rejects with them; and the suite a person runs by hand is the
very code the gate runs, with the same results (docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from loragate.acceptance import report as rep
from loragate.acceptance.plan import SuitePlan
from loragate.acceptance.results import CheckResult
from loragate.core import engine as eng
from loragate.core.processes import set_pdeathsig

#: Seconds the suite may run before it is stopped (and the adapter rejected).
DEFAULT_SUITE_TIMEOUT_S = 900.0
#: The suite's test folder.
SUITE_DIR = Path(__file__).resolve().parent / "suite"


@dataclass
class SuiteRun:
    """What the pytest child left behind."""

    returncode: int | None
    results: dict[str, CheckResult]
    started: bool
    finished_status: int | None
    timed_out: bool = False
    interrupted: bool = False


def _read_results(path: Path) -> tuple[dict[str, CheckResult], bool, int | None]:
    results: dict[str, CheckResult] = {}
    started, finished = False, None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return results, False, None
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a torn last line from a killed child
        kind = event.get("event")
        if kind == "started":
            started = True
        elif kind == "check":
            result = CheckResult.from_dict(event["result"])
            results[f"{event['adapter']}/{result.id}"] = result
        elif kind == "finished":
            finished = int(event.get("exitstatus", -1))
    return results, started, finished


def run_suite(plan: SuitePlan, folder: Path, *, api_key: str | None, timeout_s: float,
              progress: Callable[[str], None]) -> SuiteRun:
    """Run the pytest suite on ``plan`` in a child process; Ctrl-C/SIGTERM stop it and return partial results."""
    plan_path, results_path = folder / "plan.json", folder / "results.jsonl"
    for stale in (results_path, folder / "samples.jsonl"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    rep.write_file(plan_path, json.dumps(plan.to_dict(), indent=1, ensure_ascii=False) + "\n")
    cmd = [sys.executable, "-m", "pytest", str(SUITE_DIR / "test_adapter.py"), "-c", os.devnull,
           "--rootdir", str(SUITE_DIR), "-p", "no:cacheprovider", "-q", "--tb=line", "-o", "console_output_style=classic",
           "--lg-plan", str(plan_path), "--lg-results", str(results_path), "--lg-samples", str(folder / "samples.jsonl"),
           "--junitxml", str(folder / "suite.xml")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if api_key:
        env[eng.API_KEY_ENV] = api_key
    log = (folder / "suite.log").open("wb")
    child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                             preexec_fn=set_pdeathsig)
    rep.write_file(folder / "suite.pid", f"{child.pid}\n")
    progress(f"suite: {sum(len(r.requests) for a in plan.adapters for r in a.runs)} requests, "
             f"{len(plan.check_ids)} checks, {plan.concurrency} in flight (pytest pid {child.pid})")
    timed_out = interrupted = False
    try:
        try:
            child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if child.poll() is None:
            _stop_child(child)
        log.close()
    results, started, finished = _read_results(results_path)
    return SuiteRun(child.returncode, results, started, finished, timed_out, interrupted)


def _stop_child(child: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, sig)
        try:
            child.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue
