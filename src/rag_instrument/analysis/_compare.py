"""Before and after, per group: percentiles, the change, and whether it is beyond noise."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from rag_instrument.analysis._model import Analysis
from rag_instrument.analysis._stats import mann_whitney, percentile

__all__ = ["ALPHA", "Change", "compare"]

#: Significance level: a change with a p-value below this is beyond noise.
ALPHA = 0.05


@dataclass
class Change:
    """One group before and after."""

    key: str
    depth: int
    count_before: int
    count_after: int
    p50_before: float | None
    p50_after: float | None
    p95_before: float | None
    p95_after: float | None
    p99_before: float | None
    p99_after: float | None
    #: p95 after minus before, in ms and percent of before.
    p95_change_ms: float | None
    p95_change_pct: float | None
    #: Two-sided Mann-Whitney U p-value (``None`` when a side has no runs).
    p_value: float | None
    significant: bool
    #: Which way the runs moved, by the test's ranks: 1 slower, -1 faster, 0 neither.
    direction: int = 0

    @property
    def verdict(self) -> str:
        """``slower``, ``faster``, ``no significant change``, ``new`` or ``gone``.

        The direction is the test's (which side's runs rank higher), not the sign of the
        p95 change: a p50 that doubled under an unchanged p95 is slower.
        """
        if self.count_before == 0:
            return "new"
        if self.count_after == 0:
            return "gone"
        if not self.significant or self.direction == 0:
            return "no significant change"
        return "slower" if self.direction > 0 else "faster"

    def p95_regressed_beyond(self, pct: float) -> bool:
        """Whether p95 grew by more than ``pct`` percent, and the change is significant.

        From a p95 of 0 ms, any growth is more than every percentage. A growth of exactly
        ``pct`` (10% as 10.000000000000009 in floats) is not more.
        """
        if not self.significant or self.p95_change_ms is None:
            return False
        if self.p95_change_pct is None:
            return self.p95_change_ms > 0
        return round(self.p95_change_pct, 9) > pct

    def as_json(self) -> dict[str, Any]:
        """A plain dict, with the verdict."""
        return {**asdict(self), "verdict": self.verdict}


def _pcts(values: list[float]) -> tuple[float | None, float | None, float | None]:
    if not values:
        return None, None, None
    return percentile(values, 50), percentile(values, 95), percentile(values, 99)


def compare(before: Analysis, after: Analysis, alpha: float = ALPHA) -> list[Change]:
    """Every group of either side, in the candidate's order (then the baseline's)."""
    depths = {r.key: r.depth for r in before.rows}
    depths.update({r.key: r.depth for r in after.rows})
    # Run counts are exact; the samples may hold a uniform part of the runs (percentiles).
    counts_before = {r.key: r.count for r in before.rows}
    counts_after = {r.key: r.count for r in after.rows}
    keys = [r.key for r in after.rows] + [r.key for r in before.rows if r.key not in after.samples]
    changes = []
    for key in keys:
        old = before.samples.get(key, [])
        new = after.samples.get(key, [])
        b50, b95, b99 = _pcts(old)
        a50, a95, a99 = _pcts(new)
        p_value, direction = mann_whitney(old, new) if old and new else (None, 0)
        change_ms = a95 - b95 if a95 is not None and b95 is not None else None
        change_pct = (
            100.0 * change_ms / b95 if change_ms is not None and b95 else None
        )
        changes.append(
            Change(
                key=key,
                depth=depths.get(key, 0),
                count_before=counts_before.get(key, len(old)),
                count_after=counts_after.get(key, len(new)),
                p50_before=b50,
                p50_after=a50,
                p95_before=b95,
                p95_after=a95,
                p99_before=b99,
                p99_after=a99,
                p95_change_ms=change_ms,
                p95_change_pct=change_pct,
                p_value=p_value,
                significant=p_value is not None and p_value < alpha,
                direction=direction,
            )
        )
    return changes
