"""Carrying out a decision core's steps, synchronously or with ``await``.

Where the library does the same thing in a sync and an async flavour (the cache's single
flight, ending a database session), the decisions are written once, as a generator (a
*plan*) that yields the next step, a callable and its arguments, and is sent the step's
result, or has the step's exception thrown in. :func:`run` and :func:`arun` are the two
thin loops that carry the steps out: ``step(*args)`` or ``await step(*args)``. This is the
shape of tenacity's ``BaseRetrying.iter``, which ``Retrying`` and ``AsyncRetrying`` drive.

The generator proxies (a stage's or a profile's wrapper around a generator, an async
generator or each step of an awaitable) are the same idea turned around: :class:`Relay`
decides how to resume the inner iterator after the consumer sent a value or threw an
exception in, and :func:`relay`, :func:`relay_await` and :func:`relay_async_generator` are
the thin loops; their owners say only how one step runs (inside a context, with a profiler
switched on) and what ending means.
"""

from __future__ import annotations

import types
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator
from typing import Any, Self, TypeVar

__all__ = [
    "Call",
    "Opener",
    "Plan",
    "Relay",
    "arun",
    "relay",
    "relay_async_generator",
    "relay_await",
    "run",
]

T = TypeVar("T")
#: Yields ``(step, args)``; is sent ``step(*args)``'s result; returns the outcome.
Plan = Generator[tuple[Callable[..., Any], tuple[Any, ...]], Any, T]


def run(plan: Plan[T]) -> T:
    """Carry out ``plan``'s steps in this thread; return its outcome.

    An exception a step raises is thrown into the plan, which decides (usually it
    re-raises it: the caller then gets the same exception object).
    """
    reply: Any = None
    failure: BaseException | None = None
    while True:
        try:
            step, args = plan.send(reply) if failure is None else plan.throw(failure)
        except StopIteration as stop:
            result: T = stop.value
            return result
        finally:
            failure = None  # no reference cycle through the exception's traceback
        try:
            reply = step(*args)
        except BaseException as exc:
            reply, failure = None, exc


async def arun(plan: Plan[T]) -> T:
    """Carry out ``plan``'s steps, awaiting each; return its outcome (see :func:`run`)."""
    reply: Any = None
    failure: BaseException | None = None
    while True:
        try:
            step, args = plan.send(reply) if failure is None else plan.throw(failure)
        except StopIteration as stop:
            result: T = stop.value
            return result
        finally:
            failure = None
        try:
            reply = await step(*args)
        except BaseException as exc:
            reply, failure = None, exc


# --- relaying: a proxy between a consumer and an inner generator ----------------------------

#: Runs one step of the inner iterator: ``call(fn, *args)`` returns ``fn(*args)`` (inside a
#: context, with a profiler switched on...): ``contextvars.Context.run`` has this shape.
Call = Callable[..., Any]


class Relay:
    """The decision core of the generator proxies (stages' and profiles', a few thin loops).

    A proxy stands between a consumer and an inner generator (or awaitable). After each
    item it is told what the consumer did (:meth:`sent` a value, :meth:`threw` an
    exception) and :meth:`step` says how to resume the inner one: ``send(value)`` or
    ``throw(exc)``. It keeps the account the proxy's owner reports (``items`` passed on,
    ``completed`` when the inner one was exhausted, the ``failure`` it stopped with). As a
    context manager around the proxy's loop it calls :meth:`end` however the loop stops
    (exhausted, failed, closed); subclasses say what ending means.
    """

    __slots__ = ("completed", "failure", "items", "pending", "value")

    def __init__(self) -> None:
        self.value: Any = None
        self.pending: BaseException | None = None
        self.items = 0
        self.completed = False
        self.failure: BaseException | None = None

    def step(
        self, send: Callable[[Any], T], throw: Callable[[BaseException], T]
    ) -> tuple[Callable[[Any], T], Any]:
        """How to resume the inner iterator: ``(send, value)`` or ``(throw, exception)``."""
        pending = self.pending
        if pending is None:
            return send, self.value
        self.pending = None
        return throw, pending

    def sent(self, value: Any) -> None:
        """The consumer sent ``value`` (``None`` for ``next()``)."""
        self.value = value

    def threw(self, exc: BaseException) -> None:
        """The consumer threw ``exc`` in (``.throw()``, ``.athrow()``): pass it on."""
        self.pending, self.value = exc, None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        """The proxy stopped: note a failure (closing is none) and :meth:`end`."""
        if exc is not None and not isinstance(exc, GeneratorExit):
            self.failure = exc
        self.end()

    def end(self) -> None:
        """The proxy stopped (nothing to do here; subclasses report their account)."""


def relay(core: Relay, gen: Generator[Any, Any, T], call: Call) -> Generator[Any, Any, T]:
    """Proxy ``gen`` for ``yield from``: each send, throw and close into it runs as ``call``."""
    while True:
        method, argument = core.step(gen.send, gen.throw)
        try:
            item = call(method, argument)
        except StopIteration as stop:
            core.completed = True
            result: T = stop.value
            return result
        core.items += 1
        try:
            core.sent((yield item))
        except GeneratorExit:
            call(gen.close)
            raise
        except BaseException as exc:  # .throw() from the consumer: pass it in
            core.threw(exc)


@types.coroutine
def relay_await(call: Call, awaitable: Awaitable[T]) -> Generator[Any, Any, T]:
    """Await ``awaitable`` with each of its steps (``send``/``throw``) running as ``call``.

    This is ``yield from awaitable.__await__()`` except for ``call``: the event loop's
    futures pass through untouched, so cancellation and timeouts reach the awaitable
    exactly as they would without us.
    """
    iterator: Any = awaitable.__await__()
    core = Relay()
    while True:
        method, argument = core.step(iterator.send, iterator.throw)
        try:
            signal = call(method, argument)
        except StopIteration as stop:
            result: T = stop.value
            return result
        try:
            core.sent((yield signal))
        except BaseException as exc:  # cancellation, or a throw() from the awaiting side
            core.threw(exc)


#: Opens one relayed async generator: given the proxy function and its call's arguments,
#: returns the core (entered around the loop), the inner async generator and how each of
#: its steps is awaited (``None``: as it is).
Opener = Callable[
    [Callable[..., Any], tuple[Any, ...], dict[str, Any]],
    tuple[Relay, AsyncGenerator[Any, Any], Callable[[Awaitable[Any]], Awaitable[Any]] | None],
]


def relay_async_generator(opener: Opener) -> Callable[..., AsyncGenerator[Any, Any]]:
    """An async generator function that proxies the one ``opener`` opens on each call.

    There is no ``yield from`` for async generators, so the loop is this one function;
    its owners say what a call opens (``opener``) and what ending means (the core).
    """

    async def proxy(*args: Any, **kwargs: Any) -> AsyncGenerator[Any, Any]:
        core, agen, through = opener(proxy, args, kwargs)
        with core:  # ends however the proxy stops
            while True:
                method, argument = core.step(agen.asend, agen.athrow)
                try:
                    step = method(argument)
                    item = await (step if through is None else through(step))
                except StopAsyncIteration:
                    core.completed = True
                    return
                core.items += 1
                try:
                    core.sent((yield item))
                except GeneratorExit:
                    closing = agen.aclose()
                    await (closing if through is None else through(closing))
                    raise
                except BaseException as exc:
                    core.threw(exc)

    return proxy
