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
import traceback
import types
import warnings
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final, ParamSpec, TypeVar, overload

from opentelemetry import context as otel_context
from opentelemetry import trace as trace_api
from opentelemetry.trace import Status, StatusCode

from rag_instrument import _breakdown, _config
from rag_instrument import attributes as attr
from rag_instrument._context import Frame, bound, current_frame, reset_frame, set_frame
from rag_instrument._sanitize import to_attribute_value
from rag_instrument._utils import FunctionKind, function_kind, internal_error, user_code_error
from rag_instrument.logs import emit

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from rag_instrument._config import Runtime

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


_SPAN_KIND: Final = {
    PipelineStage.RETRIEVAL.value: attr.SpanKind.RETRIEVER,
    PipelineStage.RERANKING.value: attr.SpanKind.RERANKER,
    PipelineStage.EMBEDDING.value: attr.SpanKind.EMBEDDING,
    PipelineStage.GENERATION.value: attr.SpanKind.LLM,
}


class _Spec:
    """Everything about a stage that is known before it runs (computed once)."""

    __slots__ = (
        "attributes",
        "cancelled_event",
        "completed_event",
        "failed_event",
        "is_stage",
        "level",
        "metric_attributes",
        "name",
    )

    def __init__(self, name: str, is_stage: bool, attributes: dict[str, Any]) -> None:
        self.name = name
        self.is_stage = is_stage
        sanitizer = _config.runtime().sanitizer
        attrs: dict[str, Any] = {}
        if is_stage:
            attrs[attr.RAG_STAGE] = name
            attrs[attr.OPENINFERENCE_SPAN_KIND] = _SPAN_KIND.get(name, attr.SpanKind.CHAIN)
        for key, value in attributes.items():
            converted = to_attribute_value(value, sanitizer)
            if converted is not None:
                attrs[key] = converted
        self.attributes = attrs
        self.metric_attributes = {attr.RAG_STAGE: name}
        self.completed_event = f"{name} completed"
        self.failed_event = f"{name} failed"
        self.cancelled_event = f"{name} cancelled"
        # A traced operation's line is a detail of its stage: debug level.
        self.level = "info" if is_stage else "debug"


def _stage_name(value: object, what: str) -> str:
    if isinstance(value, PipelineStage):
        return value.value
    if not isinstance(value, str):
        raise TypeError(
            f"rag_instrument.{what}: the name must be a str or PipelineStage, "
            f"got {type(value).__name__} {value!r:.80}"
        )
    name = value.strip()
    if not name:
        raise ValueError(f"rag_instrument.{what}: the name must not be empty")
    return name


# --- begin / end ----------------------------------------------------------------------------


def _begin(spec: _Spec, rt: Runtime, owner: object) -> Frame:
    parent = current_frame()
    attributes = spec.attributes
    context_attrs = bound().attrs
    if context_attrs:
        attributes = {**context_attrs, **attributes}
    span = rt.tracer.start_span(spec.name, attributes=attributes)
    stage_name = spec.name if spec.is_stage else (parent.stage if parent is not None else None)
    frame = Frame(spec.name, stage_name, spec.is_stage, parent, span, owner)
    frame.tokens = (otel_context.attach(trace_api.set_span_in_context(span)), set_frame(frame))
    frame.start_ns = time.perf_counter_ns()
    return frame


def _safe_begin(spec: _Spec, rt: Runtime, owner: object) -> Frame | None:
    try:
        return _begin(spec, rt, owner)
    except Exception as exc:
        internal_error(f"starting {spec.name!r}", exc)
        return None


def _record_exception(span: Span, exc: BaseException, rt: Runtime) -> None:
    sanitizer = rt.sanitizer
    try:
        message = str(exc)
    except Exception:
        message = "<unprintable>"
    try:
        stack = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    except Exception:
        stack = ""
    exc_type = type(exc)
    module = exc_type.__module__
    qualname = (
        exc_type.__qualname__
        if module in ("builtins", None)
        else f"{module}.{exc_type.__qualname__}"
    )
    clean_message = sanitizer.text(message)
    span.set_status(Status(StatusCode.ERROR, f"{exc_type.__name__}: {clean_message}"))
    span.add_event(
        "exception",
        {
            "exception.type": qualname,
            "exception.message": clean_message,
            "exception.stacktrace": sanitizer.text(stack),
            "exception.escaped": True,
        },
    )


