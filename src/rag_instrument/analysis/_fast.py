"""The fast path of ``analyze --by stage``: whole chunks of lines matched at once.

Most lines of a rag_instrument log are in the library's layout (``timestamp``, ``level``,
``event``, ``logger``, ``trace_id``, ``span_id``, ``context``, then the fields): a stage's
own line (``"context":{"pipeline_stage":...},"execution_time_ms":...``, maybe ``cpu_ms``
and a ``breakdown``), an LLM call's line (``provider``, ``model``, ``cache_hit``) or a line
that names nothing the aggregation reads. One compiled regular expression recognises
those lines in a chunk of about a megabyte and hands out only the fields that count;
everything else in the chunk (the *residue*) goes through the exact path, which parses a
line in full whenever it could matter.

The expression only accepts lines whose every key and value is spelled out, so a line it
accepts means exactly what the exact path would make of it:

* the keys are the library's own, in its order, each once; a key that would change the
  result (``level``, ``status``, ``cache_hit`` on a stage line, a second ``context``,
  ``pipeline_stage`` or ``execution_time_ms``...) sends the line to the exact path;
* strings hold no escapes (a chunk with a backslash is split, and its lines with one go
  to the exact path), the chunk is ASCII (so valid UTF-8) and holds no control
  character (both checked per chunk);
* numbers follow JSON's grammar (no exponent, at most 18 integer digits, so never
  infinite) and are converted by orjson, as the exact path does; a duration cannot be
  negative, NaN or a string there;
* a ``breakdown`` is parsed by orjson, and must be one object.

Anything found wrong after matching (a breakdown that does not parse, a stage seen for
the first time, the first stage lines sampled for nesting) sends the whole chunk to the
exact path before anything is counted. Sums are order-independent
(:class:`~rag_instrument.analysis._stats.ExactSum`), so the fast and the exact path give
the same figures to the last bit.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from functools import partial
from itertools import chain, compress
from operator import is_not, methodcaller
from typing import TYPE_CHECKING, Any

import orjson

from rag_instrument.analysis._stats import ExactSum

if TYPE_CHECKING:
    from rag_instrument.analysis._aggregate import Aggregator

__all__ = ["feed_chunk"]

#: A JSON number without sign or exponent, never large enough to overflow.
_NUM = rb"(?:0|[1-9][0-9]{0,17})(?:\.[0-9]++)?"
#: A value that does not matter: an escape-free string, a number, true/false/null.
_VALUE = rb'(?:"[^"]*+"|-?' + _NUM + rb"|true|false|null)"
_SPECIAL_EVENTS = rb"(?:slow query|n\+1 query detected|retrying|budget exceeded)"
#: Other fields of a stage line: any key the aggregation does not read.
_STAGE_OTHER = (
    rb'"(?!(?:context|logger|event|level|resourceSpans|cache_hit|execution_time_ms|breakdown'
    rb'|status|cpu_ms)")[^"]*+":' + _VALUE
)
#: Other fields of any other line: any key the aggregation does not read.
_OTHER = (
    rb'"(?!(?:context|logger|event|resourceSpans|cache_namespace|provider|model|cache_hit)")'
    rb'[^"]*+":' + _VALUE
)
_CONTEXT_OTHER = rb'"(?!pipeline_stage")[^"]*+":' + _VALUE
_LINE = re.compile(
    rb'\n\{"timestamp":"[^"]*+","level":"info","event":"(?!' + _SPECIAL_EVENTS + rb'")[^"]*+",'
    # group 1: the library's own logger (its LLM lines count in the cache table)
    rb'"logger":"(?:(rag_instrument)|[^"]*+)","trace_id":"[^"]*+","span_id":"[^"]*+",'
    rb'"context":\{'
    # a stage's line: groups 2 (stage), 3 (duration), 4 (CPU time), 5 (breakdown)
    rb'(?:"pipeline_stage":"([^"]++)"(?:,' + _CONTEXT_OTHER + rb")*+\},"
    rb'"execution_time_ms":(' + _NUM + rb')(?:,"cpu_ms":(' + _NUM + rb"))?"
    rb"(?:," + _STAGE_OTHER + rb")*+"
    rb'(?:,"breakdown":(\{[^\n]*\}))?'
    # any other line: only an LLM call's cache lookup counts, groups 6 (provider),
    # 7 (model), 8 (cache hit)
    rb"|(?:" + _CONTEXT_OTHER + rb"(?:," + _CONTEXT_OTHER + rb")*+)?\}"
    rb"(?:," + _OTHER + rb')*+(?:,"provider":"([^"]*+)","model":"([^"]*+)"'
    rb"(?:," + _OTHER + rb')*+,"cache_hit":(true|false))?)'
    rb"\}(?=\n)"
)
# The groups, by number.
_OURS, _STAGE, _MS, _CPU, _BREAKDOWN, _PROVIDER, _MODEL, _HIT = range(1, 9)
_GROUPS = 8
#: One group's runs in a chunk: its key, durations, CPU times and breakdowns.
_Runs = tuple[str, list[float], list[float], list[dict[str, Any]]]
_not_none = partial(is_not, None)
_get_ms = methodcaller("get", "ms")
#: Control characters (a JSON string cannot hold them raw) and the backslash (escapes),
#: mapped out of ASCII: ``chunk.translate(_UNUSUAL).isascii()`` is one pass over a chunk.
_UNUSUAL = bytes.maketrans(
    bytes([*range(10), *range(11, 32), ord("\\")]), bytes([0x80] * 32)
)


def feed_chunk(agg: Aggregator, name: str, first: int, chunk: bytes) -> int:
    """Aggregate a chunk (a newline, then lines each ending in one); return its lines.

    ``first`` is the number of its first line.
    """
    if agg.nest_left > 0:  # the first stage lines are read whole, to sample nesting
        lines = chunk[1:-1].split(b"\n")
        agg.feed_lines(name, first, lines)
        return len(lines)
    if chunk.translate(_UNUSUAL).isascii():
        return _feed_clean(agg, name, first, chunk)
    # Lines with an escape, a control character or non-ASCII text go the exact way; the
    # runs of lines between them the fast way, in file order.
    lines = chunk[1:-1].split(b"\n")
    start = 0
    for i, line in enumerate(lines):
        if not line.translate(_UNUSUAL).isascii():
            if start < i:
                _feed_clean(agg, name, first + start, _join(lines[start:i]))
            agg.feed_lines(name, first + i, [line])
            start = i + 1
    if start < len(lines):
        _feed_clean(agg, name, first + start, _join(lines[start:]))
    return len(lines)


def _column(parts: list[Any], group: int) -> list[Any]:
    """One group's captures, one per matched line (``None`` where it took no part)."""
    return parts[group :: _GROUPS + 1]


