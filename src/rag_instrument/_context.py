"""Per-task and per-thread state: bound log context and the stack of open stages.

Both live in :mod:`contextvars`, so every asyncio task and every thread sees only its own
values (a task starts with a copy of its creator's, a new thread with none). Values are
stored immutably and replaced on change, so a copied context can never be mutated by the
task it was copied from.
"""

from __future__ import annotations

import collections
import contextvars
import functools
import inspect
import threading
import types
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator
from typing import TYPE_CHECKING, Any, Final, ParamSpec, TypeVar, cast

from opentelemetry import context as otel_context
from opentelemetry import trace as trace_api
from opentelemetry.context.context import Context

from rag_instrument._runtime import OTEL_CONTEXT_VAR, get_runtime
from rag_instrument._sanitize import REDACTED, is_secret_key, to_attribute_value
from rag_instrument._utils import internal_error, warn_once

if TYPE_CHECKING:
    from opentelemetry.trace import Span

__all__ = [
    "Bound",
    "Frame",
    "attach_span",
    "bind_context",
    "bound",
    "current_frame",
    "current_span",
    "current_stage",
    "detach_span",
    "note_content",
    "on_frame_end",
    "request_context",
    "run_end_hooks",
    "seen_contents",
    "unbind_context",
    "wrap_context",
]

P = ParamSpec("P")
R = TypeVar("R")


class BoundScope:
    """What a set of bound values belongs to.

    One request (``request_context()``, the request middleware), or the process outside
    any. Values bound or unbound within it keep it; a stage that ends under another
    scope's values ended elsewhere (see stages).
    """

    __slots__ = ()


ROOT_SCOPE: Final = BoundScope()


class Bound:
    """An immutable snapshot of bound values, in log form and in span-attribute form."""

    __slots__ = ("attrs", "log", "scope")

    def __init__(
        self, log: dict[str, Any], attrs: dict[str, Any], scope: BoundScope = ROOT_SCOPE
    ) -> None:
        self.log = log
        self.attrs = attrs
        self.scope = scope


EMPTY = Bound({}, {})
_bound: contextvars.ContextVar[Bound] = contextvars.ContextVar(
    "rag_instrument.bound", default=EMPTY
)


class Frame:
    """One open stage (or traced operation) in the current task or thread.

    ``breakdown`` accumulates the work reported while this frame is the innermost one; at
    exit it is rolled up into ``parent``. ``stage`` is the pipeline stage log lines inside
    this frame report (a traced operation inherits its parent's). ``owner``: the object
    that opened it, for a ``with`` block to find its own frame (``None`` when nothing looks);
    an owner that keeps the frame must drop it when the frame ends, or the two form a
    reference cycle that only the garbage collector frees, with all they hold.
    """

    __slots__ = (
        "attr_count",
        "bound",
        "breakdown",
        "ended",
        "is_stage",
        "name",
        "owner",
        "parent",
        "scratch",
        "span",
        "stage",
        "start_attrs",
        "start_ns",
        "tokens",
    )

    def __init__(
        self,
        name: str,
        stage: str | None,
        is_stage: bool,
        parent: Frame | None,
        span: Span,
        owner: object,
    ) -> None:
        self.name = name
        self.stage = stage
        self.is_stage = is_stage
        self.parent = parent
        self.span = span
        self.owner = owner
        self.breakdown: dict[str, dict[str, float]] | None = None
        #: Set when its totals were taken: work reported later goes to an open ancestor.
        self.ended = False
        self.start_ns = 0
        self.tokens: tuple[Any, Any] | None = None
        #: The attributes the span was started with (all sanitised by us).
        self.start_attrs: dict[str, Any] | None = None
        #: How many attributes the span was started with.
        self.attr_count = 0
        #: Per-frame state for integrations (e.g. N+1 statement counts), created on demand.
        self.scratch: dict[str, Any] | None = None
        #: The values bound where the frame started (for lines written where it ends, when
        #: that is another context: a generator closed by the collector).
        self.bound: Bound | None = None


