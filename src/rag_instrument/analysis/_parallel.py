"""One large file read by several processes: line-aligned byte ranges, merged results.

Each process aggregates its range (streaming, as one process would) and sends back its
aggregator; the parent merges them in file order, so counts, sums, maxima, side tables and
line numbers are exactly what one process would find. Percentile samples are concatenated
while they fit the bound, and otherwise merged into one uniform sample, each part weighted
by the runs it stands for.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import random
import threading
from array import array
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING, Any

from rag_instrument.analysis._read import Source
from rag_instrument.analysis._stats import Sample

if TYPE_CHECKING:
    from rag_instrument.analysis._aggregate import Aggregator

__all__ = ["MIN_BYTES", "default_jobs", "feed_parallel", "ranges", "worth_it"]

#: Files smaller than this are read by one process (starting workers costs more).
MIN_BYTES = 32 << 20
#: Ranges never smaller than this.
_MIN_RANGE = 8 << 20


def default_jobs() -> int:
    """Processes to use by default: the CPUs this process may run on, at most 2.

    Each process holds its own interpreter (about 30 MB): two keep a run under 100 MB.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(2, cpus))


def worth_it(source: Source, jobs: int) -> bool:
    """A plain (not gzip) regular file large enough to split."""
    if jobs < 2 or source.name == "-" or source.end is not None:
        return False
    try:
        if not os.path.isfile(source.name) or os.path.getsize(source.name) < MIN_BYTES:
            return False
    except OSError:
        return False
    return not source.is_gzip()


def ranges(path: str, jobs: int) -> list[tuple[int, int]]:
    """Up to ``jobs`` byte ranges covering the file, each starting at a line start."""
    size = os.path.getsize(path)
    count = max(1, min(jobs, size // _MIN_RANGE))
    cuts = [0]
    with open(path, "rb") as handle:
        for k in range(1, count):
            handle.seek(max(cuts[-1], k * size // count - 1))
            handle.readline()  # to the start of the next line
            cut = handle.tell()
            if cut < size and cut > cuts[-1]:
                cuts.append(cut)
    cuts.append(size)
    return list(itertools.pairwise(cuts))


def feed_parallel(
    aggregator: Aggregator,
    source: Source,
    jobs: int,
    work: Callable[[dict[str, Any], Source], Aggregator],
) -> None:
    """Aggregate ``source`` with up to ``jobs`` processes into ``aggregator``.

    ``work(options, range)`` reads one range into a new aggregator (a module-level function,
    so that a worker process can be handed it).
    """
    parts = ranges(source.name, jobs)
    options = aggregator.options()
    # fork is instant and safe while this process runs a single thread; otherwise spawn.
    method = (
        "fork"
        if "fork" in multiprocessing.get_all_start_methods() and threading.active_count() == 1
        else "spawn"
    )
    context = multiprocessing.get_context(method)
    with ProcessPoolExecutor(max_workers=len(parts) - 1, mp_context=context) as pool:
        futures = [
            pool.submit(work, options, Source(source.name, start, end))
            for start, end in parts[1:]
        ]
        first = work(options, Source(source.name, parts[0][0], parts[0][1]))
        results = [first, *(f.result() for f in futures)]
    lines_before = 0
    for part in results:
        merge(aggregator, part, source.name, lines_before)
        lines_before += part.report.lines
    aggregator.report.files += 1 - len(results)  # one file, however many parts


def merge(into: Aggregator, part: Aggregator, name: str, lines_before: int) -> None:
    """Add ``part`` (a later range of the file ``name``) to ``into``."""
    report = part.report
    into.report.files += report.files
    into.report.lines += report.lines
    into.report.bad_lines += report.bad_lines
    if report.bad_lines and name not in into.report.first_bad and name in report.first_bad:
        line_no, why = report.first_bad[name]
        into.report.first_bad[name] = (lines_before + line_no, why)
    into.report.unreadable.update(report.unreadable)
    into.used += part.used
    into.kinds |= part.kinds
    for key, group in part.groups.items():
        mine = into.groups.get(key)
        if mine is None:
            into.groups[key] = group
            continue
        mine.count += group.count
        mine.errors += group.errors
        mine.cancelled += group.cancelled
        mine.total_ms.merge(group.total_ms)
        mine.max_ms = max(mine.max_ms, group.max_ms)
        mine.over += group.over
        mine.cache_hits += group.cache_hits
        mine.cache_misses += group.cache_misses
        mine.cpu_ms.merge(group.cpu_ms)
        mine.cpu_runs += group.cpu_runs
        mine.statuses.update(group.statuses)
        for kind, total in group.kinds_ms.items():
            if kind in mine.kinds_ms:
                mine.kinds_ms[kind].merge(total)
            else:
                mine.kinds_ms[kind] = total
        mine.sample = merge_samples(mine.sample, group.sample)
    into.learned_budgets.update(part.learned_budgets)
    for shape, entry in part.slow.items():
        mine_slow = into.slow.get(shape)
        if mine_slow is None:
            into.slow[shape] = entry
        else:
            mine_slow["count"] += entry["count"]
            mine_slow["total_ms"] += entry["total_ms"]
            mine_slow["worst_ms"] = max(mine_slow["worst_ms"], entry["worst_ms"])
            mine_slow["stages"] |= entry["stages"]
    for what, entry in part.n_plus_one.items():
        mine_n = into.n_plus_one.get(what)
        if mine_n is None:
            into.n_plus_one[what] = entry
        else:
            mine_n["warnings"] += entry["warnings"]
            mine_n["max_count"] = max(mine_n["max_count"], entry["max_count"])
            mine_n["stages"] |= entry["stages"]
    into.retries.update(part.retries)
    for namespace, (hits, lookups) in part.cache.items():
        counts = into.cache.setdefault(namespace, [0, 0])
        counts[0] += hits
        counts[1] += lookups
    for stage, largest in part.exceeded.items():
        into.exceeded.setdefault(stage, Counter()).update(largest)
    for trace, runs in part.nest_traces.items():
        into.nest_traces.setdefault(trace, []).extend(runs)
    for span_id, link in part.otlp_spans.items():
        into.otlp_spans.setdefault(span_id, link)
    into.otlp_runs |= part.otlp_runs
    # Request spans (--by route): ours counted in each part; the others held back to the end.
    into.otlp_own_requests |= part.otlp_own_requests
    into.otlp_foreign_counted |= part.otlp_foreign_counted
    if not into.otlp_own_requests:
        into.otlp_foreign.extend(part.otlp_foreign)
    else:
        into.otlp_foreign.clear()
    for trace, requests in part.otlp_requests.items():
        into.otlp_requests.setdefault(trace, []).extend(requests)
    into.duplicates += part.duplicates


def merge_samples(a: Sample, b: Sample) -> Sample:
    """One sample standing for the runs of both."""
    seen = a.seen + b.seen
    if seen <= a.max_values:
        a.values.extend(b.values)
        a.seen = seen
        return a
    rng = random.Random(0x5EED ^ seen)  # noqa: S311 - sampling, not security
    from_a = min(len(a.values), round(a.max_values * a.seen / seen))
    from_b = min(len(b.values), a.max_values - from_a)
    merged = Sample(a.max_values)
    merged.values = array("d", rng.sample(list(a.values), from_a))
    merged.values.extend(rng.sample(list(b.values), from_b))
    merged.seen = seen
    return merged
