"""The runtime: everything the hot paths need, resolved once per ``configure()``.

One module owns it; everybody else reads it through :func:`get_runtime` (and
:func:`is_configured`), the way structlog keeps its configuration behind
``get_config()``. Only the configuration module (:mod:`rag_instrument._config`) installs a
new one, with :func:`install`. The runtime is immutable in what it exposes; replacing it
is one assignment, so a reader holding the old one finishes with a consistent view.

This module sits at the bottom of the house: it imports the OpenTelemetry *API* and
rag_instrument's base modules (settings, sanitiser, attribute names), nothing above.
What needs the SDK (leaf spans, marking a span as sanitised at the source) is reached
through the :class:`SpanTools` the exporters module hands in at ``configure()`` time.
"""

from __future__ import annotations

import contextvars
import threading
from typing import TYPE_CHECKING, Any, Final, Protocol

from opentelemetry import context as otel_context
from opentelemetry import metrics as metrics_api
from opentelemetry import trace as trace_api
from opentelemetry.context.context import Context

from rag_instrument import attributes as attr
from rag_instrument._sanitize import Sanitizer
from rag_instrument._settings import Settings
from rag_instrument._utils import warn_once

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from opentelemetry.context import Context
    from opentelemetry.metrics import Counter, Histogram, Meter
    from opentelemetry.trace import Span, SpanKind, Status, Tracer

    from rag_instrument.exporters import Pipelines
    from rag_instrument.logs import LogOutput

__all__ = ["InstrumentFactory", "Runtime", "SpanTools", "get_runtime", "install", "is_configured"]

LIBRARY: str = "rag_instrument"
_INTERNAL = trace_api.SpanKind.INTERNAL


try:  # the key OpenTelemetry's suppress_instrumentation() sets (the SDK's export does)
    from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY as _SUPPRESS_KEY
except ImportError:  # pragma: no cover - an API without it: nothing is ever suppressed
    _SUPPRESS_KEY = "suppress_instrumentation"


def _runtime_var() -> contextvars.ContextVar[Context] | None:
    # The context variable behind the API's default runtime context (``contextvars``);
    # another runtime context (OTEL_PYTHON_CONTEXT) is read through the API.
    runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    var = getattr(runtime, "_current_context", None)
    if type(runtime).__name__ == "ContextVarsRuntimeContext" and isinstance(
        var, contextvars.ContextVar
    ):
        return var
    return None


#: The OpenTelemetry API's current-context variable, read directly on hot paths (``None``
#: when the application chose another runtime context: the API is asked then).
OTEL_CONTEXT_VAR: Final = _runtime_var()


def instrumentation_suppressed() -> bool:
    """Whether the current context asks instrumentations to record nothing.

    OpenTelemetry's ``suppress_instrumentation()`` sets it, and the SDK's batch processor
    exports under it: work an exporter does through instrumented code (a database, an
    instrumented client) must make no spans, which would be exported, and make more.
    """
    var = OTEL_CONTEXT_VAR
    if var is None:
        return bool(otel_context.get_value(_SUPPRESS_KEY))
    return bool(var.get().get(_SUPPRESS_KEY))


class SpanTools(Protocol):
    """What the exporters module offers the rest of the library about SDK spans.

    Everything outside ``exporters`` uses the OpenTelemetry API only; these two operations
    need the SDK's span internals, so they are reached through the runtime.
    """

    def start_leaf_span(
        self,
        tracer: Tracer,
        name: str,
        kind: SpanKind,
        attributes: dict[str, Any],
        *,
        sanitized: bool = False,
    ) -> Span:
        """Start a span that will have no children, as cheaply as the tracer allows."""
        ...

    def mark_if_clean(self, span: Span, start_attrs: Mapping[str, Any], name: str) -> None:
        """Skip export-time redaction of ``span`` if nobody but us touched it."""
        ...

    def start_stage_span(
        self,
        tracer: Tracer,
        name: str,
        attributes: dict[str, Any],
        *,
        kind: SpanKind = ...,
        sanitized: bool = False,
        context: Context | None = None,
    ) -> Span:
        """Start a stage's span (the current span while it runs), as cheaply as allowed."""
        ...

    def end_stage_span(
        self,
        span: Span,
        attributes: dict[str, Any] | None,
        status: Status | None,
        event: tuple[str, dict[str, Any]] | None,
        clean: tuple[Mapping[str, Any] | None, str] | None,
        name: str | None = None,
    ) -> None:
        """End a stage's span with the library's own (sanitised) additions."""
        ...


