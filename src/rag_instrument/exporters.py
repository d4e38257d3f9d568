"""The only module that touches the OpenTelemetry SDK: providers, processors, exporters.

Design (see ``docs/design.md``):

* The global tracer provider can be set only once per process. The first ``configure()``
  installs an SDK ``TracerProvider`` unless the application already has one; either way
  rag_instrument adds one permanent :class:`DispatchProcessor` to it. Reconfiguring swaps
  what the dispatcher feeds, so spans are never doubled and the application's own
  processors are never touched.
* Export runs on the SDK's batch worker thread, never on the caller's (except the
  ``memory`` exporter, which exists for tests). The queue is sized for a tight loop of
  stages; every span that cannot be queued or exported is counted in
  ``rag.spans.dropped``.
* Every call into code we do not own (processors, exporters) is guarded: a failing
  exporter costs telemetry, with at most one warning per 20 s, never the application's
  result or exception.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any, Final

from opentelemetry import metrics as metrics_api
from opentelemetry import trace as trace_api
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider as SDKMeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    InMemoryMetricReader,
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, Span, SpanLimits, SpanProcessor
from opentelemetry.sdk.trace import TracerProvider as SDKTracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, Status

from rag_instrument import attributes as attr
from rag_instrument._leaf import (
    CONTEXT_IS_TUPLE,
    LeafSpan,
    StageSpan,
    end_stage_span,
    mark_if_clean,
    mark_sanitized,
    start_leaf_span,
    start_stage_span,
    take_sanitized,
)
from rag_instrument._metrics import MetricsHub, build_hub
from rag_instrument._otlp import fast_exporter
from rag_instrument._sanitize import (
    exported_name,
    is_secret_key,
    mask_attribute,
    redact_text,
)
from rag_instrument._sending import (
    MAX_EXPORT_BYTES,
    REFUSING_STATUSES,
    RefusableMetricExporter,
    by_size,
    estimated_bytes,
    install_refusal_filter,
    within_size,
)
from rag_instrument._settings import (
    SPAN_EXPORT_BATCH_SIZE,
    SPAN_QUEUE_SIZE,
    SPAN_SCHEDULE_DELAY_MS,
    check_export_variables,
)
from rag_instrument._utils import internal_error, user_code_error, warn_once

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Observation

    from rag_instrument._settings import Settings

__all__ = [
    "MAX_EXPORT_BYTES",
    "REFUSING_STATUSES",
    "DispatchProcessor",
    "LeafSpan",
    "Pipelines",
    "RefusableMetricExporter",
    "SafeSpanExporter",
    "StageSpan",
    "build",
    "end_stage_span",
    "estimated_bytes",
    "mark_if_clean",
    "mark_sanitized",
    "redact_span",
    "start_leaf_span",
    "start_stage_span",
]

#: The span batch defaults (see :data:`rag_instrument._settings.SPAN_QUEUE_SIZE`).
MAX_QUEUE_SIZE = SPAN_QUEUE_SIZE
SCHEDULE_DELAY_MS = SPAN_SCHEDULE_DELAY_MS
EXPORT_BATCH_SIZE = SPAN_EXPORT_BATCH_SIZE
OTLP_TIMEOUT_S = 5.0


def _library_version() -> str:
    try:
        return version("rag_instrument")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0"


class _RateLimitFilter(logging.Filter):
    """Let each distinct SDK warning through at most once per 20 s ("Queue full" floods)."""

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        """Drop a record whose message was let through less than 20 s ago."""
        key = f"{record.name}:{record.msg}"
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < 20.0:
            return False
        if len(self._last) > 256:
            self._last.clear()
        self._last[key] = now
        return True


_FILTER_INSTALLED = False


def _install_sdk_log_filter() -> None:
    global _FILTER_INSTALLED
    if _FILTER_INSTALLED:
        return
    flt = _RateLimitFilter()
    for name in (
        "opentelemetry.sdk._shared_internal",
        "opentelemetry.sdk.trace.export",
        "opentelemetry.exporter.otlp.proto.http.trace_exporter",
        "opentelemetry.exporter.otlp.proto.http.metric_exporter",
        "opentelemetry.sdk.metrics._internal.export",
    ):
        logging.getLogger(name).addFilter(flt)
    install_refusal_filter()
    _FILTER_INSTALLED = True


class _Drops:
    """Counts spans lost to a full queue or a failed export."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.count += n


