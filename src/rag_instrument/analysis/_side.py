"""The tables beside the stage table: slow queries, N+1, retries, cache and budgets."""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING, Any, TypeGuard

if TYPE_CHECKING:
    from rag_instrument.analysis._aggregate import Aggregator

__all__ = ["record_side", "side_tables"]


def _valid_ms(value: Any) -> TypeGuard[float]:
    return type(value) in (int, float) and 0 <= value < math.inf


def record_side(agg: Aggregator, event: str, record: dict[str, Any]) -> None:
    """Note a slow query, N+1 warning, retry, budget warning or cache lookup."""
    stage = record.get("stage") or record.get("pipeline_stage")
    if event == "slow query":
        shape = str(record.get("db.query.text") or record.get("statement") or "?")
        ms = record.get("execution_time_ms")
        entry = agg.slow.setdefault(
            shape, {"statement": shape, "count": 0, "total_ms": 0.0, "worst_ms": 0.0,
                    "stages": set()}
        )
        entry["count"] += 1
        if _valid_ms(ms):
            entry["total_ms"] += ms
            entry["worst_ms"] = max(entry["worst_ms"], ms)
        if stage:
            entry["stages"].add(str(stage))
    elif event == "n+1 query detected":
        what = str(record.get("relationship") or record.get("statement") or "?")
        entry = agg.n_plus_one.setdefault(
            what, {"relationship": what, "warnings": 0, "max_count": 0, "stages": set()}
        )
        entry["warnings"] += 1
        count = record.get("count")
        if type(count) is int:
            entry["max_count"] = max(entry["max_count"], count)
        if stage:
            entry["stages"].add(str(stage))
    elif event == "retrying":
        target = str(record.get("target") or "?")
        agg.retries[(target, str(record.get("error_type") or "?"))] += 1
    elif event == "budget exceeded":
        # A stage's budget names the stage; a route's (the web middleware's) the route.
        name = str(record.get("stage") or record.get("route") or "?")
        largest = record.get("largest")
        if type(largest) is dict:
            largest = largest.get("kind")
        agg.exceeded.setdefault(name, Counter())[str(largest or "-")] += 1
        budget = record.get("budget_ms")
        if _valid_ms(budget):
            agg.learned_budgets[name] = float(budget)
    elif "cache_hit" in record:
        namespace = str(
            record.get("cache_namespace")
            or f"{record.get('provider') or '?'}/{record.get('model') or '?'}"
        )
        counts = agg.cache.setdefault(namespace, [0, 0])
        counts[0] += record["cache_hit"] is True
        counts[1] += 1


def side_tables(agg: Aggregator) -> dict[str, list[dict[str, Any]]]:
    """The side tables as :class:`Analysis` fields, each sorted by what matters most."""
    return {
        "slow_queries": sorted(
            ({**e, "stages": sorted(e["stages"])} for e in agg.slow.values()),
            key=lambda e: -e["total_ms"],
        ),
        "n_plus_one": sorted(
            ({**e, "stages": sorted(e["stages"])} for e in agg.n_plus_one.values()),
            key=lambda e: -e["warnings"],
        ),
        "retries": [
            {"target": t, "error_type": e, "retries": n}
            for (t, e), n in agg.retries.most_common()
        ],
        "cache": [
            {"namespace": ns, "hits": h, "lookups": n, "hit_ratio": h / n if n else None}
            for ns, (h, n) in sorted(agg.cache.items())
        ],
        "budget_exceeded": [
            {"stage": s, "times": sum(c.values()), "largest": dict(c.most_common())}
            for s, c in agg.exceeded.items()
        ],
    }
