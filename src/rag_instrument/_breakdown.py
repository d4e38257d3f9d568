"""What a stage's time went to: the internal recording API of every integration.

An integration (the SQLAlchemy listener, an LLM provider, a vector search) reports a unit
of work with :func:`record` or a cache outcome with :func:`record_cache`. The work is
added to the innermost open frame of the current task or thread; when a frame exits, its
totals are rolled up into its parent, so a stage's ``breakdown`` covers the work of its
nested stages too. Outside any stage, recording is a no-op.

Shape, as it appears on the stage's completion line::

    {"db": {"count": 3, "ms": 12.1}, "llm": {"count": 1, "ms": 800.2},
     "cache": {"hits": 1, "misses": 2}}
"""

from __future__ import annotations

import contextvars
import threading
from typing import Any

from rag_instrument._context import Frame, current_frame
from rag_instrument._utils import internal_error

__all__ = [
    "StageTimings",
    "detach",
    "forms",
    "largest",
    "record",
    "record_cache",
    "record_in",
    "roll_up",
    "safe_forms",
    "snapshot",
    "stage_timings",
]

# Frames are per task, but a frame's children may finish on other threads (work submitted
# through ``wrap_context``). One process-wide lock keeps their roll-ups from losing counts;
# it is uncontended in the common single-threaded case.
_lock = threading.Lock()


def _open(frame: Frame | None) -> Frame | None:
    """``frame``, or its nearest ancestor still open when it has ended.

    Work a frame started (a task it created) can outlive it: the stages still running
    waited for it.
    """
    while frame is not None and frame.ended:
        frame = frame.parent
    return frame


def record(kind: str, ms: float, count: int = 1) -> None:
    """Report ``count`` units of ``kind`` work (``db``, ``llm``, ``vector``, ``embedding``).

    Args:
        kind: the breakdown key.
        ms: wall-clock milliseconds the work took.
        count: how many operations (statements, calls) that was.
    """
    frame = current_frame()
    if frame is None:
        return
    with _lock:
        if frame.ended:
            frame = _open(frame)
            if frame is None:
                return
        bd = frame.breakdown
        if bd is None:
            bd = frame.breakdown = {}
        entry = bd.get(kind)
        if entry is None:
            bd[kind] = {"count": count, "ms": ms}
        else:
            entry["count"] += count
            entry["ms"] += ms


def record_in(frame: Frame, kind: str, ms: float, count: int = 1) -> None:
    """Like :func:`record`, into a given ``frame`` (from another thread: the loop watchdog)."""
    with _lock:
        open_frame = _open(frame)
        if open_frame is None:
            return
        bd = open_frame.breakdown
        if bd is None:
            bd = open_frame.breakdown = {}
        entry = bd.get(kind)
        if entry is None:
            bd[kind] = {"count": count, "ms": ms}
        else:
            entry["count"] += count
            entry["ms"] += ms


def record_cache(hit: bool, count: int = 1) -> None:
    """Report a cache hit (``hit=True``) or miss to the innermost open stage."""
    frame = current_frame()
    if frame is None:
        return
    with _lock:
        if frame.ended:
            frame = _open(frame)
            if frame is None:
                return
        bd = frame.breakdown
        if bd is None:
            bd = frame.breakdown = {}
        entry = bd.get("cache")
        if entry is None:
            entry = bd["cache"] = {"hits": 0, "misses": 0}
        entry["hits" if hit else "misses"] += count


def detach(frame: Frame) -> dict[str, dict[str, float]] | None:
    """Take ``frame``'s totals (once, when it exits) and add them to its parent's.

    Returns the totals, which nothing mutates any more: work reported to ``frame`` after
    this (by a job it started that outlives it) goes to its nearest ancestor still open.
    """
    frame.ended = True
    if frame.breakdown is None:
        return None  # nothing was recorded: no lock needed (the common case)
    with _lock:
        child = frame.breakdown
        frame.breakdown = None
    if child:
        roll_up(frame, child)
    return child


