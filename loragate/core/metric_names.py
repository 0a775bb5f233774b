"""The names and label values of the metrics the proxy exports: the one place that defines them.

The proxy (:mod:`loragate.server.metrics`) registers its metrics under these names; the load
test reads the proxy's counters by them, and the chart's recording rules and alerts use them
(``charts/loragate/files/prometheus-rules.yaml``; ``tests/test_prometheus.py`` checks they agree).
Counter names are given without prometheus_client's ``_total`` suffix.
"""

from __future__ import annotations

REQUESTS = "loragate_requests"
COMPLETIONS = "loragate_completions"
LENGTH_CUTOFFS = "loragate_length_cutoffs"
JSON_OUTPUTS = "loragate_json_outputs"
JSON_CONSTRAINED_OUTPUTS = "loragate_json_constrained_outputs"
TIME_TO_FIRST_TOKEN = "loragate_time_to_first_token_seconds"
REQUEST_DURATION = "loragate_request_duration_seconds"
OUTPUT_TOKENS = "loragate_output_tokens"
SCORING_REQUESTS = "loragate_scoring_requests"
UPSTREAM_ERRORS = "loragate_upstream_errors"
CLIENT_DISCONNECTS = "loragate_client_disconnects"
UNJUDGED_GENERATIONS = "loragate_unjudged_generations"
REJECTED_REQUESTS = "loragate_rejected_requests"
CONNECTIONS_EVICTED = "loragate_connections_evicted"
REQUESTS_IN_FLIGHT = "loragate_requests_in_flight"
# Shadows (loragate.server.shadow): a candidate adapter sent a sampled share of a live adapter's
# requests, judged and counted apart; every series is labelled ``candidate`` and ``live``.
SHADOW_REQUESTS = "loragate_shadow_requests"
SHADOW_COMPLETIONS = "loragate_shadow_completions"
SHADOW_LENGTH_CUTOFFS = "loragate_shadow_length_cutoffs"
SHADOW_JSON_OUTPUTS = "loragate_shadow_json_outputs"
SHADOW_PAIRED = "loragate_shadow_paired"
SHADOW_OUTPUT_TOKENS = "loragate_shadow_output_tokens"
SHADOWS_IN_FLIGHT = "loragate_shadows_in_flight"
ENGINE_SCRAPE_ERRORS = "loragate_engine_scrape_errors"
PROMOTED_SET_INFO = "loragate_promoted_set_info"
PROMOTED_SET_CONVERGED = "loragate_promoted_set_converged"
PROMOTED_ADAPTER_STATE = "loragate_promoted_adapter_state"
PROMOTED_OPERATIONS = "loragate_promoted_operations"

#: The adapter label of any model name that is neither in the contracts nor served.
OTHER_ADAPTER = "__other__"
#: Endpoint label values.
ENDPOINTS = ("completions", "chat_completions", "responses", "messages", "models", "admin", "other")
#: ``endpoint`` values of generating endpoints whose answers the proxy forwards unjudged.
UNJUDGED_ENDPOINTS = ("responses", "messages")
#: ``kind`` values of upstream errors.
UPSTREAM_ERROR_KINDS = ("connect", "reset", "timeout", "status_5xx", "stream_broken", "invalid_response")
#: ``outcome`` values of shadow requests: judged (the engine answered and the candidate's choices
#: were counted), skipped (``max_in_flight`` shadows were running: never queued), upstream_error
#: (no answer: connect, timeout, reset, broken), refused (the engine answered with a status other
#: than 200), invalid_response (a 200 answer the proxy could not read).
SHADOW_OUTCOMES = ("judged", "skipped", "upstream_error", "refused", "invalid_response")
#: ``metric`` values of the paired outcomes: stop (``finish_reason`` stop) and json_valid (valid JSON).
SHADOW_PAIRED_METRICS = ("stop", "json_valid")
#: ``pair`` values: which of the live and the candidate answer met the metric on the same request.
SHADOW_PAIRS = ("both", "live_only", "candidate_only", "neither")
#: ``kind`` values of failed relays of the engine's metrics (``/metrics/engine``).
ENGINE_SCRAPE_ERROR_KINDS = ("connect", "reset", "timeout", "stream_broken", "status", "too_large", "other")
#: ``state`` values of an adapter of the promoted set (loragate.server.reconciler).
PROMOTED_ADAPTER_STATES = ("pending", "loading", "loaded", "failed", "draining", "conflict", "invalid")
#: ``reason`` values of requests refused by the proxy itself.
BAD_REQUEST_REASONS = (
    "malformed_json", "not_an_object", "body_too_large", "unsupported_media_type",
    "unauthorized", "forbidden", "slow_body", "adapter_path",
    # the request target, route and fields the engine would read differently
    # (loragate.server.target, loragate.server.routes)
    "invalid_target", "invalid_field", "not_served", "method_not_allowed",
    # refused by the server before the app sees the request (loragate.server.serving)
    "invalid_http", "head_timeout", "headers_too_large", "connection_limit",
    # a request that came while the server drained before stopping (loragate.server.drain)
    "draining",
    # a request for an adapter being removed from the promoted set (loragate.server.reconciler)
    "adapter_retiring",
)


def total(counter: str) -> str:
    """The sample name of a counter (``loragate_completions`` -> ``loragate_completions_total``)."""
    return f"{counter}_total"
