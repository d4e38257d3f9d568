"""``profile()``: a deterministic profile of one block or call, as one log line.

::

    @ri.profile(top=10)
    def rerank(query: str, docs: list[str]) -> list[str]: ...

    with ri.profile("rerank", memory=True, save_to="rerank.prof"):
        ...

Each run logs one ``"profile"`` line: the top functions by ``sort`` (``function`` as
``module:qualname:line``, ``calls``, ``tottime_ms``, ``cumtime_ms``), with ``memory=True``
the traced peak (``peak_kib``) and the top allocation sites, and with ``save_to`` a
``.prof`` file that ``python -m pstats`` and snakeviz open.

How the profile stays scoped to the code it wraps. The profiler (:mod:`cProfile`; on
Python 3.12+ cProfile itself runs on :mod:`sys.monitoring`, PEP 669) is switched on only
while that code runs:

- a ``def`` or a ``with`` block: from entry to exit;
- a decorated ``async def``, generator or async generator: around each step of it (each
  ``send``/``throw`` into the coroutine or generator), and off while it is suspended, so
  what the event loop (or the generator's consumer) runs in between is not recorded;
- an ``async with`` block (or a plain ``with`` inside a coroutine, which may ``await``
  too): on Python 3.12+, ``sys.monitoring`` reports the block's own
  frame suspending and resuming (``PY_YIELD`` / ``PY_RESUME`` set on that one code
  object, so nothing else in the process pays for it) and the profiler is paused in
  between. Python 3.11 has no such events: there the profiler runs on a clock that only
  advances while the block's task is the one running, and functions that took none of
  that task's time are dropped from the result.

On 3.12+ cProfile's hooks are process-wide: calls other threads make while a profile is
switched on are recorded too (3.11's hook is per thread).

Only one profiler can run at a time (on 3.12+ per process, on 3.11 per thread). A
profile that finds one already running (a nested ``profile``, ``cProfile``, a debugger's
profiler) still times its code and logs its line, at warning level with
``profiled: false`` and the ``reason``; it never raises.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import os
import sys
import threading
import types
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Generator
from typing import Any, TypeVar, overload

from rag_instrument._profiler import MONITORING, SORT_KEYS, Run, RunRelay, pauser
from rag_instrument._steps import Relay, relay, relay_async_generator
from rag_instrument._utils import FunctionKind, function_kind

__all__ = ["Profile", "profile"]

F = TypeVar("F", bound=Callable[..., Any])
R = TypeVar("R")

def _label_of(fn: Callable[..., Any]) -> str:
    target = getattr(fn, "__func__", fn)
    module = getattr(target, "__module__", None) or "?"
    qualname = getattr(target, "__qualname__", None) or type(target).__qualname__
    return f"{module}:{qualname}"


class Profile:
    """A profile: context manager (``with``, ``async with``) and decorator.

    Made by :func:`profile`; see the module documentation for what is recorded and how a
    run is scoped to the code it wraps.
    """

    __slots__ = ("memory", "name", "save_to", "sort", "top")

    def __init__(
        self,
        name: str | None,
        top: int,
        sort: str,
        memory: bool,
        save_to: str | os.PathLike[str] | None,
    ) -> None:
        # ValueError for every bad argument, type or value: the library's one configuration
        # error (API.md section 1).
        where = "rag_instrument.profile"
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise ValueError(f"{where}: name must be a non-empty string, got {name!r}")
        if isinstance(top, bool) or not isinstance(top, int) or top < 1:
            raise ValueError(f"{where}: top must be a positive integer, got {top!r}")
        if sort not in SORT_KEYS:
            raise ValueError(f"{where}: sort must be one of {', '.join(SORT_KEYS)}, got {sort!r}")
        if not isinstance(memory, bool):
            raise ValueError(f"{where}: memory must be True or False, got {memory!r}")  # noqa: TRY004
        if save_to is not None and not isinstance(save_to, str | os.PathLike):
            raise ValueError(f"{where}: save_to must be a file path, got {save_to!r}")
        self.name = name.strip() if name is not None else None
        self.top = top
        self.sort = sort
        self.memory = memory
        self.save_to = os.fspath(save_to) if save_to is not None else None

    def __repr__(self) -> str:
        return f"<rag_instrument.profile {self.name or ''!r} sort={self.sort!r} top={self.top}>"

    # --- context manager ---------------------------------------------------------------------

    def __enter__(self) -> Profile:
        caller = sys._getframe(1)
        flags = caller.f_code.co_flags
        if flags & (inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR) and (
            asyncio._get_running_loop() is not None
        ):
            # A plain ``with`` in a coroutine may still ``await`` inside: scope it like
            # ``async with``.
            self._enter_block(caller)
            return self
        run = Run(self, self.name or "profile")
        _push_run(self, run)
        run.start()
        run.resume()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._exit_block()

    async def __aenter__(self) -> Profile:
        self._enter_block(sys._getframe(1))  # the coroutine that runs ``async with``
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._exit_block()

    def _enter_block(self, caller: types.FrameType) -> None:
        """Start a run for a block in a coroutine: paused while ``caller`` is suspended."""
        run = Run(self, self.name or "profile")
        _push_run(self, run)
        if MONITORING:
            run.start()
            if run.profiler is not None:
                if pauser.add(caller, run):
                    run.block_frame = caller
                else:
                    run.reasons.append(
                        "no free sys.monitoring tool id: other tasks' work may be included"
                    )
        else:
            run.start(task_clock=True)
        run.resume()

    def _exit_block(self) -> None:
        run = _pop_run(self)
        if run is None:
            return
        run.pause()
        if run.block_frame is not None:
            pauser.remove(run.block_frame, run)
            run.block_frame = None
        run.finish()

    # --- decorator ---------------------------------------------------------------------------

    def __call__(self, fn: F) -> F:
        """Profile each call of ``fn`` (``def``, ``async def``, generator or async generator)."""
        if isinstance(fn, classmethod | staticmethod):
            return type(fn)(self(fn.__func__))
        if not callable(fn):
            raise TypeError(f"rag_instrument.profile: cannot decorate {fn!r:.80}: not callable")
        label = self.name or _label_of(fn)
        kind = function_kind(fn)
        wrapper: Callable[..., Any]
        if kind is FunctionKind.ASYNC:
            wrapper = self._wrap_async(fn, label)
        elif kind is FunctionKind.GENERATOR:
            wrapper = self._wrap_generator(fn, label)
        elif kind is FunctionKind.ASYNC_GENERATOR:
            wrapper = self._wrap_async_generator(fn, label)
        else:
            wrapper = self._wrap_sync(fn, label)
        functools.update_wrapper(wrapper, fn)
        return wrapper  # type: ignore[return-value]

    def _wrap_sync(self, fn: Callable[..., R], label: str) -> Callable[..., R]:
        key = object()  # this decorated function, in the runs open in this task or thread

        def wrapper(*args: Any, **kwargs: Any) -> R:
            active = _in_progress.get()
            mine = (key, _runner())
            if mine in active:  # a recursive call: the outermost call's run profiles it
                return fn(*args, **kwargs)
            token = _in_progress.set(active | {mine})
            run = Run(self, label)
            run.start()
            run.resume()
            try:
                return fn(*args, **kwargs)
            finally:
                run.pause()
                run.finish()
                _in_progress.reset(token)

        return wrapper

    def _wrap_async(
        self, fn: Callable[..., Awaitable[R]], label: str
    ) -> Callable[..., Awaitable[R]]:
        key = object()

        async def wrapper(*args: Any, **kwargs: Any) -> R:
            active = _in_progress.get()
            mine = (key, _runner())
            if mine in active:  # a recursive call: the outermost call's run profiles it
                return await fn(*args, **kwargs)
            token = _in_progress.set(active | {mine})
            try:
                with RunRelay(self._started(label)) as core:
                    awaitable = fn(*args, **kwargs)
                    if not isinstance(awaitable, Coroutine):
                        return await awaitable  # an object whose __call__ returns an awaitable
                    return await core.stepped(awaitable)
            finally:
                _in_progress.reset(token)

        return wrapper

    def _wrap_generator(
        self, fn: Callable[..., Generator[Any, Any, R]], label: str
    ) -> Callable[..., Generator[Any, Any, R]]:
        def wrapper(*args: Any, **kwargs: Any) -> Generator[Any, Any, R]:
            with RunRelay(self._started(label)) as core:
                result: R = yield from relay(core, fn(*args, **kwargs), core.run.during)
            return result

        return wrapper

    def _wrap_async_generator(
        self, fn: Callable[..., AsyncGenerator[Any, Any]], label: str
    ) -> Callable[..., AsyncGenerator[Any, Any]]:
        def open_run(
            proxy: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> tuple[Relay, AsyncGenerator[Any, Any], Callable[[Awaitable[Any]], Awaitable[Any]]]:
            core = RunRelay(self._started(label))
            try:
                agen = fn(*args, **kwargs)
            except BaseException:
                core.end()  # the run is timed and logged even so
                raise
            return core, agen, core.stepped

        return relay_async_generator(open_run)

    def _started(self, label: str) -> Run:
        run = Run(self, label)
        run.start()
        return run


#: The decorated functions whose run is open, each with the task or thread it runs in: a
#: recursive call of one in the same task or thread is part of that run (one line per
#: outermost call, not one warning per level). Calls in child tasks and worker threads
#: (which inherit the context) are runs of their own, as a profile covers its own task.
_in_progress: contextvars.ContextVar[frozenset[tuple[object, object]]] = contextvars.ContextVar(
    "rag_instrument.profiled_functions", default=frozenset()
)


def _runner() -> object:
    """The current asyncio task, or the current thread's id outside one."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no running loop in this thread
        task = None
    return task if task is not None else threading.get_ident()