# (key, value) pairs already found clean: stage names, span kinds, operation names and the
# like repeat on every span, so most attributes cost one dictionary lookup.
_CLEAN_PAIRS: dict[tuple[str, Any], None] = {}


def _redact_mapping(attributes: Any) -> dict[str, Any] | None:
    """A redacted copy of ``attributes``, or ``None`` when nothing needed masking.

    Runs for every exported span, on the export thread, which shares the interpreter lock
    with the application: numbers are skipped and clean pairs remembered.
    """
    if not attributes:
        return None
    # BoundedAttributes takes its lock per item; the span has ended, so read its dict.
    plain = getattr(attributes, "_dict", attributes)
    changed: dict[str, Any] | None = None
    clean_pairs = _CLEAN_PAIRS
    for key, value in plain.items():
        kind = type(value)
        if kind is bool or ((kind is int or kind is float) and not is_secret_key(key)):
            continue  # the common numbers: no call
        if kind is str:
            pair = (key, value)
            if pair in clean_pairs:
                continue
            clean = mask_attribute(key, value)
            if clean == value:
                if len(value) <= 256:
                    if len(clean_pairs) >= 16384:
                        clean_pairs.clear()
                    clean_pairs[pair] = None
                continue
        else:
            clean = mask_attribute(key, value)
            if clean is value:
                continue
        if changed is None:
            changed = dict(plain)
        changed[key] = clean
    return changed


def redact_span(span: ReadableSpan) -> ReadableSpan:
    """``span`` itself when nothing in it looks secret, else a copy with secrets masked.

    Runs on the export thread, so spans from any instrumentation (an HTTP client's
    ``url.full`` with a password, an attribute the application set by hand) are covered
    at no cost to the application's threads.
    """
    attributes = _redact_mapping(span._attributes)  # the mapping itself, not a read-only view
    events = span._events
    new_events: list[Event] | None = None
    for index, event in enumerate(events):
        cleaned = _redact_mapping(event.attributes)
        event_name = redact_text(event.name) if type(event.name) is str else event.name
        if cleaned is not None or event_name != event.name:
            if new_events is None:
                new_events = list(events)
            new_events[index] = Event(
                event_name, cleaned if cleaned is not None else event.attributes, event.timestamp
            )
    links = span._links
    new_links: list[Link] | None = None
    for index, link in enumerate(links):
        cleaned = _redact_mapping(link.attributes)
        if cleaned is not None:
            if new_links is None:
                new_links = list(links)
            new_links[index] = Link(link.context, cleaned)
    status = span._status
    description = status.description
    clean_description = redact_text(description) if description else description
    name = span.name
    clean_name = exported_name(name)
    if (
        attributes is None
        and new_events is None
        and new_links is None
        and clean_description == description
        and clean_name == name
    ):
        return span
    return ReadableSpan(
        name=clean_name,
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=attributes if attributes is not None else span.attributes,
        events=new_events if new_events is not None else events,
        links=new_links if new_links is not None else span.links,
        kind=span.kind,
        status=Status(status.status_code, clean_description),
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


def _redact_unless_sanitized(span: ReadableSpan) -> ReadableSpan:
    span_id = span.context.span_id if span.context is not None else 0
    if take_sanitized(span_id):
        return span
    return redact_span(span)


class SafeSpanExporter(SpanExporter):
    """Wraps an exporter: secrets masked, exceptions turned into counted, rate-limited warnings."""

    def __init__(self, inner: SpanExporter, drops: _Drops, *, redact: bool = True) -> None:
        self.inner = inner
        self._drops = drops
        self._redact = redact
        #: Set when a later configuration reuses ``inner``: shutting down only flushes it.
        self.keep_inner = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Export (secrets masked) in requests of at most :data:`MAX_EXPORT_BYTES`.

        Exceptions become a counted failure. A batch whose spans carry captured content
        (2,000 characters of prompt each, say) is split by size, not only by count: one
        OTLP request over a collector's limit (gRPC's 4 MiB) is rejected whole.
        """
        if self._redact:
            try:
                spans = [_redact_unless_sanitized(span) for span in spans]
            except Exception as exc:
                self._drops.add(len(spans))
                user_code_error("redacting spans for export", exc)
                return SpanExportResult.FAILURE
        if getattr(self.inner, "splits_by_size", False):  # it measures its own encoding
            return self._export(spans)
        outcome = SpanExportResult.SUCCESS
        for chunk in by_size(spans, MAX_EXPORT_BYTES):
            if self._export(chunk) is not SpanExportResult.SUCCESS:
                outcome = SpanExportResult.FAILURE
        return outcome

    def _export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except BaseException as exc:
            # SystemExit or KeyboardInterrupt raised by an exporter would end the export
            # thread silently, losing every later span: counted and reported like any
            # failure. On the main thread (a flush the application called) they are the
            # application's, and go on once counted.
            self._drops.add(len(spans))
            user_code_error(f"span exporter {type(self.inner).__name__}.export", exc)
            if not isinstance(exc, Exception) and (
                threading.current_thread() is threading.main_thread()
            ):
                raise
            return SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS:
            # An exporter that cuts a batch in several requests says how many it lost.
            failed = getattr(self.inner, "failed", None)
            splits = getattr(self.inner, "splits_by_size", False)
            lost = failed if splits and type(failed) is int else len(spans)
            self._drops.add(lost)
            if not splits and not type(self.inner).__module__.startswith("opentelemetry."):
                # The SDK's exporters say why themselves; an application's says nothing.
                name = type(self.inner).__name__
                warn_once.warning(
                    f"rag_instrument: span exporter {name} did not "
                    f"export {lost} span(s) (it returned {result!r})",
                    key=f"span exporter {name} failed",  # one per window, whatever the count
                )
        return result

    def shutdown(self) -> None:
        """Shut the wrapped exporter down; failures are logged, not raised."""
        try:
            if self.keep_inner:
                self.inner.force_flush()
                return
            self.inner.shutdown()
        except Exception as exc:
            user_code_error(f"span exporter {type(self.inner).__name__}.shutdown", exc)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Flush the wrapped exporter; ``False`` on failure."""
        try:
            return bool(self.inner.force_flush(timeout_millis))
        except Exception as exc:
            user_code_error(f"span exporter {type(self.inner).__name__}.force_flush", exc)
            return False


