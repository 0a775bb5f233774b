"""The proxy's metric objects and path handling on the hot path: fast, and the same answers."""

from __future__ import annotations

import posixpath

from hypothesis import example, given
from hypothesis import strategies as st
from prometheus_client import generate_latest

from loragate.server.app import canonical_path
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


def _normalised(path: str) -> str:
    """The same resolution by the standard library: POSIX keeps exactly two leading slashes, but
    three or more collapse to one; a trailing slash of a non-root path stays."""
    resolved = posixpath.normpath("///" + path)
    return resolved + "/" if path.endswith("/") and resolved != "/" else resolved


@given(path=st.lists(st.sampled_from(["", ".", "..", "v1", "completions", ".x", "a.", "..b"]), max_size=6)
       .map("/".join) | st.text(alphabet="/.av1", max_size=12))
@example("//v1/completions")
@example("/v1/./load_lora_adapter")
@example("/a/../v1/x")
@example("/v1/")
@example("")
@example("v1/x")
@example("/.")
@example("/..")
@example("/v1/completions/.")
def test_canonical_path_resolves_dot_and_empty_segments_as_posix_does(path):
    assert canonical_path(path) == _normalised(path)
    assert canonical_path(canonical_path(path)) == canonical_path(path)
