"""Which stage runs inside which, the order of the rows, and the slowest requests."""

from __future__ import annotations

from bisect import bisect_right
from collections import Counter

from rag_instrument.analysis._model import PIPELINE_ORDER, TOTAL_STAGE, Waterfall

__all__ = ["Interval", "ordered", "parents_from_intervals", "waterfalls"]

#: ``(stage, start ms, end ms)``, epoch milliseconds.
Interval = tuple[str, float, float]
#: How far a run's start or end from a log line may seem outside the request's.
_SLACK_MS = 5.0
#: Runs walked back at most to find the one holding another (see ``_ByStart.holder``).
_WALK = 4096


class _ByStart:
    """One stage's runs in one trace, by start: the run holding a given span of time.

    Finding it costs a binary search and a short walk back, not a pass over every run of
    the trace: one trace may hold tens of thousands of runs (a batch ingestion job under
    one trace id), and a pass per run made reading such a log take hours.
    """

    __slots__ = ("max_end", "runs", "starts")

    def __init__(self, runs: list[tuple[Interval, int]]) -> None:
        #: (run, its place in the trace's input), by start.
        self.runs = sorted(runs, key=lambda r: r[0][1])
        self.starts = [r[0][1] for r in self.runs]
        self.max_end: list[float] = []
        highest = float("-inf")
        for run, _ in self.runs:
            highest = max(highest, run[2])
            self.max_end.append(highest)

    def holder(
        self, start_by: float, end_from: float, exclude: Interval | None = None
    ) -> tuple[Interval, int] | None:
        """The run holding a span of time: the narrowest of this stage around it, if any.

        That is, of the runs that started by ``start_by`` and ended at or after
        ``end_from``, the shortest, the first in the input among equals (as a pass over
        every run chose), with its place in the input. Walking back from the latest start,
        a run that started before ``end_from`` minus the shortest width found so far
        cannot be as short: the walk stops there (and after :data:`_WALK` runs in any case).
        """
        index = bisect_right(self.starts, start_by) - 1
        if index < 0 or self.max_end[index] < end_from:
            return None  # none of the runs started by then lasts that long
        runs = self.runs
        stop = max(-1, index - _WALK)
        best: tuple[Interval, int] | None = None
        width = float("inf")
        while index > stop and runs[index][0][1] >= end_from - width:
            found = runs[index]
            run = found[0]
            if run[2] >= end_from and run is not exclude:
                run_width = run[2] - run[1]
                if run_width < width or (
                    run_width == width and best is not None and found[1] < best[1]
                ):
                    best, width = found, run_width
            index -= 1
        return best


def _by_stage(runs: list[Interval]) -> dict[str, _ByStart]:
    grouped: dict[str, list[tuple[Interval, int]]] = {}
    for place, run in enumerate(runs):
        grouped.setdefault(run[0], []).append((run, place))
    return {stage: _ByStart(group) for stage, group in grouped.items()}


def parents_from_intervals(traces: dict[str, list[Interval]]) -> dict[str, str]:
    """Stage -> the stage it usually runs in, from the runs' times within each trace."""
    votes: dict[str, Counter[str | None]] = {}
    for runs in traces.values():
        by_stage = _by_stage(runs)
        for stage, start, end in runs:
            best: tuple[float, int, str] | None = None
            # A line's start is its timestamp minus its duration: a few tens of microseconds
            # late (the time to write the line). A stage holds another when it ended no
            # earlier and started no later, within that slack (at most half the inner
            # stage's duration, so that a short stage is never "inside" the sibling that
            # starts right after it).
            slack = max(0.05, min(0.5, (end - start) / 2))
            for other, index in by_stage.items():
                if other == stage:
                    continue
                found = index.holder(start + slack, end)
                if found is not None:
                    candidate = (found[0][2] - found[0][1], found[1], other)
                    if best is None or candidate < best:  # narrowest, then first in input
                        best = candidate
            votes.setdefault(stage, Counter())[best[2] if best else None] += 1
    parents: dict[str, str] = {}
    for stage, counter in votes.items():
        parent, n = counter.most_common(1)[0]
        if parent is not None and n * 2 > sum(counter.values()):
            parents[stage] = parent
    # A cycle (two stages each usually inside the other) is no nesting at all.
    for stage in list(parents):
        seen = {stage}
        node = parents.get(stage)
        while node is not None:
            if node in seen:
                parents.pop(stage, None)
                break
            seen.add(node)
            node = parents.get(node)
    return parents


def waterfalls(
    slowest: list[tuple[float, str, list[Interval]]], parents: dict[str, str]
) -> list[Waterfall]:
    """The slowest requests, slowest first, each stage as an offset from the request's start.

    Stages come in tree order: a stage right after the one it runs in, siblings by start.
    """
    out = []
    for total, trace, runs in sorted(slowest, reverse=True):
        total_run = max((r for r in runs if r[0] == TOTAL_STAGE), key=lambda r: r[2] - r[1])
        origin, end = total_run[1], total_run[2]
        # Another request's runs under the same trace id are left out. Times from log lines
        # are a little late (the time to write the line; more on a busy machine): a run may
        # seem to start up to a few ms before the request does.
        mine = [r for r in runs if r[1] >= origin - _SLACK_MS and r[2] <= end + _SLACK_MS]
        by_stage = _by_stage(mine)
        # By identity: the same run logged twice (a file concatenated with itself) is two
        # equal tuples, and keyed by value a run became its own child, for ever.
        children: dict[int, list[Interval]] = {}
        for run in mine:
            if run is total_run:
                continue
            parent = parents.get(run[0])
            index = by_stage.get(parent) if parent is not None else None
            found = (
                index.holder(run[1] + _SLACK_MS, run[2] - _SLACK_MS, exclude=run)
                if index is not None
                else None
            )
            holder = found[0] if found is not None else total_run
            children.setdefault(id(holder), []).append(run)
        stages: list[tuple[str, float, float, int]] = []
        pending: list[tuple[Interval, int]] = [(total_run, 0)]
        seen: set[int] = set()
        while pending:  # depth first, children in start order
            run, depth = pending.pop()
            if id(run) in seen:  # pragma: no cover - each run is listed under one holder
                continue
            seen.add(id(run))
            stages.append((run[0], max(0.0, run[1] - origin), run[2] - run[1], depth))
            kids = sorted(children.get(id(run), []), key=lambda r: r[1], reverse=True)
            pending.extend((kid, depth + 1) for kid in kids)
        out.append(Waterfall(trace_id=trace, total_ms=total, stages=stages))
    return out


def ordered(keys: list[str], parents: dict[str, str]) -> list[tuple[str, int]]:
    """Keys as a tree: pipeline order first, then by first appearance; with depths."""
    first = {key: i for i, key in enumerate(keys)}

    def rank(key: str) -> tuple[int, int]:
        if key == TOTAL_STAGE:
            return (0, 0)
        if key in PIPELINE_ORDER:
            return (1, PIPELINE_ORDER.index(key))
        return (2, first[key])

    children: dict[str | None, list[str]] = {}
    for key in keys:
        parent = parents.get(key)
        children.setdefault(parent if parent in first else None, []).append(key)
    out: list[tuple[str, int]] = []

    def walk(node: str | None, depth: int) -> None:
        for child in sorted(children.get(node, []), key=rank):
            out.append((child, depth))
            walk(child, depth + 1)

    walk(None, 0)
    return out
