"""The machinery behind :func:`rag_instrument.profile`: one run, its scoping, its report.

A :class:`Run` owns one profiler (cProfile), the optional memory tracing and the timing of
one execution; :meth:`Run.during` switches it on around each step of a coroutine or a
generator (the stepping loops are :mod:`rag_instrument._steps`' relays); the
:class:`_FramePauser` pauses it while an ``async with`` block's frame is suspended
(Python 3.12+, ``sys.monitoring``); :class:`_TaskClock` is the 3.11 fallback. The public
object and its wrappers are in :mod:`rag_instrument.profiling`.
"""

from __future__ import annotations

import asyncio
import cProfile
import os
import pstats
import sys
import time
import tracemalloc
import types
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

from rag_instrument._context import current_frame
from rag_instrument._runtime import get_runtime
from rag_instrument._steps import Relay, relay_await
from rag_instrument._utils import internal_error
from rag_instrument.logs import emit

if TYPE_CHECKING:
    from rag_instrument.profiling import Profile

__all__ = ["MONITORING", "SORT_KEYS", "Run", "RunRelay", "pauser"]

R = TypeVar("R")

#: ``sort`` values and the statistic each one orders by (pstats' names and aliases).
SORT_KEYS: Final = {
    "cumulative": "cumtime_ms",
    "cumtime": "cumtime_ms",
    "tottime": "tottime_ms",
    "time": "tottime_ms",
    "calls": "calls",
    "ncalls": "calls",
}
#: ``sys.monitoring`` (Python 3.12+), typed loosely so one source checks on 3.11 as well.
_monitoring: Any = getattr(sys, "monitoring", None)
MONITORING: Final = _monitoring is not None
#: Our own code, left out of the reports (this module and the public one's wrappers).
_OUR_FILES: Final = frozenset({__file__, os.path.join(os.path.dirname(__file__), "profiling.py")})


#: Our profilers that are switched on right now (to tell a nested profile from a foreign one).
_enabled: set[cProfile.Profile] = set()


def _profiler_in_use() -> str | None:
    """Why a new profiler cannot run now, or ``None`` when it can."""
    current: object = sys.getprofile()
    if current is not None:
        if current in _enabled:
            # Python 3.11 has one profiler per thread: the other ri.profile encloses this
            # code, or is an ``async with`` profile of another task on this event loop.
            return (
                "an enclosing ri.profile (or an async one of another task on the same event "
                "loop) is profiling this thread already"
            )
        return "another profiler is active in this thread (sys.setprofile)"
    if MONITORING:
        holder = _monitoring.get_tool(_monitoring.PROFILER_ID)
        if holder is not None:
            if _enabled:
                return "an enclosing ri.profile (or one in another thread) is profiling already"
            return f"another profiler is active ({holder} holds the sys.monitoring profiler slot)"
    return None


# --- naming functions -----------------------------------------------------------------------

_modules_by_file: dict[str, str] = {}
_modules_seen = [0]


def _module_of(filename: str) -> str:
    if len(sys.modules) != _modules_seen[0]:
        _modules_by_file.clear()
        for name, module in list(sys.modules.items()):
            path = getattr(module, "__file__", None)
            if isinstance(path, str):
                _modules_by_file[os.path.normcase(os.path.abspath(path))] = name
        _modules_seen[0] = len(sys.modules)
    found = _modules_by_file.get(os.path.normcase(os.path.abspath(filename)))
    if found is not None:
        return found
    base = os.path.basename(filename)
    return base.removesuffix(".py") if base.endswith(".py") else filename


def _builtin_label(text: str) -> str:
    # cProfile names C functions by their repr: "<built-in method time.sleep>",
    # "<method 'append' of 'list' objects>", "<function ...>".
    if text.startswith("<built-in method ") and text.endswith(">"):
        dotted = text[len("<built-in method ") : -1]
        module, _, name = dotted.rpartition(".")
        return f"{module or 'builtins'}:{name}:0"
    if text.startswith("<method '") and "' of '" in text:
        method, _, rest = text[len("<method '") :].partition("' of '")
        owner = rest.split("'", 1)[0]
        module, _, cls = owner.rpartition(".")
        return f"{module or 'builtins'}:{cls}.{method}:0"
    return text


