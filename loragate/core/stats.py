"""Rates with 95% Wilson intervals, and the sample sizes the gate's bars imply.

A rate bar (``stop_rate >= 0.90``) is met only when the *lower* bound of the measured rate's
95% Wilson score interval clears it; a ceiling (``runaway share <= 0.10``) only when the
*upper* bound stays under it. So a handful of lucky samples can never pass: 20 out of 20
stops give a lower bound of 0.839, which does not clear a 0.90 bar, let alone 0.95.

The sample size of a check follows from its bar: the smallest ``n`` for which a perfect run
(``n`` successes out of ``n``) clears it. For a floor ``b`` that is the smallest ``n`` with
``n / (n + z**2) > b``, e.g. 35 for 0.90, 73 for 0.95, 16 for 0.80 (z = 1.96).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

#: Two-sided 95% normal quantile.
Z_95 = 1.959963984540054
#: Largest sample size :func:`required_n` will ever ask for (a bar of 1.0 cannot be met).
MAX_SAMPLE_SIZE = 10_000


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval ``(low, high)`` of ``successes / n``; ``(0, 1)`` when ``n == 0``."""
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got {successes}/{n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # Clamp float noise at the ends (0/n has a lower bound of exactly 0, n/n an upper of 1).
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def meets_floor(successes: int, n: int, bar: float) -> bool:
    """Whether the rate's 95% lower bound is at least ``bar`` (no samples never meet a bar > 0)."""
    if bar <= 0:
        return True
    return n > 0 and wilson_interval(successes, n)[0] >= bar


def meets_ceiling(bad: int, n: int, ceiling: float) -> bool:
    """Whether the share of bad outcomes has its 95% upper bound at or under ``ceiling``."""
    if ceiling >= 1:
        return True
    return n > 0 and wilson_interval(bad, n)[1] <= ceiling


def required_n_floor(bar: float) -> int:
    """Smallest ``n`` whose all-success run has a 95% lower bound at or above ``bar``."""
    if bar <= 0:
        return 1
    for n in range(1, MAX_SAMPLE_SIZE + 1):
        if meets_floor(n, n, bar):
            return n
    raise ValueError(f"a bar of {bar} cannot be shown with up to {MAX_SAMPLE_SIZE} samples")


def required_n_ceiling(ceiling: float) -> int:
    """Smallest ``n`` whose run with no bad outcome has a 95% upper bound at or under ``ceiling``."""
    if ceiling >= 1:
        return 1
    for n in range(1, MAX_SAMPLE_SIZE + 1):
        if meets_ceiling(0, n, ceiling):
            return n
    raise ValueError(f"a ceiling of {ceiling} cannot be shown with up to {MAX_SAMPLE_SIZE} samples")


@dataclass(frozen=True)
class Rate:
    """A measured share with its 95% Wilson interval."""

    successes: int
    n: int

    @property
    def value(self) -> float:
        """The point estimate (0 when nothing was measured)."""
        return self.successes / self.n if self.n else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.successes, self.n)

    @property
    def low(self) -> float:
        return self.interval[0]

    @property
    def high(self) -> float:
        return self.interval[1]

    def describe(self) -> str:
        """``34/35 = 97.1% [95% CI 85.5-99.5%]``."""
        low, high = self.interval
        return f"{self.successes}/{self.n} = {self.value:.1%} [95% CI {low:.1%}-{high:.1%}]"

    def to_dict(self) -> dict:
        low, high = self.interval
        return {"successes": self.successes, "n": self.n, "rate": round(self.value, 4),
                "ci95_low": round(low, 4), "ci95_high": round(high, 4)}


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) by linear interpolation between closest ranks (numpy's
    default ``linear`` method): the one convention of every percentile loragate reports.
    ``None`` for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


#: Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond 30: the normal's).
_T_95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


@dataclass(frozen=True)
class MeanInterval:
    """The mean of per-prompt values with its 95% Student-t interval (the spread over prompts,
    not the noise of one value): what the diagnosis decides on."""

    mean: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict:
        return {"mean": round(self.mean, 4), "ci95_low": round(self.low, 4), "ci95_high": round(self.high, 4),
                "n": self.n}


def mean_interval(values: Sequence[float]) -> MeanInterval:
    """Mean and 95% t-interval of ``values``; one value gives an unbounded interval (nothing is
    known about the spread). Raises ``ValueError`` for no values."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n == 1:
        return MeanInterval(mean, -math.inf, math.inf, 1)
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    t = _T_95[n - 2] if n - 1 <= len(_T_95) else Z_95
    half = t * math.sqrt(var / n)
    return MeanInterval(mean, mean - half, mean + half, n)


@dataclass(frozen=True)
class PairedDifference:
    """The difference of two rates measured on the same requests, ``first - second``, with its 95%
    interval by Newcombe's hybrid score method for paired proportions (Newcombe 1998, "Improved
    confidence intervals for the difference between binomial proportions based on paired data",
    method 10): each rate's Wilson interval, combined with the correlation of the pairs.

    The four counts are the requests on which both met the metric, the first only, the second
    only, and neither.
    """

    both: int
    first_only: int
    second_only: int
    neither: int

    @property
    def n(self) -> int:
        return self.both + self.first_only + self.second_only + self.neither

    @property
    def first(self) -> Rate:
        return Rate(self.both + self.first_only, self.n)

    @property
    def second(self) -> Rate:
        return Rate(self.both + self.second_only, self.n)

    @property
    def value(self) -> float:
        return self.first.value - self.second.value

    @property
    def interval(self) -> tuple[float, float]:
        """``(low, high)``; ``(-1, 1)`` when nothing was paired."""
        n = self.n
        if n == 0:
            return -1.0, 1.0
        a, b, c, d = self.both, self.first_only, self.second_only, self.neither
        p1, p2 = (a + b) / n, (a + c) / n
        l1, u1 = wilson_interval(a + b, n)
        l2, u2 = wilson_interval(a + c, n)
        # the pairs' correlation, its numerator corrected towards 0 by n/2 when positive (Newcombe's phi-hat)
        denom = (a + b) * (c + d) * (a + c) * (b + d)
        cross = a * d - b * c
        numerator = max(cross - n / 2, 0.0) if cross > 0 else float(cross)
        phi = numerator / math.sqrt(denom) if denom else 0.0
        delta = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
        eps = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
        return max(-1.0, p1 - p2 - delta), min(1.0, p1 - p2 + eps)

    def to_dict(self) -> dict:
        low, high = self.interval
        return {"both": self.both, "first_only": self.first_only, "second_only": self.second_only,
                "neither": self.neither, "n": self.n, "difference": round(self.value, 4),
                "ci95_low": round(low, 4), "ci95_high": round(high, 4)}


def required_n_paired(max_drop: float) -> int:
    """Smallest ``n`` of pairs, all of them both meeting the metric, whose difference has a 95%
    lower bound at or above ``-max_drop`` (with no discordant pair the lower bound is the first
    rate's Wilson lower bound minus 1, so this is :func:`required_n_floor` of ``1 - max_drop``)."""
    return required_n_floor(1.0 - max_drop)
