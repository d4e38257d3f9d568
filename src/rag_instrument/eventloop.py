"""``watch_event_loop()``: find the synchronous code that blocks an asyncio event loop.

::

    async def main() -> None:
        watch = ri.watch_event_loop(threshold_ms=100)
        ...
        watch.stop()

or ``ri.configure(event_loop_threshold_ms=100)``, which watches every loop a stage runs in.

How it works. A heartbeat callback on the loop notes the time every ``interval``
(a quarter of the threshold, between 5 and 250 ms) and schedules the next one. A watchdog
thread, one per watched loop, sleeps until the next heartbeat is overdue by more than the
threshold. If it is, the loop is blocked: right then, while the blocking code still runs,
the watchdog samples the loop thread's stack (:func:`sys._current_frames`) and finds the
stage the loop's current task is in. When the heartbeat runs again it logs one warning::

    {"event": "event loop blocked", "level": "warning", "blocked_ms": 412.3,
     "threshold_ms": 100.0, "stage": "retrieval", "trace_id": "...", "span_id": "...",
     "stack": [..., "app/search.py:42 in retrieve"]}

``blocked_ms`` is how long the overdue heartbeat waited (the loop's lag), so it may miss
at most one interval at the start of the block; ``trace_id``/``span_id`` are the stage's.
The block also counts in the ``rag.event_loop.blocked`` counter and as ``blocked`` in the
stage's breakdown (measured by the watchdog to within about 10 ms). A block still going
on after ten times the threshold (at least 5 s) is reported then, with ``ongoing: true``,
so a deadlocked loop is reported too.

An idle loop pays one timer callback per interval; a request pays nothing. The watch ends
with :meth:`EventLoopWatch.stop` or by itself once its loop is closed.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any, Final

from rag_instrument import _breakdown, _context
from rag_instrument import attributes as attr
from rag_instrument._runtime import get_runtime
from rag_instrument._utils import internal_error
from rag_instrument.logs import emit

if TYPE_CHECKING:
    from rag_instrument._context import Frame

__all__ = ["EventLoopWatch", "watch_event_loop"]

_MIN_INTERVAL_S: Final = 0.005
_MAX_INTERVAL_S: Final = 0.25
_BLOCK_TICK_S: Final = 0.01
_STACK_FRAMES: Final = 30
#: Python 3.12+ can read a task's context from another thread (``Task.get_context``); 3.11
#: cannot, so there stages note, per task, the frame they opened (see :func:`note_frame`).
_TASK_CONTEXT: Final = sys.version_info >= (3, 12)

_watches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, EventLoopWatch] = (
    weakref.WeakKeyDictionary()
)
_lock = threading.Lock()
#: Task -> its innermost stage frame (3.11). A plain dict, cheap on the stage path; the
#: watchdogs drop finished tasks from it (:func:`_prune_tasks`).
_task_frames: dict[asyncio.Task[Any], Frame] = {}
_pruned_at = [0.0]
#: True while a watch runs on Python 3.11: stages then call :func:`note_frame`.
track_tasks = False
#: Called when :data:`track_tasks` may have changed (the stage hooks register here, since
#: this module cannot import them: they import it).
tracking_listeners: list[Callable[[], None]] = []


def note_frame() -> None:
    """Remember the current task's innermost stage frame (3.11; called by stages)."""
    loop = asyncio._get_running_loop()
    if loop is None:
        return
    task = asyncio.current_task(loop)
    if task is None:
        return
    frame = _context.current_frame()
    if frame is None:
        _task_frames.pop(task, None)
    else:
        _task_frames[task] = frame


def _prune_tasks() -> None:
    """Forget finished tasks (called from the watchdog threads, at most once a second)."""
    now = time.monotonic()
    if now - _pruned_at[0] < 1.0 or not _task_frames:
        return
    _pruned_at[0] = now
    for task in [t for t in list(_task_frames) if t.done()]:
        _task_frames.pop(task, None)