_frame: contextvars.ContextVar[Frame | None] = contextvars.ContextVar(
    "rag_instrument.frame", default=None
)

current_frame = _frame.get
set_frame = _frame.set
reset_frame = _frame.reset
bound = _bound.get
set_bound = _bound.set
reset_bound = _bound.reset


# --- content seen by a stage -----------------------------------------------------------------

_CONTENTS_KEY: Final = "rag_instrument.contents"
#: Content texts kept per tree of stages (a request's): the most recent ones.
_MAX_CONTENTS: Final = 64
_MIN_CONTENT_CHARS: Final = 8


def _root(frame: Frame) -> Frame:
    parent = frame.parent
    while parent is not None:
        frame, parent = parent, parent.parent
    return frame


def note_content(text: object) -> None:
    """Remember prompt or completion ``text`` for the current tree of stages (content capture off).

    An exception raised later in any stage of that tree (the request's, or the outermost
    stage's) that quotes it has the quote hidden on the stage's span and failed line: a
    stage hides what it saw, and what its siblings saw too. Kept once, on the outermost
    frame, and only as references, until that frame ends.
    """
    if not isinstance(text, str) or len(text) < _MIN_CONTENT_CHARS:
        return
    frame = _frame.get()
    if frame is None:
        return
    root = _root(frame)
    scratch = root.scratch
    if scratch is None:
        scratch = root.scratch = {}
    seen = scratch.get(_CONTENTS_KEY)
    if seen is None:
        seen = scratch.setdefault(_CONTENTS_KEY, collections.deque(maxlen=_MAX_CONTENTS))
    seen.append(text)


def seen_contents(frame: Any = None) -> tuple[str, ...]:
    """The content texts noted in ``frame``'s tree of stages (default: the current one)."""
    if frame is None:
        frame = _frame.get()
    if not isinstance(frame, Frame):
        return ()
    scratch = _root(frame).scratch
    if not scratch:
        return ()
    return tuple(scratch.get(_CONTENTS_KEY, ()))


_END_HOOKS: Final = "rag_instrument.end_hooks"


def on_frame_end(frame: Frame, hook: Callable[[], None]) -> None:
    """Call ``hook`` when ``frame``'s stage ends, while it is still the current frame."""
    scratch = frame.scratch
    if scratch is None:
        scratch = frame.scratch = {}
    scratch.setdefault(_END_HOOKS, []).append(hook)


def run_end_hooks(frame: Frame) -> None:
    """Run (once) the hooks registered with :func:`on_frame_end`; never raises."""
    scratch = frame.scratch
    hooks = scratch.pop(_END_HOOKS, None) if scratch is not None else None
    if not hooks:
        return
    for hook in hooks:
        try:
            hook()
        except Exception as exc:
            internal_error("ending a scope", exc)


def _span_key() -> str | None:
    # The key the API's ``set_span_in_context`` stores the current span under. Private to
    # the API; when it is not where expected, attaching goes through the API instead.
    try:
        from opentelemetry.trace.propagation import _SPAN_KEY
    except ImportError:  # pragma: no cover - a future API
        return None
    probe = trace_api.NonRecordingSpan(trace_api.INVALID_SPAN_CONTEXT)
    context = trace_api.set_span_in_context(probe, Context())
    return _SPAN_KEY if context.get(_SPAN_KEY) is probe and len(context) == 1 else None


_SPAN_KEY = _span_key()
_CURRENT = OTEL_CONTEXT_VAR if _SPAN_KEY is not None else None


def attach_span(span: Span) -> Any:
    """Make ``span`` the current span; return the token for :func:`detach_span`.

    The same as ``context.attach(trace.set_span_in_context(span))``: a new OpenTelemetry
    context with ``span`` under the API's key, set in the API's own context variable, but
    without the four calls in between (a stage's hot path).
    """
    var = _CURRENT
    if var is None:
        return otel_context.attach(trace_api.set_span_in_context(span))
    values: dict[str, object] = {**var.get(), _SPAN_KEY: span}  # type: ignore[dict-item]
    return var.set(Context(values))


