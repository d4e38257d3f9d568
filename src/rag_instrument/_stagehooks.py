"""Optional work at the start and end of every stage, behind one flag the stages check.

``configure(resource_metrics=True)`` measures each stage's CPU time,
``configure(event_loop_threshold_ms=...)`` watches every loop a stage runs in, and on
Python 3.11 a running :func:`~rag_instrument.watch_event_loop` needs each task's stage
(see :mod:`rag_instrument.eventloop`). With none of them, :data:`active` is ``False`` and a
stage pays one module-attribute check.
"""

from __future__ import annotations

from collections.abc import Awaitable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from rag_instrument import _resources, eventloop

if TYPE_CHECKING:
    from rag_instrument._context import Frame
    from rag_instrument._runtime import Runtime

__all__ = ["active", "awaiting", "begin", "end", "refresh", "switched"]

R = TypeVar("R")

#: Whether stages must call :func:`begin` and :func:`end`.
active = False
_wanted_by_settings = False


def refresh(rt: Runtime | None = None) -> None:
    """Recompute :data:`active` (a new runtime was installed, or a watch started or ended)."""
    global active, _wanted_by_settings
    if rt is not None:
        settings = rt.settings
        _wanted_by_settings = rt.enabled and (
            settings.resource_metrics or settings.event_loop_threshold_ms is not None
        )
    active = _wanted_by_settings or eventloop.track_tasks


eventloop.tracking_listeners.append(refresh)


def switched(old: Runtime, new: Runtime) -> None:
    """``configure()``, ``shutdown()`` or a capture replaced ``old`` by ``new``."""
    refresh(new)
    if new.enabled and new.settings.resource_metrics:
        _resources.install(new)
    else:
        _resources.uninstall()
    if old.settings.event_loop_threshold_ms != new.settings.event_loop_threshold_ms or not (
        new.enabled
    ):
        eventloop.stop_automatic()


def begin(frame: Frame, rt: Runtime, cpu: bool | None) -> None:
    """``frame`` was just entered (its context variables are set).

    ``cpu``: whether the thread's CPU time during the stage is the stage's own (see
    :func:`rag_instrument._resources.cpu_begin`).
    """
    settings = rt.settings
    if settings.resource_metrics:
        _resources.cpu_begin(frame, cpu)
    threshold = settings.event_loop_threshold_ms
    if threshold is not None:
        eventloop.ensure_watched(threshold)
    if eventloop.track_tasks:
        eventloop.note_frame()


def awaiting(frame: Frame, rt: Runtime, awaitable: Awaitable[R]) -> Awaitable[R]:
    """What a coroutine stage awaits: with ``resource_metrics``, watched for suspending."""
    if not rt.settings.resource_metrics:
        return awaitable
    if isinstance(awaitable, Coroutine):
        coro: Coroutine[Any, Any, R] = awaitable
        return _resources.unless_suspended(frame, coro)
    _resources.cpu_forget(frame)  # an awaitable we cannot follow: no claim about its CPU
    return awaitable


def end(frame: Frame, rt: Runtime) -> float | None:
    """``frame`` was just left; returns its ``cpu_ms`` when that is measured and meaningful."""
    if eventloop.track_tasks:
        eventloop.note_frame()
    if rt.settings.resource_metrics:
        return _resources.cpu_end(frame)
    return None
