"""Index-tuning sweeps: latency and recall@k for each value of a search parameter.

The machinery behind :func:`rag_instrument.sweep` and :func:`rag_instrument.format_table`
(re-exported by :mod:`rag_instrument.vector`). It imports nothing from the library: a sweep
only times calls and compares ids.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "SweepRow",
    "best",
    "format_table",
    "hit_id",
    "percentile",
    "recall_at_k",
    "sweep",
]


def _check_positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class SweepRow:
    """One value of a :func:`sweep`: its latency, throughput and recall.

    Attributes:
        param: the parameter swept (``"nprobe"``).
        value: its value for this row.
        p50_ms: median search latency, milliseconds.
        p95_ms: 95th percentile search latency, milliseconds.
        qps: queries per second, searching one query after the other.
        recall: mean recall@k over the queries, from 0 to 1.
        k: the ``k`` of recall@k.
        queries: how many queries were timed.
    """

    param: str
    value: Any
    p50_ms: float
    p95_ms: float
    qps: float
    recall: float
    k: int
    queries: int

    def as_dict(self) -> dict[str, Any]:
        """The row as a plain dict (for JSON)."""
        return {
            "param": self.param,
            "value": self.value,
            "p50_ms": self.p50_ms,
            "p95_ms": self.p95_ms,
            "qps": self.qps,
            "recall": self.recall,
            "k": self.k,
            "queries": self.queries,
        }


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation, as NumPy's default does."""
    if not sorted_values:
        return math.nan
    position = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    fraction = position - low
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * fraction


def hit_id(hit: Any) -> Any:
    """The id of one search hit: the hit itself, ``hit["id"]``, ``hit.id`` or ``hit[0]``."""
    if isinstance(hit, str | int | bytes):
        return hit
    if isinstance(hit, Mapping):
        for key in ("id", "pk", "_id"):
            if key in hit:
                return hit[key]
        raise ValueError(f"sweep: cannot find an id in a hit with keys {sorted(hit)[:8]}")
    found = getattr(hit, "id", None)
    if found is not None:
        return found
    if isinstance(hit, tuple | list) and hit:
        return hit[0]
    item = getattr(hit, "item", None)  # a NumPy scalar
    if callable(item):
        return item()
    raise ValueError(f"sweep: cannot find an id in a hit of type {type(hit).__name__}")


def _ids(hits: Any, k: int) -> list[Any]:
    # A batch-shaped answer to a single query ([[hit, ...]]) is unwrapped.
    if isinstance(hits, list) and len(hits) == 1 and isinstance(hits[0], list):
        hits = hits[0]
    return [hit_id(h) for h in list(hits)[:k]]


def recall_at_k(found: Sequence[Any], exact: Sequence[Any], k: int) -> float:
    """``|found[:k] ∩ exact[:k]| / |exact[:k]|`` (1.0 when there is nothing to find)."""
    truth = set(list(exact)[:k])
    if not truth:
        return 1.0
    return len(truth & set(list(found)[:k])) / len(truth)