#: This process's id, kept current across forks: the batch processor's check that it runs in
#: the process that made it, without a system call per span.
_PROCESS: list[int] = [os.getpid()]
#: The span context's type when it is the tuple (trace id, span id, remote, flags, ...).
_SPAN_CONTEXT: Final = trace_api.SpanContext if CONTEXT_IS_TUPLE else None
_SAMPLED: Final = int(trace_api.TraceFlags.SAMPLED)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: _PROCESS.__setitem__(0, os.getpid()))


#: The names the SDK batch processor's emit() uses (1.45): one more (a metric
#: recorded per queued item, say) and its spans are queued through emit() again.
_EMIT_NAMES: Final = frozenset(
    {
        "_at_fork_reinit",
        "_bsp_reset_once",
        "_exporting",
        "_logger",
        "_max_export_batch_size",
        "_max_queue_size",
        "_metrics",
        "_pid",
        "_queue",
        "_shutdown",
        "_worker_awaken",
        "appendleft",
        "do_once",
        "drop_items",
        "getpid",
        "info",
        "is_set",
        "len",
        "os",
        "set",
        "warning",
    }
)


def _emits_inline(inner: Any) -> bool:
    """Whether on_end may repeat ``inner``'s emit() inline (``inner``: the SDK's processor).

    Its emit() uses no name beyond the known ones, and the state it reads is there.
    """
    try:
        return (
            frozenset(type(inner).emit.__code__.co_names) <= _EMIT_NAMES
            and isinstance(inner._shutdown, bool)
            and isinstance(inner._pid, int)
            and isinstance(inner._queue, collections.deque)
            and isinstance(inner._max_queue_size, int)
            and isinstance(inner._max_export_batch_size, int)
            and isinstance(inner._worker_awaken, threading.Event)
        )
    except AttributeError:  # another SDK's processor, or none
        return False


