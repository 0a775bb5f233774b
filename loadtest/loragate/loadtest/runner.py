"""Headless load run of one adapter and its SLO verdict: ``loragate load`` and ``loragate gate --load``.

:func:`run_load` runs ``loadtest/loragate/loadtest/locustfile.py`` headless in a child process (locust's gevent
monkey-patching stays out of the caller), with the adapter's prompts, for ``duration_s``
seconds of ``users`` closed-loop users. Requests still running at the end finish (locust's
``--stop-timeout``), so every request sent is either completed or failed. The child writes
every request's raw sample; the numbers and the SLO checks are computed here from those
samples (:mod:`loragate.loadtest.measure`: definitions as ``vllm bench serve``).

With ``metrics_url`` (the proxy's ``/metrics``) the proxy's counters are read before and
after: ``loragate_completions_total`` of the adapter must have grown by exactly the number of
requests locust completed, per ``finish_reason`` class, and ``loragate_output_tokens_total`` by
exactly the output tokens the engine reported to locust. Any difference (a lost or a double
count) is the breach ``proxy counters``. Other traffic to the same adapter through the same
proxy during the run makes the check fail: run the load gate while nothing else uses the
adapter (a candidate adapter normally has no other traffic).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import httpx

from loragate.core import metric_names
from loragate.core.contracts import Contract, LoadSLO
from loragate.loadtest.measure import (
    FINISH_LENGTH,
    FINISH_OTHER,
    FINISH_STOP,
    RequestSample,
    slo_checks,
    summarize,
)
from loragate.loadtest.prompts import LoadTestError, base_url, write_prompts

#: The locustfile the runner starts (also what an operator passes to ``locust -f``).
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
#: Seconds one request may wait for its next bytes before it fails.
REQUEST_TIMEOUT_S = 120.0
#: Seconds requests still running at the end of the run get to finish (more than one request
#: can take), so a request is only ever abandoned when it has failed anyway.
STOP_TIMEOUT_S = REQUEST_TIMEOUT_S + 10.0
#: Seconds locust gets to start and to write its reports, on top of run and stop time.
STARTUP_MARGIN_S = 60.0
#: Seconds the runner waits for the proxy's counters to show the last completions (the proxy
#: counts a stream when it ends; the client may see the end a moment earlier).
COUNTER_SETTLE_S = 2.0
#: Name of the breach raised by the proxy counter check.
COUNTER_BREACH = "proxy counters"

#: One sentence for every report: where the definitions come from.
DEFINITIONS = (
    "Metric definitions follow vLLM's `vllm bench serve`: TTFT = first streamed chunk with "
    "non-empty choices minus send time; ITL = every gap between consecutive such chunks, pooled "
    "over requests; e2e = last such chunk minus send time; TPOT = (e2e - TTFT) / (output tokens "
    "- 1); output tokens/s = output tokens of completed requests / run duration; goodput = "
    "completed requests with TTFT <= ttft_p95_ms and TPOT <= itl_p95_ms, per second. "
    "Percentiles by linear interpolation over the raw samples. Requests never set ignore_eos "
    "or min_tokens."
)


@dataclass
class LoadResult:
    """The outcome of one load run: passed only when every SLO holds and the counters match."""

    adapter: str
    endpoint: str
    passed: bool
    #: One line per breached objective, naming it with measured value vs bar,
    #: e.g. ``"TTFT p95: 6120 ms > bar 5000 ms (ttft_p95_ms)"`` or ``"proxy counters: ..."``.
    breaches: list[str]
    #: The measured numbers (:func:`loragate.loadtest.measure.summarize`): ``ttft_p50_ms``,
    #: ``ttft_p95_ms``, ``itl_p95_ms``, ``tpot_mean_ms``, ``e2e_p50_ms``, ``e2e_p95_ms``,
    #: ``output_tokens_per_s``, ``requests``, ``completed``, ``error_rate``, ``goodput``,
    #: ``stop_share``, ``max_tokens_share``, ...
    metrics: dict[str, Any]
    #: The objectives the run was judged on (the contract's ``slo``).
    slo: dict[str, float]
    #: Every objective: ``{name, label, measured, bar, kind, passed, check}``.
    checks: list[dict[str, Any]] = field(default_factory=list)
    #: Proxy counter check: ``{checked, passed, expected, observed, detail}``.
    counters: dict[str, Any] = field(default_factory=dict)
    #: Failed requests by message (HTTP status, stream error).
    errors: dict[str, int] = field(default_factory=dict)
    #: How the run was made: users, spawn_rate, duration_s, max_tokens, temperature, prompts.
    config: dict[str, Any] = field(default_factory=dict)
    #: Files written: samples, locust CSV / HTML / log, this result (when ``report_dir`` given).
    report_files: dict[str, str] = field(default_factory=dict)
    definitions: str = DEFINITIONS

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- proxy counters


def _counter_names() -> tuple[str, str]:
    """Sample names of the proxy's completion and output-token counters, from the one module
    that defines them (:mod:`loragate.core.metric_names`)."""
    return metric_names.total(metric_names.COMPLETIONS), metric_names.total(metric_names.OUTPUT_TOKENS)


def read_counters(metrics_url: str, adapter: str, *, timeout_s: float = 10.0) -> dict[str, float]:
    """The proxy's counters of ``adapter``: completions by finish class and output tokens.

    Keys: ``stop``, ``length``, ``other``, ``completions`` (their sum), ``output_tokens``.
    Raises :class:`LoadTestError` when the endpoint cannot be read or is not Prometheus text.
    """
    from prometheus_client.parser import text_string_to_metric_families

    completions_name, tokens_name = _counter_names()
    try:
        resp = httpx.get(metrics_url, timeout=timeout_s)
        resp.raise_for_status()
        families = list(text_string_to_metric_families(resp.text))
    except httpx.HTTPError as exc:
        raise LoadTestError(f"cannot read the proxy's metrics at {metrics_url}: {exc}") from None
    except ValueError as exc:
        raise LoadTestError(f"{metrics_url} is not Prometheus text: {exc}") from None
    out = {FINISH_STOP: 0.0, FINISH_LENGTH: 0.0, FINISH_OTHER: 0.0, "output_tokens": 0.0}
    # A fresh proxy declares the family before any adapter has a sample in it.
    if not any(f"{f.name}_total" == completions_name for f in families):
        raise LoadTestError(f"{metrics_url} exports no {completions_name}: not a loragate proxy?")
    samples = [s for family in families for s in family.samples]
    for s in samples:
        if s.labels.get("adapter") != adapter:
            continue
        if s.name == completions_name and s.labels.get("finish_reason") in out:
            out[s.labels["finish_reason"]] += s.value
        elif s.name == tokens_name:
            out["output_tokens"] += s.value
    out["completions"] = out[FINISH_STOP] + out[FINISH_LENGTH] + out[FINISH_OTHER]
    return out


def _counter_check(metrics_url: str, adapter: str, before: Mapping[str, float],
                   metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Compare the counters' growth with what locust saw; waits briefly for the last counts."""
    expected = {
        "completions": float(metrics["completed"]),
        FINISH_STOP: float(metrics[FINISH_STOP]),
        FINISH_LENGTH: float(metrics[FINISH_LENGTH]),
        FINISH_OTHER: float(metrics[FINISH_OTHER]),
        "output_tokens": float(metrics["output_tokens"]),
    }
    deadline = time.monotonic() + COUNTER_SETTLE_S
    while True:
        after = read_counters(metrics_url, adapter)
        observed = {k: after[k] - before[k] for k in expected}
        if observed == expected or time.monotonic() > deadline:
            break
        if any(observed[k] > expected[k] for k in expected):
            break  # counted twice: waiting cannot fix it
        time.sleep(0.25)
    passed = observed == expected
    completions_name, tokens_name = _counter_names()
    detail = (
        f"{completions_name}{{adapter={adapter!r}}} grew by {observed['completions']:g} "
        f"(stop {observed[FINISH_STOP]:g}, length {observed[FINISH_LENGTH]:g}, other {observed[FINISH_OTHER]:g}); "
        f"locust completed {expected['completions']:g} (stop {expected[FINISH_STOP]:g}, "
        f"length {expected[FINISH_LENGTH]:g}, other {expected[FINISH_OTHER]:g}); "
        f"{tokens_name} grew by {observed['output_tokens']:g} vs {expected['output_tokens']:g} reported to locust"
    )
    return {"checked": True, "passed": passed, "expected": expected, "observed": observed, "detail": detail}