def _end(
    frame: Frame,
    spec: _Spec,
    exc: BaseException | None,
    items: int | None = None,
    completed: bool = True,
) -> None:
    elapsed_ns = time.perf_counter_ns() - frame.start_ns
    rt = _config._RUNTIME
    tokens = frame.tokens
    frame.tokens = None
    if tokens is not None:
        try:
            reset_frame(tokens[1])
            otel_context.detach(tokens[0])
        except Exception:
            # Exited in a different context than entered (a misused context manager):
            # restore nothing rather than someone else's state.
            pass
    ms = elapsed_ns / 1e6
    breakdown = frame.breakdown
    if breakdown:
        _breakdown.roll_up(frame)
    span = frame.span
    cancelled = exc is not None and not isinstance(exc, Exception)
    budget = rt.budgets.get(spec.name) if spec.is_stage and rt.budgets else None
    exceeded = budget is not None and ms > budget
    if span.is_recording():
        if breakdown:
            span.set_attributes(_breakdown.as_attributes(breakdown))
        if items is not None:
            span.set_attribute(attr.RAG_STREAM_ITEMS, items)
            span.set_attribute(attr.RAG_STREAM_COMPLETED, completed)
        if exc is not None:
            span.set_attribute(attr.ERROR_TYPE, type(exc).__qualname__)
            if cancelled:
                span.set_attribute(attr.RAG_CANCELLED, True)
            else:
                _record_exception(span, exc, rt)
        if exceeded:
            span.set_attribute(attr.RAG_BUDGET_EXCEEDED, True)
            span.set_attribute(attr.RAG_BUDGET_MS, budget)
    try:
        span.end()
    except Exception as end_exc:  # a span processor we do not own raised
        user_code_error("ending a span", end_exc)
    if spec.is_stage:
        rt.stage_duration.record(ms / 1000.0, spec.metric_attributes)
    if rt.log is not None:
        fields: dict[str, Any] = {"execution_time_ms": round(ms, 3)}
        if breakdown:
            fields["breakdown"] = _breakdown.render(breakdown)
        if items is not None:
            fields["items"] = items
        if exc is None:
            event, level = spec.completed_event, spec.level
        elif cancelled:
            event, level = spec.cancelled_event, "warning"
            fields["error_type"] = type(exc).__name__
        else:
            event, level = spec.failed_event, "error"
            fields["error_type"] = type(exc).__name__
            fields["error_message"] = rt.sanitizer.text(_message(exc))
        # Only a stage's own line reports its duration under context.pipeline_stage, so
        # per-stage aggregations of execution_time_ms (the README's jq one-liner, the
        # analyzer) count each run exactly once.
        line_stage = spec.name if spec.is_stage else ""
        if not spec.is_stage:
            fields["operation"] = spec.name
        emit(level, event, fields, span=span, stage=line_stage, trusted=True, rt=rt)
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


