"""Every Prometheus metric the proxy exports: names, labels, help texts, in one place.

Label values are bounded by construction:

- ``adapter``: a name from the contracts or the engine's model list, else :data:`OTHER_ADAPTER`
  (see :class:`loragate.server.adapters.AdapterNames`); a client can never mint a new value.
- ``finish_reason``: ``stop`` | ``length`` | ``other`` (:class:`~loragate.core.judging.FinishClass`).
- ``cause``: ``max_tokens`` | ``context`` (:class:`~loragate.core.judging.LengthCause`).
- ``result`` of JSON outputs: ``valid`` | ``invalid`` | ``schema_mismatch``
  (:class:`~loragate.core.judging.JsonResult`); of JSON-constrained outputs: ``valid`` |
  ``ignored`` | ``cut`` | ``schema_mismatch`` (:class:`~loragate.core.judging.ConstraintResult`).
- ``endpoint``: :data:`ENDPOINTS`; ``code``: the HTTP status class (``2xx`` ... ``5xx``).
- ``kind`` and ``reason``: the fixed tuples below.
- ``candidate`` and ``live`` (the ``loragate_shadow_*`` series): only the pairs of the proxy's
  configured shadows, whose names are contract adapters (:meth:`ProxyMetrics.init_shadow`);
  ``outcome``, ``metric`` and ``pair``: the fixed tuples of :mod:`loragate.core.metric_names`.

Rates an operator alerts on (the chart's recording rules compute them):

- stop rate = ``loragate_completions_total{finish_reason="stop"}`` / all completions, per adapter;
- JSON validity = ``loragate_json_outputs_total{result="valid"}`` / all judged outputs, per
  adapter (only adapters whose contract expects JSON are judged).

Every series an alert reads exists at 0 for every adapter label value the proxy knows (its
contracts' adapters and base model, what the engine serves, and ``__other__``) before that
adapter's first request: see :meth:`ProxyMetrics.init_adapter`.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from loragate.core import metric_names as names
from loragate.core.judging import ConstraintResult, FinishClass, JsonResult, LengthCause
from loragate.core.metric_names import (  # noqa: F401  (re-exported: the proxy's label values)
    BAD_REQUEST_REASONS,
    ENDPOINTS,
    OTHER_ADAPTER,
    SHADOW_OUTCOMES,
    SHADOW_PAIRED_METRICS,
    SHADOW_PAIRS,
    UNJUDGED_ENDPOINTS,
    UPSTREAM_ERROR_KINDS,
)

#: Seconds; from tens of milliseconds (a GPU's first token) to minutes (a CPU's long answer).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _CachedLabels:
    """``labels(*values)`` answered from a dict after the first call with those values.

    prometheus_client's own ``labels`` checks the values and takes a lock on every call (0.7 µs,
    about six calls per request). Label values here are bounded (module docstring) and no child
    is ever removed, so the dict is bounded and never stale.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._children_by_values: dict[tuple, Any] = {}
        super().__init__(*args, **kwargs)

    def labels(self, *values: Any, **by_name: Any) -> Any:
        if by_name:
            return super().labels(*values, **by_name)  # type: ignore[misc]
        try:
            return self._children_by_values[values]
        except KeyError:
            child = self._children_by_values[values] = super().labels(*values)  # type: ignore[misc]
            return child


class _Counter(_CachedLabels, Counter):
    pass


class _Gauge(_CachedLabels, Gauge):
    pass


class _Histogram(_CachedLabels, Histogram):
    pass


