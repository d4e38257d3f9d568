"""Pipeline stages: ``stage``, ``traced``, ``pipeline_stage_context`` and budgets.

A stage is one span plus one completion line, and the unit the breakdown, budgets and the
``rag.stage.duration`` histogram are about::

    @ri.stage(ri.PipelineStage.RETRIEVAL, top_k=5)
    async def retrieve(query: str) -> list[Doc]: ...

    with ri.pipeline_stage_context("reranking"):
        ...

The same object decorates ``def``, ``async def``, generator and async-generator functions
(methods too) and is a context manager (``with`` and ``async with``).

Generators are the hard case. A wrapped generator's stage runs in a private copy of the
caller's context (:class:`contextvars.Context`), entered only while the generator's own
code runs. So the caller's context is exactly what it was before after every ``next()``,
spans opened inside the generator across a ``yield`` keep their parent, and finalisation
by the garbage collector or by asyncio from another task never runs the generator's
``finally`` under someone else's context, and never logs "Failed to detach context".
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import time
import types
import warnings
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final, ParamSpec, TypeVar, overload

from opentelemetry import trace as trace_api
from opentelemetry.trace import Status, StatusCode

from rag_instrument import _breakdown, _stagehooks
from rag_instrument import attributes as attr
from rag_instrument._context import (
    STAGE_ATTRIBUTES_MAX,
    START_ATTRIBUTES_MAX,
    Bound,
    Frame,
    attach_span,
    bound,
    current_frame,
    detach_span,
    reset_bound,
    reset_frame,
    run_end_hooks,
    seen_contents,
    set_bound,
    set_frame,
    within_span_limit,
)
from rag_instrument._errors import exception_message
from rag_instrument._registry import register_span_kind, span_kind
from rag_instrument._runtime import get_runtime
from rag_instrument._sanitize import (
    REDACTED,
    is_secret_key,
    redact_text,
    safe_repr,
    stack_trace,
    to_attribute_value,
    truncate,
    valid_utf8,
)
from rag_instrument._steps import Relay, relay, relay_async_generator, relay_await
from rag_instrument._utils import (
    FunctionKind,
    function_kind,
    internal_error,
    user_code_error,
    warn_once,
)
from rag_instrument.logs import LineHead, emit, emit_head

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from rag_instrument._runtime import Runtime

__all__ = ["PipelineStage", "Stage", "pipeline_stage_context", "stage", "traced"]

P = ParamSpec("P")
R = TypeVar("R")
F = TypeVar("F", bound=Callable[..., Any])


class PipelineStage(StrEnum):
    """The stages of a RAG request; any other string is accepted as a stage name too."""

    QUERY_REWRITING = "query_rewriting"
    EMBEDDING = "embedding"
    RETRIEVAL = "retrieval"
    RERANKING = "reranking"
    GENERATION = "generation"
    CHAIN_OF_THOUGHT = "chain_of_thought"
    INGESTION = "ingestion"
    SEARCH = "search"


for _stage, _kind in (
    (PipelineStage.RETRIEVAL, attr.SpanKind.RETRIEVER),
    (PipelineStage.RERANKING, attr.SpanKind.RERANKER),
    (PipelineStage.EMBEDDING, attr.SpanKind.EMBEDDING),
    (PipelineStage.GENERATION, attr.SpanKind.LLM),
):
    register_span_kind(_stage.value, _kind)


class _Spec:
    """Everything about a stage that is known before it runs (computed once)."""

    __slots__ = (
        "_given",
        "_sanitizer",
        "attributes",
        "cancelled_event",
        "completed_event",
        "completed_head",
        "failed_event",
        "is_stage",
        "level",
        "metric_attributes",
        "name",
    )

    def __init__(self, name: str, is_stage: bool, attributes: dict[str, Any]) -> None:
        self.name = name
        self.is_stage = is_stage
        self._given = attributes
        sanitizer = get_runtime().sanitizer
        self._sanitizer: Any = sanitizer
        self.attributes = self._cleaned(sanitizer)
        self.metric_attributes = {attr.RAG_STAGE: name}
        self.completed_event = f"{name} completed"
        self.failed_event = f"{name} failed"
        self.cancelled_event = f"{name} cancelled"
        # Stages and traced operations alike: one "<name> completed" line at info.
        self.level = "info"
        self.completed_head = LineHead(
            self.level, self.completed_event, None if is_stage else {"operation": name}
        )

    def attributes_for(self, sanitizer: Any) -> dict[str, Any]:
        """The span's start attributes under the configuration in force.

        Given attributes are cleaned (masked, cut to ``max_content_chars``) with the
        settings of the configuration that runs the stage, not those in force when the
        decorator was applied (at import, usually): cleaned again after a
        ``configure()`` changes them.
        """
        if sanitizer is self._sanitizer or not self._given:
            return self.attributes
        attributes = self._cleaned(sanitizer)
        self.attributes, self._sanitizer = attributes, sanitizer
        return attributes

    def _cleaned(self, sanitizer: Any) -> dict[str, Any]:
        name, is_stage, attributes = self.name, self.is_stage, self._given
        attrs: dict[str, Any] = {}
        if is_stage:
            attrs[attr.RAG_STAGE] = name
            attrs[attr.OPENINFERENCE_SPAN_KIND] = span_kind(name)
        for key, value in attributes.items():
            if sanitizer.redact and is_secret_key(key):
                attrs[key] = REDACTED  # api_key=..., password=...: by name, whatever the value
                continue
            converted = to_attribute_value(value, sanitizer)
            if converted is not None:
                attrs[key] = converted
        if len(attrs) > STAGE_ATTRIBUTES_MAX:
            # Spans keep 128 attributes and drop the oldest beyond, its own first: keep
            # the stage's own and the first of the given ones (room left for the bound
            # values), and say so once.
            warn_once.warning(
                f"rag_instrument: {name!r} was given {len(attrs)} attributes: its span "
                f"keeps the first {STAGE_ATTRIBUTES_MAX}"
            )
            attrs = dict(list(attrs.items())[:STAGE_ATTRIBUTES_MAX])
        return attrs


#: Longest stage or span name kept (a name is a label, not a payload).
MAX_NAME_CHARS: Final = 120


def _stage_name(value: object, what: str) -> str:
    if isinstance(value, PipelineStage):
        return value.value
    if not isinstance(value, str):
        raise TypeError(
            f"rag_instrument.{what}: the name must be a str or PipelineStage, "
            f"got {safe_repr(value, 80)}"
        )
    # str's own methods: a str subclass may override strip() or __repr__.
    name = str.strip(value)
    if not name:
        raise ValueError(f"rag_instrument.{what}: the name must not be empty")
    return _clean_name(name)


def _clean_name(name: str) -> str:
    """A span or stage name made safe: valid UTF-8, secrets masked, cut to ``MAX_NAME_CHARS``."""
    return truncate(redact_text(valid_utf8(name)), MAX_NAME_CHARS)


# --- begin / end ----------------------------------------------------------------------------


def _begin(spec: _Spec, rt: Runtime, owner: object, cpu: bool | None = None) -> Frame:
    parent = current_frame()
    attributes = spec.attributes if spec._sanitizer is rt.sanitizer else spec.attributes_for(
        rt.sanitizer
    )
    frame_bound = bound()
    context_attrs = frame_bound.attrs
    if context_attrs:
        attributes = (
            {**context_attrs, **attributes}
            if len(context_attrs) + len(attributes) <= START_ATTRIBUTES_MAX
            else within_span_limit(context_attrs, attributes, spec.name)
        )
    span = rt.start_span(spec.name, attributes)
    stage_name = spec.name if spec.is_stage else (parent.stage if parent is not None else None)
    frame = Frame(spec.name, stage_name, spec.is_stage, parent, span, owner)
    frame.attr_count = len(attributes)
    frame.start_attrs = attributes
    frame.bound = frame_bound
    frame.tokens = (attach_span(span), set_frame(frame))
    if _stagehooks.active:  # resource_metrics, event_loop_threshold_ms, a 3.11 loop watch
        _stagehooks.begin(frame, rt, cpu)
    frame.start_ns = time.perf_counter_ns()
    return frame


def _safe_begin(
    spec: _Spec, rt: Runtime, owner: object, cpu: bool | None = None
) -> Frame | None:
    """Start a stage; ``cpu`` says whether its thread's CPU time would be its own.

    ``True`` for a ``def`` (and an ``async def``, until it suspends), ``False`` for a
    generator (its consumer runs between its steps), ``None`` for a ``with`` block: only
    outside a running event loop, since the block may contain ``await``.
    """
    try:
        return _begin(spec, rt, owner, cpu)
    except Exception as exc:
        internal_error(f"starting {spec.name!r}", exc)
        return None


def _exception_record(
    exc: BaseException, rt: Runtime, clean_message: str | None = None
) -> tuple[Status, tuple[str, dict[str, Any]]]:
    """The span status and ``exception`` event for ``exc``, sanitised."""
    sanitizer = rt.sanitizer
    if clean_message is None:
        clean_message = exception_message(exc, sanitizer, rt.settings.capture_content)
    exc_type = type(exc)
    module = exc_type.__module__
    qualname = (
        exc_type.__qualname__
        if module in ("builtins", None)
        else f"{module}.{exc_type.__qualname__}"
    )
    # The frames (no source text), then the safe message, not the raw one.
    stack = stack_trace(exc, lambda _exc: f"{qualname}: {clean_message}")
    status = Status(StatusCode.ERROR, f"{exc_type.__name__}: {clean_message}")
    return status, (
        "exception",
        {
            "exception.type": qualname,
            "exception.message": clean_message,
            "exception.stacktrace": sanitizer.text(stack),
            "exception.escaped": True,
        },
    )


def _record_exception(
    span: Span, exc: BaseException, rt: Runtime, clean_message: str | None = None
) -> None:
    """Set ``span``'s status and add its ``exception`` event for ``exc`` (sanitised)."""
    status, (name, attributes) = _exception_record(exc, rt, clean_message)
    span.set_status(status)
    span.add_event(name, attributes)