def current_span() -> Span:
    """``trace.get_current_span()``, read from the API's context variable directly."""
    var = _CURRENT
    if var is None:
        return trace_api.get_current_span()
    span: Span = var.get().get(_SPAN_KEY, trace_api.INVALID_SPAN)  # type: ignore[arg-type,assignment]
    return span


def detach_span(token: Any) -> None:
    """Restore the context from before :func:`attach_span`.

    Raises:
        ValueError: the token was made in another context (the caller decides).
    """
    var = _CURRENT
    if var is None:
        otel_context.detach(token)
    else:
        var.reset(token)


#: The attributes a span of the library's starts with, at most: spans keep 128 (the SDK
#: drops the oldest beyond, with a warning each time), and the library adds about a dozen
#: when a span ends (breakdown, error, budget, stream). Its own always fit.
START_ATTRIBUTES_MAX: Final = 112
#: Of those, the most a stage's own attributes take, given ones included: the rest is for
#: the bound values (the request id).
STAGE_ATTRIBUTES_MAX: Final = 64


def within_span_limit(
    context_attrs: dict[str, Any], own: dict[str, Any], what: str
) -> dict[str, Any]:
    """``{**context_attrs, **own}`` cut to :data:`START_ATTRIBUTES_MAX`, ``own`` kept whole.

    The bound values beyond the limit are left off the span (the log lines keep them), with
    a warning (rate-limited): the latest bound are kept (a request's id, bound by the
    middleware over the application-wide values); ``own``: the span's own attributes, at
    most the limit.
    """
    if len(context_attrs) + len(own) <= START_ATTRIBUTES_MAX:
        return {**context_attrs, **own}
    room = max(START_ATTRIBUTES_MAX - len(own), 0)
    kept = dict(list(context_attrs.items())[-room:]) if room else {}
    warn_once.warning(
        f"rag_instrument: {len(context_attrs)} bound values are more than the span of "
        f"{what!r} can hold with its own: it keeps the {room} bound last (the lines keep all)"
    )
    return {**kept, **own}


def current_stage() -> str | None:
    """The pipeline stage the current task or thread is in, or ``None``."""
    frame = _frame.get()
    return frame.stage if frame is not None else None


def _make_bound(base: Bound, kv: dict[str, Any], scope: BoundScope | None = None) -> Bound:
    sanitizer = get_runtime().sanitizer
    log = dict(base.log)
    attrs = dict(base.attrs)
    for key, value in kv.items():
        if key == "pipeline_stage":
            # Reserved: the stage comes from the stage being run, never from bound values.
            warn_once.warning("rag_instrument: 'pipeline_stage' cannot be bound; ignored")
            continue
        log[key] = sanitizer.value(value, key)
        # From the value itself, as a stage's own attributes are: the log's form is already
        # cut, and cutting it again would report the cut length as the original's.
        if sanitizer.redact and is_secret_key(key):
            attr: Any = REDACTED
        else:
            attr = to_attribute_value(value, sanitizer)
        if attr is None:
            attrs.pop(key, None)
        else:
            attrs[key] = attr
    return Bound(log, attrs, base.scope if scope is None else scope)


def bind_context(**kv: Any) -> None:
    """Bind values that appear under ``"context"`` in every log line of this task or thread.

    They also become span attributes of stages started afterwards. Values are redacted and
    truncated once, here, not on every log line.
    """
    try:
        _bound.set(_make_bound(_bound.get(), kv))
    except Exception as exc:
        internal_error("bind_context", exc)


def unbind_context(*keys: str) -> None:
    """Remove bound values by key; never raises.

    Missing keys are ignored; a list (tuple, set) of keys is read as its keys.
    """
    try:
        wanted: set[Any] = set()
        key: Any
        for key in keys:
            if isinstance(key, list | tuple | set | frozenset):
                wanted.update(k for k in key if isinstance(k, str))
            elif isinstance(key, str):
                wanted.add(key)
        current = _bound.get()
        if not any(k in current.log for k in wanted):
            return
        log = {k: v for k, v in current.log.items() if k not in wanted}
        attrs = {k: v for k, v in current.attrs.items() if k not in wanted}
        _bound.set(Bound(log, attrs, current.scope))
    except Exception as exc:
        internal_error("unbind_context", exc)


