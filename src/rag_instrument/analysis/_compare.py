"""Before and after, per group: percentiles, the change, and whether it is beyond noise."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from rag_instrument.analysis._model import Analysis
from rag_instrument.analysis._stats import mann_whitney_u, percentile

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

    @property
    def verdict(self) -> str:
        """``slower``, ``faster``, ``no significant change``, ``new`` or ``gone``."""
        if self.count_before == 0:
            return "new"
        if self.count_after == 0:
            return "gone"
        if not self.significant:
            return "no significant change"
        return "slower" if (self.p95_change_ms or 0.0) > 0 else "faster"

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
    keys = [r.key for r in after.rows] + [r.key for r in before.rows if r.key not in after.samples]
    changes = []
    for key in keys:
        old = before.samples.get(key, [])
        new = after.samples.get(key, [])
        b50, b95, b99 = _pcts(old)
        a50, a95, a99 = _pcts(new)
        p_value = mann_whitney_u(old, new) if old and new else None
        change_ms = a95 - b95 if a95 is not None and b95 is not None else None
        change_pct = (
            100.0 * change_ms / b95 if change_ms is not None and b95 else None
        )
        changes.append(
            Change(
                key=key,
                depth=depths.get(key, 0),
                count_before=len(old),
                count_after=len(new),
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
            )
        )
    return changes