class _CountingBatchProcessor(BatchSpanProcessor):
    """The SDK's batch processor, counting the spans it drops because its queue is full."""

    def __init__(self, exporter: SpanExporter, drops: _Drops) -> None:
        # The standard variables where set (configure() has refused unusable ones), else
        # ours; our batch never exceeds a smaller queue the operator asked for.
        env = check_export_variables(os.environ)
        queue = int(env.get("OTEL_BSP_MAX_QUEUE_SIZE", MAX_QUEUE_SIZE))
        super().__init__(
            exporter,
            max_queue_size=queue,
            schedule_delay_millis=int(env.get("OTEL_BSP_SCHEDULE_DELAY", SCHEDULE_DELAY_MS)),
            max_export_batch_size=int(
                env.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", min(EXPORT_BATCH_SIZE, queue))
            ),
        )
        self._drops = drops
        inner = getattr(self, "_batch_processor", None)
        self._queue = getattr(inner, "_queue", None)
        # The SDK's on_end is "queue it if sampled": done here directly when its batch
        # processor has the expected shape (a stage's hot path), else through it.
        self._emit = getattr(inner, "emit", None)
        #: The SDK's batch processor, when its emit() can be done inline (see on_end).
        self._inline: Any = inner if _emits_inline(inner) else None

    def shutdown_within(self, timeout_millis: int) -> None:
        """Shut down within ``timeout_millis``: the worker stops exporting after it.

        ``BatchSpanProcessor.shutdown()`` takes no timeout and gives its batch processor
        the SDK's 30 s: a slow exporter went on exporting batch after batch long after
        ``ri.shutdown(timeout)`` had returned.
        """
        inner = getattr(self, "_batch_processor", None)
        shutdown = getattr(inner, "shutdown", None)
        if shutdown is None:
            self.shutdown()  # type: ignore[no-untyped-call]
            return
        try:
            shutdown(timeout_millis=max(int(timeout_millis), 0))
        except TypeError:  # a batch processor without the parameter
            self.shutdown()  # type: ignore[no-untyped-call]
        # What is still queued is never exported now: lost, as a full queue's spans are.
        queue = self._queue
        left = len(queue) if queue is not None else 0
        worker = getattr(inner, "_worker_thread", None)
        if left or (worker is not None and worker.is_alive()):
            self._drops.add(max(left, 1))

    def on_end(self, span: ReadableSpan) -> None:
        """Queue the span (if sampled), counting it when the queue is full."""
        inner = self._inline
        queue = self._queue
        if inner is not None and not inner._shutdown and inner._pid == _PROCESS[0]:
            # The SDK's emit() for a running processor in its own process with room in its
            # queue, without the os.getpid() system call it makes for every span.
            queued = len(queue)  # type: ignore[arg-type]
            if queued < inner._max_queue_size:
                context = span.context
                if context is None:
                    return
                # trace_flags.sampled, read off the tuple (two property calls less a span)
                flags = context[3] if type(context) is _SPAN_CONTEXT else context.trace_flags
                if flags & _SAMPLED:
                    queue.appendleft(span)  # type: ignore[union-attr]
                    if queued + 1 >= inner._max_export_batch_size:
                        awaken = inner._worker_awaken
                        if not awaken.is_set():
                            awaken.set()
                return
        if queue is not None and queue.maxlen is not None and len(queue) >= queue.maxlen:
            self._drops.add(1)
        emit = self._emit
        if emit is None:
            super().on_end(span)
        elif span.context is not None and span.context.trace_flags.sampled:
            emit(span)  # the SDK's own way: it warns, counts, or starts over after a fork


_NO_OP_ON_START: Final = frozenset(
    {SpanProcessor.on_start, BatchSpanProcessor.on_start, SimpleSpanProcessor.on_start}
)