def _label(code: types.CodeType | str) -> str:
    if isinstance(code, str):
        return _builtin_label(code)
    return f"{_module_of(code.co_filename)}:{code.co_qualname}:{code.co_firstlineno}"


def _is_ours(code: types.CodeType | str) -> bool:
    if isinstance(code, str):
        return "_lsprof.Profiler" in code
    return code.co_filename in _OUR_FILES


# --- one run --------------------------------------------------------------------------------


class _TaskClock:
    """A profiler clock that advances only while ``task`` is the running asyncio task."""

    __slots__ = ("last", "task", "total")

    def __init__(self, task: asyncio.Task[Any] | None) -> None:
        self.task = task
        self.last = time.perf_counter()
        self.total = 0.0

    def __call__(self) -> float:
        now = time.perf_counter()
        try:
            ours = asyncio.current_task() is self.task
        except RuntimeError:  # no running loop in this thread (the loop stopped meanwhile)
            ours = False
        if ours:
            self.total += now - self.last
        self.last = now
        return self.total


class Run:
    """One execution of a :class:`Profile`: its profiler, memory tracing and timings."""

    __slots__ = (
        "block_frame",
        "clock",
        "label",
        "memory_owned",
        "off",
        "profiler",
        "reasons",
        "spec",
        "start_ns",
    )

    def __init__(self, spec: Profile, label: str) -> None:
        self.spec = spec
        self.label = label
        self.profiler: cProfile.Profile | None = None
        self.clock: _TaskClock | None = None
        self.reasons: list[str] = []
        self.memory_owned = False
        self.start_ns = 0
        self.block_frame: types.FrameType | None = None
        #: ``configure(enabled=False)``: run the code, profile and log nothing.
        self.off = not get_runtime().enabled

    def start(self, task_clock: bool = False) -> None:
        if self.off:
            return
        try:
            reason = _profiler_in_use()
            if reason is not None:
                self.reasons.append(reason)
            elif task_clock:
                self.clock = _TaskClock(asyncio.current_task())
                self.profiler = cProfile.Profile(self.clock)
            else:
                self.profiler = cProfile.Profile()
            if self.spec.memory:
                if tracemalloc.is_tracing():
                    self.reasons.append("tracemalloc is already tracing: no memory figures")
                else:
                    tracemalloc.start()
                    self.memory_owned = True
        except Exception as exc:
            internal_error("starting a profile", exc)
        self.start_ns = time.perf_counter_ns()

    def resume(self) -> None:
        profiler = self.profiler
        if profiler is None:
            return
        reason = _profiler_in_use()
        if reason is not None:  # something else started profiling while we were paused
            self.reasons.append(reason + " (part of the run was not profiled)")
            return
        _enabled.add(profiler)  # before enable(): the profile is to hold the user's calls
        try:
            profiler.enable()
        except ValueError as exc:  # 3.12+: the profiler slot was taken meanwhile
            _enabled.discard(profiler)
            self.reasons.append(f"{exc} (part of the run was not profiled)")

    def pause(self) -> None:
        profiler = self.profiler
        if profiler is not None:
            profiler.disable()
            _enabled.discard(profiler)

    def during(self, fn: Callable[..., R], /, *args: Any) -> R:
        """``fn(*args)`` with the profiler on: one step of a coroutine or generator."""
        self.resume()
        try:
            return fn(*args)
        finally:
            self.pause()

    def finish(self) -> None:
        if self.off:
            return
        elapsed_ms = (time.perf_counter_ns() - self.start_ns) / 1e6
        try:
            self._report(elapsed_ms)
        except Exception as exc:
            internal_error("reporting a profile", exc)
        finally:
            if self.memory_owned:
                tracemalloc.stop()

    def _functions(self, profiler: cProfile.Profile) -> tuple[list[dict[str, Any]], int, set[Any]]:
        rows: list[dict[str, Any]] = []
        dropped: set[Any] = set()
        total_calls = 0
        task_clocked = self.clock is not None
        entries = profiler.getstats()
        ours = _builtins_called_by_ours(entries)
        for entry in entries:
            code = entry.code
            if _is_ours(code):
                dropped.add(code)
                continue
            calls, inline, total = entry.callcount, entry.inlinetime, entry.totaltime
            if isinstance(code, str) and code in ours:
                # A builtin the library's own bookkeeping called (a context variable, a
                # set): only the application's calls of it count.
                ours_calls, ours_inline, ours_total = ours[code]
                calls -= ours_calls
                inline = max(inline - ours_inline, 0.0)
                total = max(total - ours_total, 0.0)
                if calls <= 0:
                    continue
            if task_clocked and entry.totaltime == 0 and entry.inlinetime == 0:
                # Under the task clock, code that only ran while other tasks had the loop
                # took none of this task's time: it is not part of the profile.
                dropped.add(code)
                continue
            total_calls += calls
            rows.append(
                {
                    "function": _label(code),
                    "calls": calls,
                    "tottime_ms": round(inline * 1000, 3),
                    "cumtime_ms": round(total * 1000, 3),
                }
            )
        key = SORT_KEYS[self.spec.sort]
        rows.sort(key=lambda row: row[key], reverse=True)
        return rows[: self.spec.top], total_calls, dropped

    def _report(self, elapsed_ms: float) -> None:
        spec = self.spec
        fields: dict[str, Any] = {"profile": self.label, "wall_ms": round(elapsed_ms, 3)}
        frame = current_frame()
        if frame is not None and frame.stage:
            fields["stage"] = frame.stage
        profiler = self.profiler
        fields["profiled"] = profiler is not None
        if profiler is not None:
            rows, total_calls, dropped = self._functions(profiler)
            fields["sort"] = spec.sort
            fields["total_calls"] = total_calls
            fields["functions"] = rows
            if spec.save_to is not None:
                self._save(profiler, dropped, fields)
        else:
            fields["functions"] = []  # the line keeps its shape: no function was profiled
        if self.memory_owned:
            _current, peak = tracemalloc.get_traced_memory()
            fields["peak_kib"] = round(peak / 1024, 1)
            snapshot = tracemalloc.take_snapshot().filter_traces(
                (
                    tracemalloc.Filter(False, tracemalloc.__file__),
                    *(tracemalloc.Filter(False, path) for path in _OUR_FILES),
                )
            )
            fields["allocations"] = [
                {
                    "site": f"{stat.traceback[0].filename}:{stat.traceback[0].lineno}",
                    "size_kib": round(stat.size / 1024, 1),
                    "count": stat.count,
                }
                for stat in snapshot.statistics("lineno")[: spec.top]
            ]
        level = "info"
        if self.reasons:
            level = "warning"
            fields["reason"] = "; ".join(dict.fromkeys(self.reasons))
        emit(level, "profile", fields, stage="")

    def _save(self, profiler: cProfile.Profile, dropped: set[Any], fields: dict[str, Any]) -> None:
        path = self.spec.save_to
        assert path is not None
        try:
            stats = pstats.Stats(profiler)
            if dropped:
                labels = {cProfile.label(code) for code in dropped if not isinstance(code, str)}
                _drop_entries(stats, labels, {code for code in dropped if isinstance(code, str)})
            stats.dump_stats(path)
            fields["saved_to"] = path
        except OSError as exc:
            fields["save_error"] = f"{type(exc).__name__}: {exc.strerror or exc}"