def _running_frame(loop: asyncio.AbstractEventLoop) -> tuple[Frame | None, Any]:
    """The stage frame and context of the task ``loop`` is running now (another thread)."""
    current = getattr(asyncio.tasks, "_current_tasks", None)
    task = current.get(loop) if isinstance(current, dict) else None
    if task is None:
        return None, None
    get_context = getattr(task, "get_context", None)
    if get_context is not None:
        # A snapshot: the task goes on changing its context once the block ends.
        ctx = get_context().copy()
        return ctx.get(_context._frame), ctx
    return _task_frames.get(task), None


def _format_stack(frame: FrameType) -> list[str]:
    """``file:line in function`` per frame, innermost last; never source text (SECURITY.md)."""
    summary = traceback.StackSummary.extract(
        traceback.walk_stack(frame), limit=_STACK_FRAMES, lookup_lines=False
    )
    summary.reverse()  # outermost first, the blocking line last, as in a traceback
    return [f"{entry.filename}:{entry.lineno} in {entry.name}" for entry in summary]


class EventLoopWatch:
    """The handle :func:`watch_event_loop` returns; :meth:`stop` ends the watch."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, threshold_ms: float, *, automatic: bool = False
    ) -> None:
        self.threshold_ms = float(threshold_ms)
        self.automatic = automatic
        #: How many blocks this watch has reported.
        self.blocks = 0
        self._threshold_s = self.threshold_ms / 1000.0
        self.interval_s = min(max(self._threshold_s / 4, _MIN_INTERVAL_S), _MAX_INTERVAL_S)
        self._loop_ref = weakref.ref(loop)
        self._last_beat = time.monotonic()
        self._loop_thread: int | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._stopped = threading.Event()
        self._finished = False
        #: False once stopped or ended (a plain attribute: read on the stage path).
        self.alive = True
        self._ongoing_after_s = max(10 * self._threshold_s, 5.0)
        self._empty = contextvars.Context()  # the heartbeat holds on to no request's state
        self._thread = threading.Thread(
            target=self._watch, name="rag_instrument-loop-watch", daemon=True
        )

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The watched loop (``None`` once it was garbage-collected)."""
        return self._loop_ref()

    @property
    def running(self) -> bool:
        """Whether the watchdog thread is still watching."""
        return self._thread.is_alive() and not self._finished

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<EventLoopWatch threshold_ms={self.threshold_ms:g} {state}>"

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if asyncio._get_running_loop() is loop:  # started from the loop's own thread
            self._loop_thread = threading.get_ident()
        loop.call_soon_threadsafe(self._beat, context=self._empty)
        self._thread.start()

    # --- loop side ---------------------------------------------------------------------------

    def _beat(self) -> None:
        self._last_beat = time.monotonic()
        self._loop_thread = threading.get_ident()
        if self._stopped.is_set():
            return
        loop = self._loop_ref()
        if loop is not None:
            self._handle = loop.call_later(self.interval_s, self._beat, context=self._empty)

    # --- watchdog side -----------------------------------------------------------------------

    def _watch(self) -> None:
        try:
            self._watch_loop()
        except Exception as exc:
            internal_error("event loop watch", exc)
        finally:
            self._finished = True
            self.alive = False
            with _lock:
                loop = self._loop_ref()
                if loop is not None:
                    if _watches.get(loop) is self:
                        del _watches[loop]
                    if _automatic.get(loop) is self:
                        del _automatic[loop]
                _update_tracking()

    def _watch_loop(self) -> None:
        stopped = self._stopped
        seen_beat = self._last_beat
        due: float | None = None
        while not stopped.is_set():
            loop = self._loop_ref()
            if loop is None or loop.is_closed():
                return
            running = loop.is_running()
            del loop
            if not running:  # between run_until_complete() calls: nothing can block it
                due = None
                stopped.wait(self._threshold_s)
                continue
            now = time.monotonic()
            beat = self._last_beat
            if due is None:
                due, seen_beat = now + self.interval_s, beat
            elif beat != seen_beat:
                due, seen_beat = beat + self.interval_s, beat
            if now - due <= self._threshold_s:
                if track_tasks:
                    _prune_tasks()
                stopped.wait(due + self._threshold_s - now + 0.001)
                continue
            self._on_block(due, seen_beat)
            due = None

    def _on_block(self, due: float, beat: float) -> None:
        stack: list[str] = []
        thread_id = self._loop_thread
        if thread_id is not None:
            frame = sys._current_frames().get(thread_id)
            if frame is not None:
                stack = _format_stack(frame)
                del frame
        loop = self._loop_ref()
        stage_frame, ctx = _running_frame(loop) if loop is not None else (None, None)
        del loop
        counted = time.monotonic() - due
        if stage_frame is not None:
            _breakdown.record_in(stage_frame, attr.BREAKDOWN_BLOCKED, counted * 1000.0)
        ongoing_after = self._ongoing_after_s
        ongoing = False
        while self._last_beat == beat and not self._stopped.is_set():
            loop = self._loop_ref()
            if loop is None or loop.is_closed() or not loop.is_running():
                break
            del loop
            self._stopped.wait(_BLOCK_TICK_S)
            now = time.monotonic()
            if stage_frame is not None and self._last_beat == beat:
                _breakdown.record_in(
                    stage_frame, attr.BREAKDOWN_BLOCKED, (now - due - counted) * 1000.0, 0
                )
                counted = now - due
            if now - due > ongoing_after:
                ongoing = True
                break
        end = self._last_beat if self._last_beat != beat else time.monotonic()
        blocked_s = max(end - due, self._threshold_s)
        if stage_frame is not None and not ongoing and blocked_s > counted:
            _breakdown.record_in(
                stage_frame, attr.BREAKDOWN_BLOCKED, (blocked_s - counted) * 1000.0, 0
            )
        self.blocks += 1
        self._report(blocked_s, stack, stage_frame, ctx, ongoing)
        if ongoing:  # wait for this block to end before watching for the next one
            while self._last_beat == beat and not self._stopped.wait(self._threshold_s):
                loop = self._loop_ref()
                if loop is None or loop.is_closed() or not loop.is_running():
                    break
                del loop

    def _report(
        self,
        blocked_s: float,
        stack: list[str],
        stage_frame: Frame | None,
        ctx: contextvars.Context | None,
        ongoing: bool,
    ) -> None:
        rt = get_runtime()
        if not rt.enabled:  # instrumentation off: a watch started before writes nothing
            return
        stage = stage_frame.stage if stage_frame is not None else None
        metric_attributes = {attr.RAG_STAGE: stage} if stage else {}
        rt.counter(
            attr.METRIC_EVENT_LOOP_BLOCKED,
            "{block}",
            "Times an asyncio event loop was blocked past the threshold.",
        ).add(1, metric_attributes)
        fields: dict[str, Any] = {
            "blocked_ms": round(blocked_s * 1000.0, 3),
            "threshold_ms": self.threshold_ms,
            "stage": stage,
            "stack": stack,
        }
        if stage_frame is not None and not stage_frame.is_stage:
            fields["operation"] = stage_frame.name
        if ongoing:
            fields["ongoing"] = True
        span = stage_frame.span if stage_frame is not None else None
        # Inside the blocked task's context (as it was during the block) the line carries
        # that request's bound values, e.g. its request_id.
        if ctx is None and stage_frame is not None and stage_frame.bound is not None:
            # No task context to run in (Python 3.11): the values bound where the stage
            # started are that request's too.
            token = _context.set_bound(stage_frame.bound)
            try:
                emit("warning", "event loop blocked", fields, span=span, stage="", rt=rt)
            finally:
                _context.reset_bound(token)
            return
        runner = ctx.run if ctx is not None else _call
        runner(emit, "warning", "event loop blocked", fields, span=span, stage="", rt=rt)

    def stop(self, timeout: float = 2.0) -> None:
        """Stop watching (idempotent); waits up to ``timeout`` s for the watchdog to end."""
        self.alive = False
        self._stopped.set()
        handle = self._handle
        loop = self._loop_ref()
        if handle is not None and loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(handle.cancel)
            except RuntimeError:  # closed meanwhile
                pass
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        with _lock:
            if loop is not None:
                if _watches.get(loop) is self:
                    del _watches[loop]
                if _automatic.get(loop) is self:
                    del _automatic[loop]
            _update_tracking()


