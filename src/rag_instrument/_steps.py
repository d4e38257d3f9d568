"""Carrying out a decision core's steps, synchronously or with ``await``.

Where the library does the same thing in a sync and an async flavour (the cache's single
flight, ending a database session), the decisions are written once, as a generator (a
*plan*) that yields the next step, a callable and its arguments, and is sent the step's
result, or has the step's exception thrown in. :func:`run` and :func:`arun` are the two
thin loops that carry the steps out: ``step(*args)`` or ``await step(*args)``. This is the
shape of tenacity's ``BaseRetrying.iter``, which ``Retrying`` and ``AsyncRetrying`` drive.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, TypeVar

__all__ = ["Plan", "arun", "run"]

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