def _builtins_called_by_ours(entries: Any) -> dict[str, tuple[int, float, float]]:
    """Per builtin, the calls the library's own code made of it: (count, own time, total)."""
    found: dict[str, tuple[int, float, float]] = {}
    for entry in entries:
        if not _is_ours(entry.code) or not entry.calls:
            continue
        for sub in entry.calls:
            if isinstance(sub.code, str):
                calls, inline, total = found.get(sub.code, (0, 0.0, 0.0))
                found[sub.code] = (
                    calls + sub.callcount,
                    inline + sub.inlinetime,
                    total + sub.totaltime,
                )
    return found


def _drop_entries(
    stats: pstats.Stats, labels: set[tuple[str, int, str]], builtin_names: set[str]
) -> None:
    table: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]

    def unwanted(key: tuple[str, int, str]) -> bool:
        if key in labels:
            return True
        return key[0] == "~" and key[2] in builtin_names

    for key in [k for k in table if unwanted(k)]:
        del table[key]
    for key, (cc, nc, tt, ct, callers) in list(table.items()):
        kept = {c: v for c, v in callers.items() if not unwanted(c)}
        figures = [cc, nc, tt, ct]
        if key[0] == "~" and len(kept) < len(callers):
            # A builtin the library's code called too: only the application's calls count.
            for caller, by_caller in callers.items():
                if caller not in kept and isinstance(by_caller, tuple) and len(by_caller) == 4:
                    figures[0] -= by_caller[1]  # a caller's figures: nc, cc, tt, ct
                    figures[1] -= by_caller[0]
                    figures[2] = max(figures[2] - by_caller[2], 0.0)
                    figures[3] = max(figures[3] - by_caller[3], 0.0)
            if figures[1] <= 0:
                del table[key]
                continue
        table[key] = (*figures, kept)