def _end(
    frame: Frame,
    spec: _Spec,
    exc: BaseException | None,
    items: int | None = None,
    completed: bool = True,
) -> None:
    elapsed_ns = time.perf_counter_ns() - frame.start_ns
    # The line's timestamp: its start (timestamp - duration) is then where the stage
    # started, however long ending it takes (end hooks, processors, a busy machine), and
    # the analyzer nests stages by those times.
    ended_ns = time.time_ns()
    if frame.scratch is not None:
        run_end_hooks(frame)  # scopes tied to this stage report (N+1 final counts)
    tokens = frame.tokens
    frame.tokens = None
    if tokens is not None:
        try:
            reset_frame(tokens[1])
            detach_span(tokens[0])
        except Exception:
            # Exited in a different context than entered (a misused context manager):
            # restore nothing rather than someone else's state.
            tokens = None
    now_bound = bound()
    if (
        frame.bound is not None
        and frame.bound is not now_bound
        and (tokens is None or not _extends(now_bound, frame.bound))
    ):
        # Ended from another context than the one it ran in (a generator holding the
        # block, closed by the collector or the event loop after its request ended): its
        # lines carry the values bound where it ran (the request id), not whatever is
        # bound where it happens to end.
        bound_token = set_bound(frame.bound)
        try:
            _finish(frame, spec, exc, items, completed, elapsed_ns, ended_ns)
        finally:
            reset_bound(bound_token)
        return
    _finish(frame, spec, exc, items, completed, elapsed_ns, ended_ns)