def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


def _update_tracking() -> None:
    # Under _lock. Stages tell 3.11 watches which task is in which stage, only while one runs.
    global track_tasks
    track_tasks = not _TASK_CONTEXT and any(w.running for w in list(_watches.values()))
    if not track_tasks:
        _task_frames.clear()
    for listener in tracking_listeners:
        listener()


def _validate_threshold(threshold_ms: object) -> float:
    if isinstance(threshold_ms, bool) or not isinstance(threshold_ms, int | float):
        raise ValueError(  # noqa: TRY004 - bad settings are ValueErrors (API.md section 1)
            f"rag_instrument.watch_event_loop: threshold_ms must be a number, got {threshold_ms!r}"
        )
    if not threshold_ms > 0 or threshold_ms == float("inf"):
        raise ValueError(
            "rag_instrument.watch_event_loop: threshold_ms must be a positive number of "
            f"milliseconds, got {threshold_ms!r}"
        )
    return float(threshold_ms)


def _install(
    loop: asyncio.AbstractEventLoop, threshold_ms: float, automatic: bool
) -> EventLoopWatch:
    watch = EventLoopWatch(loop, threshold_ms, automatic=automatic)
    with _lock:
        old = _watches.get(loop)
        _watches[loop] = watch
    if old is not None:
        old.stop()
    watch._start(loop)
    with _lock:
        _update_tracking()
    return watch