def sweep(
    search: Callable[..., Any],
    param: str,
    values: Iterable[Any],
    queries: Sequence[Any],
    *,
    ground_truth: Sequence[Sequence[Any]] | Callable[[Any], Sequence[Any]],
    k: int = 10,
    warmup: int = 1,
) -> list[SweepRow]:
    """Time ``search(query, **{param: value})`` for each value and measure its recall@k.

    Answers "which ``nprobe`` / ``ef`` reaches recall 0.95 at the lowest latency?". For each
    value, every query is searched once, one after the other (after ``warmup`` untimed
    searches), giving p50 and p95 latency, queries per second and the mean recall@k
    against ``ground_truth``.

    Args:
        search: ``search(query, **{param: value})`` returning hits best first: ids, dicts
            with an ``"id"``, objects with ``.id``, or ``(id, score)`` tuples.
        param: the keyword argument to vary (``"nprobe"``, ``"ef"``, ``"probes"``).
        values: the values to try, in order.
        queries: the query vectors (or texts).
        ground_truth: the exact ids (or hits, read as ``search``'s are) for each query (a list,
            in the order of ``queries``),
            or a callable giving them for a query (e.g. a FLAT / exact search), called once
            per query before any timing.
        k: the ``k`` of recall@k (only the first ``k`` hits of each side count).
        warmup: untimed searches per value before timing (loads caches, segments).

    Returns:
        One :class:`SweepRow` per value, in the order of ``values``.

    Raises:
        ValueError: ``search`` is not callable; empty ``param``, ``values`` or ``queries``;
            a non-positive ``k``; a negative ``warmup``; a ``ground_truth`` that is neither
            a function nor a list of id lists, or whose length differs from ``queries``.
        TypeError: ``search`` returned an awaitable, or something that is not a list.
    """
    if not callable(search):
        raise ValueError(f"sweep: search must be a function of a query, got {search!r:.80}")  # noqa: TRY004
    if not isinstance(param, str) or not param:
        raise ValueError(f"sweep: param must be a non-empty string, got {param!r}")
    values = list(values)
    if not values:
        raise ValueError("sweep: values must not be empty")
    queries = list(queries)
    if not queries:
        raise ValueError("sweep: queries must not be empty")
    k = _check_positive("sweep: k", k)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"sweep: warmup must be a non-negative integer, got {warmup!r}")
    if callable(ground_truth):
        truth = [_ids(ground_truth(q), k) for q in queries]
    else:
        accepted = "a list of id lists (one per query) or a function of a query"
        if isinstance(ground_truth, str | bytes) or not hasattr(ground_truth, "__iter__"):
            raise ValueError(f"sweep: ground_truth must be {accepted}, got {ground_truth!r:.80}")
        entries = list(ground_truth)
        if any(isinstance(ids, str | bytes) or not hasattr(ids, "__iter__") for ids in entries):
            raise ValueError(
                f"sweep: ground_truth must be {accepted}; an entry is not a list of ids"
            )
        truth = [_ids(ids, k) for ids in entries]  # ids, or hits as search gives them
        if len(truth) != len(queries):
            raise ValueError(
                f"sweep: ground_truth has {len(truth)} entries for {len(queries)} queries"
            )
    rows: list[SweepRow] = []
    for value in values:
        kwargs = {param: value}
        for query in queries[: min(warmup, len(queries))]:
            search(query, **kwargs)
        latencies: list[float] = []
        recalls: list[float] = []
        for query, exact in zip(queries, truth, strict=True):
            started = time.perf_counter()
            hits = search(query, **kwargs)
            latencies.append(time.perf_counter() - started)
            if inspect.isawaitable(hits):
                raise TypeError("sweep: search returned an awaitable; pass a synchronous search")
            if hits is None or isinstance(hits, str | bytes) or not hasattr(hits, "__iter__"):
                raise TypeError(
                    f"sweep: search must return the ids (or hits) it found, got {hits!r:.80}"
                )
            recalls.append(recall_at_k(_ids(hits, k), exact, k))
        total = sum(latencies)
        latencies.sort()
        rows.append(
            SweepRow(
                param=param,
                value=value,
                p50_ms=percentile(latencies, 50) * 1000.0,
                p95_ms=percentile(latencies, 95) * 1000.0,
                qps=len(queries) / total if total > 0 else math.inf,
                recall=sum(recalls) / len(recalls),
                k=k,
                queries=len(queries),
            )
        )
    return rows


def best(rows: Sequence[SweepRow], target_recall: float = 0.95) -> SweepRow | None:
    """The row with the lowest p50 latency among those reaching ``target_recall``."""
    reaching = [row for row in rows if row.recall >= target_recall]
    return min(reaching, key=lambda row: row.p50_ms) if reaching else None


def format_table(
    rows: Sequence[SweepRow | Mapping[str, Any]], *, target_recall: float | None = 0.95
) -> str:
    """Render sweep rows as an aligned table for a terminal.

    Args:
        rows: :class:`SweepRow` objects (or their ``as_dict()`` form).
        target_recall: name the fastest value reaching this recall under the table
            (``None``: no such line).
    """
    if target_recall is not None and (
        isinstance(target_recall, bool)
        or not isinstance(target_recall, int | float)
        or not 0.0 < target_recall <= 1.0
    ):
        raise ValueError(
            f"format_table: target_recall must be above 0 and at most 1, or None, "
            f"got {target_recall!r}"
        )
    typed = [row if isinstance(row, SweepRow) else SweepRow(**dict(row)) for row in rows]
    if not typed:
        return "(no rows)"
    param, k = typed[0].param, typed[0].k
    header = [param, "p50 ms", "p95 ms", "qps", f"recall@{k}"]
    body = [
        [str(r.value), f"{r.p50_ms:.3f}", f"{r.p95_ms:.3f}", f"{r.qps:.1f}", f"{r.recall:.3f}"]
        for r in typed
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def render(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    lines = [render(header), "  ".join("-" * w for w in widths), *map(render, body)]
    if target_recall is not None:
        found = best(typed, target_recall)
        if found is None:
            lines.append(f"no {param} value reaches recall@{k} >= {target_recall:g}")
        else:
            lines.append(
                f"fastest {param} reaching recall@{k} >= {target_recall:g}: {found.value} "
                f"(p50 {found.p50_ms:.3f} ms)"
            )
    return "\n".join(lines)