def _extends(now: Bound, then: Bound) -> bool:
    """Whether ``now`` is of the request ``then`` was bound in (values bound since kept).

    Not so when a plain generator holding a ``with`` block is closed in another request's
    code (by the collector, or by that code closing it): the values bound there are that
    request's, not the ones the block ran under.
    """
    return now.scope is then.scope


def _finish(
    frame: Frame,
    spec: _Spec,
    exc: BaseException | None,
    items: int | None,
    completed: bool,
    elapsed_ns: int,
    ended_ns: int,
) -> None:
    """The end of a stage whose context is restored: its span, metrics and line."""
    rt = get_runtime()
    cpu_ms = _stagehooks.end(frame, rt) if _stagehooks.active else None
    ms = elapsed_ns / 1e6
    if cpu_ms is not None and cpu_ms > ms:
        # The CPU clock is read outside the wall clock's span (around the stage's own
        # bookkeeping): one thread never computes longer than the time that passed.
        cpu_ms = round(ms, 3)
    # Detached under the lock: work still running elsewhere (an executor job) can no longer
    # change it while it is rendered below.
    breakdown = _breakdown.detach(frame)
    # The span's attributes and the line's field, made in one pass.
    forms = _breakdown.safe_forms(breakdown) if breakdown else None
    if isinstance(exc, GeneratorExit):
        # A generator around this block was closed or collected: control flow, not an
        # error, and not a cancellation either (the enclosing stream says completed=false).
        exc, completed = None, False
    span = frame.span
    cancelled = exc is not None and not isinstance(exc, Exception)
    budget = rt.budgets.get(spec.name) if spec.is_stage and rt.budgets else None
    exceeded = budget is not None and ms > budget
    message: str | None = None
    # The library's own additions at the end (all sanitised where they are made: export
    # skips redacting the span if nothing else added attributes, events or a status).
    own: dict[str, Any] | None = None
    status: Status | None = None
    exc_event: tuple[str, dict[str, Any]] | None = None
    try:
        if span.is_recording() and (
            breakdown or items is not None or exc is not None or exceeded or cpu_ms is not None
        ):
            own = forms[0] if forms is not None else {}  # a fresh dict: ours to add to
            if cpu_ms is not None:
                own[attr.RAG_CPU_MS] = cpu_ms
            if items is not None:
                own[attr.RAG_STREAM_ITEMS] = items
                own[attr.RAG_STREAM_COMPLETED] = completed
            if exc is not None:
                own[attr.ERROR_TYPE] = type(exc).__qualname__
                if cancelled:
                    own[attr.RAG_CANCELLED] = True
                else:
                    message = exception_message(
                        exc, rt.sanitizer, rt.settings.capture_content, seen_contents(frame)
                    )
                    status, exc_event = _exception_record(exc, rt, message)
            if exceeded:
                own[attr.RAG_BUDGET_EXCEEDED] = True
                own[attr.RAG_BUDGET_MS] = budget
    finally:
        try:
            rt.end_span(span, (frame.start_attrs, spec.name), own, status, exc_event)
        except Exception as end_exc:  # a span processor we do not own raised
            user_code_error("ending a span", end_exc)
    if spec.is_stage:
        rt.stage_duration.record(ms / 1000.0, spec.metric_attributes)
        timings = _breakdown.stage_timings.get()
        if timings is not None:  # inside a web request: its Server-Timing header lists us
            timings.add(spec.name, ms)
    plain_line = not breakdown and items is None and cpu_ms is None
    if rt.log is not None and exc is None and (plain_line or spec.is_stage):
        # The common lines, assembled from their rendered fixed part; a stage's breakdown,
        # CPU time and items follow execution_time_ms, where emit() would put them too (an
        # operation's head already holds "operation", which emit() puts after them).
        extra = None if plain_line else _measured(cpu_ms, forms, items)
        line_stage = spec.name if spec.is_stage else (frame.stage or "")
        emit_head(
            rt,
            spec.completed_head,
            span,
            line_stage,
            round(ms, 3),
            own_stage=spec.is_stage,
            extra=extra,
            ended_ns=ended_ns,
        )
    elif rt.log is not None:
        fields: dict[str, Any] = {"execution_time_ms": round(ms, 3)}
        fields.update(_measured(cpu_ms, forms, items))
        if exc is None:
            event, level = spec.completed_event, spec.level
        elif cancelled:
            event, level = spec.cancelled_event, "warning"
            fields["error_type"] = type(exc).__name__
        else:
            event, level = spec.failed_event, "error"
            fields["error_type"] = type(exc).__name__
            if message is None:
                message = exception_message(
                    exc, rt.sanitizer, rt.settings.capture_content, seen_contents(frame)
                )
            fields["error_message"] = message
        # Only a stage's own line reports its duration under context.pipeline_stage, so
        # per-stage aggregations of execution_time_ms (the README's jq one-liner, the
        # analyzer) count each run exactly once.
        # A traced operation's line names the stage it ran in (top-level ``stage``).
        line_stage = spec.name if spec.is_stage else (frame.stage or "")
        if not spec.is_stage:
            fields["operation"] = spec.name
        emit(
            level,
            event,
            fields,
            span=span,
            stage=line_stage,
            trusted=True,
            rt=rt,
            own_stage=spec.is_stage,
            created_ns=ended_ns,
        )
    if exceeded:
        assert budget is not None
        rt.budget_counter.add(1, spec.metric_attributes)
        if rt.log is not None:
            emit(
                "warning",
                "budget exceeded",
                {
                    "stage": spec.name,
                    "budget_ms": budget,
                    "execution_time_ms": round(ms, 3),
                    "largest": _breakdown.largest(breakdown),
                },
                span=span,
                stage="",
                trusted=True,
                rt=rt,
            )