# Guards the entries of request_context objects shared by threads (held for a list step).
_ENTRIES_LOCK: Final = threading.Lock()


class _RequestContext:
    """What :func:`request_context` returns: ``with``, ``async with``, or a decorator.

    The same object may be entered again, nested or from concurrent tasks: each exit
    restores what its own entry replaced. As a decorator (of a ``def``, an ``async def``,
    a generator or an async generator function) each call is a block of its own; a
    generator's every step runs with the values bound.
    """

    __slots__ = ("_kv", "_tokens")

    def __init__(self, kv: dict[str, Any]) -> None:
        self._kv = kv
        self._tokens: list[contextvars.Token[Bound]] = []

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        kv = self._kv
        wrapper: Callable[..., Any]
        if inspect.isasyncgenfunction(fn):
            wrapper = _async_generator_in(functools.partial(_bound_copy, kv), fn)
        elif inspect.isgeneratorfunction(fn):

            def run_generator(*args: Any, **kwargs: Any) -> Generator[Any, Any, Any]:
                copy = _bound_copy(kv)
                return (yield from _steps_in(copy, copy.run(fn, *args, **kwargs)))

            wrapper = run_generator
        elif inspect.iscoroutinefunction(fn):

            async def run_async(*args: Any, **kwargs: Any) -> Any:
                async with _RequestContext(kv):
                    return await fn(*args, **kwargs)

            wrapper = run_async
        else:

            def run(*args: Any, **kwargs: Any) -> Any:
                with _RequestContext(kv):
                    return fn(*args, **kwargs)

            wrapper = run
        functools.update_wrapper(wrapper, fn)
        return cast("Callable[P, R]", wrapper)

    def __enter__(self) -> None:
        try:
            token = _bound.set(_make_bound(_bound.get(), self._kv, BoundScope()))  # a request
        except Exception as exc:
            internal_error("request_context", exc)
            return
        with _ENTRIES_LOCK:
            self._tokens.append(token)

    def __exit__(self, *exc_info: object) -> None:
        # The latest entry made in this context (another task's or thread's entries of the
        # same object belong to their own contexts: resetting one of those here fails, and
        # is skipped). None of them: exited in another context than it was entered in (a
        # generator finalised elsewhere): the other context's values must not be touched.
        with _ENTRIES_LOCK:
            tokens = list(reversed(self._tokens))
        for token in tokens:
            try:
                _bound.reset(token)
            except (ValueError, RuntimeError):
                continue
            with _ENTRIES_LOCK:
                try:
                    self._tokens.remove(token)
                except ValueError:
                    pass
            return

    async def __aenter__(self) -> None:
        self.__enter__()

    async def __aexit__(self, *exc_info: object) -> None:
        self.__exit__(*exc_info)


def _bound_copy(kv: dict[str, Any]) -> contextvars.Context:
    """A copy of the current context with ``kv`` bound in it (a request of its own)."""
    copy = contextvars.copy_context()
    try:
        copy.run(_bound.set, _make_bound(_bound.get(), kv, BoundScope()))
    except Exception as exc:
        internal_error("request_context", exc)
    return copy


def request_context(**kv: Any) -> _RequestContext:
    """Bind values for a ``with`` or ``async with`` block (or a decorated function's call).

    What was bound before is restored at the end.

    Example:
        >>> import rag_instrument as ri
        >>> with ri.request_context(request_id="r-1"):
        ...     pass
    """
    return _RequestContext(kv)