class InstrumentFactory(Protocol):
    """Where the library's own histograms and counters come from, when not the meter's.

    The exporters module offers one that aggregates in place (``_metrics.MetricsHub``).
    """

    def create_histogram(
        self,
        name: str,
        unit: str = ...,
        description: str = ...,
        *,
        explicit_bucket_boundaries_advisory: Sequence[float] | None = ...,
    ) -> Histogram:
        """A histogram (created once per configuration by :meth:`Runtime.histogram`)."""
        ...

    def create_counter(self, name: str, unit: str = ..., description: str = ...) -> Counter:
        """A counter (created once per configuration by :meth:`Runtime.counter`)."""
        ...


class Runtime:
    """The configuration in force, as the library's code uses it (see :func:`get_runtime`).

    Attributes:
        settings: the validated :class:`~rag_instrument.Settings`.
        configured: ``False`` until ``configure()`` ran (and again after ``shutdown()``).
        enabled: ``settings.enabled``: ``False`` makes every decorator a pass-through.
        tracer: the tracer stages and integrations start spans with.
        meter: the meter for rag_instrument's metrics.
        sanitizer: redacts and truncates values for logs and span attributes.
        budgets: milliseconds per stage name.
        log: where log lines go (``None``: not written).
        pipelines: what the exporters module built (``None`` when not configured).
    """

    __slots__ = (
        "__weakref__",
        "_claims",
        "_factory",
        "_instruments",
        "_lock",
        "_tools",
        "budget_counter",
        "budgets",
        "configured",
        "enabled",
        "log",
        "meter",
        "pipelines",
        "sanitizer",
        "settings",
        "stage_duration",
        "tracer",
    )

    def __init__(
        self,
        settings: Settings,
        *,
        configured: bool,
        tracer: Tracer,
        meter: Meter,
        log: LogOutput | None = None,
        pipelines: Pipelines | None = None,
        tools: SpanTools | None = None,
        instruments: InstrumentFactory | None = None,
    ) -> None:
        self.settings = settings
        self.configured = configured
        self.enabled = settings.enabled
        self.tracer = tracer
        self.meter = meter
        self.log = log
        self.pipelines = pipelines
        self._tools = tools
        self._factory: InstrumentFactory | Meter = instruments if instruments is not None else meter
        self.sanitizer = Sanitizer(settings.max_content_chars, redact=settings.redact)
        self.budgets = dict(settings.budgets)
        self._instruments: dict[tuple[str, str], Any] = {}
        self._claims: set[object] = set()
        self._lock = threading.Lock()
        self.stage_duration: Histogram = self.histogram(
            attr.METRIC_STAGE_DURATION, "s", "Duration of rag_instrument pipeline stages."
        )
        self.budget_counter: Counter = self.counter(
            attr.METRIC_BUDGET_EXCEEDED, "{stage}", "Stages that ran over their budget."
        )

    # --- metric instruments, created once per configuration ----------------------------------

    def _instrument(self, kind: str, name: str, unit: str, description: str) -> Any:
        key = (kind, name)
        found = self._instruments.get(key)
        if found is None:
            factory = getattr(self._factory, f"create_{kind}")
            boundaries = attr.HISTOGRAM_BOUNDARIES.get(name) if kind == "histogram" else None
            if boundaries is None:
                found = factory(name, unit=unit, description=description)
            else:
                found = factory(
                    name,
                    unit=unit,
                    description=description,
                    explicit_bucket_boundaries_advisory=boundaries,
                )
            self._instruments[key] = found
        return found

    def histogram(self, name: str, unit: str, description: str = "") -> Histogram:
        """A histogram on the current meter, created once per configuration."""
        result: Histogram = self._instrument("histogram", name, unit, description)
        return result

    def counter(self, name: str, unit: str, description: str = "") -> Counter:
        """A counter on the current meter, created once per configuration."""
        result: Counter = self._instrument("counter", name, unit, description)
        return result

    def claim(self, key: object) -> bool:
        """``True`` exactly once per runtime and ``key`` (e.g. to register observable metrics).

        Cheap when already claimed (one set lookup, no lock).
        """
        if key in self._claims:
            return False
        with self._lock:
            if key in self._claims:
                return False
            self._claims.add(key)
            return True

    # --- spans through the exporters' tools ---------------------------------------------------

    def start_leaf_span(
        self,
        name: str,
        kind: SpanKind,
        attributes: dict[str, Any],
        *,
        sanitized: bool = False,
    ) -> Span:
        """A span that will have no children (a database statement), as cheaply as possible.

        ``sanitized=True`` promises that every attribute came from the library's sanitiser,
        so that export can skip redacting it. Without an SDK configuration by
        rag_instrument, this is the tracer's own ``start_span``.
        """
        if instrumentation_suppressed():
            return trace_api.INVALID_SPAN
        tools = self._tools
        if tools is None:
            return self.tracer.start_span(name, kind=kind, attributes=attributes)
        return tools.start_leaf_span(self.tracer, name, kind, attributes, sanitized=sanitized)

    def start_span(
        self,
        name: str,
        attributes: dict[str, Any],
        *,
        kind: SpanKind = _INTERNAL,
        sanitized: bool = True,
        context: Context | None = None,
    ) -> Span:
        """Start a span of the library's own (a stage, a model call), ended by :meth:`end_span`.

        With an SDK configured by rag_instrument, a recording span without the SDK span's
        per-span machinery (see ``exporters.StageSpan``), else the tracer's ``start_span``.
        ``attributes`` may be kept as they are: do not change them afterwards.
        ``sanitized``: every attribute was made by the library's sanitiser (export may
        skip redacting the span as long as nobody else adds to it). ``context``: the
        parent's context (e.g. extracted from a request's headers) instead of the current.
        """
        if instrumentation_suppressed():  # an exporter's own work (see the function)
            return trace_api.INVALID_SPAN
        tools = self._tools
        if tools is None:
            return self.tracer.start_span(name, context=context, kind=kind, attributes=attributes)
        return tools.start_stage_span(
            self.tracer,
            name,
            attributes,
            kind=kind,
            sanitized=sanitized and self.settings.redact,
            context=context,
        )

    def end_span(
        self,
        span: Span,
        clean: tuple[Mapping[str, Any] | None, str] | None,
        attributes: dict[str, Any] | None = None,
        status: Status | None = None,
        event: tuple[str, dict[str, Any]] | None = None,
        name: str | None = None,
    ) -> None:
        """End a span :meth:`start_span` started, adding the library's own (sanitised) parts.

        ``clean``: the attributes and name it was started with (``None``: not all made by
        the library's sanitiser). Export skips redacting the span when nobody else added
        or changed attributes, events, the status or the name. ``name``: its final name,
        made by the library's sanitiser (a request span named after its route).
        """
        tools = self._tools
        if tools is not None:
            tools.end_stage_span(
                span, attributes, status, event, clean if self.settings.redact else None, name
            )
            return
        if span.is_recording():
            if name is not None:
                span.update_name(name)
            if attributes:
                span.set_attributes(attributes)
            if status is not None:
                span.set_status(status)
            if event is not None:
                span.add_event(event[0], event[1])
        span.end()

    def mark_if_clean(self, span: Span, start_attrs: Mapping[str, Any], name: str) -> None:
        """Let export skip redacting ``span`` if it is as we started it (``start_attrs``)."""
        tools = self._tools
        if tools is not None and self.settings.redact:
            tools.mark_if_clean(span, start_attrs, name)