def _measured(
    cpu_ms: float | None, forms: tuple[dict[str, Any], dict[str, Any]] | None, items: int | None
) -> dict[str, Any]:
    """A stage line's fields after ``execution_time_ms``: CPU time, breakdown, items."""
    fields: dict[str, Any] = {}
    if cpu_ms is not None:
        fields["cpu_ms"] = cpu_ms
    if forms is not None:
        fields["breakdown"] = forms[1]
    if items is not None:
        fields["items"] = items
    return fields


def _safe_end(
    frame: Frame,
    spec: _Spec,
    exc: BaseException | None,
    items: int | None = None,
    completed: bool = True,
) -> None:
    try:
        _end(frame, spec, exc, items, completed)
    except Exception as end_exc:
        internal_error(f"ending {spec.name!r}", end_exc)


# --- wrappers -------------------------------------------------------------------------------


def _wrap_sync(fn: Callable[P, R], spec: _Spec) -> Callable[P, R]:
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        rt = get_runtime()
        if not rt.enabled:
            return fn(*args, **kwargs)
        try:  # _safe_begin, inline: every stage pays for this frame
            frame = _begin(spec, rt, wrapper, True)
        except Exception as begin_exc:
            internal_error(f"starting {spec.name!r}", begin_exc)
            return fn(*args, **kwargs)
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            _safe_end(frame, spec, exc)
            raise
        try:  # _safe_end, inline
            _end(frame, spec, None)
        except Exception as end_exc:
            internal_error(f"ending {spec.name!r}", end_exc)
        return result

    return wrapper