#: Runs opened by ``with`` / ``async with`` in this task or thread, innermost last: each
#: exit pairs with its own entry even when one Profile object is used in several places.
_open_runs: contextvars.ContextVar[tuple[tuple[Profile, Run], ...]] = contextvars.ContextVar(
    "rag_instrument.profile_runs", default=()
)


def _push_run(spec: Profile, run: Run) -> None:
    _open_runs.set((*_open_runs.get(), (spec, run)))


def _pop_run(spec: Profile) -> Run | None:
    runs = _open_runs.get()
    for index in range(len(runs) - 1, -1, -1):
        if runs[index][0] is spec:
            _open_runs.set(runs[:index] + runs[index + 1 :])
            return runs[index][1]
    return None


@overload
def profile(name: F, /) -> F: ...


@overload
def profile(
    name: str | None = None,
    *,
    top: int = 20,
    sort: str = "cumulative",
    memory: bool = False,
    save_to: str | os.PathLike[str] | None = None,
) -> Profile: ...


def profile(
    name: Any = None,
    *,
    top: int = 20,
    sort: str = "cumulative",
    memory: bool = False,
    save_to: str | os.PathLike[str] | None = None,
) -> Any:
    """Profile a block or each call of a function, and log one ``"profile"`` line per run.

    Args:
        name: the ``profile`` field of the line (default: the decorated function's
            ``module:qualname``, or ``"profile"`` for a block).
        top: how many functions (and allocation sites) to report.
        sort: ``"cumulative"`` (default), ``"tottime"`` or ``"calls"`` (pstats' aliases
            ``cumtime``, ``time`` and ``ncalls`` too).
        memory: also trace allocations with :mod:`tracemalloc` (``peak_kib`` and the top
            allocation sites). Tracing is process-wide and slows allocation down a lot.
        save_to: write the run's statistics to this ``.prof`` file (overwritten by each
            run), for ``python -m pstats`` or snakeviz.

    Returns:
        A :class:`Profile`: use it as ``with``/``async with`` or as a decorator.

    ``@ri.profile`` without parentheses profiles the function with these defaults, as
    ``@ri.profile()`` does.

    Raises:
        ValueError: an argument is invalid (named in the message).
    """
    if callable(name) and not isinstance(name, str):  # bare @ri.profile
        return Profile(None, top, sort, memory, save_to)(name)
    return Profile(name, top, sort, memory, save_to)