# --------------------------------------------------------------------------- the run


def _check_args(adapter: str, prompts: Sequence[str], users: int, spawn_rate: float, duration_s: float) -> None:
    if not adapter or not isinstance(adapter, str):
        raise LoadTestError("an adapter name is required")
    if isinstance(prompts, str) or not prompts:
        raise LoadTestError("prompts must be a non-empty sequence of prompt strings")
    if int(users) < 1:
        raise LoadTestError(f"users must be at least 1, got {users}")
    if not spawn_rate or spawn_rate <= 0:
        raise LoadTestError(f"spawn rate must be > 0, got {spawn_rate}")
    if not duration_s or duration_s < 1:
        raise LoadTestError(f"duration must be at least 1 second, got {duration_s}")


def _locust_env() -> dict[str, str]:
    """The environment of the locust child: the caller's, minus settings that would change the
    run behind the runner's back (LOCUST_* options, the locustfile's LORAGATE_LOAD_*)."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("LOCUST_", "LORAGATE_LOAD_"))}


def _run_locust(cmd: list[str], cwd: Path, log: Path, timeout_s: float) -> int:
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=_locust_env(),
                                start_new_session=True)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise LoadTestError(f"locust did not finish within {timeout_s:.0f} s; log: {log}") from None
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _read_samples(path: Path, log: Path, code: int) -> list[RequestSample]:
    if not path.is_file():
        tail = "\n".join("    " + line for line in log.read_text(errors="replace").splitlines()[-25:])
        raise LoadTestError(f"locust exited with status {code} without writing its samples.\n"
                            f"Last lines of {log}:\n{tail}")
    samples = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            samples.append(RequestSample.from_dict(json.loads(line)))
    return samples


def run_load(endpoint: str, adapter: str, contract: Contract, prompts: Sequence[str], *,
             users: int = 4, spawn_rate: float = 4, duration_s: float = 30,
             metrics_url: str | None = None, report_dir: str | os.PathLike[str] | None = None,
             max_tokens: int | None = None, temperature: float = 0.0) -> LoadResult:
    """Load ``adapter`` at ``endpoint`` and judge the contract's SLOs.

    ``endpoint``: the server's base URL (``http://host:port``, with or without ``/v1``).
    ``contract``: the adapter's contract: its ``slo`` are the bars, its ``max_tokens`` the
    requests' budget unless ``max_tokens`` is given. ``prompts``: rendered prompts, sent in
    order, cycling. ``metrics_url``: the proxy's ``/metrics`` for the counter check (``None``:
    not checked, recorded as such). ``report_dir``: keep the samples, locust's CSV, HTML and
    log, and ``load.json`` there (otherwise they go to a temporary folder, removed).

    Raises :class:`LoadTestError` when the run cannot be made or judged (never a pass).
    """
    _check_args(adapter, prompts, users, spawn_rate, duration_s)
    endpoint = base_url(endpoint)
    slo: LoadSLO = contract.slo
    budget = int(max_tokens) if max_tokens else contract.max_tokens
    before = read_counters(metrics_url, adapter) if metrics_url else None

    keep = report_dir is not None
    work = Path(report_dir) if report_dir is not None else Path(tempfile.mkdtemp(prefix="loragate-load-"))
    try:
        work.mkdir(parents=True, exist_ok=True)
        files = {
            "prompts": work / "prompts.jsonl",
            "samples": work / "samples.jsonl",
            "locust_log": work / "locust.log",
            "locust_html": work / "locust.html",
            "locust_csv_stats": work / "locust_stats.csv",
        }
        files["samples"].unlink(missing_ok=True)
        write_prompts(prompts, files["prompts"], contract.api)
        cmd = [
            sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
            "--host", endpoint, "-u", str(int(users)), "-r", f"{float(spawn_rate):g}",
            "-t", f"{int(round(duration_s))}s", "--stop-timeout", f"{STOP_TIMEOUT_S:g}",
            "--csv", str(work / "locust"), "--html", str(files["locust_html"]),
            "--exit-code-on-error", "0", "--loglevel", "INFO",
            "--adapter", adapter, "--api", contract.api, "--prompts-file", str(files["prompts"]),
            "--max-tokens", str(budget), "--temperature", f"{float(temperature):g}",
            "--request-timeout", f"{REQUEST_TIMEOUT_S:g}", "--samples-file", str(files["samples"]),
        ]
        timeout = duration_s + STOP_TIMEOUT_S + STARTUP_MARGIN_S
        code = _run_locust(cmd, cwd=work, log=files["locust_log"], timeout_s=timeout)
        samples = _read_samples(files["samples"], files["locust_log"], code)
        if code != 0:
            raise LoadTestError(f"locust exited with status {code}; log: {files['locust_log']}")

        metrics = summarize(samples, slo)
        checks = slo_checks(metrics, slo)
        breaches = [f"{c.describe()} ({c.name})" for c in checks if not c.passed]
        if before is not None:
            counters = _counter_check(metrics_url, adapter, before, metrics)  # type: ignore[arg-type]
            if not counters["passed"]:
                breaches.append(f"{COUNTER_BREACH}: {counters['detail']}")
        else:
            counters = {"checked": False, "passed": None, "detail": "no metrics URL given: not checked"}
        errors: dict[str, int] = {}
        for s in samples:
            if not s.ok:
                key = (s.error or "unknown error")[:300]
                errors[key] = errors.get(key, 0) + 1
        result = LoadResult(
            adapter=adapter, endpoint=endpoint, passed=not breaches, breaches=breaches,
            metrics=metrics, slo=dataclasses.asdict(slo),
            checks=[{**dataclasses.asdict(c), "passed": c.passed, "check": c.describe()} for c in checks],
            counters=counters, errors=dict(sorted(errors.items(), key=lambda kv: -kv[1])),
            config={"users": int(users), "spawn_rate": float(spawn_rate), "duration_s": float(duration_s),
                    "max_tokens": budget, "temperature": float(temperature), "prompts": len(prompts),
                    "metrics_url": metrics_url},
        )
        if keep:
            result.report_files = {k: str(v) for k, v in files.items() if v.exists()}
            result.report_files["result"] = str(work / "load.json")
            (work / "load.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        return result
    finally:
        if not keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