def _join(lines: list[bytes]) -> bytes:
    return b"".join((b"\n", b"\n".join(lines), b"\n"))


def _feed_clean(agg: Aggregator, name: str, first: int, chunk: bytes) -> int:
    parts = _LINE.split(chunk)
    pieces = parts[0 :: _GROUPS + 1]
    matched = len(pieces) - 1
    runs = _stage_runs(agg, parts) if matched else None
    if runs is None:
        lines = chunk[1:-1].split(b"\n")
        agg.feed_lines(name, first, lines)
        return len(lines)
    for key, values, cpu, breakdowns in runs:
        _add_runs(agg, key, values, cpu, breakdowns)
    _add_cache(agg, parts)
    residue = b"".join(pieces)
    if residue == b"\n":
        return matched
    agg.feed_text(name, first, residue[1:-1], lambda j: _line_number(pieces, first, j))
    return matched + residue.count(b"\n") - 1


def _stage_runs(agg: Aggregator, parts: list[Any]) -> list[_Runs] | None:
    """The matched stage lines by group, or ``None`` when the chunk must go the exact way.

    Grouping and conversion run in C (``compress``, ``map``, one orjson call per group),
    not in a Python loop per line.
    """
    every_stage = _column(parts, _STAGE)
    # The stage lines only (a stage line always has a duration, other lines neither).
    stages = list(filter(None, every_stage))
    every_ms = list(filter(None, _column(parts, _MS)))
    every_cpu = list(compress(_column(parts, _CPU), every_stage))
    every_breakdown = list(compress(_column(parts, _BREAKDOWN), every_stage))
    if len(every_ms) != len(stages):  # pragma: no cover - the expression makes it so
        return None
    out: list[_Runs] = []
    for stage in set(stages):
        key = stage.decode("ascii")
        if key not in agg.groups:  # a new group: created in file order by the exact path
            return None
        mine = list(map(stage.__eq__, stages))
        try:
            values = orjson.loads(b"[" + b",".join(compress(every_ms, mine)) + b"]")
        except orjson.JSONDecodeError:  # a number orjson will not read: the exact path says
            return None
        cpu_texts = list(filter(None, compress(every_cpu, mine)))
        cpu: list[float] = []
        if cpu_texts:
            try:
                cpu = orjson.loads(b"[" + b",".join(cpu_texts) + b"]")
            except orjson.JSONDecodeError:
                return None
        objects = list(filter(None, compress(every_breakdown, mine)))
        breakdowns: list[dict[str, Any]] = []
        if objects:
            try:
                breakdowns = orjson.loads(b"[" + b",".join(objects) + b"]")
            except orjson.JSONDecodeError:
                return None
            # Each must be one object: ``{...},"k":v`` would have made several, or failed.
            if len(breakdowns) != len(objects) or not set(map(type, breakdowns)) <= {dict}:
                return None
        out.append((key, values, cpu, breakdowns))
    return out


