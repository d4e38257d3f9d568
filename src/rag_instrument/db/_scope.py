"""Where statements are counted: N+1 scopes (stages or ``db_scope()``) and session counters.

N+1 detection counts statement *shapes* (literals and bind values stripped, see
:mod:`rag_instrument.db._sql`) per scope. A scope is the innermost open pipeline stage or
the innermost :func:`db_scope`, whichever was opened last: a :func:`db_scope` opened inside
a stage wins, also for statements run under traced operations opened inside the scope; a
stage opened inside the scope counts on its own. Outside both, nothing is counted: a
long-running process would otherwise see every repeated statement as N+1.

The resolution is cached in the current frame's scratch (keyed by the open scope), so a
statement does not walk the frame chain.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Final

from rag_instrument._context import Frame, current_frame, on_frame_end
from rag_instrument._utils import internal_error

__all__ = ["DbScope", "ShapeCounts", "StatementCounter", "db_scope", "scope_counts"]

_SCRATCH_KEY: Final = "rag_instrument.db.shapes"
_RESOLVED_KEY: Final = "rag_instrument.db.resolved"
_MAX_SHAPES: Final = 1000


class ShapeCounts:
    """Statement-shape counts of one scope, and the shapes already reported."""

    __slots__ = ("counts", "lock", "reports", "warned")

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.warned: set[str] = set()
        self.lock = threading.Lock()
        self.reports: list[tuple[str, Callable[[int], None]]] = []

    def defer(self, shape: str, report: Callable[[int], None]) -> None:
        """Call ``report(final count)`` for ``shape`` when the scope ends (:meth:`flush`)."""
        with self.lock:
            self.reports.append((shape, report))

    def flush(self) -> None:
        """Make the deferred reports, each with its shape's final count in this scope."""
        with self.lock:
            reports, self.reports = self.reports, []
            counts = dict(self.counts)
        for shape, report in reports:
            report(counts.get(shape, 0))

    def add(self, shape: str, threshold: int) -> int:
        """Count one statement; return its count if it just reached ``threshold``, else 0.

        Each shape is reported once per scope, however many more times it runs. The lock
        is taken only near the threshold: far below it, or once reported, a count lost to
        a race between threads can only delay a report, never repeat it.
        """
        counts = self.counts
        count = counts.get(shape)
        if count is not None and (count + 1 < threshold or shape in self.warned):
            counts[shape] = count + 1
            return 0
        with self.lock:
            count = self.counts.get(shape)
            if count is None:
                if len(self.counts) >= _MAX_SHAPES:  # bounded memory for ad-hoc SQL
                    return 0
                count = 0
            count += 1
            self.counts[shape] = count
            if count >= threshold and shape not in self.warned:
                self.warned.add(shape)
                return count
            return 0


class DbScope:
    """An N+1 counting scope opened by :func:`db_scope`.

    Attributes:
        counts: statement shape -> number of executions seen in this scope.
    """

    __slots__ = ("_frame", "_shapes", "_token")

    def __init__(self) -> None:
        self._shapes = ShapeCounts()
        self._frame: Frame | None = None
        self._token: contextvars.Token[DbScope | None] | None = None

    @property
    def counts(self) -> dict[str, int]:
        """Statement shape -> executions seen in this scope so far (a copy)."""
        with self._shapes.lock:
            return dict(self._shapes.counts)

    def __enter__(self) -> DbScope:
        self._frame = current_frame()
        self._token = _scope.set(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        token, self._token = self._token, None
        try:
            self._shapes.flush()  # N+1 warnings, with their final counts
        except Exception as err:
            internal_error("db_scope end", err)
        if token is not None:
            try:
                _scope.reset(token)
            except ValueError:
                pass  # exited in another context than entered: leave that context alone

    async def __aenter__(self) -> DbScope:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)


_scope: contextvars.ContextVar[DbScope | None] = contextvars.ContextVar(
    "rag_instrument.db.scope", default=None
)


def db_scope() -> DbScope:
    """Open an N+1 counting scope without a pipeline stage (``with`` or ``async with``).

    Statements run inside are counted by shape; a shape that reaches the N+1 threshold
    logs one ``"n+1 query detected"`` warning for this scope when it ends, with the
    shape's final ``count``. Stages opened inside the
    scope count on their own.

    Example:
        >>> import rag_instrument as ri
        >>> with ri.db_scope() as scope:
        ...     pass
        >>> scope.counts
        {}
    """
    return DbScope()


def scope_counts() -> tuple[ShapeCounts | None, str | None]:
    """The shape counts of the innermost scope, and its pipeline stage name."""
    frame = current_frame()
    scope = _scope.get()
    if frame is None:
        return (scope._shapes, None) if scope is not None else (None, None)
    scratch = frame.scratch
    if scratch is not None:
        cached = scratch.get(_RESOLVED_KEY)
        if (
            cached is not None
            and cached[0] is scope
            and (scope is None or cached[1] is scope._frame)
        ):
            return cached[2], cached[3]
    shapes, stage = _resolve(frame, scope)
    scratch = frame.scratch
    if scratch is None:
        scratch = frame.scratch = {}
    scratch[_RESOLVED_KEY] = (scope, scope._frame if scope is not None else None, shapes, stage)
    return shapes, stage


def _resolve(frame: Frame, scope: DbScope | None) -> tuple[ShapeCounts | None, str | None]:
    # Walk up from the current frame: reaching the frame the scope was opened under first
    # means the scope is the innermost; a stage frame first means that stage was opened
    # inside the scope (or there is no scope).
    opened_under = scope._frame if scope is not None else None
    stage_frame: Frame | None = frame
    while stage_frame is not None:
        if scope is not None and stage_frame is opened_under:
            return scope._shapes, frame.stage
        if stage_frame.is_stage:
            break
        stage_frame = stage_frame.parent
    if stage_frame is None:
        if scope is None:
            return None, None
        return scope._shapes, frame.stage
    scratch = stage_frame.scratch
    if scratch is None:
        scratch = stage_frame.scratch = {}
    shapes: ShapeCounts | None = scratch.get(_SCRATCH_KEY)
    if shapes is None:
        shapes = ShapeCounts()
        found = scratch.setdefault(_SCRATCH_KEY, shapes)
        if found is shapes:
            on_frame_end(stage_frame, shapes.flush)
        shapes = found
    return shapes, stage_frame.stage


# --- statement counting for db_session() ------------------------------------------------------


class StatementCounter:
    """How many statements instrumented engines ran inside one ``db_session()``."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


session_counter: contextvars.ContextVar[StatementCounter | None] = contextvars.ContextVar(
    "rag_instrument.db.session_counter", default=None
)