def _wrap_async(fn: Callable[P, Awaitable[R]], spec: _Spec) -> Callable[P, Awaitable[R]]:
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        rt = get_runtime()
        if not rt.enabled:
            return await fn(*args, **kwargs)
        frame = _safe_begin(spec, rt, wrapper, True)
        if frame is None:
            return await fn(*args, **kwargs)
        try:
            if _stagehooks.active:
                # Its CPU time counts only if it never suspends (resource_metrics).
                result = await _stagehooks.awaiting(frame, rt, fn(*args, **kwargs))
            else:
                result = await fn(*args, **kwargs)
        except BaseException as exc:
            _safe_end(frame, spec, exc)
            raise
        _safe_end(frame, spec, None)
        return result

    return wrapper


class _Relay(Relay):
    """A stage's relay: ends the stage, inside the generator's own context, when it stops."""

    __slots__ = ("ctx", "frame", "spec")

    def __init__(
        self, ctx: contextvars.Context | None, frame: Frame | None, spec: _Spec | None
    ) -> None:
        super().__init__()
        self.ctx = ctx
        self.frame = frame
        self.spec = spec

    def end(self) -> None:
        """End the stage (if one was begun) in the generator's context."""
        if self.frame is not None and self.ctx is not None and self.spec is not None:
            self.ctx.run(_safe_end, self.frame, self.spec, self.failure, self.items, self.completed)


def _wrap_generator(
    fn: Callable[P, Generator[Any, Any, R]], spec: _Spec
) -> Callable[P, Generator[Any, Any, R]]:
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> Generator[Any, Any, R]:
        rt = get_runtime()
        if not rt.enabled:
            return (yield from fn(*args, **kwargs))
        ctx = contextvars.copy_context()
        gen = ctx.run(fn, *args, **kwargs)
        frame = ctx.run(_safe_begin, spec, rt, wrapper, False)
        if frame is None:
            result: R = yield from gen
            return result
        with _Relay(ctx, frame, spec) as core:  # ends the stage however the proxy stops
            driven: R = yield from relay(core, gen, ctx.run)
        return driven

    return wrapper