def _add_runs(
    agg: Aggregator,
    key: str,
    values: list[float],
    cpu: list[float],
    breakdowns: list[dict[str, Any]],
) -> None:
    """Count runs as :meth:`Aggregator.run` would, one group and a chunk at a time."""
    group = agg.groups[key]
    count = len(values)
    agg.used += count
    agg.kinds.add("log")
    group.count += count
    group.total_ms.extend(values)
    group.max_ms = max(group.max_ms, float(max(values)))
    budget = agg.budgets.get(key)
    if budget is not None:
        group.over += sum(1 for ms in values if ms > budget)
    sample = group.sample
    if sample.max_values - sample.seen >= count:
        sample.values.extend(map(float, values))
        sample.seen += count
    else:
        for ms in values:
            sample.add(float(ms))
    if cpu:
        group.cpu_ms.extend(cpu)
        group.cpu_runs += len(cpu)
    if breakdowns:
        _add_breakdowns(agg, group, breakdowns)


def _add_breakdowns(agg: Aggregator, group: Any, breakdowns: list[dict[str, Any]]) -> None:
    """Add breakdowns as :meth:`Aggregator.breakdown` would, a kind at a time."""
    plan: list[tuple[str, list[float]]] = []
    for kind in set(chain.from_iterable(breakdowns)):
        entries = list(filter(_not_none, map(methodcaller("get", kind), breakdowns)))
        if kind == "cache" or not set(map(type, entries)) <= {dict}:
            plan = []
            break  # unusual: one breakdown at a time, below
        found = list(filter(_not_none, map(_get_ms, entries)))
        if found and not (
            set(map(type, found)) <= {int, float} and min(found) >= 0 and max(found) < math.inf
        ):
            plan = []
            break
        if found:
            plan.append((kind, found))
    else:
        for kind, found in plan:
            total = group.kinds_ms.get(kind)
            if total is None:
                total = group.kinds_ms[kind] = ExactSum()
            total.extend(found)
        return
    for breakdown in breakdowns:
        agg.breakdown(group, breakdown)


def _add_cache(agg: Aggregator, parts: list[Any]) -> None:
    """The LLM lines' cache lookups, as ``record_side`` counts them (our logger's only)."""
    hits = _column(parts, _HIT)
    answers = Counter(hits)
    lookups = answers[b"true"] + answers[b"false"]
    if not lookups:
        return
    owners = set(compress(_column(parts, _OURS), hits))
    providers = set(compress(_column(parts, _PROVIDER), hits))
    models = set(compress(_column(parts, _MODEL), hits))
    if owners == {b"rag_instrument"} and len(providers) == 1 and len(models) == 1:
        # The usual chunk: one provider and model.
        every = Counter({(b"rag_instrument", *providers, *models, b"true"): answers[b"true"]})
        every[(b"rag_instrument", *providers, *models, b"false")] = answers[b"false"]
    else:
        every = Counter(
            zip(
                _column(parts, _OURS),
                _column(parts, _PROVIDER),
                _column(parts, _MODEL),
                hits,
                strict=True,
            )
        )
    for (ours, provider, model, hit), n in every.items():
        if ours is None or hit is None or not n:
            continue
        namespace = f"{provider.decode('ascii') or '?'}/{model.decode('ascii') or '?'}"
        counts = agg.cache.get(namespace)
        if counts is None:
            counts = agg.cache[namespace] = [0, 0]
        if hit == b"true":
            counts[0] += n
        counts[1] += n


def _line_number(pieces: list[bytes], first: int, j: int) -> int:
    """The number of the ``j``-th residue line: the matched lines before it counted in."""
    before = 0  # residue lines before the current piece
    for i, piece in enumerate(pieces):
        here = piece.count(b"\n")
        if i == len(pieces) - 1:
            here -= 1  # the chunk's final newline
        if j < before + here:
            return first + i + j
        before += here
    return first + len(pieces) - 1 + j  # pragma: no cover - j is always in range

