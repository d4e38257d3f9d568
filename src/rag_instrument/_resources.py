"""``configure(resource_metrics=True)``: CPU time per stage, and the process metrics.

CPU time per stage (``cpu_ms`` on the stage's line, ``rag.cpu_ms`` on its span) is the CPU
time the stage's *thread* used between its start and its end (:func:`time.thread_time`).
That is the stage's own CPU only when nothing else ran on the thread meanwhile, so it is
reported where that holds:

- a decorated ``def`` (it cannot give its thread away);
- a ``with`` block in a thread that runs no event loop;
- a decorated ``async def`` that completed without ever suspending.

An ``async def`` that awaited something real was off the thread while other tasks used it
(their CPU would be counted), and a ``with`` block in a loop's thread may contain ``await``:
neither reports ``cpu_ms``. Generators are left out for the same reason: their consumer
runs between their steps. Comparing ``cpu_ms`` with ``execution_time_ms`` answers
"computing or waiting?": close to it, the stage computed; far below, it waited (I/O, a
lock, the GIL).

The process metrics follow the OpenTelemetry semantic conventions and are read from the
standard library (``os.times``, ``gc``, ``/proc/self`` on Linux) only when a metric reader
collects, so they cost nothing between exports:

- ``process.cpu.time`` (s, ``cpu.mode`` = ``user`` / ``system``)
- ``process.memory.usage`` (By, resident set size; Linux)
- ``process.open_file_descriptor.count`` (Linux, or wherever ``/dev/fd`` lists them)
- ``process.thread.count``
- ``cpython.gc.collections`` (``cpython.gc.generation``)
- ``rag.gc.pause.time`` (s): time spent in garbage collections, from ``gc.callbacks``
"""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
import types
import weakref
from collections.abc import Coroutine, Generator, Iterable
from typing import TYPE_CHECKING, Any, Final, TypeVar

from rag_instrument._runtime import get_runtime

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Observation

    from rag_instrument._context import Frame
    from rag_instrument._runtime import Runtime

__all__ = [
    "cpu_begin",
    "cpu_end",
    "cpu_forget",
    "install",
    "uninstall",
    "unless_suspended",
]

R = TypeVar("R")

_CPU_KEY: Final = "rag.cpu"
_PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


# --- CPU time per stage ---------------------------------------------------------------------


def cpu_begin(frame: Frame, cpu: bool | None) -> None:
    """Note the thread's CPU clock as ``frame`` starts.

    Args:
        frame: the stage's frame.
        cpu: ``True``: the stage cannot give its thread away (a ``def``; an ``async def``
            until :func:`unless_suspended` sees it suspend). ``None`` (a ``with`` block):
            only outside a running event loop. ``False`` (a generator): never.
    """
    if cpu is False or (cpu is None and asyncio._get_running_loop() is not None):
        return
    scratch = frame.scratch
    if scratch is None:
        scratch = frame.scratch = {}
    scratch[_CPU_KEY] = (time.thread_time_ns(), threading.get_ident())


def cpu_end(frame: Frame) -> float | None:
    """The CPU milliseconds ``frame``'s thread used since :func:`cpu_begin`, if meaningful."""
    scratch = frame.scratch
    if not scratch:
        return None
    started: tuple[int, int] | None = scratch.pop(_CPU_KEY, None)
    if started is None or started[1] != threading.get_ident():
        return None
    return round((time.thread_time_ns() - started[0]) / 1e6, 3)


def cpu_forget(frame: Frame) -> None:
    """``frame``'s CPU time will not mean anything (it gave its thread away)."""
    if frame.scratch:
        frame.scratch.pop(_CPU_KEY, None)


@types.coroutine
def unless_suspended(frame: Frame, coro: Coroutine[Any, Any, R]) -> Generator[Any, Any, R]:
    """Await ``coro``; if it suspends, its stage's CPU time stops meaning anything.

    The first step runs inline; only a coroutine that really suspends is driven step by
    step (the futures pass through untouched, so cancellation reaches it as usual).
    """
    value: Any = None
    pending: BaseException | None = None
    while True:
        try:
            if pending is None:
                signal = coro.send(value)
            else:
                thrown, pending = pending, None
                signal = coro.throw(thrown)
        except StopIteration as stop:
            result: R = stop.value
            return result
        cpu_forget(frame)
        try:
            value = yield signal
        except BaseException as exc:
            pending, value = exc, None


