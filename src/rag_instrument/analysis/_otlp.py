"""Stage runs from OTLP JSON: the OpenTelemetry Collector ``file`` exporter's lines.

Each line is one ``ExportTraceServiceRequest`` in the protobuf JSON mapping: ids in hex,
64-bit integers (the ``...UnixNano`` times) as strings, attribute values as
``{"stringValue": ...}`` / ``{"intValue": "..."}`` / ``{"doubleValue": ...}``. A stage span is
one with a ``rag.stage`` attribute; its breakdown is in ``rag.breakdown.<kind>.<ms|count>``
(and ``rag.breakdown.cache.hits``/``misses``), a blown budget in ``rag.budget.ms``.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rag_instrument.analysis._aggregate import Aggregator

__all__ = ["feed", "parents", "settle_routes"]

#: Spans remembered (id -> parent, stage) to nest stages; beyond it, new ones are not.
_MAX_SPANS = 500_000
_ERROR_CODES = (2, "STATUS_CODE_ERROR")
_BREAKDOWN = "rag.breakdown."
#: The instrumentation scope of rag_instrument's spans.
_OUR_SCOPE = "rag_instrument"


def _value(value: Any) -> Any:
    if type(value) is not dict:
        return None
    for kind in ("stringValue", "doubleValue", "boolValue"):
        if kind in value:
            return value[kind]
    if "intValue" in value:
        try:
            return int(value["intValue"])
        except (TypeError, ValueError):
            return None
    return None


def _attributes(items: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if type(items) is list:
        for item in items:
            if type(item) is dict and type(item.get("key")) is str:
                out[item["key"]] = _value(item.get("value"))
    return out


def _spans(record: dict[str, Any]) -> Any:
    """``(instrumentation scope name, span)`` of every span of the request."""
    for resource_spans in record.get("resourceSpans") or ():
        if type(resource_spans) is not dict:
            continue
        scopes = resource_spans.get("scopeSpans") or resource_spans.get(
            "instrumentationLibrarySpans"
        )
        for scope in scopes or ():
            if type(scope) is dict:
                info = scope.get("scope") or scope.get("instrumentationLibrary")
                name = info.get("name") if type(info) is dict else None
                name = name if type(name) is str else ""
                yield from ((name, s) for s in scope.get("spans") or () if type(s) is dict)


#: A request span: key, ms, line, end (s), span id, trace id, start and end (ns).
_Request = tuple[str, float, dict[str, Any], float, Any, Any, int, int]
#: Other instrumentations' request spans held back before they are counted now.
_MAX_FOREIGN = 200_000
#: A trace's latest requests compared with a new request span (see ``_same_request``).
_RECENT = 64


def _count_request(agg: Aggregator, request: _Request) -> bool:
    """Count one request span, unless a span of the same request was counted."""
    key, ms, line, end_s, span_id, trace_id, start, end = request
    if type(trace_id) is str and _same_request(agg, trace_id, key, start, end):
        if type(span_id) is str:  # its log line, if read too, is this request's
            agg.otlp_runs.add(span_id.lower())
        return False
    agg.run(key, ms, line, end_s)
    return True


def settle_routes(agg: Aggregator) -> None:
    """Count the other instrumentations' request spans held back, if they are the only ones.

    Called at the end of the input (and when too many are held back); from then on they
    are counted as they come.
    """
    held, agg.otlp_foreign = agg.otlp_foreign, []
    if agg.otlp_own_requests:
        return  # rag_instrument's own request spans stand for these requests
    agg.otlp_foreign_counted = True
    for request in held:
        _count_request(agg, request)


def _same_request(agg: Aggregator, trace_id: str, key: str, start: int, end: int) -> bool:
    """Whether a request of ``key`` that holds this span, or that it holds, was counted.

    Two instrumentations of one request (FastAPI's or the OpenTelemetry ASGI middleware's
    server span, and rag_instrument's request span inside it) both carry ``http.route``:
    one request, counted once. Their spans are exported together, so only the trace's last
    requests are compared (a trace may hold many: a client that sends one traceparent).
    """
    requests = agg.otlp_requests.get(trace_id)
    if requests is None:
        if len(agg.otlp_requests) >= _MAX_SPANS:
            agg.otlp_requests.clear()
        requests = agg.otlp_requests[trace_id] = []
    for other, o_start, o_end in requests[-_RECENT:]:
        if other == key and (
            (o_start <= start and end <= o_end) or (start <= o_start and o_end <= end)
        ):
            return True
    requests.append((key, start, end))
    return False


def feed(agg: Aggregator, record: dict[str, Any]) -> str | None:
    """Aggregate the spans of one request line; return what was wrong, if anything."""
    if type(record.get("resourceSpans")) is not list:
        return "resourceSpans is not a list"
    problem: str | None = None
    for scope_name, span in _spans(record):
        try:
            start = int(span["startTimeUnixNano"])
            end = int(span["endTimeUnixNano"])
        except (KeyError, TypeError, ValueError):
            problem = "a span without start/end times"
            continue
        if end < start:
            problem = "a span that ends before it starts"
            continue
        end_s = end / 1e9
        if (agg.since is not None and end_s < agg.since) or (
            agg.until is not None and end_s >= agg.until
        ):
            continue
        attributes = _attributes(span.get("attributes"))
        stage = attributes.get("rag.stage")
        span_id, trace_id = span.get("spanId"), span.get("traceId")
        if type(span_id) is str and len(agg.otlp_spans) < _MAX_SPANS:
            parent = span.get("parentSpanId") or None
            agg.otlp_spans[span_id] = (
                parent if type(parent) is str else None,
                stage if type(stage) is str else None,
            )
        key = _key(agg.by, span, attributes, stage, scope_name)
        if key is None:
            continue
        ms = (end - start) / 1e6
        line = _as_line(span, attributes, ms)
        if agg.by == "route":
            request = (key, ms, line, end_s, span_id, trace_id, start, end)
            if scope_name != _OUR_SCOPE:
                # Another instrumentation's server span: counted at the end, and only if
                # the input holds none of rag_instrument's request spans (which count
                # once per request, whatever instrumented it besides, in any order).
                if agg.otlp_foreign_counted:
                    _count_request(agg, request)
                elif not agg.otlp_own_requests:
                    agg.otlp_foreign.append(request)
                    if len(agg.otlp_foreign) >= _MAX_FOREIGN:
                        settle_routes(agg)  # memory stays bounded: these count from now
                continue
            if agg.otlp_foreign_counted:
                # Requests are counted from the other instrumentation's spans already (more
                # of them came first than are held back): each request once, from those.
                if type(span_id) is str:
                    agg.otlp_runs.add(span_id.lower())
                continue
            agg.otlp_own_requests = True
            agg.otlp_foreign.clear()  # ours stand for the requests: theirs are not needed
            if not _count_request(agg, request):
                continue
            if type(span_id) is str:
                agg.otlp_runs.add(span_id.lower())
            _learn_budget(agg, key, attributes, line)  # a route budget, as a stage's
            continue
        agg.run(key, ms, line, end_s)
        if type(span_id) is str:
            agg.otlp_runs.add(span_id.lower())
        if agg.by == "stage" and type(trace_id) is str:
            agg.interval(trace_id, key, start / 1e6, end / 1e6)
        _learn_budget(agg, key, attributes, line)
    return problem


def _learn_budget(
    agg: Aggregator, key: str, attributes: dict[str, Any], line: dict[str, Any]
) -> None:
    """Take the budget a span says it exceeded (``rag.budget.*``) as ``key``'s."""
    budget = attributes.get("rag.budget.ms")
    if attributes.get("rag.budget.exceeded") is True and isinstance(budget, int | float):
        agg.learned_budgets[key] = float(budget)
        agg.exceeded.setdefault(key, Counter())[_largest(line.get("breakdown"))] += 1


def _key(
    by: str, span: dict[str, Any], attributes: dict[str, Any], stage: Any, scope: str
) -> str | None:
    if by == "stage":
        return stage if type(stage) is str and stage else None
    if by == "event":
        name = span.get("name")
        return name if type(name) is str else None
    route = attributes.get("http.route")
    method = attributes.get("http.request.method")
    if type(route) is not str:
        # rag_instrument's request span of a request no route matched (a 404): listed as
        # its "request completed" line lists it.
        if scope == _OUR_SCOPE and type(method) is str and stage is None:
            return f"{method} (no route)"
        return None
    return f"{method or '?'} {route}"


def _as_line(span: dict[str, Any], attributes: dict[str, Any], ms: float) -> dict[str, Any]:
    """The span as the fields of a stage's log line (what the aggregation reads)."""
    status = span.get("status")
    code = status.get("code") if type(status) is dict else None
    line: dict[str, Any] = {"execution_time_ms": ms}
    if code in _ERROR_CODES:
        line["level"] = "error"
    elif attributes.get("rag.cancelled") is True:
        line["level"], line["error_type"] = "warning", "cancelled"
    cpu = attributes.get("rag.cpu_ms")
    if cpu is not None:
        line["cpu_ms"] = cpu
    http_status = attributes.get("http.response.status_code")
    if type(http_status) is int:
        line["status"] = http_status
    breakdown: dict[str, dict[str, Any]] = {}
    for name, value in attributes.items():
        if name.startswith(_BREAKDOWN):
            kind, _, field = name[len(_BREAKDOWN) :].rpartition(".")
            if kind:
                breakdown.setdefault(kind, {})[field] = value
    if breakdown:
        line["breakdown"] = breakdown
    return line


def _largest(breakdown: Any) -> str:
    if type(breakdown) is not dict:
        return "-"
    timed = [
        (ms, kind)
        for kind, entry in breakdown.items()
        if kind != "cache"
        and type(entry) is dict
        and type(ms := entry.get("ms", 0)) in (int, float)
        and not math.isnan(ms)
    ]
    return max(timed)[1] if timed else "-"


def parents(spans: dict[str, tuple[str | None, str | None]]) -> dict[str, str]:
    """Stage -> the stage it usually runs in, walking up through non-stage spans."""
    votes: dict[str, Counter[str | None]] = {}
    for parent_id, stage in spans.values():
        if stage is None:
            continue
        found: str | None = None
        node, hops = parent_id, 0
        while node is not None and hops < 64:
            entry = spans.get(node)
            if entry is None:
                break
            if entry[1] is not None:
                found = entry[1]
                break
            node, hops = entry[0], hops + 1
        votes.setdefault(stage, Counter())[found] += 1
    out: dict[str, str] = {}
    for stage, counter in votes.items():
        parent, n = counter.most_common(1)[0]
        if parent is not None and parent != stage and n * 2 > sum(counter.values()):
            out[stage] = parent
    return out