def _unconfigured() -> Runtime:
    # Before configure(): spans go to whatever the global OpenTelemetry API provides (a no-op
    # unless the application installed an SDK), no log lines are written, metrics are no-ops
    # unless a global meter provider exists.
    return Runtime(
        Settings(),
        configured=False,
        tracer=trace_api.get_tracer(LIBRARY),
        meter=metrics_api.get_meter(LIBRARY),
    )


class _AfterShutdown(trace_api.NoOpTracer):
    """The tracer after ``shutdown()``: spans go nowhere, and the first one says so once."""

    def __init__(self) -> None:
        self.warned = False

    def _warn(self) -> None:
        if not self.warned:
            self.warned = True
            warn_once.warning(
                "rag_instrument: a span was started after shutdown(): spans are dropped "
                "until configure() is called again"
            )

    def start_span(self, *args: Any, **kwargs: Any) -> trace_api.Span:
        self._warn()
        return super().start_span(*args, **kwargs)

    def start_as_current_span(self, *args: Any, **kwargs: Any) -> Any:
        self._warn()
        return super().start_as_current_span(*args, **kwargs)


def after_shutdown() -> Runtime:
    """The runtime after ``shutdown()`` of a configuration that built the tracer provider.

    As before ``configure()``, but the spans of stages have nowhere to go (the provider's
    processors are shut down): they are dropped, and the first one says so.
    """
    return Runtime(
        Settings(),
        configured=False,
        tracer=_AfterShutdown(),
        meter=metrics_api.get_meter(LIBRARY),
    )


_current: Runtime = _unconfigured()


def get_runtime() -> Runtime:
    """The runtime in force: read it at call time, so that a later ``configure()`` applies.

    Example:
        >>> import rag_instrument as ri
        >>> service = ri.get_runtime().settings.service_name
    """
    return _current


def is_configured() -> bool:
    """Whether ``configure()`` has run (and ``shutdown()`` has not run since)."""
    return _current.configured


def install(runtime: Runtime | None) -> Runtime:
    """Make ``runtime`` the one in force (``None``: a fresh unconfigured one); return it.

    Only the configuration module calls this (``configure()``, ``shutdown()``,
    ``rag_instrument.testing.capture``).
    """
    global _current
    _current = runtime if runtime is not None else _unconfigured()
    return _current