# --- process metrics ------------------------------------------------------------------------


class _GcPauses:
    """Seconds spent in garbage collections, from ``gc.callbacks`` (installed once)."""

    def __init__(self) -> None:
        self.total_s = 0.0
        self._started = 0.0
        self.installed = False

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started:
            self.total_s += time.perf_counter() - self._started
            self._started = 0.0

    def install(self) -> None:
        if not self.installed:
            gc.callbacks.append(self)
            self.installed = True

    def uninstall(self) -> None:
        if self.installed:
            try:
                gc.callbacks.remove(self)
            except ValueError:
                pass
            self.installed = False


_gc_pauses = _GcPauses()


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None


def _open_fds() -> int | None:
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(folder))
        except OSError:
            continue
    return None


def _observe(rt_ref: weakref.ref[Runtime], read: Any) -> Any:
    """A callback that reports only while its runtime is the one in force."""
    from opentelemetry.metrics import Observation

    def callback(options: CallbackOptions) -> Iterable[Observation]:
        rt = rt_ref()
        if rt is None or rt is not get_runtime():
            return []  # a retired configuration: its meter may live on in the application's
        try:
            return [Observation(value, attributes) for value, attributes in read()]
        except Exception:
            return []

    return callback


def _cpu_times() -> list[tuple[float, dict[str, str]]]:
    times = os.times()
    return [(times.user, {"cpu.mode": "user"}), (times.system, {"cpu.mode": "system"})]


def _memory() -> list[tuple[int, dict[str, str]]]:
    rss = _rss_bytes()
    return [] if rss is None else [(rss, {})]


def _fds() -> list[tuple[int, dict[str, str]]]:
    count = _open_fds()
    return [] if count is None else [(count, {})]


def _threads() -> list[tuple[int, dict[str, str]]]:
    return [(threading.active_count(), {})]


def _gc_collections() -> list[tuple[int, dict[str, int]]]:
    return [
        (stats["collections"], {"cpython.gc.generation": generation})
        for generation, stats in enumerate(gc.get_stats())
    ]


def _gc_pause() -> list[tuple[float, dict[str, str]]]:
    return [(_gc_pauses.total_s, {})]


_installed: weakref.WeakSet[Runtime] = weakref.WeakSet()


def install(rt: Runtime) -> None:
    """Register the process metrics on ``rt``'s meter (once) and time GC pauses."""
    _gc_pauses.install()
    if rt in _installed:  # a runtime put back by testing.capture(): already registered
        return
    _installed.add(rt)
    ref = weakref.ref(rt)
    meter = rt.meter
    meter.create_observable_counter(
        "process.cpu.time", [_observe(ref, _cpu_times)], "s", "CPU time used by the process."
    )
    meter.create_observable_up_down_counter(
        "process.memory.usage", [_observe(ref, _memory)], "By", "Resident set size."
    )
    meter.create_observable_up_down_counter(
        "process.open_file_descriptor.count",
        [_observe(ref, _fds)],
        "{file_descriptor}",
        "Open file descriptors.",
    )
    meter.create_observable_up_down_counter(
        "process.thread.count", [_observe(ref, _threads)], "{thread}", "Live threads."
    )
    meter.create_observable_counter(
        "cpython.gc.collections",
        [_observe(ref, _gc_collections)],
        "{collection}",
        "Garbage collections, per generation.",
    )
    meter.create_observable_counter(
        "rag.gc.pause.time",
        [_observe(ref, _gc_pause)],
        "s",
        "Time spent in garbage collections since metrics were enabled.",
    )


def uninstall() -> None:
    """Stop timing GC pauses (the configuration that wanted them was replaced)."""
    _gc_pauses.uninstall()