# --- async-with scoping on 3.12+ -------------------------------------------------------------


class _FramePauser:
    """Pause runs while the frame of their ``async with`` block is suspended (3.12+).

    One ``sys.monitoring`` tool for the process; ``PY_YIELD``/``PY_RESUME`` are switched on
    only for the code objects of open ``async with ri.profile()`` blocks.
    """

    def __init__(self) -> None:
        self.tool: int | None = None
        self.by_code: dict[types.CodeType, list[tuple[types.FrameType, Run]]] = {}

    def _claim(self) -> int | None:
        monitoring = _monitoring
        for tool in (4, 3):  # the ids PEP 669 leaves unnamed; never a debugger's or coverage's
            if monitoring.get_tool(tool) is None:
                monitoring.use_tool_id(tool, "rag_instrument.profile")
                events = monitoring.events
                monitoring.register_callback(tool, events.PY_YIELD, self._on_yield)
                monitoring.register_callback(tool, events.PY_RESUME, self._on_resume)
                return tool
        return None

    def add(self, frame: types.FrameType, run: Run) -> bool:
        if self.tool is None:
            self.tool = self._claim()
            if self.tool is None:
                return False
        code = frame.f_code
        entries = self.by_code.setdefault(code, [])
        entries.append((frame, run))
        if len(entries) == 1:
            events = _monitoring.events
            _monitoring.set_local_events(self.tool, code, events.PY_YIELD | events.PY_RESUME)
        return True

    def remove(self, frame: types.FrameType, run: Run) -> None:
        code = frame.f_code
        entries = self.by_code.get(code)
        if entries is None or self.tool is None:
            return
        entries[:] = [(f, r) for f, r in entries if r is not run]
        if not entries:
            del self.by_code[code]
            _monitoring.set_local_events(self.tool, code, 0)
        if not self.by_code:
            _monitoring.free_tool_id(self.tool)
            self.tool = None

    def _find(self, code: types.CodeType) -> Run | None:
        entries = self.by_code.get(code)
        if not entries:
            return None
        frame = sys._getframe(2)  # the frame that yielded or resumed
        for owner, run in entries:
            if owner is frame:
                return run
        return None

    def _on_yield(self, code: types.CodeType, offset: int, value: object) -> None:
        run = self._find(code)
        if run is not None:
            run.pause()

    def _on_resume(self, code: types.CodeType, offset: int) -> None:
        run = self._find(code)
        if run is not None:
            run.resume()


pauser = _FramePauser()


# --- stepping ----------------------------------------------------------------------------


class RunRelay(Relay):
    """The relay of a profiled generator or async generator: ends its run when it stops."""

    __slots__ = ("run",)

    def __init__(self, run: Run) -> None:
        super().__init__()
        self.run = run

    def end(self) -> None:
        self.run.finish()

    def stepped(self, awaitable: Awaitable[R]) -> Awaitable[R]:
        """Await ``awaitable`` with the profiler on only while its own steps run."""
        return relay_await(self.run.during, awaitable)