def snapshot(frame: Frame) -> dict[str, dict[str, float]] | None:
    """A copy of ``frame``'s totals so far (``None``: nothing recorded), taken under the lock."""
    with _lock:
        current = frame.breakdown
        return {k: dict(v) for k, v in current.items()} if current else None


def roll_up(frame: Frame, child: dict[str, dict[str, float]]) -> None:
    """Add ``child`` (``frame``'s detached totals) to ``frame``'s parent's."""
    if not child:
        return
    with _lock:
        parent = _open(frame.parent)
        if parent is None:
            return
        bd = parent.breakdown
        if bd is None:
            bd = parent.breakdown = {}
        for kind, values in child.items():
            entry = bd.get(kind)
            if entry is None:
                bd[kind] = dict(values)
            else:
                for key, amount in values.items():
                    entry[key] = entry.get(key, 0) + amount


def largest(breakdown: dict[str, dict[str, float]] | None) -> dict[str, Any] | None:
    """The timed entry that took the most milliseconds, as ``{"kind", "count", "ms"}``."""
    if not breakdown:
        return None
    best: tuple[str, dict[str, float]] | None = None
    for kind, values in breakdown.items():
        if "ms" in values and (best is None or values["ms"] > best[1]["ms"]):
            best = (kind, values)
    if best is None:
        return None
    return {"kind": best[0], "count": int(best[1]["count"]), "ms": round(best[1]["ms"], 3)}


# The attribute names made so far, by (kind, key): the same few on every stage.
_ATTRIBUTE_NAMES: dict[tuple[str, str], str] = {}


def safe_forms(
    breakdown: dict[str, dict[str, float]] | None,
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]] | None:
    """:func:`forms`, or ``None`` when there is nothing to report or it fails (never raises)."""
    if not breakdown:  # callers test first on the hot path; kept for the others
        return None
    try:
        return forms(breakdown)
    except Exception as exc:  # an amount that is not a number: the stage still ends
        internal_error("rendering a breakdown", exc)
        return None


def forms(
    breakdown: dict[str, dict[str, float]],
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Both forms of ``breakdown`` in one pass: span attributes, and the log's.

    Counts as integers, milliseconds rounded to the microsecond, in both.
    """
    attributes: dict[str, Any] = {}  # numbers, in a dict its callers may add to
    log: dict[str, dict[str, Any]] = {}
    names = _ATTRIBUTE_NAMES
    for kind, values in breakdown.items():
        entry: dict[str, Any] = {}
        for key, amount in values.items():
            value = round(amount, 3) if key == "ms" else int(amount)
            entry[key] = value
            name = names.get((kind, key))
            if name is None:
                if len(names) >= 1024:  # kinds named at run time must not grow it forever
                    names.clear()
                name = names[(kind, key)] = f"rag.breakdown.{kind}.{key}"
            attributes[name] = value
        log[kind] = entry
    return attributes, log


# --- stage timings of a web request ---------------------------------------------------------


class StageTimings:
    """Stage durations of one web request, by stage name, for its ``Server-Timing`` header.

    The request middleware puts one in :data:`stage_timings` for the request's context;
    every stage that ends inside (nested ones, work in ``wrap_context`` threads and body
    iterators included) adds its duration. Bounded: names past the 32nd are not kept.
    """

    __slots__ = ("by_name",)

    def __init__(self) -> None:
        #: stage name -> [runs, total milliseconds], in the order stages first finished.
        self.by_name: dict[str, list[float]] = {}

    def add(self, name: str, ms: float) -> None:
        """Count one run of stage ``name`` that took ``ms`` milliseconds."""
        entry = self.by_name.get(name)
        if entry is not None:
            entry[0] += 1
            entry[1] += ms
        elif len(self.by_name) < 32:
            self.by_name[name] = [1, ms]


stage_timings: contextvars.ContextVar[StageTimings | None] = contextvars.ContextVar(
    "rag_instrument.stage_timings", default=None
)