class DispatchProcessor(SpanProcessor):
    """The one processor rag_instrument adds to a provider; feeds the current pipelines.

    Swapping :attr:`processors` (a tuple, replaced atomically) is how ``configure()``
    reconfigures without doubling spans. Exceptions from the processors it calls are
    caught: otel-python's own multi-processor does not (open-telemetry/opentelemetry-python
    #5624), which would let a broken processor replace the application's exception.
    """

    def __init__(self) -> None:
        self._processors: tuple[SpanProcessor, ...] = ()
        self._starters: tuple[SpanProcessor, ...] = ()

    @property
    def processors(self) -> tuple[SpanProcessor, ...]:
        """The processors fed now."""
        return self._processors

    @processors.setter
    def processors(self, processors: tuple[SpanProcessor, ...]) -> None:
        # Batch and simple processors do nothing on start: skip them there (hot path).
        self._starters = tuple(p for p in processors if type(p).on_start not in _NO_OP_ON_START)
        self._processors = processors

    @property
    def acts_on_start(self) -> bool:
        """Whether a processor fed now does something on start (stage spans ask per span)."""
        return bool(self._starters)

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        """Call every current processor that acts on start, isolating their failures."""
        for processor in self._starters:
            try:
                processor.on_start(span, parent_context=parent_context)
            except Exception as exc:
                user_code_error(f"span processor {type(processor).__name__}.on_start", exc)

    def on_end(self, span: ReadableSpan) -> None:
        """Call every current processor (or queue the span), isolating failures."""
        for processor in self._processors:
            try:
                processor.on_end(span)
            except Exception as exc:
                user_code_error(f"span processor {type(processor).__name__}.on_end", exc)

    def shutdown(self) -> None:
        """Nothing: the pipelines are shut down by ``rag_instrument.shutdown()``."""

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Flush every current pipeline."""
        ok = True
        for processor in self.processors:
            try:
                ok = bool(processor.force_flush(timeout_millis)) and ok
            except Exception as exc:
                user_code_error(f"span processor {type(processor).__name__}.force_flush", exc)
                ok = False
        return ok


def _ratio_sampler(ratio: float, parent_based: bool = True) -> Sampler:
    # ALWAYS_ON skips the ratio arithmetic on every span at the default ratio of 1.
    if parent_based:
        return ParentBased(ALWAYS_ON if ratio >= 1.0 else TraceIdRatioBased(ratio))
    if ratio >= 1.0:
        return ALWAYS_ON
    return ALWAYS_OFF if ratio <= 0.0 else TraceIdRatioBased(ratio)


_OWNED_PROVIDER: SDKTracerProvider | None = None


def _resource(settings: Settings) -> Resource:
    return Resource.create({"service.name": settings.service_name})


def _tracer_provider(
    settings: Settings, explicit: trace_api.TracerProvider | None
) -> tuple[trace_api.TracerProvider, bool]:
    """The provider to use, and whether rag_instrument owns it."""
    global _OWNED_PROVIDER
    if explicit is not None:
        return explicit, explicit is _OWNED_PROVIDER
    current = trace_api.get_tracer_provider()
    if _OWNED_PROVIDER is not None and current is _OWNED_PROVIDER:
        return _OWNED_PROVIDER, True
    if hasattr(current, "add_span_processor"):
        return current, False  # the application's own SDK provider: add to it
    if isinstance(current, trace_api.ProxyTracerProvider):
        # No provider installed (or none any more: see release_global_provider): ours.
        if _OWNED_PROVIDER is None:
            _OWNED_PROVIDER = SDKTracerProvider(
                sampler=_ratio_sampler(settings.sample_ratio, settings.parent_based_sampling),
                resource=_resource(settings),
                span_limits=SpanLimits(
                    max_attributes=128,
                    max_attribute_length=max(4096, settings.max_content_chars + 64),
                ),
                shutdown_on_exit=False,  # the library's bounded shutdown runs at exit instead
            )
        _enable(_OWNED_PROVIDER)
        trace_api.set_tracer_provider(_OWNED_PROVIDER)
        return _OWNED_PROVIDER, True
    if _OWNED_PROVIDER is not None:
        return _OWNED_PROVIDER, True
    return current, False


def global_provider_is_unset() -> bool:
    """Whether no tracer provider is installed globally (the API's proxy is in place)."""
    return isinstance(trace_api.get_tracer_provider(), trace_api.ProxyTracerProvider)


def release_global_provider() -> None:
    """Take the library's own provider out of the API's global slot, if it is there.

    For ``testing.capture()``: a capture opened when no provider was installed leaves none
    installed, so that what the process does next (a test installing its own provider with
    ``trace.set_tracer_provider``) goes as it would have gone without the capture. The
    API lets a provider be set once only; this puts back the unset state, as
    OpenTelemetry's own test helpers do. The next ``configure()`` installs it again.
    """
    if _OWNED_PROVIDER is None or trace_api.get_tracer_provider() is not _OWNED_PROVIDER:
        return
    try:
        from opentelemetry.util._once import Once

        trace_api._TRACER_PROVIDER = None
        trace_api._TRACER_PROVIDER_SET_ONCE = Once()
    except Exception as exc:  # another version of the API: the provider stays installed
        internal_error("releasing the global tracer provider", exc)


def _enable(provider: Any) -> None:
    """Undo ``OTEL_SDK_DISABLED`` on a provider of ours: ``enabled`` has decided already.

    The SDK's providers read the variable themselves and hand out no-op tracers and meters.
    The library reads it too, as the default of ``enabled`` (an explicit ``enabled=True``
    or ``RAG_INSTRUMENT_ENABLED=true`` wins); a provider is only built when enabled.
    """
    if getattr(provider, "_disabled", False) is True:
        provider._disabled = False


def _span_processors(settings: Settings, drops: _Drops) -> tuple[list[SpanProcessor], Any]:
    memory: InMemorySpanExporter | None = None
    exporter: SpanExporter | None
    if settings.exporter == "memory":
        memory = InMemorySpanExporter()
        safe = SafeSpanExporter(memory, drops, redact=settings.redact)
        return [SimpleSpanProcessor(safe)], memory
    if settings.exporter == "console":
        exporter = ConsoleSpanExporter(out=sys.stdout)  # the stdout of now, not of import time
    elif settings.exporter == "otlp":
        # The SDK's exporter, sending what rag_instrument's encoder wrote (the same bytes).
        exporter = fast_exporter(
            _otlp("trace"),
            max_bytes=MAX_EXPORT_BYTES,
            split=by_size,
            fit=within_size,
            endpoint=_otlp_url(settings, "traces"),
            timeout=OTLP_TIMEOUT_S,
        )
    elif settings.exporter == "custom":
        exporter = settings.span_exporter
    else:
        exporter = None
    if exporter is None:
        return [], None
    safe = SafeSpanExporter(exporter, drops, redact=settings.redact)
    # An exporter the application passed stays the application's: flushed, never shut
    # down, so that the same instance can be passed to configure() again.
    safe.keep_inner = settings.exporter == "custom"
    return [_CountingBatchProcessor(safe, drops)], None


def _otlp(signal: str) -> Callable[..., Any]:
    try:
        if signal == "trace":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            return OTLPSpanExporter
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        return OTLPMetricExporter
    except ImportError as exc:
        raise ImportError(
            "rag_instrument: exporter='otlp' needs the OTLP exporter: "
            "pip install 'rag_instrument[otlp]'"
        ) from exc


def _metric_interval(default_ms: float) -> float:
    """Our export interval, unless ``OTEL_METRIC_EXPORT_INTERVAL`` is set (and usable)."""
    return check_export_variables(os.environ).get("OTEL_METRIC_EXPORT_INTERVAL", default_ms)


def _otlp_metrics(settings: Settings) -> MetricExporter:
    return RefusableMetricExporter(
        _otlp("metric"), _otlp_url(settings, "metrics"), timeout_s=OTLP_TIMEOUT_S
    )


def _otlp_url(settings: Settings, signal: str) -> str:
    full = settings.otlp_signal_endpoints.get(signal)
    if full is not None:  # OTEL_EXPORTER_OTLP_<SIGNAL>_ENDPOINT: the URL as it is
        return full
    base = (settings.otlp_endpoint or "http://localhost:4318").rstrip("/")
    suffix = f"/v1/{signal}"
    if base.endswith(("/v1/traces", "/v1/metrics")):
        base = base.rsplit("/v1/", 1)[0]
    return base + suffix


class Pipelines:
    """What one ``configure()`` built: span processors, meter provider, readers."""

    def __init__(
        self,
        *,
        tracer: trace_api.Tracer,
        meter: metrics_api.Meter,
        dispatcher: DispatchProcessor | None,
        processors: list[SpanProcessor],
        memory_exporter: InMemorySpanExporter | None,
        meter_provider: SDKMeterProvider | None,
        memory_reader: InMemoryMetricReader | None,
        drops: _Drops,
        instruments: MetricsHub | None = None,
    ) -> None:
        self.tracer = tracer
        self.meter = meter
        self.dispatcher = dispatcher
        self.processors = processors
        self.memory_exporter = memory_exporter
        self.meter_provider = meter_provider
        self.memory_reader = memory_reader
        self.drops = drops
        #: ``drops.count`` when the last flush returned (see :meth:`force_flush`).
        self.drops_seen = 0
        #: Whether the global tracer provider is the one rag_instrument built (spans the
        #: global API makes after shutdown() are then dropped, with nowhere to go).
        self.owns_tracer_provider = False
        #: Where the library's own histograms and counters come from (``None``: the meter).
        self.instruments = instruments

    def keep_exporter(self, exporter: SpanExporter) -> None:
        """Flush, but do not shut down, ``exporter`` when this configuration is retired."""
        for processor in self.processors:
            safe = getattr(processor, "span_exporter", None)
            if isinstance(safe, SafeSpanExporter) and safe.inner is exporter:
                safe.keep_inner = True

    # --- the SpanTools interface (see ``rag_instrument._runtime``) ---------------------------

    @staticmethod
    def start_leaf_span(
        tracer: trace_api.Tracer,
        name: str,
        kind: trace_api.SpanKind,
        attributes: dict[str, Any],
        *,
        sanitized: bool = False,
    ) -> trace_api.Span:
        """Start a span that will have no children (see :func:`start_leaf_span`)."""
        return start_leaf_span(tracer, name, kind, attributes, sanitized=sanitized)

    #: Start a stage's span (see :func:`start_stage_span`).
    start_stage_span = staticmethod(start_stage_span)
    #: End a stage's span with the library's own additions (see :func:`end_stage_span`).
    end_stage_span = staticmethod(end_stage_span)

    @staticmethod
    def mark_if_clean(span: trace_api.Span, start_attrs: Mapping[str, Any], name: str) -> None:
        """Mark ``span`` as sanitised at the source (see :func:`mark_if_clean`)."""
        mark_if_clean(span, start_attrs, name)

    def activate(self) -> None:
        """Start feeding spans to this configuration's processors."""
        if self.dispatcher is not None:
            self.dispatcher.processors = tuple(self.processors)

    def force_flush(self, timeout_millis: int) -> bool:
        """Flush processors and metric readers; ``False`` if any span failed to export.

        Since the previous flush (or the configuration's start): a span dropped because
        the queue was full when it ended did not make it either.
        """
        dropped_before = self.drops_seen
        ok = True
        for processor in self.processors:
            ok = bool(processor.force_flush(timeout_millis)) and ok
        if self.meter_provider is not None:
            try:
                ok = bool(self.meter_provider.force_flush(timeout_millis)) and ok
            except Exception as exc:  # the SDK raises when a reader times out or fails
                user_code_error("metric readers' force_flush", exc)
                ok = False
        dropped_now = self.drops.count
        self.drops_seen = dropped_now
        return ok and dropped_now == dropped_before

    def shutdown(self, timeout_millis: int) -> bool:
        """Detach from the dispatcher, then flush and close everything this built.

        Returns whether every span this configuration was given was exported (none lost to
        a full queue or a failed export, the final flush included).
        """
        if self.dispatcher is not None and self.dispatcher.processors == tuple(self.processors):
            self.dispatcher.processors = ()
        for processor in self.processors:
            try:
                if isinstance(processor, _CountingBatchProcessor):
                    processor.shutdown_within(timeout_millis)
                else:
                    processor.shutdown()
            except Exception as exc:
                user_code_error(f"span processor {type(processor).__name__}.shutdown", exc)
        if self.meter_provider is not None:
            try:
                if math.isinf(_metric_interval(30_000)):
                    # OTEL_METRIC_EXPORT_INTERVAL=inf: the SDK's reader runs no thread, and
                    # its final collection ran only there: collected and sent here.
                    self.meter_provider.force_flush(timeout_millis)
            except Exception as exc:
                user_code_error("metric readers' final flush", exc)
            try:
                self.meter_provider.shutdown(timeout_millis=timeout_millis)
            except Exception as exc:
                user_code_error("meter provider shutdown", exc)
        return self.drops.count == 0


def _meter(
    settings: Settings,
    readers: Iterable[MetricReader],
    explicit: metrics_api.MeterProvider | None,
    drops: _Drops,
) -> tuple[
    metrics_api.Meter, SDKMeterProvider | None, InMemoryMetricReader | None, MetricsHub | None
]:
    name, lib_version = "rag_instrument", _library_version()
    if explicit is not None:
        return explicit.get_meter(name, lib_version), None, None, None
    current = metrics_api.get_meter_provider()
    if isinstance(current, SDKMeterProvider):
        # The application's own: its readers and exporters decide where metrics go.
        return current.get_meter(name, lib_version), None, None, None
    all_readers = list(readers)
    memory: InMemoryMetricReader | None = None
    # Metrics go where spans go unless metrics_exporter says otherwise (a traces-only
    # backend such as Arize Phoenix: metrics_exporter="none").
    target = settings.metrics_exporter or settings.exporter
    if target == "memory":
        memory = InMemoryMetricReader()
        all_readers.append(memory)
    elif target == "console":
        all_readers.append(
            PeriodicExportingMetricReader(
                ConsoleMetricExporter(out=sys.stdout),
                export_interval_millis=_metric_interval(60_000),
            )
        )
    elif target == "otlp":
        all_readers.append(
            PeriodicExportingMetricReader(
                _otlp_metrics(settings), export_interval_millis=_metric_interval(30_000)
            )
        )
    if not all_readers:
        return metrics_api.NoOpMeter(name), None, None, None
    resource = _resource(settings)
    try:
        provider = SDKMeterProvider(
            metric_readers=all_readers, resource=resource, shutdown_on_exit=False
        )
    except Exception as exc:
        if "registered already" not in str(exc):
            raise
        # A reader belongs to one meter provider for good: the running configuration's
        # (an app factory called twice with a module-level reader), or another's.
        raise ValueError(
            "rag_instrument: metric_readers: a reader is already in use by a meter provider "
            "(an earlier configure() or the application's); a MetricReader serves one "
            "provider for its life: pass new reader objects to each configure()"
        ) from None
    _enable(provider)
    meter = provider.get_meter(name, lib_version)
    # The library's own histograms and counters skip the SDK's per-measurement work when
    # every reader takes the default aggregations (see rag_instrument._metrics).
    hub = build_hub(provider, all_readers, resource, name, lib_version)

    def observe_drops(_options: CallbackOptions) -> Iterable[Observation]:
        from opentelemetry.metrics import Observation

        return [Observation(drops.count)]

    meter.create_observable_counter(
        attr.METRIC_SPANS_DROPPED,
        callbacks=[observe_drops],
        unit="{span}",
        description="Finished spans lost to a full export queue or a failed export.",
    )
    return meter, provider, memory, hub


def build(
    settings: Settings,
    *,
    metric_readers: Sequence[MetricReader] = (),
    tracer_provider: trace_api.TracerProvider | None = None,
    meter_provider: metrics_api.MeterProvider | None = None,
) -> Pipelines:
    """Build (but do not yet activate) the tracing and metrics pipelines for ``settings``."""
    _install_sdk_log_filter()
    drops = _Drops()
    processors, memory = _span_processors(settings, drops)
    meter, owned_meter_provider, memory_reader, hub = _meter(
        settings, metric_readers, meter_provider, drops
    )
    provider, owned = _tracer_provider(settings, tracer_provider)
    if owned and isinstance(provider, SDKTracerProvider):
        # A reconfigured ratio: tracers read the sampler they were created with, so the
        # provider's and every cached tracer's are replaced (no wrapper on the hot path).
        sampler = _ratio_sampler(settings.sample_ratio, settings.parent_based_sampling)
        provider.sampler = sampler
        for cached in getattr(provider, "_tracers", {}).values():
            if hasattr(cached, "sampler"):
                cached.sampler = sampler
        resource = _resource(settings)
        if getattr(provider, "_resource", None) != resource:
            # A reconfigured service name: the SDK offers no public setter, and its tracers
            # cache the resource they were created with.
            provider._resource = resource
            for cached in getattr(provider, "_tracers", {}).values():
                if hasattr(cached, "resource"):
                    cached.resource = resource
    dispatcher: DispatchProcessor | None = getattr(provider, "_rag_instrument_dispatcher", None)
    if dispatcher is None and hasattr(provider, "add_span_processor"):
        dispatcher = DispatchProcessor()
        provider.add_span_processor(dispatcher)
        provider._rag_instrument_dispatcher = dispatcher  # type: ignore[attr-defined]
    tracer = provider.get_tracer("rag_instrument", _library_version())
    pipelines = Pipelines(
        tracer=tracer,
        meter=meter,
        dispatcher=dispatcher,
        processors=processors,
        memory_exporter=memory,
        meter_provider=owned_meter_provider,
        memory_reader=memory_reader,
        drops=drops,
        instruments=hub,
    )
    pipelines.owns_tracer_provider = owned
    return pipelines