def watch_event_loop(
    threshold_ms: float = 100, *, loop: asyncio.AbstractEventLoop | None = None
) -> EventLoopWatch:
    """Watch an asyncio event loop and log each time it is blocked past ``threshold_ms``.

    Args:
        threshold_ms: how long the loop may go without running a due callback before it
            counts as blocked (milliseconds, default 100).
        loop: the loop to watch (default: the running loop). One watch per loop: watching
            a loop again replaces its watch.

    Returns:
        The :class:`EventLoopWatch`; call ``.stop()`` to end it. It also ends by itself
        once the loop is closed.

    Raises:
        ValueError: ``threshold_ms`` is not a positive number, or there is no running
            loop and no ``loop`` was given.
    """
    threshold = _validate_threshold(threshold_ms)
    if loop is None:
        loop = asyncio._get_running_loop()
        if loop is None:
            raise ValueError(
                "rag_instrument.watch_event_loop: no running event loop; call it from async "
                "code or pass loop="
            )
    elif not isinstance(loop, asyncio.AbstractEventLoop):
        raise ValueError(
            f"rag_instrument.watch_event_loop: loop must be an asyncio event loop, got {loop!r}"
        )
    if loop.is_closed():
        raise ValueError("rag_instrument.watch_event_loop: the loop is closed")
    return _install(loop, threshold, automatic=False)


#: loop -> its automatic watch: the stage path's lookup (a WeakKeyDictionary lookup makes a
#: weak reference each time). A watch removes its loop when it ends, with the loop's close.
_automatic: dict[asyncio.AbstractEventLoop, EventLoopWatch] = {}


def ensure_watched(threshold_ms: float) -> None:
    """Watch the running loop unless it is watched already (``event_loop_threshold_ms``)."""
    loop = asyncio._get_running_loop()
    if loop is None:
        return
    known = _automatic.get(loop)
    if known is not None and known.alive:
        return
    try:
        with _lock:
            existing = _watches.get(loop)
        if existing is None or not existing.running:
            existing = _install(loop, threshold_ms, automatic=True)
        _automatic[loop] = existing
    except Exception as exc:
        internal_error("watching the event loop", exc)


def stop_automatic() -> None:
    """Stop the watches ``configure(event_loop_threshold_ms=...)`` started (reconfiguring)."""
    with _lock:
        automatic = [w for w in _watches.values() if w.automatic]
    for watch in automatic:
        watch.stop()
    _automatic.clear()
