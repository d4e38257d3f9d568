"""What leaves the process: export requests capped by size, and metrics a collector refuses.

A private part of :mod:`rag_instrument.exporters` (only it imports this module). Batch
processors group spans by count; with content capture on, 1,024 spans of 4,000-character
prompts make one request of more than 4 MB, which a collector rejects whole (gRPC's 4 MiB
default): :func:`by_size` splits a batch by its estimated size. A traces-only backend
answers 405 on ``/v1/metrics`` every 30 seconds: :class:`RefusableMetricExporter` says so
once and stops asking.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final

import orjson
from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult
from opentelemetry.sdk.trace import Event, ReadableSpan

from rag_instrument._sanitize import redact_text
from rag_instrument._utils import warn_once

__all__ = [
    "MAX_EXPORT_BYTES",
    "REFUSING_STATUSES",
    "RefusableMetricExporter",
    "by_size",
    "estimated_bytes",
    "install_refusal_filter",
    "within_size",
]


#: The largest export request rag_instrument sends, estimated before encoding: well under
#: the 4 MiB that gRPC collectors accept by default (and the 4.6 MB one batch of spans with
#: captured content reached), leaving room for the encoding's own overhead.
MAX_EXPORT_BYTES: Final = 3 * 1024 * 1024
_SPAN_OVERHEAD: Final = 160  # ids, times, kind, status, scope: bytes per span, generously
_json: Final = orjson.dumps


def _value_bytes(value: Any) -> int:
    """A value's share: its characters (twice, for non-ASCII text), 10 for a number.

    Bytes count as themselves; arrays and maps (which the OTLP encoder also writes) as
    their elements, each framed.
    """
    if isinstance(value, str):
        return len(value) * 2 if not value.isascii() else len(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return len(value) + 4
    if isinstance(value, tuple | list):
        size = 0
        for item in value:
            size += _value_bytes(item) + 4
        return size
    if isinstance(value, dict):
        size = 0
        for key, item in value.items():
            size += _value_bytes(key) + _value_bytes(item) + 8
        return size
    return 10


def _attributes_bytes(attributes: Any) -> int:
    """Each attribute's key, value and framing: at least the bytes OTLP carries for them.

    Their JSON text (UTF-8, as OTLP's strings are; quotes, separators and escapes only add
    to it) plus 14 bytes per attribute (and 12 per array element): one C call, where the
    loop below takes a dozen steps per attribute on the export thread, for every span.
    The loop (each key, value and 8 bytes; non-ASCII text counted twice) is for what JSON
    cannot hold (an integer beyond 64 bits, bytes).
    """
    plain = getattr(attributes, "_dict", attributes)
    if not plain:
        return 0
    try:
        text = _json(plain)
    except Exception:
        pass
    else:
        size = len(text) + 14 * len(plain)
        if b"[" in text:  # arrays (rare): OTLP frames their elements one by one
            for value in plain.values():
                if type(value) is tuple or type(value) is list:
                    size += 12 * len(value) + 12  # a number JSON writes as "0,": 13 in OTLP
        return size
    size = 0
    for key, value in plain.items():
        kind = type(value)
        if kind is str:
            size += len(key) + 8 + (len(value) if value.isascii() else 2 * len(value))
        elif kind is int or kind is float or kind is bool:
            size += len(key) + 18
        else:
            size += len(key) + 8 + _value_bytes(value)
    return size


def estimated_bytes(span: ReadableSpan) -> int:
    """About how many bytes ``span`` takes in an OTLP request (an upper estimate)."""
    size = _SPAN_OVERHEAD + len(span.name) + _attributes_bytes(span._attributes)
    for event in span._events:
        size += 32 + len(event.name) + _attributes_bytes(event.attributes)
    for link in span._links:
        size += 48 + _attributes_bytes(link.attributes)
    description = span._status.description
    return size + (len(description) if description else 0)


def by_size(spans: Sequence[ReadableSpan], limit: int) -> Iterator[Sequence[ReadableSpan]]:
    """``spans`` in consecutive chunks of at most ``limit`` estimated bytes (one at least)."""
    start, total = 0, 0
    for index, span in enumerate(spans):
        size = estimated_bytes(span)
        if total + size > limit and index > start:
            yield spans[start:index]
            start, total = index, 0
        total += size
    if start < len(spans):
        yield spans[start:] if start else spans


def within_size(span: ReadableSpan, limit: int) -> ReadableSpan:
    """``span`` itself when its estimate is within ``limit`` bytes; else a copy cut to fit.

    One span can outgrow any request on its own (a dozen attributes of 200 retrieved
    chunks each): a collector rejects such a request whole, and with it the span. Its
    largest attribute values (then its events') are replaced, largest first, by a note of
    what was cut, until the estimate fits; a warning (rate-limited) names them.
    """
    if estimated_bytes(span) <= limit:
        return span
    attributes = dict(getattr(span._attributes, "_dict", span._attributes) or {})
    events = list(span._events)
    budget = int(limit * 0.9)
    cut: list[str] = []
    # Each attribute sized as the span's estimate sizes it (JSON text, framing), so that
    # taking it out takes out what it counted there.
    sized = sorted(
        ((_attributes_bytes({key: value}), key) for key, value in attributes.items()),
        reverse=True,
    )
    current = estimated_bytes(span)
    for size, key in sized:
        if current <= budget:
            break
        note = f"[cut: {size} bytes, more than an export request holds]"
        attributes[key] = note
        current -= size - _attributes_bytes({key: note})
        cut.append(key)
    if current > budget:
        events = [
            Event(event.name, {"rag.cut": "attributes over the export size limit"},
                  event.timestamp)
            for event in events
        ]
        cut.append("(event attributes)")
    warn_once.warning(
        f"rag_instrument: span {redact_text(span.name)!r} was too big to export "
        f"({estimated_bytes(span)} bytes); its largest values were cut: "
        f"{', '.join(cut[:10])}{' ...' if len(cut) > 10 else ''}"
    )
    return _copy(span, attributes, events)


def _copy(span: ReadableSpan, attributes: dict[str, Any], events: list[Event]) -> ReadableSpan:
    return ReadableSpan(
        name=span.name,
        context=span.get_span_context(),
        parent=span.parent,
        resource=span.resource,
        attributes=attributes,
        events=events,
        links=span._links,
        kind=span.kind,
        status=span.status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


#: HTTP statuses that mean "this collector does not take metrics at all" (a traces-only
#: backend): retrying every 30 s only repeats the error.
REFUSING_STATUSES: Final = frozenset({404, 405, 415, 501})


class _Refusals(logging.Filter):
    """Drops the SDK's metric export error for a collector that refuses metrics for good.

    Our own warning says it once instead ("Failed to export metrics batch code: 405").
    """

    def __init__(self) -> None:
        super().__init__()
        self.statuses: set[int] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep the record unless it is the export error for a refusing collector."""
        if not self.statuses:
            return True
        try:
            message = record.getMessage()
        except Exception:
            return True
        return not any(f"code: {status}" in message for status in self.statuses)


_REFUSALS = _Refusals()


class RefusableMetricExporter(MetricExporter):
    """An OTLP metric exporter that stops when the collector refuses metrics for good.

    A traces-only backend answers ``405 Method Not Allowed`` (or 404) on ``/v1/metrics``:
    say so once, as a warning naming the setting to change, and send no more metrics
    there, instead of an export error every 30 seconds. Statuses are read from a
    ``requests`` session hook, the exporter's documented ``session`` argument.
    """

    def __init__(self, make: Callable[..., Any], url: str, *, timeout_s: float) -> None:
        self.url = url
        self.stopped = False
        self._status: int | None = None
        session: Any = None
        try:
            import requests

            session = requests.Session()
            session.hooks["response"].append(self._record)
        except ImportError:  # pragma: no cover - requests comes with the OTLP exporter
            session = None
        kwargs: dict[str, Any] = {"endpoint": url, "timeout": timeout_s}
        if session is not None:
            kwargs["session"] = session
        self.inner = make(**kwargs)
        super().__init__(
            preferred_temporality=getattr(self.inner, "_preferred_temporality", None),
            preferred_aggregation=getattr(self.inner, "_preferred_aggregation", None),
        )

    def _record(self, response: Any, *args: Any, **kwargs: Any) -> None:
        status = getattr(response, "status_code", None)
        self._status = status if isinstance(status, int) else None
        if self._status in REFUSING_STATUSES:
            _REFUSALS.statuses.add(self._status)  # the SDK's error line for it is dropped

    def export(
        self, metrics_data: Any, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        """Export, unless the collector refused metrics before (then drop them)."""
        if self.stopped:
            return MetricExportResult.SUCCESS
        self._status = None
        result: MetricExportResult = self.inner.export(metrics_data, timeout_millis=timeout_millis)
        status = self.last_status()
        if result is not MetricExportResult.SUCCESS and status in REFUSING_STATUSES:
            self.stopped = True
            warn_once.warning(
                f"rag_instrument: the collector at {redact_text(self.url)} does not accept "
                f"metrics (HTTP {status}); no more metrics are sent there. Set "
                "metrics_exporter='none' (RAG_INSTRUMENT_METRICS_EXPORTER=none) for a "
                "traces-only backend, or point metrics elsewhere."
            )
            return MetricExportResult.SUCCESS
        return result

    def last_status(self) -> int | None:
        """The HTTP status of the last response (``None`` when there was none)."""
        return self._status

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        """Flush the wrapped exporter."""
        return bool(self.inner.force_flush(timeout_millis))

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        """Shut the wrapped exporter down."""
        self.inner.shutdown(timeout_millis=timeout_millis)


_FILTER_INSTALLED: list[bool] = [False]


def install_refusal_filter() -> None:
    """Drop the SDK's own error line for a refusing collector (our warning says it)."""
    if _FILTER_INSTALLED[0]:
        return
    logging.getLogger("opentelemetry.exporter.otlp.proto.http.metric_exporter").addFilter(_REFUSALS)
    _FILTER_INSTALLED[0] = True
