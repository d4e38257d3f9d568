"""Spans built without the SDK's mutable span, and the marks of spans sanitised at the source.

Leaf spans (database statements) are built once, when they end. Stage spans
(:class:`StageSpan`) are real recording spans while they run (the current span, parent
of other instrumentations' spans) but carry none of the SDK span's per-span machinery:
sampling, ids, limits and the processors' calls are done the SDK's way, and the span is
itself the ``ReadableSpan`` the processors receive when it ends.

Part of the exporters module (:mod:`rag_instrument.exporters` re-exports it, and only it
and the configuration modules may import this one): the rest of the library reaches it
through the runtime's ``start_leaf_span`` / ``start_span`` / ``end_span`` /
``mark_if_clean``.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import traceback
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import orjson
from opentelemetry import trace as trace_api
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.trace import (
    Event,
    ReadableSpan,
    SpanProcessor,
    SynchronousMultiSpanProcessor,
)
from opentelemetry.sdk.trace import Tracer as SDKTracer
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased
from opentelemetry.sdk.util import BoundedList
from opentelemetry.trace import Status, StatusCode

from rag_instrument._context import current_span
from rag_instrument._runtime import get_runtime
from rag_instrument._sanitize import mask_attribute, redact_text
from rag_instrument._utils import user_code_error

if TYPE_CHECKING:
    from opentelemetry.context import Context

__all__ = [
    "CONTEXT_IS_TUPLE",
    "LeafSpan",
    "StageSpan",
    "end_stage_span",
    "mark_if_clean",
    "mark_sanitized",
    "start_leaf_span",
    "start_stage_span",
    "take_sanitized",
]

_logger = logging.getLogger("opentelemetry.sdk.trace")  # the SDK's warnings, the SDK's logger


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


def mark_if_clean(span: trace_api.Span, start_attrs: Mapping[str, Any], name: str) -> None:
    """Let export skip redacting ``span`` if nobody but rag_instrument touched it.

    A :class:`StageSpan` keeps its own mark (see :meth:`StageSpan.finish`): nothing here.

    That is: it holds exactly the attributes it was started with (``start_attrs``, all
    sanitised where they were made; none added *or overwritten*), no events, its name
    ``name`` and no status. Anything else (an attribute the application set through the
    span it got from ``with`` or from ``trace.get_current_span()``, also over one of ours)
    leaves the span to the export-time pass: the fast path never trades redaction. Reads
    the SDK span's own containers: its public properties copy them (a tuple of events per
    call), which a stage's hot path cannot afford.
    """
    if isinstance(span, StageSpan):
        return
    attributes = getattr(span, "_attributes", None)
    plain = getattr(attributes, "_dict", None)
    if plain is None or getattr(span, "_events", True) or getattr(span, "_name", None) != name:
        return
    status = getattr(span, "_status", None)
    if status is None or status.status_code is not trace_api.StatusCode.UNSET:
        return
    if plain == start_attrs:  # same keys, same (mostly identical) values
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


# --- stage spans ------------------------------------------------------------------------------

_INVALID_FOR_LINK: Final = trace_api.INVALID_SPAN_CONTEXT
# Serialises the rare switch of a stage span's attributes to the SDK's bounded mapping
# (the first attribute someone else sets), so that two threads doing it lose nothing.
_SWITCH_LOCK: Final = threading.Lock()


class StageSpan(trace_api.Span, ReadableSpan):
    """A recording span for a stage: the current span while it runs, one object throughout.

    It implements the OpenTelemetry API's ``Span`` (what code inside the stage sees through
    ``trace.get_current_span()``; SDK spans started inside take it as their parent) and is
    the SDK's ``ReadableSpan`` that the processors receive at its end, the way the SDK's
    own span is. What it leaves out is the SDK span's per-span machinery that a stage does
    not need: a lock, a bounded attribute map and an event list made for every span, and
    a second object built at the end. The SDK's rules still apply, in the same order:
    sampling, ids and trace flags at the start (:func:`start_stage_span`), the span limits
    on attributes, events and links, the processors' ``on_start`` (when one acts on it),
    ``_on_ending`` and ``on_end``.

    The attributes it starts with were all sanitised by rag_instrument. As long as nobody
    else sets an attribute, an event, a link or a status, the span is *clean*: export may
    skip redacting it. Any such call from outside (the API methods below) clears the mark
    for good; the library's own additions at the end go through :meth:`finish`.
    """

    # Class-level defaults: most stage spans never get events, links or a status.
    _events: Any = ()
    _links: Any = ()
    _status: Status = Status(StatusCode.UNSET)
    _kind = trace_api.SpanKind.INTERNAL
    _end_time: int | None = None

    def __init__(
        self,
        tracer: Any,
        name: str,
        context: trace_api.SpanContext,
        parent: trace_api.SpanContext | None,
        attributes: dict[str, Any],
        clean: bool,
        processor: Any,
    ) -> None:
        # ReadableSpan's fields, set directly (its __init__ would build a Resource).
        self._name = name
        self._context = context
        self._parent = parent
        self._attributes: Any = attributes  # a plain dict until someone else sets one
        self._resource = tracer.resource
        self._instrumentation_scope = tracer._instrumentation_scope
        self._instrumentation_info = tracer.instrumentation_info
        self._limits = tracer._span_limits
        self._processor = processor
        #: Every attribute, event and status so far came from rag_instrument's sanitiser.
        self._clean = clean
        self._start_time = time.time_ns()

    def __repr__(self) -> str:
        return f'{type(self).__name__}(name="{self._name}", context={self._context})'

    # --- the API's Span --------------------------------------------------------------------

    def get_span_context(self) -> trace_api.SpanContext:
        """The span's identity."""
        return self._context  # type: ignore[return-value]  # set in __init__, never None

    def is_recording(self) -> bool:
        """``True`` until the span ends."""
        return self._end_time is None

    def _bounded(self) -> Any:
        # The first attribute from outside: from now on the SDK's own bounded mapping
        # (its validation, limits, eviction order and dropped count) holds them.
        attributes = self._attributes
        if type(attributes) is dict:
            with _SWITCH_LOCK:
                attributes = self._attributes
                if type(attributes) is dict:
                    limits = self._limits
                    attributes = self._attributes = BoundedAttributes(
                        limits.max_span_attributes,
                        attributes,
                        immutable=False,
                        max_value_len=limits.max_span_attribute_length,
                    )
        return attributes

    def set_attribute(self, key: str, value: Any) -> None:
        """Set one attribute (the SDK's limits and validation apply).

        Secrets are masked as the value is set (as the export masks them): the processors
        of an application's own provider see the span before the library's export does.
        """
        if self._end_time is not None:
            _logger.warning("Setting attribute on ended span.")
            return
        self._clean = False
        try:
            if get_runtime().settings.redact:
                value = _masked(key, value)
            self._bounded()[key] = value
        except TypeError:  # ended meanwhile: the mapping became immutable
            _logger.warning("Setting attribute on ended span.")

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        """Set several attributes (as :meth:`set_attribute`)."""
        if self._end_time is not None:
            _logger.warning("Setting attribute on ended span.")
            return
        self._clean = False
        bounded = self._bounded()
        redact = get_runtime().settings.redact
        try:
            for key, value in attributes.items():
                bounded[key] = _masked(key, value) if redact else value
        except TypeError:
            _logger.warning("Setting attribute on ended span.")

    def _append_event(self, event: Event) -> None:
        events = self._events
        if type(events) is tuple:
            events = self._events = BoundedList(self._limits.max_events)
        events.append(event)

    def add_event(self, name: str, attributes: Any = None, timestamp: int | None = None) -> None:
        """Add an event (the SDK's limits apply; secrets masked, as :meth:`set_attribute`)."""
        if self._end_time is not None:
            _logger.warning("Tried calling %s on an ended span.", "_add_event")
            return
        self._clean = False
        if get_runtime().settings.redact:
            try:
                if type(name) is str:
                    name = redact_text(name)
                if attributes:
                    attributes = {k: _masked(k, v) for k, v in dict(attributes).items()}
            except Exception:  # the export's pass masks it all the same
                pass
        self._append_event(self._event(name, attributes, timestamp))

    def _event(self, name: str, attributes: Any, timestamp: int | None) -> Event:
        limits = self._limits
        bounded = BoundedAttributes(
            limits.max_event_attributes,
            attributes,
            max_value_len=limits.max_attribute_length,
            immutable=True,
        )
        return Event(name=name, attributes=bounded, timestamp=timestamp)

    def add_link(self, context: trace_api.SpanContext, attributes: Any = None) -> None:
        """Add a link (the SDK's validity rule and limits apply)."""
        if not (context and (context.is_valid or (attributes or context.trace_state))):
            return
        if self._end_time is not None:
            _logger.warning("Tried calling %s on an ended span.", "_add_link")
            return
        self._clean = False
        limits = self._limits
        bounded = BoundedAttributes(
            limits.max_link_attributes,
            attributes,
            max_value_len=limits.max_attribute_length,
            immutable=True,
        )
        links = self._links
        if type(links) is tuple:
            links = self._links = BoundedList(limits.max_links)
        links.append(trace_api.Link(context=context, attributes=bounded))

    def update_name(self, name: str) -> None:
        """Rename the span."""
        if self._end_time is not None:
            _logger.warning("Tried calling %s on an ended span.", "update_name")
            return
        self._name = name
        self._clean = False  # a name from outside may hold anything: export redacts it

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        """Set the status, as the SDK does (``OK`` is final, ``UNSET`` is ignored)."""
        if self._end_time is not None:
            _logger.warning("Tried calling %s on an ended span.", "set_status")
            return
        self._clean = False
        self._put_status(status, description)

    def _put_status(self, status: Status | StatusCode, description: str | None) -> None:
        if self._status.status_code is StatusCode.OK:
            return
        if isinstance(status, Status):
            if status.status_code is StatusCode.UNSET:
                return
            if description is not None:
                _logger.warning(
                    "Description %s ignored. Use either `Status` or `(StatusCode, Description)`",
                    description,
                )
            self._status = status
        elif isinstance(status, StatusCode) and status is not StatusCode.UNSET:
            self._status = Status(status, description)

    def record_exception(
        self,
        exception: BaseException,
        attributes: Any = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        """Record an exception as an ``exception`` event, with the SDK's attributes."""
        module = type(exception).__module__
        qualname = type(exception).__qualname__
        found: dict[str, Any] = {
            "exception.type": f"{module}.{qualname}"
            if module and module != "builtins"
            else qualname,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        if attributes:
            found.update(attributes)
        self.add_event("exception", found, timestamp)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        """End the span; an exception is recorded and sets the status, as the SDK does."""
        if exc_val is not None and self.is_recording():
            self.record_exception(exc_val, escaped=True)
            self.set_status(Status(StatusCode.ERROR, f"{type(exc_val).__name__}: {exc_val}"))
        self.end()

    # --- the end ---------------------------------------------------------------------------

    def finish(
        self,
        attributes: Mapping[str, Any] | None = None,
        status: Status | None = None,
        event: tuple[str, dict[str, Any]] | None = None,
        name: str | None = None,
    ) -> None:
        """Add rag_instrument's own (sanitised) attributes, status, event and name, and end.

        They do not clear the clean mark, which the API's methods do.
        """
        if self._end_time is not None:
            return
        if name is not None:
            self._name = name
        if attributes:
            current = self._attributes
            if type(current) is dict:
                self._attributes = {**current, **attributes}
            else:
                for key, value in attributes.items():
                    current[key] = value
        if status is not None:
            self._put_status(status, None)
        if event is not None:
            self._append_event(self._event(event[0], event[1], None))
        self.end()

    def end(self, end_time: int | None = None) -> None:
        """End the span and hand it to the provider's span processors (once)."""
        if self._end_time is not None:
            _logger.warning("Calling end() on an ended span.")
            return
        self._end_time = end_time if end_time is not None else time.time_ns()
        attributes = self._attributes
        if type(attributes) is dict:
            limits = self._limits
            count, length = limits.max_span_attributes, limits.max_span_attribute_length
            if not _within(attributes, count, length):
                self._attributes = BoundedAttributes(
                    limits.max_span_attributes,
                    attributes,
                    immutable=True,
                    max_value_len=limits.max_span_attribute_length,
                )
        else:
            attributes._immutable = True
        if self._clean:
            mark_sanitized(self.get_span_context().span_id)
        processor = self._processor
        if processor.ending:
            processor.multi._on_ending(self)
        if processor.sequential:  # the SDK's synchronous multi-processor's loop, inline
            for each in processor.multi._span_processors:
                each.on_end(self)
        else:
            processor.multi.on_end(self)


def _masked(key: Any, value: Any) -> Any:
    """``value`` set by hand under ``key``, secrets masked (never raises)."""
    try:
        return mask_attribute(key, value)
    except Exception:  # the export's pass masks it all the same
        return value


def _within(attributes: dict[str, Any], max_count: int | None, max_length: int | None) -> bool:
    """Whether the SDK's limits would keep ``attributes`` (sanitised values) as they are."""
    if max_count is not None and len(attributes) > max_count:
        return False
    if max_length is None:
        return True
    # A string's JSON text is never shorter than the string: when the whole mapping's fits
    # in the limit, no value can exceed it. One call, where the loop below takes a dozen
    # steps per value (a span's attributes are usually well under the 4 KiB limit).
    try:
        if len(_json(attributes)) <= max_length:
            return True
    except Exception:  # a value JSON cannot hold (an integer beyond 64 bits): the loop says
        pass
    for value in attributes.values():
        kind = type(value)
        if kind is str:
            if len(value) > max_length:
                return False
        elif kind is tuple or kind is list:
            for item in value:
                if type(item) is str and len(item) > max_length:
                    return False
    return True


_json: Final = orjson.dumps

# Processors whose on_start / _on_ending do nothing (batch and simple ones): not called.
_NO_OP_START: Final = frozenset(
    {SpanProcessor.on_start, BatchSpanProcessor.on_start, SimpleSpanProcessor.on_start}
)
_NO_OP_ENDING: Final = frozenset(
    getattr(cls, "_on_ending", None)
    for cls in (SpanProcessor, BatchSpanProcessor, SimpleSpanProcessor)
)


def _tuple_layout() -> bool:
    # SpanContext is a tuple (trace id, span id, remote, flags, state, valid) whose
    # constructor re-validates the ids; ours are valid by construction. Build it directly
    # only if this API's SpanContext is still laid out that way.
    flags, state = trace_api.TraceFlags(1), trace_api.TraceState()
    made = trace_api.SpanContext(3, 5, is_remote=False, trace_flags=flags, trace_state=state)
    raw = tuple.__new__(trace_api.SpanContext, (3, 5, False, flags, state, True))
    return (
        made == raw
        and raw.trace_id == 3
        and raw.span_id == 5
        and raw.is_valid
        and raw.trace_flags is flags
        and raw.trace_state is state
        and not raw.is_remote
    )


#: Whether a ``SpanContext`` is the tuple (trace id, span id, remote, flags, state, valid),
#: so that it can be built with ``tuple.__new__`` and read by unpacking (hot paths).
CONTEXT_IS_TUPLE: Final = _tuple_layout()
_DEFAULT_STATE: Final = trace_api.DEFAULT_TRACE_STATE
_MAX_TRACE_ID: Final = 2**128 - 1
_MAX_SPAN_ID: Final = 2**64 - 1

# Whether this SDK sets the "random trace id" flag (W3C Trace Context level 2).
_RANDOM_FLAG: Final = int(getattr(trace_api.TraceFlags, "RANDOM_TRACE_ID", 0))
_FLAGS: Final = tuple(trace_api.TraceFlags(bits) for bits in range(4))
_SAMPLED_FLAG: Final = int(trace_api.TraceFlags.SAMPLED)
#: The parent's flags a child keeps under parent-based sampling: sampled, random trace id.
_KEPT_FLAGS: Final = _SAMPLED_FLAG | _RANDOM_FLAG
_SPAN_CONTEXT: Final = trace_api.SpanContext
_ROOT_FLAGS: Final = _FLAGS[_KEPT_FLAGS]  # a root the always-on sampler keeps


class _Processor:
    """What a tracer's multi-processor needs called, worked out once per processor tuple."""

    __slots__ = ("dynamic", "ending", "multi", "processors", "sequential", "starting")

    def __init__(self, multi: Any) -> None:
        self.multi = multi
        self.processors = multi._span_processors
        #: The SDK's synchronous multi-processor, whose on_end is a plain loop.
        self.sequential = type(multi) is SynchronousMultiSpanProcessor
        self.starting = False
        self.ending = False
        dynamic = []
        for processor in self.processors:
            if hasattr(processor, "acts_on_start"):
                dynamic.append(processor)  # rag_instrument's dispatcher: asked per span
            elif type(processor).on_start not in _NO_OP_START:
                self.starting = True
            ending = getattr(type(processor), "_on_ending", None)
            if ending is not None and ending not in _NO_OP_ENDING:
                self.ending = True
        self.dynamic = tuple(dynamic)

    def acts_on_start(self) -> bool:
        if self.starting:
            return True
        for processor in self.dynamic:  # noqa: SIM110 - no generator on the hot path
            if processor.acts_on_start:
                return True
        return False


class _Facts:
    """What starting a stage span on one SDK tracer needs, checked once per tracer."""

    __slots__ = ("enabled", "ok", "processor", "random_ids", "sampler", "sampling", "tracer")

    def __init__(self, tracer: Any) -> None:
        self.tracer = tracer
        self.ok = (
            isinstance(tracer, SDKTracer)
            # A subclass that changes how spans start (a vendor's tracer) keeps its own.
            and getattr(type(tracer), "start_span", None) is SDKTracer.start_span
            and hasattr(getattr(tracer, "span_processor", None), "_span_processors")
            and hasattr(tracer, "_span_limits")
            and hasattr(tracer, "_instrumentation_scope")
            # The SDK's own span metrics (OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED) are
            # counted in its start_span: leave those spans to it.
            and type(getattr(tracer, "_tracer_metrics", None)).__name__
            in ("NoOpTracerMetrics", "NoneType")
        )
        self.enabled = getattr(tracer, "_is_enabled", None)
        generator = getattr(tracer, "id_generator", None)
        self.random_ids = type(generator) is RandomIdGenerator
        self.processor: _Processor | None = None
        self.sampler: Any = None
        self.sampling = ""

    def processors(self) -> _Processor:
        multi = self.tracer.span_processor
        found = self.processor
        if (
            found is None
            or found.multi is not multi
            or found.processors is not getattr(multi, "_span_processors", None)
        ):
            found = self.processor = _Processor(multi)  # a processor was added
        return found

    def sampling_of(self, sampler: Any) -> str:
        """How to decide for ``sampler`` (worked out once per sampler).

        ``"parent"``: parent-based with the default delegates and an always-on root;
        ``"parent-root"``: the same with another root; ``""``: ask the sampler.
        """
        if sampler is not self.sampler:
            kind = ""
            if (
                type(sampler) is ParentBased
                and getattr(sampler, "_remote_parent_sampled", None) is ALWAYS_ON
                and getattr(sampler, "_local_parent_sampled", None) is ALWAYS_ON
                and getattr(sampler, "_remote_parent_not_sampled", None) is ALWAYS_OFF
                and getattr(sampler, "_local_parent_not_sampled", None) is ALWAYS_OFF
            ):
                kind = "parent" if getattr(sampler, "_root", None) is ALWAYS_ON else "parent-root"
            self.sampler, self.sampling = sampler, kind
        return self.sampling


_FACTS: list[_Facts | None] = [None]


def start_stage_span(
    tracer: trace_api.Tracer,
    name: str,
    attributes: dict[str, Any],
    *,
    kind: trace_api.SpanKind = trace_api.SpanKind.INTERNAL,
    sanitized: bool = False,
    context: Context | None = None,
) -> trace_api.Span:
    """Start a stage span: a :class:`StageSpan` on an SDK tracer, else the tracer's own.

    Decides as the SDK's ``Tracer.start_span`` does: the tracer's sampler (parent-based
    sampling is decided inline for the default delegates; any other sampler is asked),
    ids from its id generator, the trace flags and trace state, a non-recording span when
    the sampler drops it, and the processors' ``on_start`` when one of them acts on it.
    Falls back to ``tracer.start_span`` for tracers that are not the SDK's, disabled
    tracers and tracers counting their own span metrics. ``sanitized=True`` promises
    that every attribute was made by the library's sanitiser (see :class:`StageSpan`).
    ``attributes`` is not copied: the caller must not change it afterwards. ``context``:
    the parent's context (an extracted remote parent), instead of the current one.
    """
    facts = _FACTS[0]
    if facts is None or facts.tracer is not tracer:
        facts = _FACTS[0] = _Facts(tracer)
    if not facts.ok or (facts.enabled is not None and not facts.enabled()):
        return tracer.start_span(name, context=context, kind=kind, attributes=attributes)
    sdk: Any = tracer
    parent: trace_api.SpanContext | None = (
        current_span() if context is None else trace_api.get_current_span(context)
    ).get_span_context()
    sampler = sdk.sampler
    if (
        sampler is facts.sampler
        and facts.sampling == "parent"
        and facts.random_ids
        and CONTEXT_IS_TUPLE
        and type(parent) is _SPAN_CONTEXT
    ):
        # The usual case, decided as below in fewer steps: a parent-based sampler with the
        # default delegates and an always-on root (the parent decides; a root is sampled),
        # random ids, the parent's context read as the tuple it is.
        trace_id, _, _, parent_flags, state, valid = parent
        if valid:
            flags = _FLAGS[parent_flags & _KEPT_FLAGS]
        else:
            parent = None
            trace_id = random.getrandbits(128)
            while not trace_id:
                trace_id = random.getrandbits(128)
            flags, state = _ROOT_FLAGS, _DEFAULT_STATE
        span_id = random.getrandbits(64)
        while not span_id:
            span_id = random.getrandbits(64)
        span_context = tuple.__new__(
            _SPAN_CONTEXT, (trace_id, span_id, False, flags, state or _DEFAULT_STATE, True)
        )
        if not flags & _SAMPLED_FLAG:
            return trace_api.NonRecordingSpan(span_context)
        return _stage_span(
            facts, sdk, name, span_context, parent, attributes, kind, sanitized, context
        )
    sampling = facts.sampling_of(sampler)
    sampled = recording = True
    trace_state: trace_api.TraceState | None = None
    if parent is not None and parent.is_valid:
        trace_id = parent.trace_id
        random_flag = parent.trace_flags & _RANDOM_FLAG
        if sampling:  # parent-based, default delegates: the parent decides
            sampled = recording = parent.trace_flags.sampled
            trace_state = parent.trace_state
    else:
        parent = None
        if facts.random_ids:
            trace_id = random.getrandbits(128)
            while not trace_id:
                trace_id = random.getrandbits(128)
            random_flag = _RANDOM_FLAG
        else:
            generator = sdk.id_generator
            trace_id = generator.generate_trace_id()
            is_random = getattr(generator, "is_trace_id_random", None)
            random_flag = _RANDOM_FLAG if is_random is not None and is_random() else 0
        if sampling == "parent-root":
            sampling = ""  # a root under a ratio (or other) root sampler: asked below
    if not sampling:
        result = sampler.should_sample(context, trace_id, name, kind, attributes, ())
        decision = result.decision
        sampled, recording = decision.is_sampled(), decision.is_recording()
        trace_state = result.trace_state
        if recording:
            decided = dict(result.attributes or {})
            if decided != attributes:
                attributes, sanitized = decided, False  # the sampler added its own
    if facts.random_ids:
        span_id = random.getrandbits(64)
        while not span_id:
            span_id = random.getrandbits(64)
    else:
        span_id = sdk.id_generator.generate_span_id()
    flags = _FLAGS[(1 if sampled else 0) | random_flag]
    if CONTEXT_IS_TUPLE and 0 < trace_id <= _MAX_TRACE_ID and 0 < span_id <= _MAX_SPAN_ID:
        span_context = tuple.__new__(
            trace_api.SpanContext,
            (trace_id, span_id, False, flags, trace_state or _DEFAULT_STATE, True),
        )
    else:
        span_context = trace_api.SpanContext(
            trace_id, span_id, is_remote=False, trace_flags=flags, trace_state=trace_state
        )
    if not recording:
        return trace_api.NonRecordingSpan(span_context)
    return _stage_span(facts, sdk, name, span_context, parent, attributes, kind, sanitized, context)


def _stage_span(
    facts: _Facts,
    sdk: Any,
    name: str,
    span_context: trace_api.SpanContext,
    parent: trace_api.SpanContext | None,
    attributes: dict[str, Any],
    kind: trace_api.SpanKind,
    sanitized: bool,
    context: Context | None,
) -> StageSpan:
    """The recording span, once sampled, with the processors' ``on_start`` if they act."""
    processor = facts.processor
    multi = sdk.span_processor
    if (
        processor is None
        or processor.multi is not multi
        or (processor.processors is not multi._span_processors)
    ):
        processor = facts.processors()  # a processor was added (or first use)
    span = StageSpan(sdk, name, span_context, parent, attributes, sanitized, processor)
    if kind is not trace_api.SpanKind.INTERNAL:
        span._kind = kind
    if processor.starting or (processor.dynamic and processor.acts_on_start()):
        try:
            multi.on_start(span, parent_context=context)
        except Exception as exc:  # an application's processor: its telemetry, not the stage
            user_code_error(f"span processor on_start ({name!r})", exc)
    return span


def end_stage_span(
    span: trace_api.Span,
    attributes: Mapping[str, Any] | None,
    status: Status | None,
    event: tuple[str, dict[str, Any]] | None,
    clean: tuple[Mapping[str, Any] | None, str] | None,
    name: str | None = None,
) -> None:
    """End a stage span with rag_instrument's own attributes, status, event and name.

    A :class:`StageSpan` takes them without losing its clean mark. Another span (the
    fallback's SDK span) is marked clean when it still is as it started (``clean``: the
    attributes and name it started with; ``None``: do not mark), then gets them through
    the API. ``name``: the span's final name (made by the library's sanitiser).
    """
    if isinstance(span, StageSpan):
        if attributes or status is not None or event is not None or name is not None:
            span.finish(attributes, status, event, name)
        elif span._end_time is None:
            span.end()
        return
    if span.is_recording():
        if clean is not None and clean[0] is not None:
            mark_if_clean(span, clean[0], clean[1])
        if name is not None:
            span.update_name(name)
        if attributes:
            span.set_attributes(attributes)
        if status is not None:
            span.set_status(status)
        if event is not None:
            span.add_event(event[0], event[1])
    span.end()