class ProxyMetrics:
    """The proxy's metrics, registered in ``registry`` (a fresh one per proxy instance)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = _Counter(
            names.REQUESTS, "HTTP requests the proxy answered, by endpoint and status class.",
            ["endpoint", "code"], registry=r)
        self.completions = _Counter(
            names.COMPLETIONS,
            "Completion choices that finished, by adapter and finish_reason (stop|length|other). "
            "Stop rate = stop / all. A streamed choice counts once, when its stream ends. Scoring "
            "requests (echo with max_tokens 0) are not completions.",
            ["adapter", "finish_reason"], registry=r)
        self.length_cutoffs = _Counter(
            names.LENGTH_CUTOFFS,
            "Choices cut with finish_reason=length, by cause: max_tokens (the request's budget ran out: "
            "a runaway when the adapter should have stopped) or context (prompt + output reached max_model_len).",
            ["adapter", "cause"], registry=r)
        self.json_outputs = _Counter(
            names.JSON_OUTPUTS,
            "Choices of adapters whose contract expects JSON, by result: valid, invalid (does not parse, "
            "answers cut at max_tokens included), schema_mismatch (parses, breaks the contract's JSON Schema). "
            "JSON validity = valid / all. An echoed prompt is not judged, only what was generated.",
            ["adapter", "result"], registry=r)
        self.constrained_outputs = _Counter(
            names.JSON_CONSTRAINED_OUTPUTS,
            "Choices of requests that asked for JSON (response_format json_object or json_schema), by result: "
            "valid (parses, and matches the adapter's contract schema if any); ignored (ended on its own, "
            "on the end-of-sequence token, and is not JSON: the engine did not honour the constraint); cut "
            "(not JSON, but ended first by max_tokens, the context limit, a stop string or token the request "
            "named, or an abort); schema_mismatch (JSON, but breaks the adapter's contract schema, which the "
            "engine never saw).",
            ["adapter", "result"], registry=r)
        self.scoring_requests = _Counter(
            names.SCORING_REQUESTS,
            "Completion requests with echo and max_tokens 0 (how lm-eval scores log-likelihoods): the "
            "engine answers with the prompt and its logprobs and generates nothing for the client. "
            "Counted here only, never as completions.",
            ["adapter"], registry=r)
        self.ttft = _Histogram(
            names.TIME_TO_FIRST_TOKEN,
            "Streamed requests: seconds from the proxy receiving the request to the first chunk with output.",
            ["adapter"], buckets=LATENCY_BUCKETS, registry=r)
        self.duration = _Histogram(
            names.REQUEST_DURATION,
            "Completion requests: seconds from the proxy receiving the request to the last byte sent back.",
            ["adapter"], buckets=LATENCY_BUCKETS, registry=r)
        self.output_tokens = _Counter(
            names.OUTPUT_TOKENS, "Completion tokens generated, from the engine's usage report.",
            ["adapter"], registry=r)
        self.upstream_errors = _Counter(
            names.UPSTREAM_ERRORS,
            "Requests the upstream engine failed: connect (no connection), timeout (no answer in time), "
            "reset (connection closed after the request, before the answer), status_5xx, stream_broken "
            "(the answer broke off, or its stream ended before every choice finished), invalid_response.",
            ["adapter", "kind"], registry=r)
        self.client_disconnects = _Counter(
            names.CLIENT_DISCONNECTS,
            "Requests whose client went away before it was handed the whole answer, streamed or not; the "
            "engine's request is cancelled and nothing is counted as a completion.",
            ["adapter"], registry=r)
        self.unjudged_generations = _Counter(
            names.UNJUDGED_GENERATIONS,
            "Answers of generating endpoints the proxy forwards without judging them yet (the Responses "
            "and Messages APIs), by adapter (from the request's model) and endpoint.",
            ["adapter", "endpoint"], registry=r)
        self.bad_requests = _Counter(
            names.REJECTED_REQUESTS, "Requests the proxy refused itself, by reason.",
            ["reason"], registry=r)
        self.connections_evicted = _Counter(
            names.CONNECTIONS_EVICTED,
            "Client connections closed to make room at the connection cap: the one that had waited "
            "longest for a request head (idle keep-alive or a head still arriving).", [], registry=r)
        self.in_flight = _Gauge(
            names.REQUESTS_IN_FLIGHT, "Requests being handled by the proxy now, by endpoint.",
            ["endpoint"], registry=r)
        self.shadow_requests = _Counter(
            names.SHADOW_REQUESTS,
            "Shadow requests: a sampled live request also sent to the engine for the candidate adapter, its "
            "answer judged and never returned. By outcome: judged, skipped (max_in_flight shadows of the pair "
            "were running; never queued), upstream_error (no answer), refused (the engine answered with a "
            "status other than 200), invalid_response.",
            ["candidate", "live", "outcome"], registry=r)
        self.shadow_completions = _Counter(
            names.SHADOW_COMPLETIONS,
            "The candidate's completion choices on shadowed requests, by finish_reason (stop|length|other), "
            "judged as loragate_completions_total judges the live adapter's. Stop rate = stop / all.",
            ["candidate", "live", "finish_reason"], registry=r)
        self.shadow_length_cutoffs = _Counter(
            names.SHADOW_LENGTH_CUTOFFS,
            "The candidate's choices on shadowed requests cut with finish_reason=length, by cause "
            "(max_tokens: a runaway; context).", ["candidate", "live", "cause"], registry=r)
        self.shadow_json_outputs = _Counter(
            names.SHADOW_JSON_OUTPUTS,
            "The candidate's choices on shadowed requests, judged by the candidate's contract (when it expects "
            "JSON), by result: valid, invalid, schema_mismatch. JSON validity = valid / all.",
            ["candidate", "live", "result"], registry=r)
        self.shadow_paired = _Counter(
            names.SHADOW_PAIRED,
            "Choices of the same request answered by the live adapter and its shadow, by metric (stop: "
            "finish_reason stop; json_valid: valid by each adapter's own contract, counted when both expect JSON) "
            "and pair: both met it, live_only, candidate_only, neither. Counted only when the live answer was "
            "judged (a client gone, or a live error, leaves no pair).",
            ["candidate", "live", "metric", "pair"], registry=r)
        self.shadow_output_tokens = _Counter(
            names.SHADOW_OUTPUT_TOKENS,
            "Completion tokens the engine generated for shadows (from its usage report): the engine cost of "
            "shadowing.", ["candidate", "live"], registry=r)
        self.shadows_in_flight = _Gauge(
            names.SHADOWS_IN_FLIGHT, "Shadow requests running now (waiting for an engine turn included).",
            ["candidate", "live"], registry=r)
        self.engine_scrape_errors = _Counter(
            names.ENGINE_SCRAPE_ERRORS,
            "Scrapes of /metrics/engine the engine's /metrics could not answer, by kind: connect, reset, "
            "timeout, stream_broken, status (not 200), too_large (over the relay's cap), other.",
            ["kind"], registry=r)
        for kind in names.ENGINE_SCRAPE_ERROR_KINDS:
            self.engine_scrape_errors.labels(kind)
        for endpoint in ENDPOINTS:
            self.in_flight.labels(endpoint)
        for reason in BAD_REQUEST_REASONS:
            self.bad_requests.labels(reason)
        self._initialised: set[tuple[str, bool]] = set()

    def enable_promoted(self) -> None:
        """Register the promoted-set reconciler's metrics (only a proxy that runs one exports them)."""
        r = self.registry
        # plain Gauges: their label sets are replaced as revisions and the set change (clear())
        self.promoted_set_info = Gauge(
            names.PROMOTED_SET_INFO,
            "Always 1: desired_revision is the promoted-set file's revision, applied_revision the last one "
            "whose every entry was attempted (loaded, or failed and reported) and whose removals are done.",
            ["desired_revision", "applied_revision"], registry=r)
        self.promoted_set_converged = Gauge(
            names.PROMOTED_SET_CONVERGED,
            "1 when the applied revision is the file's and every adapter of the set is loaded; 0 otherwise.",
            registry=r)
        self.promoted_adapter_state = Gauge(
            names.PROMOTED_ADAPTER_STATE,
            "1 for the state each adapter of the promoted set is in, 0 for the others: pending, loading, loaded, "
            "failed (retried with backoff), draining (removed, waiting for its requests), conflict (the engine "
            "serves the name from another folder), invalid (a bad entry).",
            ["adapter", "state"], registry=r)
        self.promoted_operations = _Counter(
            names.PROMOTED_OPERATIONS, "Runtime LoRA calls the reconciler made to the engine, by operation and result.",
            ["operation", "result"], registry=r)
        for operation in ("load", "unload"):
            for result in ("ok", "error"):
                self.promoted_operations.labels(operation, result)

    def init_adapter(self, adapter: str, json_contract: bool) -> None:
        """Create every label combination of ``adapter`` at 0, once.

        A ratio such as stop / all only exists in PromQL when both series exist: an adapter that
        never stops must still export ``finish_reason="stop"`` as 0, or its stop rate (and the
        alert on it) would be missing instead of 0. Likewise ``increase()`` sees an event only on
        a series that existed before it: every series an alert reads (completions, length cuts,
        constrained JSON results, upstream error kinds) exists at 0, and so do disconnects, scoring
        requests and output tokens. JSON outputs are counted, and created, only for adapters whose
        contract expects JSON (``json_contract``).
        """
        key = (adapter, json_contract)
        if key in self._initialised:
            return
        self._initialised.add(key)
        for constrained in ConstraintResult:
            self.constrained_outputs.labels(adapter, constrained.value)
        for kind in UPSTREAM_ERROR_KINDS:
            self.upstream_errors.labels(adapter, kind)
        self.client_disconnects.labels(adapter)
        self.scoring_requests.labels(adapter)
        self.output_tokens.labels(adapter)
        for finish in FinishClass:
            self.completions.labels(adapter, finish.value)
        for cause in LengthCause:
            self.length_cutoffs.labels(adapter, cause.value)
        if json_contract:
            for result in JsonResult:
                self.json_outputs.labels(adapter, result.value)

    def init_shadow(self, candidate: str, live: str, json_contract: bool) -> None:
        """Create every series of the shadow pair ``(candidate, live)`` at 0 (the proxy calls it for
        each configured shadow at start): a rule comparing the candidate with the live adapter sees
        the pair before its first shadow. JSON series exist when the candidate's contract expects JSON."""
        for outcome in SHADOW_OUTCOMES:
            self.shadow_requests.labels(candidate, live, outcome)
        for finish in FinishClass:
            self.shadow_completions.labels(candidate, live, finish.value)
        for cause in LengthCause:
            self.shadow_length_cutoffs.labels(candidate, live, cause.value)
        if json_contract:
            for result in JsonResult:
                self.shadow_json_outputs.labels(candidate, live, result.value)
        for metric in SHADOW_PAIRED_METRICS:
            for pair in SHADOW_PAIRS:
                self.shadow_paired.labels(candidate, live, metric, pair)
        self.shadow_output_tokens.labels(candidate, live)
        self.shadows_in_flight.labels(candidate, live)
