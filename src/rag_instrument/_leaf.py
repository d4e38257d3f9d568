"""Leaf spans (built once, when they end) and the marks of spans sanitised at the source.

Part of the exporters module (:mod:`rag_instrument.exporters` re-exports it, and only it
and the configuration modules may import this one): the rest of the library reaches it
through the runtime's ``start_leaf_span`` / ``mark_if_clean``.
"""

from __future__ import annotations

import time
from typing import Any, Final

from opentelemetry import trace as trace_api
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor

__all__ = ["LeafSpan", "mark_if_clean", "mark_sanitized", "start_leaf_span", "take_sanitized"]


# --- spans sanitised at the source -----------------------------------------------------------

# Span ids of spans whose every attribute and event the library sanitised as it set them
# (statement leaf spans, stage spans nobody else touched): export skips redacting them.
# The rest of the library marks spans through the runtime (``Runtime.mark_if_clean``).
_SANITIZED: set[int] = set()
_SANITIZED_MAX: Final = 200_000


def mark_sanitized(span_id: int) -> None:
    """Tell the exporters that the span ``span_id`` needs no export-time redaction."""
    if len(_SANITIZED) >= _SANITIZED_MAX:  # spans dropped before export leave ids behind
        _SANITIZED.clear()
    _SANITIZED.add(span_id)


def take_sanitized(span_id: int) -> bool:
    """Whether ``span_id`` was marked (forgetting the mark: each span is exported once)."""
    if span_id in _SANITIZED:
        _SANITIZED.discard(span_id)
        return True
    return False


def mark_if_clean(span: trace_api.Span, attr_count: int) -> None:
    """Let export skip redacting ``span`` if nobody but rag_instrument touched it.

    That is: it holds only the ``attr_count`` attributes it was started with (all
    sanitised where they were made) and no events. Reads the SDK span's own containers:
    its public properties copy them (a tuple of events per call), which a stage's hot path
    cannot afford.
    """
    attributes = getattr(span, "_attributes", None)
    events = getattr(span, "_events", None)
    if attributes is None or events is None:
        return
    if len(attributes) == attr_count and not events:
        mark_sanitized(span.get_span_context().span_id)


class LeafSpan(trace_api.Span):
    """A span that never has children, recorded as one finished span when it ends.

    Database statements are leaves: nothing runs inside a ``cursor.execute`` that could
    open a child span, so they need neither to become the current span nor the SDK's
    mutable span machinery (locks, bounded attribute maps, ``on_start`` dispatch). Built
    as a ``ReadableSpan`` at ``end()`` and handed to the provider's processors (the
    application's and ours), a statement span costs a fifth of an SDK span. Processors'
    ``on_start`` is not called for leaf spans.
    """

    __slots__ = (
        "_attributes",
        "_context",
        "_ended",
        "_kind",
        "_name",
        "_parent",
        "_sanitized",
        "_start_time",
        "_status",
        "_tracer",
    )

    def __init__(
        self,
        tracer: Any,
        name: str,
        context: trace_api.SpanContext,
        parent: trace_api.SpanContext,
        kind: trace_api.SpanKind,
        attributes: dict[str, Any],
    ) -> None:
        self._tracer = tracer
        self._name = name
        self._context = context
        self._parent = parent
        self._kind = kind
        self._attributes = attributes
        self._status = _UNSET
        self._start_time = time.time_ns()
        self._ended = False
        #: Set by callers whose attributes all come from the library's sanitiser.
        self._sanitized = False

    def get_span_context(self) -> trace_api.SpanContext:
        """The span's identity."""
        return self._context

    def is_recording(self) -> bool:
        """``True`` until ended."""
        return not self._ended

    def set_attribute(self, key: str, value: Any) -> None:
        """Set one attribute (copy-on-write: the initial dict may be shared)."""
        if not self._ended:
            self._attributes = {**self._attributes, key: value}

    def set_attributes(self, attributes: Any) -> None:
        """Set several attributes."""
        if not self._ended:
            self._attributes = {**self._attributes, **attributes}

    def set_status(self, status: Any, description: str | None = None) -> None:
        """Set the status (a ``Status`` or a ``StatusCode``)."""
        if isinstance(status, trace_api.Status):
            self._status = status
        else:
            self._status = trace_api.Status(status, description)

    def update_name(self, name: str) -> None:
        """Rename the span."""
        self._name = name

    def add_event(self, name: str, attributes: Any = None, timestamp: int | None = None) -> None:
        """Not kept: leaf spans carry no events."""

    def add_link(self, context: trace_api.SpanContext, attributes: Any = None) -> None:
        """Not kept: leaf spans carry no links."""

    def record_exception(
        self,
        exception: BaseException,
        attributes: Any = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        """Not kept (callers set ``error.type`` and the status instead)."""

    def end(self, end_time: int | None = None) -> None:
        """Hand the finished span to the provider's span processors (once)."""
        if self._ended:
            return
        self._ended = True
        tracer = self._tracer
        readable = ReadableSpan(
            name=self._name,
            context=self._context,
            parent=self._parent,
            resource=tracer.resource,
            attributes=self._attributes,
            kind=self._kind,
            status=self._status,
            start_time=self._start_time,
            end_time=end_time if end_time is not None else time.time_ns(),
            instrumentation_scope=tracer._instrumentation_scope,
        )
        if self._sanitized:
            mark_sanitized(self._context.span_id)
        tracer.span_processor.on_end(readable)  # the provider's processors, app's too


_UNSET = trace_api.Status(trace_api.StatusCode.UNSET)
# The last tracer checked for the SDK attributes a leaf span needs, and the answer.
_LEAF_CHECK: list[Any] = [None, False]


def start_leaf_span(
    tracer: trace_api.Tracer,
    name: str,
    kind: trace_api.SpanKind,
    attributes: dict[str, Any],
    *,
    sanitized: bool = False,
) -> trace_api.Span:
    """Start a span that will have no children, as cheaply as the tracer allows.

    Under a sampled parent on an SDK tracer: a :class:`LeafSpan` (sampled like its parent,
    as parent-based sampling decides). Under an unsampled parent: a non-recording span.
    Anywhere else (no parent, another SDK, no SDK): the tracer's own ``start_span``.
    ``sanitized=True`` promises that every attribute was made by the library's sanitiser,
    so export skips redacting the span.
    """
    parent = trace_api.get_current_span().get_span_context()
    checked = _LEAF_CHECK
    if checked[0] is not tracer:
        checked[0] = tracer
        checked[1] = (
            isinstance(getattr(tracer, "span_processor", None), SpanProcessor)
            and hasattr(tracer, "resource")
            and hasattr(tracer, "_instrumentation_scope")
            and hasattr(tracer, "id_generator")
        )
    if not parent.is_valid or not checked[1]:
        return tracer.start_span(name, kind=kind, attributes=attributes)
    ids = tracer.id_generator  # type: ignore[attr-defined]
    context = trace_api.SpanContext(
        parent.trace_id,
        ids.generate_span_id(),
        is_remote=False,
        trace_flags=parent.trace_flags,
        trace_state=parent.trace_state,
    )
    if not parent.trace_flags.sampled:
        return trace_api.NonRecordingSpan(context)
    span = LeafSpan(tracer, name, context, parent, kind, attributes)
    span._sanitized = sanitized
    return span