def _wrap_async_generator(
    fn: Callable[..., AsyncGenerator[Any, Any]], spec: _Spec
) -> Callable[..., AsyncGenerator[Any, Any]]:
    def open_stage(
        proxy: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Relay, AsyncGenerator[Any, Any], Callable[[Awaitable[Any]], Awaitable[Any]] | None]:
        rt = get_runtime()
        if not rt.enabled:
            return _Relay(None, None, None), fn(*args, **kwargs), None
        ctx = contextvars.copy_context()
        agen = ctx.run(fn, *args, **kwargs)
        frame = ctx.run(_safe_begin, spec, rt, proxy, False)
        if frame is None:  # without a stage the steps run as they are
            return _Relay(None, None, None), agen, None
        # Each step of the inner generator runs in its own context.
        return _Relay(ctx, frame, spec), agen, functools.partial(relay_await, ctx.run)

    return relay_async_generator(open_stage)


def _warn_order(fn: Callable[..., Any], what: str) -> None:
    inner = getattr(fn, "__wrapped__", None)
    if inner is None or inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        return
    if inspect.isgeneratorfunction(inner) or inspect.isasyncgenfunction(inner):
        name = getattr(fn, "__qualname__", repr(fn))
        warnings.warn(
            f"rag_instrument.{what} is applied on top of {name}, which wraps a generator "
            "(e.g. @contextmanager): the span would only cover creating the object. "
            f"Put @{what} below @contextmanager / @asynccontextmanager instead.",
            stacklevel=4,
        )


def _decorate(fn: F, spec: _Spec, what: str) -> F:
    if isinstance(fn, classmethod | staticmethod):
        return type(fn)(_decorate(fn.__func__, spec, what))
    if not callable(fn):
        raise TypeError(
            f"rag_instrument.{what}: cannot decorate {safe_repr(fn, 80)}: it is not callable"
        )
    _warn_order(fn, what)
    kind = function_kind(fn)
    wrapper: Callable[..., Any]
    if kind is FunctionKind.ASYNC:
        wrapper = _wrap_async(fn, spec)
    elif kind is FunctionKind.GENERATOR:
        wrapper = _wrap_generator(fn, spec)
    elif kind is FunctionKind.ASYNC_GENERATOR:
        wrapper = _wrap_async_generator(fn, spec)
    else:
        wrapper = _wrap_sync(fn, spec)
    functools.update_wrapper(wrapper, fn)
    return wrapper  # type: ignore[return-value]


# --- public objects -------------------------------------------------------------------------