def wrap_context(fn: Callable[P, R]) -> Callable[P, R]:
    """Return ``fn`` bound to a copy of the caller's context (trace, stage, bound values).

    Use it to run work in a thread pool or executor that should belong to the caller's
    request::

        loop.run_in_executor(None, ri.wrap_context(work), arg)

    Each call runs in a fresh copy, so a reused worker thread keeps nothing from the
    previous job, and concurrent calls do not see each other's changes. A coroutine
    function, generator function or async generator function stays one (its body, run
    step by step wherever it is awaited or iterated, sees the copy at every step), and
    the wrapper keeps ``fn``'s name, qualified name, module and docstring.
    """
    ctx = contextvars.copy_context()
    wrapper: Callable[..., Any]
    if inspect.iscoroutinefunction(fn):

        async def run_coroutine(*args: Any, **kwargs: Any) -> Any:
            copy = ctx.copy()
            return await _InContext(copy, copy.run(fn, *args, **kwargs))

        wrapper = run_coroutine
    elif inspect.isasyncgenfunction(fn):

        wrapper = _async_generator_in(ctx.copy, fn)
    elif inspect.isgeneratorfunction(fn):

        def run_generator(*args: Any, **kwargs: Any) -> Generator[Any, Any, Any]:
            copy = ctx.copy()
            return (yield from _steps_in(copy, copy.run(fn, *args, **kwargs)))

        wrapper = run_generator
        inner: Any = fn
        while isinstance(inner, functools.partial):
            inner = inner.func
        flags = getattr(getattr(inner, "__code__", None), "co_flags", 0)
        if flags & inspect.CO_ITERABLE_COROUTINE:  # @types.coroutine: awaitable, stays so
            wrapper = types.coroutine(run_generator)
    else:

        def run(*args: Any, **kwargs: Any) -> Any:
            return ctx.copy().run(fn, *args, **kwargs)

        wrapper = run
    try:
        functools.update_wrapper(wrapper, fn)
    except Exception:  # an object without the usual attributes (a callable instance)
        setattr(wrapper, "__wrapped__", fn)  # noqa: B010
    return cast("Callable[P, R]", wrapper)


def _async_generator_in(
    make_context: Callable[[], contextvars.Context], fn: Callable[..., Any]
) -> Callable[..., AsyncGenerator[Any, Any]]:
    """An async generator function running ``fn``'s every step in a context of its call's.

    ``make_context`` gives each call its context (a copy).
    """

    async def run_async_generator(*args: Any, **kwargs: Any) -> AsyncGenerator[Any, Any]:
        copy = make_context()
        agen = copy.run(fn, *args, **kwargs)
        try:
            item = await _InContext(copy, agen.asend(None))
            while True:
                try:
                    sent = yield item
                except GeneratorExit:
                    raise
                except BaseException as exc:
                    item = await _InContext(copy, agen.athrow(exc))
                else:
                    item = await _InContext(copy, agen.asend(sent))
        except StopAsyncIteration:
            return
        finally:
            await _InContext(copy, agen.aclose())

    return run_async_generator


def _steps_in(ctx: contextvars.Context, steps: Any) -> Generator[Any, Any, Any]:
    """Drive a generator or coroutine ``steps``, running each of its steps in ``ctx``."""
    try:
        item = ctx.run(steps.send, None)
    except StopIteration as stop:
        return stop.value
    while True:
        try:
            sent = yield item
        except GeneratorExit:
            ctx.run(steps.close)
            raise
        except BaseException as exc:  # thrown in (a cancellation): the body sees it
            try:
                item = ctx.run(steps.throw, exc)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                item = ctx.run(steps.send, sent)
            except StopIteration as stop:
                return stop.value


class _InContext:
    """An awaitable that runs a coroutine's (or an async generator step's) steps in ``ctx``."""

    __slots__ = ("ctx", "steps")

    def __init__(self, ctx: contextvars.Context, steps: Awaitable[Any]) -> None:
        self.ctx = ctx
        self.steps = steps

    def __await__(self) -> Generator[Any, Any, Any]:
        steps: Any = self.steps
        if not hasattr(steps, "send"):  # an awaitable object, not a coroutine
            steps = steps.__await__()
        return _steps_in(self.ctx, steps)
