"""The proxy's metric objects on the hot path: fast, and the same answers."""

from __future__ import annotations

from prometheus_client import generate_latest

from loragate.server.metrics import ProxyMetrics


def test_label_children_are_cached_per_metric_and_count_exactly():
    a, b = ProxyMetrics(), ProxyMetrics()
    child = a.completions.labels("poster-good", "stop")
    assert a.completions.labels("poster-good", "stop") is child
    assert a.completions.labels("poster-good", "length") is not child
    assert b.completions.labels("poster-good", "stop") is not child  # each proxy its own registry
    for _ in range(3):
        a.completions.labels("poster-good", "stop").inc()
    a.completions.labels(adapter="poster-good", finish_reason="stop").inc()  # by name: same child
    a.in_flight.labels("completions").inc()
    a.duration.labels("poster-good").observe(0.2)
    text = generate_latest(a.registry).decode()
    assert 'loragate_completions_total{adapter="poster-good",finish_reason="stop"} 4.0' in text
    assert 'loragate_requests_in_flight{endpoint="completions"} 1.0' in text
    assert 'loragate_request_duration_seconds_count{adapter="poster-good"} 1.0' in text
    assert 'finish_reason="stop"} 0.0' in generate_latest(b.registry).decode()  # b's child, untouched
