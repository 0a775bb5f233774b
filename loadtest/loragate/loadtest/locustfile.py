"""Locust load for one LoRA adapter behind an OpenAI-compatible server (the loragate proxy).

Each user streams ``/v1/completions`` for the adapter, one request after another (closed loop,
no wait), cycling through the prompts in file order. Watch it in locust's web UI::

    locust -f loadtest/loragate/loadtest/locustfile.py --host http://127.0.0.1:8000 --adapter poster-good

with ``--contracts`` and ``--prompts-file`` (no defaults here: ``loragate load`` fills them from
the local stack when asked; every option below also shows under "Custom parameters" in the web UI).
``loragate load`` runs this file headless and judges the SLOs from the raw samples it writes.

What locust shows (stats table, CSV, web UI):

- ``POST /v1/completions [<adapter>]``: the real HTTP requests, one entry each, response time =
  end-to-end latency (send to last chunk with choices), failures = HTTP errors, error events
  and broken streams. The Aggregated row, the request count and the failure ratio count these
  requests and nothing else.
- Rows of type ``LLM``: the streaming timings, logged straight into their own stats entries
  instead of through ``events.request``, so they never pose as requests (they are absent from
  Aggregated and from the failure ratio). Their "response time" columns hold:
  ``ttft`` (ms, one per request), ``itl`` (ms, one per gap between chunks, pooled),
  ``tpot`` (ms, one per request of more than one token), ``output tokens`` (one entry per
  output token, so its request count is the number of tokens and its RPS the output tokens
  per second; response time = the request's TPOT), ``finish_reason=stop|length|other`` (one per
  completion, response time = its e2e): the share that stopped naturally and that hit
  ``max_tokens``.
- ``GET /loragate`` on the web UI: the project's own summary (exact percentiles, goodput,
  stop and max_tokens shares, SLO checks) of the samples so far.

Definitions follow ``vllm bench serve`` (see :mod:`loragate.loadtest.measure`). The request
never sets ``ignore_eos`` or ``min_tokens``.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import gevent
import requests
from locust import User, constant, events, task
from locust.env import Environment

from loragate.core.contracts import LoadSLO, load_contracts
from loragate.core.errors import LoragateError
from loragate.loadtest.measure import (
    RequestSample,
    StreamError,
    StreamTimer,
    slo_checks,
    summarize,
)
from loragate.loadtest.prompts import (
    LoadTestError,
    base_url,
    completion_body,
    load_prompts,
    request_path,
)

log = logging.getLogger("loragate.loadtest")

#: ``request_type`` of the streaming-timing rows in locust's stats (never sent as requests).
METRIC_TYPE = "LLM"
#: Default read timeout (seconds) of one request: a gap longer than this fails the request.
DEFAULT_REQUEST_TIMEOUT_S = 120.0
CONNECT_TIMEOUT_S = 10.0
#: Seconds a user pauses after a failed request, so a server that refuses at once is not
#: hammered in a tight loop (and the samples stay a readable size).
FAILURE_BACKOFF_S = 0.5


@events.init_command_line_parser.add_listener
def _arguments(parser: Any) -> None:
    parser.add_argument("--adapter", type=str, default="", env_var="LORAGATE_LOAD_ADAPTER",
                       help="adapter (served model name) to stream completions from")
    parser.add_argument("--contracts", type=str, default="", env_var="LORAGATE_LOAD_CONTRACTS",
                       help="adapters file: max_tokens, prompt template, API and SLOs of the adapter")
    parser.add_argument("--prompts-file", type=str, default="", env_var="LORAGATE_LOAD_PROMPTS",
                       help="JSONL of {'input'}, {'prompt'} or (chat) {'messages'} lines")
    parser.add_argument("--api", type=str, default="", env_var="LORAGATE_LOAD_API",
                       help="completions or chat (default: the contract's api, else completions)")
    parser.add_argument("--max-tokens", type=int, default=0, env_var="LORAGATE_LOAD_MAX_TOKENS",
                       help="max_tokens of each request (0: the contract's max_tokens)")
    parser.add_argument("--temperature", type=float, default=0.0, env_var="LORAGATE_LOAD_TEMPERATURE",
                       help="sampling temperature (0: greedy, as the acceptance suite)")
    parser.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT_S,
                       help="seconds a request may wait for its next bytes")
    parser.add_argument("--samples-file", type=str, default="", include_in_web_ui=False,
                       help="write every request's raw sample here (JSONL) when the test stops")


@dataclass(frozen=True)
class LoadConfig:
    """What every user of one test sends."""

    adapter: str
    prompts: tuple[str, ...]
    #: ``completions`` or ``chat`` (the contract's ``api``, or ``--api``).
    api: str
    max_tokens: int
    temperature: float
    request_timeout_s: float
    slo: LoadSLO
    samples_file: Path | None


def config_from_options(options: Any) -> LoadConfig:
    """The test's configuration from locust's parsed options (command line, env, web form).

    Raises :class:`LoragateError` with a clear message for anything missing or malformed.
    """
    adapter = str(getattr(options, "adapter", "") or "").strip()
    if not adapter:
        raise LoadTestError("no adapter given: pass --adapter NAME (or LORAGATE_LOAD_ADAPTER)")
    contracts_path = str(getattr(options, "contracts", "") or "")
    contract = None
    if contracts_path:
        contracts = load_contracts(contracts_path)
        if adapter in contracts:
            contract = contracts[adapter]
    prompts_path = str(getattr(options, "prompts_file", "") or "")
    if not prompts_path:
        raise LoadTestError("no prompts: pass --prompts-file JSONL (or LORAGATE_LOAD_PROMPTS)")
    try:
        max_tokens = int(getattr(options, "max_tokens", 0) or 0)
        temperature = float(getattr(options, "temperature", 0.0) or 0.0)
        timeout = float(getattr(options, "request_timeout", DEFAULT_REQUEST_TIMEOUT_S) or DEFAULT_REQUEST_TIMEOUT_S)
    except (TypeError, ValueError) as exc:
        raise LoadTestError(f"bad numeric option: {exc}") from None
    if max_tokens <= 0:
        if contract is None:
            raise LoadTestError(f"no contract for adapter {adapter!r}: pass --max-tokens")
        max_tokens = contract.max_tokens
    if temperature < 0 or timeout <= 0:
        raise LoadTestError("--temperature must be >= 0 and --request-timeout > 0")
    api = str(getattr(options, "api", "") or "") or (contract.api if contract is not None else "completions")
    if api not in ("completions", "chat"):
        raise LoadTestError(f"--api must be completions or chat, not {api!r}")
    samples = str(getattr(options, "samples_file", "") or "")
    return LoadConfig(
        adapter=adapter,
        prompts=tuple(load_prompts(prompts_path, contract, api)),
        api=api,
        max_tokens=max_tokens,
        temperature=temperature,
        request_timeout_s=timeout,
        slo=contract.slo if contract is not None else LoadSLO(),
        samples_file=Path(samples) if samples else None,
    )


class _Run:
    """The state of the current test: its configuration, the prompt cycle, the samples."""

    def __init__(self) -> None:
        self.config: LoadConfig | None = None
        self.error: str | None = None
        self.samples: list[RequestSample] = []
        self._prompts: Iterator[str] = iter(())

    def start(self, config: LoadConfig) -> None:
        self.config, self.error, self.samples = config, None, []
        self._prompts = itertools.cycle(config.prompts)

    def next_prompt(self) -> str:
        return next(self._prompts)  # greenlets, one thread: no lock needed


RUN = _Run()


@events.test_start.add_listener
def _on_test_start(environment: Environment, **_: Any) -> None:
    try:
        cfg = config_from_options(environment.parsed_options)
        RUN.start(cfg)
    except LoragateError as exc:
        RUN.config, RUN.error = None, str(exc)
        log.error("loragate load: %s", exc)
        environment.process_exit_code = 2
        runner = environment.runner
        if runner is not None:  # stop from outside the event's greenlet
            gevent.spawn_later(0, runner.quit if getattr(environment.parsed_options, "headless", False)
                               else runner.stop)
        return
    log.info("loragate load: adapter %s, %d prompts, max_tokens %d, temperature %g",
             cfg.adapter, len(cfg.prompts), cfg.max_tokens, cfg.temperature)


@events.test_stop.add_listener
def _on_test_stop(environment: Environment, **_: Any) -> None:
    """Every user has stopped (after ``--stop-timeout``): write the raw samples.

    With ``--csv``, also wait one CSV interval first: locust's CSV writer rewrites the files
    once a second and is not called again at shutdown, so without the wait the requests that
    finished in the last second would be missing from ``*_stats.csv``.
    """
    if getattr(environment.parsed_options, "csv_prefix", None):
        from locust.stats import CSV_STATS_INTERVAL_SEC

        gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.2)
    cfg = RUN.config
    if cfg is not None and cfg.samples_file is not None:
        tmp = cfg.samples_file.with_suffix(cfg.samples_file.suffix + ".tmp")
        with tmp.open("w", encoding="utf-8") as out:
            for sample in RUN.samples:
                out.write(sample.to_json() + "\n")
        tmp.replace(cfg.samples_file)


@events.init.add_listener
def _on_init(environment: Environment, **_: Any) -> None:
    web_ui = environment.web_ui
    if web_ui is None:
        return

    # locust declares WebUI.app Optional, but WebUI.__init__ always sets it
    @web_ui.app.route("/loragate")  # type: ignore[union-attr]
    def _summary() -> Any:  # the project's own numbers, live
        from flask import jsonify

        cfg = RUN.config
        slo = cfg.slo if cfg is not None else LoadSLO()
        metrics = summarize(RUN.samples, slo)
        return jsonify({
            "adapter": cfg.adapter if cfg else None,
            "error": RUN.error,
            "metrics": metrics,
            "slo": [{"name": c.name, "passed": c.passed, "check": c.describe()} for c in slo_checks(metrics, slo)],
        })


def log_metric(environment: Environment, name: str, value: float, count: int = 1) -> None:
    """Add ``value`` ``count`` times to the ``LLM`` row ``name`` of locust's stats: its own entry
    only, never the Aggregated total nor ``events.request`` (it is not a request)."""
    entry = environment.stats.get(name, METRIC_TYPE)
    for _ in range(count):
        # locust annotates response times as int, but logs its own requests' float milliseconds too
        entry.log(value, 0)  # type: ignore[arg-type]


def _http_error(resp: requests.Response) -> str:
    try:
        err = resp.json().get("error")
        message = err.get("message") if isinstance(err, dict) else err
    except (ValueError, AttributeError):
        message = resp.text[:200]
    return f"HTTP {resp.status_code}: {message}"


def _timings(sample: RequestSample) -> tuple[float, float] | None:
    """An ok sample's (TTFT, end-to-end) seconds; None for a failed one."""
    if not sample.ok:
        return None
    if sample.ttft_s is None or sample.e2e_s is None:  # StreamTimer.result times every ok sample
        raise RuntimeError("an ok stream sample without its timings")
    return sample.ttft_s, sample.e2e_s