class Stage:
    """A stage or traced operation: a decorator and a (sync or async) context manager.

    Entering returns the span, so attributes can be added::

        with ri.stage("retrieval") as span:
            span.set_attribute("rag.documents", len(docs))

    The description (attributes, event names) is computed once, on first use, and for
    attribute-less stages shared by every object of the same name, so writing
    ``with ri.pipeline_stage_context("retrieval"):`` inline costs next to nothing.
    """

    __slots__ = (
        "_attributes",
        "_error",
        "_is_stage",
        "_last",
        "_name",
        "_open",
        "_spec",
        "_what",
    )

    def __init__(
        self,
        name: str | None,
        attributes: dict[str, Any],
        what: str,
        *,
        is_stage: bool = True,
        error: Exception | None = None,
    ) -> None:
        self._name = name
        self._attributes = attributes
        self._what = what
        self._is_stage = is_stage
        self._error = error
        self._spec: _Spec | None = None
        # The frame entered last and how many entries are open: for an exit in another
        # context than the entry's (see __exit__).
        self._last: Frame | None = None
        self._open = 0

    @property
    def name(self) -> str | None:
        """The stage (or operation) name; ``None`` for an invalid one."""
        return self._name

    def __repr__(self) -> str:
        return f"<rag_instrument.{self._what} {self._name!r}>"

    def _get_spec(self) -> _Spec:
        spec = self._spec
        if spec is None:
            assert self._name is not None
            spec = self._spec = _make_spec(self._name, self._is_stage, self._attributes)
        return spec

    def __call__(self, fn: F) -> F:
        """Decorate ``fn`` (``def``, ``async def``, generator or async generator).

        Raises:
            TypeError: the stage name was not a string, or ``fn`` is not callable.
            ValueError: the stage name was empty.
        """
        if self._error is not None:
            raise self._error
        return _decorate(fn, self._get_spec(), self._what)

    def __enter__(self) -> Span:
        rt = get_runtime()
        if not rt.enabled:
            return trace_api.INVALID_SPAN
        if self._error is not None:
            # A name computed at run time went wrong: say so, but never fail the request.
            warn_once.warning(f"rag_instrument: not traced: {self._error}")
            return trace_api.INVALID_SPAN
        try:
            spec = self._get_spec()
        except Exception as exc:  # an attribute value no sanitiser guard caught
            internal_error(f"describing {self._name!r}", exc)
            return trace_api.INVALID_SPAN
        frame = _safe_begin(spec, rt, self)
        if frame is None:
            return trace_api.INVALID_SPAN
        self._last = frame
        self._open += 1
        return frame.span

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        frame = current_frame()
        # Normally the innermost frame is ours. It is not when something opened inside
        # this block is still open (a half-consumed plain generator holding a ``with``):
        # end ours anyway, which restores the context from before this block.
        while frame is not None and frame.owner is not self:
            frame = frame.parent
        if frame is None:
            # Not in this context: the block is in an async generator that is being closed
            # from another one (the event loop's shutdown_asyncgens, the collector's
            # finalizer after a server dropped a response's body iterator). End the frame
            # this object opened, when that is unambiguous (one entry open) and not ended.
            # Or the block was left open by a plain generator and the stage around it has
            # ended since. Either way the context has moved on: restore nothing in it.
            last = self._last
            if self._open == 1 and last is not None and last.tokens is not None:
                last.tokens = None
                frame = last
        if frame is not None and self._spec is not None:
            self._open -= 1
            if frame is self._last:
                self._last = None
            _safe_end(frame, self._spec, exc)

    async def __aenter__(self) -> Span:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)


_SPECS: dict[tuple[str, bool], _Spec] = {}


def _make_spec(name: str, is_stage: bool, attributes: dict[str, Any]) -> _Spec:
    if attributes:
        return _Spec(name, is_stage, attributes)
    key = (name, is_stage)
    spec = _SPECS.get(key)
    if spec is None:
        if len(_SPECS) >= 1024:  # names computed at run time must not grow this forever
            _SPECS.clear()
        spec = _SPECS[key] = _Spec(name, is_stage, attributes)
    return spec


def _checked(name: object, what: str) -> tuple[str | None, Exception | None]:
    try:
        return _stage_name(name, what), None
    except Exception as exc:  # TypeError / ValueError, or whatever a hostile str subclass raises
        return None, exc


class _Missing:
    """The sentinel for "no positional argument given" (``None`` is a value callers pass)."""

    __slots__ = ()


_MISSING: Any = _Missing()


def _positional_or_keyword(
    value: Any, attributes: dict[str, Any], keyword: str, what: str
) -> Any:
    """The stage/span name given positionally, else by its documented keyword.

    The name is positional-only so that every keyword (``name=...`` included) is an
    attribute; ``stage(stage="retrieval")`` still means the stage, because that is what
    someone reading ``stage(stage, **attributes)`` writes.
    """
    if value is not _MISSING:
        return value
    if keyword in attributes:
        return attributes.pop(keyword)
    raise TypeError(f"{what}() missing 1 required argument: {keyword!r}")


@overload
def stage(stage: str | PipelineStage, /, **attributes: Any) -> Stage: ...


@overload
def stage(*, stage: str | PipelineStage, **attributes: Any) -> Stage: ...