def _message(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return "<unprintable>"


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
        rt = _config._RUNTIME
        if not rt.enabled:
            return fn(*args, **kwargs)
        frame = _safe_begin(spec, rt, wrapper)
        if frame is None:
            return fn(*args, **kwargs)
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            _safe_end(frame, spec, exc)
            raise
        _safe_end(frame, spec, None)
        return result

    return wrapper


def _wrap_async(fn: Callable[P, Awaitable[R]], spec: _Spec) -> Callable[P, Awaitable[R]]:
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        rt = _config._RUNTIME
        if not rt.enabled:
            return await fn(*args, **kwargs)
        frame = _safe_begin(spec, rt, wrapper)
        if frame is None:
            return await fn(*args, **kwargs)
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:
            _safe_end(frame, spec, exc)
            raise
        _safe_end(frame, spec, None)
        return result

    return wrapper


def _drive_generator(
    gen: Generator[Any, Any, Any], ctx: contextvars.Context, frame: Frame, spec: _Spec
) -> Generator[Any, Any, Any]:
    items = 0
    value: Any = None
    pending: BaseException | None = None
    failure: BaseException | None = None
    completed = False
    try:
        while True:
            try:
                if pending is None:
                    item = ctx.run(gen.send, value)
                else:
                    thrown, pending = pending, None
                    item = ctx.run(gen.throw, thrown)
            except StopIteration as stop:
                completed = True
                return stop.value
            items += 1
            try:
                value = yield item
            except GeneratorExit:
                ctx.run(gen.close)
                raise
            except BaseException as exc:  # .throw() from the consumer: pass it in
                pending, value = exc, None
    except GeneratorExit:
        raise
    except BaseException as exc:
        failure = exc
        raise
    finally:
        ctx.run(_safe_end, frame, spec, failure, items, completed)


def _wrap_generator(
    fn: Callable[P, Generator[Any, Any, R]], spec: _Spec
) -> Callable[P, Generator[Any, Any, R]]:
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> Generator[Any, Any, R]:
        rt = _config._RUNTIME
        if not rt.enabled:
            return (yield from fn(*args, **kwargs))
        ctx = contextvars.copy_context()
        gen = ctx.run(fn, *args, **kwargs)
        frame = ctx.run(_safe_begin, spec, rt, wrapper)
        if frame is None:
            result: R = yield from gen
            return result
        driven: R = yield from _drive_generator(gen, ctx, frame, spec)
        return driven

    return wrapper


@types.coroutine
def _in_context(ctx: contextvars.Context, awaitable: Awaitable[R]) -> Generator[Any, Any, R]:
    """Await ``awaitable`` with each of its steps running inside ``ctx``.

    This is ``yield from awaitable.__await__()`` except that every ``send``/``throw`` into
    it happens in ``ctx``: the event loop's futures pass through untouched, so
    cancellation and timeouts reach the awaitable exactly as they would without us.
    """
    iterator = awaitable.__await__()
    value: Any = None
    pending: BaseException | None = None
    while True:
        try:
            if pending is None:
                signal = ctx.run(iterator.send, value)
            else:
                thrown, pending = pending, None
                signal = ctx.run(iterator.throw, thrown)
        except StopIteration as stop:
            result: R = stop.value
            return result
        try:
            value = yield signal
        except BaseException as exc:
            pending, value = exc, None


async def _drive_async_generator(
    agen: AsyncGenerator[Any, Any],
    ctx: contextvars.Context | None,
    frame: Frame | None,
    spec: _Spec,
) -> AsyncGenerator[Any, Any]:
    items = 0
    value: Any = None
    pending: BaseException | None = None
    failure: BaseException | None = None
    completed = False
    try:
        while True:
            try:
                if pending is None:
                    step = agen.asend(value)
                else:
                    thrown, pending = pending, None
                    step = agen.athrow(thrown)
                item = await (step if ctx is None else _in_context(ctx, step))
            except StopAsyncIteration:
                completed = True
                return
            items += 1
            try:
                value = yield item
            except GeneratorExit:
                closing = agen.aclose()
                await (closing if ctx is None else _in_context(ctx, closing))
                raise
            except BaseException as exc:
                pending, value = exc, None
    except GeneratorExit:
        raise
    except BaseException as exc:
        failure = exc
        raise
    finally:
        if frame is not None and ctx is not None:
            ctx.run(_safe_end, frame, spec, failure, items, completed)


def _wrap_async_generator(
    fn: Callable[P, AsyncGenerator[Any, Any]], spec: _Spec
) -> Callable[P, AsyncGenerator[Any, Any]]:
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> AsyncGenerator[Any, Any]:
        rt = _config._RUNTIME
        if not rt.enabled:
            driver = _drive_async_generator(fn(*args, **kwargs), None, None, spec)
        else:
            ctx = contextvars.copy_context()
            agen = ctx.run(fn, *args, **kwargs)
            frame = ctx.run(_safe_begin, spec, rt, wrapper)
            driver = _drive_async_generator(agen, ctx if frame else None, frame, spec)
        # Delegate to the driver (async generators have no ``yield from``).
        value: Any = None
        pending: BaseException | None = None
        try:
            while True:
                try:
                    if pending is None:
                        item = await driver.asend(value)
                    else:
                        thrown, pending = pending, None
                        item = await driver.athrow(thrown)
                except StopAsyncIteration:
                    return
                try:
                    value = yield item
                except GeneratorExit:
                    raise
                except BaseException as exc:
                    pending, value = exc, None
        finally:
            await driver.aclose()

    return wrapper


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
        raise TypeError(f"rag_instrument.{what}: cannot decorate {fn!r:.80}: it is not callable")
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
    """

    __slots__ = ("_spec", "_what")

    def __init__(self, spec: _Spec, what: str) -> None:
        self._spec = spec
        self._what = what

    @property
    def name(self) -> str:
        """The stage (or operation) name."""
        return self._spec.name

    def __repr__(self) -> str:
        return f"<rag_instrument.{self._what} {self._spec.name!r}>"

    def __call__(self, fn: F) -> F:
        """Decorate ``fn`` (``def``, ``async def``, generator or async generator)."""
        return _decorate(fn, self._spec, self._what)

    def __enter__(self) -> Span:
        rt = _config._RUNTIME
        if not rt.enabled:
            return trace_api.INVALID_SPAN
        frame = _safe_begin(self._spec, rt, self)
        return frame.span if frame is not None else trace_api.INVALID_SPAN

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        frame = current_frame()
        if frame is not None and frame.owner is self:
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


def stage(name: str | PipelineStage, **attributes: Any) -> Stage:
    """A pipeline stage: decorator for any function kind, and context manager.

    On exit: one span named after the stage (with ``rag.stage``, the OpenInference span
    kind, ``attributes`` and the bound context), one ``"<stage> completed"`` line with
    ``execution_time_ms`` and ``breakdown``, a ``rag.stage.duration`` point and the budget
    check. On an exception: span status ERROR with the exception recorded, a
    ``"<stage> failed"`` line with ``error_type``, and the same exception re-raised.
    Cancellation, timeouts and interrupts end the span with ``rag.cancelled = true``.

    Args:
        name: a :class:`PipelineStage` or any non-empty string.
        **attributes: span attributes (redacted and truncated once, here).

    Raises:
        TypeError: ``name`` is not a string.
        ValueError: ``name`` is empty.
    """
    return Stage(_Spec(_stage_name(name, "stage"), True, attributes), "stage")


def pipeline_stage_context(name: str | PipelineStage, **attributes: Any) -> Stage:
    """A pipeline stage as a context manager (the same object :func:`stage` returns)."""
    return Stage(_Spec(_stage_name(name, "pipeline_stage_context"), True, attributes), "stage")


@overload
def traced(name: F, **attributes: Any) -> F: ...


@overload
def traced(name: str | None = None, **attributes: Any) -> _Traced: ...


def traced(name: Any = None, **attributes: Any) -> Any:
    """Trace any operation that is not a pipeline stage (``@ri.traced`` or ``@ri.traced("x")``).

    Like :func:`stage` but the span has no ``rag.stage``, no budget or histogram applies,
    its completion line is at debug level, and log lines inside it keep the enclosing
    stage. Work recorded inside it rolls up into the enclosing stage's breakdown.

    Args:
        name: the span name (default: the decorated function's qualified name).
        **attributes: span attributes.
    """
    if callable(name) and not isinstance(name, str):
        return _Traced(None, attributes)(name)
    if name is not None:
        name = _stage_name(name, "traced")
    return _Traced(name, attributes)


class _Traced(Stage):
    """``traced()``: named now, or after the function it decorates."""

    __slots__ = ("_attributes", "_named")

    def __init__(self, name: str | None, attributes: dict[str, Any]) -> None:
        super().__init__(_Spec(name or "traced", False, attributes), "traced")
        self._attributes = attributes
        self._named = name is not None

    def __call__(self, fn: F) -> F:
        spec = self._spec
        if not self._named:
            target = getattr(fn, "__func__", fn)  # classmethod / staticmethod
            qualname = getattr(target, "__qualname__", None) or type(target).__qualname__
            spec = _Spec(str(qualname), False, self._attributes)
        return _decorate(fn, spec, "traced")
