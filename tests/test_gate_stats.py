"""The gate's statistics: Wilson intervals, bars met on the interval, sample sizes from bars."""

from __future__ import annotations

import dataclasses

import pytest

from loragate.acceptance.plan import heldout_sample_size, probe_sample_size
from loragate.core import stats
from loragate.core.contracts import Contract, Thresholds


def test_wilson_interval_known_values() -> None:
    # Reference values (Wilson score interval, z = 1.96), e.g. from statsmodels' proportion_confint.
    low, high = stats.wilson_interval(20, 20)
    assert low == pytest.approx(0.8389, abs=1e-4) and high == 1.0
    low, high = stats.wilson_interval(15, 16)
    assert (low, high) == (pytest.approx(0.7167, abs=1e-4), pytest.approx(0.9889, abs=1e-4))
    low, high = stats.wilson_interval(0, 35)
    assert low == 0.0 and high == pytest.approx(0.0989, abs=1e-4)
    assert stats.wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        stats.wilson_interval(5, 4)


def test_twenty_lucky_samples_cannot_pass_a_95_percent_bar() -> None:
    assert not stats.meets_floor(20, 20, 0.95)
    assert not stats.meets_floor(20, 20, 0.90)  # nor a 90% one: the lower bound is 0.839
    assert stats.meets_floor(73, 73, 0.95)
    assert not stats.meets_floor(72, 72, 0.95)


def test_sample_size_is_the_smallest_perfect_run_that_clears_the_bar() -> None:
    for bar in (0.5, 0.8, 0.9, 0.95, 0.99):
        n = stats.required_n_floor(bar)
        assert stats.meets_floor(n, n, bar)
        assert not stats.meets_floor(n - 1, n - 1, bar)
    assert [stats.required_n_floor(b) for b in (0.8, 0.9, 0.95)] == [16, 35, 73]
    n = stats.required_n_ceiling(0.10)
    assert n == 35 and stats.meets_ceiling(0, n, 0.10) and not stats.meets_ceiling(0, n - 1, 0.10)
    with pytest.raises(ValueError):
        stats.required_n_floor(1.0)


def test_one_failure_in_a_minimal_sample_fails_the_bar() -> None:
    n = stats.required_n_floor(0.9)
    assert not stats.meets_floor(n - 1, n, 0.9)
    assert not stats.meets_ceiling(1, n, 0.10)


def test_run_sizes_follow_the_contract_thresholds(tmp_path) -> None:
    contract = Contract(name="a", path=tmp_path, base_model="b", output="json")
    assert heldout_sample_size(contract) == 35  # 0.90 bars and the 0.10 runaway ceiling
    assert probe_sample_size(contract) == 16    # 0.80 long-context bars
    strict = dataclasses.replace(contract, thresholds=Thresholds(stop_rate=0.95))
    assert heldout_sample_size(strict) == 73
    text = dataclasses.replace(contract, output="text", thresholds=Thresholds(json_validity=0.99))
    assert heldout_sample_size(text) == 35  # JSON validity is not judged for text adapters


def test_rate_describe_and_dict() -> None:
    rate = stats.Rate(34, 35)
    assert rate.describe().startswith("34/35 = 97.1% [95% CI ")
    d = rate.to_dict()
    assert d["successes"] == 34 and d["n"] == 35 and d["ci95_low"] < d["rate"] < d["ci95_high"]
    assert stats.Rate(0, 0).value == 0.0