def stage(stage: Any = _MISSING, /, **attributes: Any) -> Stage:
    """A pipeline stage: decorator for any function kind, and context manager.

    On exit: one span named after the stage (with ``rag.stage``, the OpenInference span
    kind, ``attributes`` and the bound context), one ``"<stage> completed"`` line with
    ``execution_time_ms`` and ``breakdown``, a ``rag.stage.duration`` point and the budget
    check. On an exception: span status ERROR with the exception recorded, a
    ``"<stage> failed"`` line with ``error_type``, and the same exception re-raised.
    Cancellation, timeouts and interrupts end the span with ``rag.cancelled = true``.

    Args:
        stage: a :class:`PipelineStage` or any non-empty string. Positional; every
            keyword is an attribute (``ri.stage("retrieval", name="my-index")``), except
            that ``ri.stage(stage="retrieval")`` without a positional argument names the stage.
        **attributes: span attributes (redacted and truncated once, on first use).

    An invalid ``stage`` (not a string, or empty) raises ``TypeError`` / ``ValueError``
    when the object decorates a function (configuration time); used as a context
    manager at run time it logs a rate-limited warning and traces nothing.
    """
    value = _positional_or_keyword(stage, attributes, "stage", "stage")
    if callable(value) and not isinstance(value, str):
        # ``@ri.stage`` without its name: the function would be replaced by the stage
        # object and fail at its first call; said now, where it is written.
        raise TypeError(
            "rag_instrument.stage: a stage needs its name: write "
            '@ri.stage("retrieval") (or @ri.traced for an operation named after the '
            f"function), not @ri.stage on {safe_repr(value, 80)}"
        )
    checked, error = _checked(value, "stage")
    return Stage(checked, attributes, "stage", error=error)


@overload
def pipeline_stage_context(stage: str | PipelineStage, /, **attributes: Any) -> Stage: ...


@overload
def pipeline_stage_context(*, stage: str | PipelineStage, **attributes: Any) -> Stage: ...


def pipeline_stage_context(stage: Any = _MISSING, /, **attributes: Any) -> Stage:
    """A pipeline stage as a context manager (the same object :func:`stage` returns).

    The stage is positional (or ``stage=`` alone); every other keyword is an attribute.
    """
    value = _positional_or_keyword(stage, attributes, "stage", "pipeline_stage_context")
    checked, error = _checked(value, "pipeline_stage_context")
    return Stage(checked, attributes, "pipeline_stage_context", error=error)


@overload
def traced(name: F, /, **attributes: Any) -> F: ...


@overload
def traced(name: str | None = None, /, **attributes: Any) -> Stage: ...


def traced(name: Any = _MISSING, /, **attributes: Any) -> Any:
    """Trace any operation that is not a pipeline stage (``@ri.traced`` or ``@ri.traced("x")``).

    Like :func:`stage` but the span has no ``rag.stage``, no budget or histogram applies,
    its completion line (``"<name> completed"``, info, with ``execution_time_ms`` and the
    ``operation`` name) names the enclosing stage in a top-level ``stage`` field, and log
    lines inside it keep the enclosing stage. Work recorded inside it rolls up into the
    enclosing stage's breakdown.

    Args:
        name: the span name (default: the decorated function's qualified name; ``"traced"``
            for a context manager). Positional, or ``name=`` when no positional argument
            is given; with a positional name, ``name=`` is an attribute like any other
            keyword (``ri.traced("lookup", name="my-index")``).
        **attributes: span attributes.
    """
    if name is _MISSING:
        name = attributes.pop("name", None)
    if callable(name) and not isinstance(name, str):
        return _Traced(None, attributes)(name)
    if name is None:
        return _Traced(None, attributes)
    checked, error = _checked(name, "traced")
    return Stage(checked, attributes, "traced", is_stage=False, error=error)


class _Traced(Stage):
    """``traced()`` without a name: named after the function it decorates."""

    __slots__ = ()

    def __init__(self, name: None, attributes: dict[str, Any]) -> None:
        super().__init__("traced", attributes, "traced", is_stage=False)

    def __call__(self, fn: F) -> F:
        target = getattr(fn, "__func__", fn)  # classmethod / staticmethod
        qualname = getattr(target, "__qualname__", None) or type(target).__qualname__
        return _decorate(
            fn, _make_spec(_clean_name(str(qualname)), False, self._attributes), "traced"
        )
