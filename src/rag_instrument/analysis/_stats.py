"""Percentiles over a bounded sample, and the Mann-Whitney U test (standard library only).

Percentiles are exact, by the nearest-rank method (the smallest value with at least p% of
the values at or below it; no interpolation, so every figure is a duration that really
occurred), over the values kept. A :class:`Sample` keeps every value up to its bound
(:data:`DEFAULT_MAX_VALUES` per group, 8 bytes each); beyond it, it keeps a uniform random
sample of that size (reservoir sampling, algorithm R, fixed seed so runs repeat), and the
percentiles are those of the sample: for a sample of k values the rank error of a
percentile is about ``sqrt(p(1-p)/k)`` (0.02 percentage points at p95 for a million).
Counts, sums, means, maxima and budget violations are always exact.
"""

from __future__ import annotations

import math
import random
from array import array
from collections.abc import Sequence

__all__ = [
    "DEFAULT_MAX_VALUES",
    "ExactSum",
    "Sample",
    "mann_whitney",
    "mann_whitney_u",
    "percentile",
]

#: Values kept per group before sampling starts (8 MB per group at the bound).
DEFAULT_MAX_VALUES = 1_000_000


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted values.

    Args:
        sorted_values: the values, ascending; must not be empty.
        pct: the percentile, 0 to 100.

    Returns:
        The smallest value such that at least ``pct`` percent of the values are at or below it.
    """
    if not sorted_values:
        raise ValueError("percentile of no values")
    rank = max(0, math.ceil(pct / 100.0 * len(sorted_values)) - 1)
    return float(sorted_values[min(rank, len(sorted_values) - 1)])


class Sample:
    """Up to ``max_values`` values: all of them, or a uniform sample once there are more."""

    __slots__ = ("_rng", "max_values", "seen", "values")

    def __init__(self, max_values: int = DEFAULT_MAX_VALUES) -> None:
        if max_values < 1:
            raise ValueError(f"max_values must be at least 1, got {max_values!r}")
        self.max_values = max_values
        self.values: array[float] = array("d")
        self.seen = 0
        self._rng: random.Random | None = None

    def add(self, value: float) -> None:
        """Offer one value."""
        self.seen += 1
        if self.seen <= self.max_values:
            self.values.append(value)
            return
        if self._rng is None:
            self._rng = random.Random(0x5EED)  # noqa: S311 - sampling, not security
        slot = self._rng.randrange(self.seen)
        if slot < self.max_values:
            self.values[slot] = value

    @property
    def exact(self) -> bool:
        """Whether every value offered is kept."""
        return self.seen <= self.max_values

    def sorted(self) -> list[float]:
        """The kept values, ascending."""
        return sorted(self.values)


def _fsum(values: Sequence[float]) -> float:
    """``math.fsum``, or infinity where the exact sum is beyond floats (1e308 + 1e308)."""
    try:
        return math.fsum(values)
    except OverflowError:
        return sum(values)  # the plain sum overflows the same way: inf or -inf


class ExactSum:
    """A sum of floats that does not depend on the order they come in.

    :meth:`value` is the exact sum of every value added, rounded once (``math.fsum``), so
    one process or several, blocks in any order, give the same figure to the last bit.
    The values are kept as a short exact expansion: a few floats whose sum is exactly the
    sum so far (refreshed every :data:`_PENDING` values).
    """

    __slots__ = ("_parts", "_pending")

    #: Values held before they are folded into the expansion.
    _PENDING = 4096

    def __init__(self) -> None:
        self._parts: list[float] = []
        self._pending: list[float] = []

    def add(self, value: float) -> None:
        """Add one value."""
        self._pending.append(value)
        if len(self._pending) >= self._PENDING:
            self._fold()

    def extend(self, values: Sequence[float]) -> None:
        """Add several values."""
        self._pending.extend(values)
        if len(self._pending) >= self._PENDING:
            self._fold()

    def merge(self, other: ExactSum) -> None:
        """Add everything ``other`` holds."""
        self.extend(other._parts + other._pending)

    def value(self) -> float:
        """The sum, correctly rounded."""
        return _fsum(self._parts + self._pending)

    def _fold(self) -> None:
        values = self._parts + self._pending
        parts: list[float] = []
        # Each round takes out the rounded sum of what is left; what is left is exact in
        # floats (the inputs and the negated partial sums), so the parts add up exactly.
        while len(parts) < 64:
            total = _fsum(values)
            if total == 0.0 or not math.isfinite(total):
                if total != 0.0:
                    parts = [total]
                break
            parts.append(total)
            values.append(-total)
        self._parts = parts
        self._pending = []


def mann_whitney_u(before: Sequence[float], after: Sequence[float]) -> float:
    """Two-sided p-value of the Mann-Whitney U test that ``after`` and ``before`` differ.

    Normal approximation with tie correction (and a continuity correction), the normal tail
    computed with :func:`math.erfc` (the standard library); suitable from about 8 values per
    side. Returns 1.0 when either side is empty or every value is the same.
    """
    return mann_whitney(before, after)[0]


def _ascending(values: Sequence[float]) -> Sequence[float]:
    # The samples of an analysis come sorted: no copy then (a million values each side).
    for k in range(len(values) - 1):
        if values[k] > values[k + 1]:
            return sorted(values)
    return values


def mann_whitney(before: Sequence[float], after: Sequence[float]) -> tuple[float, int]:
    """The Mann-Whitney U test: ``(p_value, direction)``.

    ``direction`` is ``1`` when ``after`` tends to be larger (slower), ``-1`` when smaller,
    ``0`` when neither: the side whose values rank higher, whatever the percentiles say
    (a p50 that doubled under an unchanged p95 is slower). The ranks are counted by merging
    the two sorted sides, with no combined copy: memory stays that of the samples.
    """
    # NaN is not a duration and has no rank (and would stall the merge below).
    if any(math.isnan(v) for v in before):
        before = [v for v in before if not math.isnan(v)]
    if any(math.isnan(v) for v in after):
        after = [v for v in after if not math.isnan(v)]
    n1, n2 = len(before), len(after)
    if n1 == 0 or n2 == 0:
        return 1.0, 0
    a, b = _ascending(before), _ascending(after)
    rank_sum_before = 0.0
    tie_term = 0.0
    i = j = 0
    done = 0  # values ranked so far
    while i < n1 or j < n2:
        value = a[i] if j >= n2 or (i < n1 and a[i] <= b[j]) else b[j]
        start_i, start_j = i, j
        while i < n1 and a[i] == value:
            i += 1
        while j < n2 and b[j] == value:
            j += 1
        in_a, ties = i - start_i, (i - start_i) + (j - start_j)
        rank_sum_before += in_a * (done + (ties + 1) / 2.0)
        if ties > 1:
            tie_term += ties**3 - ties
        done += ties
    total = n1 + n2
    u1 = rank_sum_before - n1 * (n1 + 1) / 2.0
    mean_u = n1 * n2 / 2.0
    direction = 0 if u1 == mean_u else (1 if u1 < mean_u else -1)
    variance = n1 * n2 / 12.0 * ((total + 1) - tie_term / (total * (total - 1)))
    if variance <= 0:
        return 1.0, direction
    z = (abs(u1 - mean_u) - 0.5) / math.sqrt(variance)
    if z <= 0:
        return 1.0, direction
    # Two-sided tail of the standard normal, 2 * (1 - Phi(z)) = erfc(z / sqrt(2)): erfc keeps
    # its precision far out in the tail where 1 - Phi(z) rounds to 0.
    return min(1.0, math.erfc(z / math.sqrt(2.0))), direction