class CompletionUser(User):
    """Streams one completion after another for the configured adapter."""

    wait_time = constant(0)

    def on_start(self) -> None:
        self.session = requests.Session()

    def on_stop(self) -> None:
        self.session.close()

    @task
    def stream_completion(self) -> None:
        cfg = RUN.config
        if cfg is None:  # bad configuration: test_start reported it and stops the test
            gevent.sleep(1)
            return
        try:
            host = self.environment.host or self.host
            if not host:
                raise LoadTestError("no host: pass --host URL (the proxy's base URL)")
            url = base_url(host) + request_path(cfg.api)
        except LoragateError as exc:
            if RUN.error != str(exc):
                RUN.error = str(exc)
                log.error("loragate load: %s", exc)
            gevent.sleep(1)
            return
        body = completion_body(cfg.adapter, RUN.next_prompt(), cfg.max_tokens, cfg.temperature, cfg.api)
        name = f"{request_path(cfg.api)} [{cfg.adapter}]"
        sent_wall, sent = time.time(), time.perf_counter()
        timer = StreamTimer(sent, sent_wall)
        status: int | None = None
        error: Exception | None = None
        try:
            with self.session.post(url, json=body, stream=True,
                                   timeout=(CONNECT_TIMEOUT_S, cfg.request_timeout_s)) as resp:
                status = resp.status_code
                if status != 200:
                    raise StreamError(_http_error(resp))
                for piece in resp.iter_content(chunk_size=None):
                    timer.feed(piece, time.perf_counter())
            sample = timer.result(status)
            if not sample.ok:
                error = StreamError(sample.error)
        except (requests.RequestException, StreamError) as exc:
            sample = timer.result(status)
            sample.ok, sample.finish_reason = False, None
            sample.error = str(exc) or type(exc).__name__
            error = exc
        timings = _timings(sample)
        elapsed_ms = (timings[1] if timings is not None else time.perf_counter() - sent) * 1000
        RUN.samples.append(sample)
        self.environment.events.request.fire(
            request_type="POST", name=name, response_time=elapsed_ms,
            response_length=timer.bytes_received, exception=error, context={"adapter": cfg.adapter},
            response=None, url=url, start_time=sent_wall,
        )
        if timings is None:
            gevent.sleep(FAILURE_BACKOFF_S)
            return
        ttft_s, e2e_s = timings
        env = self.environment
        log_metric(env, "ttft", ttft_s * 1000)
        for gap in sample.itl_s:
            log_metric(env, "itl", gap * 1000)
        tpot = sample.tpot_s
        if tpot is not None:
            log_metric(env, "tpot", tpot * 1000)
        log_metric(env, "output tokens", (tpot if tpot is not None else ttft_s) * 1000,
                   count=sample.output_tokens)
        log_metric(env, f"finish_reason={sample.finish_reason}", e2e_s * 1000)
