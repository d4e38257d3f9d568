"""SQLAlchemy instrumentation: statement spans, slow queries, N+1, pool and pgvector telemetry.

Usage::

    import rag_instrument as ri
    from sqlalchemy import create_engine

    engine = create_engine("postgresql+psycopg://app@db/rag")
    handle = ri.instrument_sqlalchemy(engine, explain_slow=True)

    with ri.stage("retrieval"):
        ...  # every statement: a CLIENT span, "db" in the stage's breakdown

    handle.uninstrument()

Options of :func:`instrument_sqlalchemy`:

* ``slow_query_ms``: statements at least this slow log ``"slow query"`` (``None``: the
  ``configure()`` value at the time of the statement, 1000 ms by default).
* ``explain_slow``: add the query plan to that warning (SELECT only, never ``ANALYZE``,
  once per statement shape per minute).
* ``n_plus_one_threshold``: the repetitions of one statement shape inside a stage or
  :func:`db_scope` that log ``"n+1 query detected"`` (``None``: the ``configure()`` value).
* ``capture_parameters``: put bind values on spans as ``db.query.parameter.<name>``,
  redacted and truncated (off by default).
* ``pool_slow_ms``: a pool checkout waiting longer logs ``"pool checkout slow"`` (100 ms).

Supports SQLAlchemy 2.0 and later (tested with 2.1), sync ``Engine`` and ``AsyncEngine``.
Requires the ``sqlalchemy`` extra.
"""

from __future__ import annotations

import inspect
import math
import threading
import weakref
from types import TracebackType
from typing import Any, Final, Generic, TypeVar

try:
    from sqlalchemy.engine import Engine
except ImportError as _exc:  # pragma: no cover - exercised in the no-extras CI environment
    raise ImportError(
        "rag_instrument.db needs SQLAlchemy: pip install 'rag_instrument[sqlalchemy]' "
        "(for PostgreSQL, rag_instrument.db.postgres and db-doctor: "
        "pip install 'rag_instrument[postgres]', which adds the drivers)"
    ) from _exc

from opentelemetry import context as otel_context
from opentelemetry import trace as trace_api
from opentelemetry.trace import Status, StatusCode

from rag_instrument import attributes as attr
from rag_instrument._runtime import get_runtime, instrumentation_suppressed
from rag_instrument._steps import Plan, arun, run
from rag_instrument._utils import internal_error, warn_once
from rag_instrument.attributes import (
    DB_SESSION_SPAN as SESSION_SPAN,
)
from rag_instrument.attributes import (
    RAG_DB_SESSION_OUTCOME as SESSION_OUTCOME,
)
from rag_instrument.attributes import (
    RAG_DB_STATEMENT_COUNT as SESSION_STATEMENTS,
)
from rag_instrument.db._listeners import EngineInstrumentation
from rag_instrument.db._scope import DbScope, StatementCounter, db_scope, session_counter
from rag_instrument.logs import emit

__all__ = [
    "DbScope",
    "DbSession",
    "SQLAlchemyHandle",
    "db_scope",
    "db_session",
    "instrument_sqlalchemy",
    "uninstrument_sqlalchemy",
]

SUPPORTED_VERSIONS: Final = ("sqlalchemy >= 2.0",)
"""The SQLAlchemy versions this integration supports."""


S = TypeVar("S")


class SQLAlchemyHandle:
    """What :func:`instrument_sqlalchemy` returns: undo it with :meth:`uninstrument`.

    Also a context manager that uninstruments on exit.
    """

    def __init__(self, engine: Engine, instrumentation: EngineInstrumentation) -> None:
        self._engine = weakref.ref(engine)
        self._instrumentation = instrumentation
        #: The options it was instrumented with (``instrument_sqlalchemy``'s keywords).
        self.options: dict[str, Any] = {}

    @property
    def engine(self) -> Engine | None:
        """The (sync) engine, or ``None`` once it was garbage-collected."""
        return self._engine()

    @property
    def instrumented(self) -> bool:
        """Whether the listeners are in place."""
        return self._instrumentation.active

    def uninstrument(self) -> None:
        """Remove every listener and the pool wrapper; calling it again does nothing."""
        with _lock:
            self._instrumentation.remove()
            engine = self._engine()
            if engine is not None and _handles.get(engine) is self:
                del _handles[engine]

    def __enter__(self) -> SQLAlchemyHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.uninstrument()

    def __repr__(self) -> str:
        state = "instrumented" if self.instrumented else "uninstrumented"
        return f"<SQLAlchemyHandle {self._instrumentation.system} {state}>"


_handles: weakref.WeakKeyDictionary[Engine, SQLAlchemyHandle] = weakref.WeakKeyDictionary()
_lock = threading.RLock()


def _sync_engine(engine: Any) -> Engine:
    sync = getattr(engine, "sync_engine", engine)
    if not isinstance(sync, Engine):
        raise TypeError(
            "rag_instrument.instrument_sqlalchemy: expected a SQLAlchemy Engine or AsyncEngine, "
            f"got {type(engine).__name__}"
        )
    return sync


def _check(name: str, value: float | None, minimum: float, integer: bool = False) -> None:
    if value is None:
        return
    bad = (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < minimum
    )
    if integer and not bad and int(value) != value:
        bad = True
    if bad:
        kind = "an integer" if integer else "a number"
        raise ValueError(
            f"rag_instrument.instrument_sqlalchemy: invalid {name} {value!r}; "
            f"expected {kind} at least {minimum:g}"
        )


_DEFAULT_OPTIONS: Final = {
    "slow_query_ms": None,
    "explain_slow": False,
    "n_plus_one_threshold": None,
    "capture_parameters": False,
    "pool_slow_ms": 100.0,
}


def instrument_sqlalchemy(
    engine: Any,
    *,
    slow_query_ms: float | None = None,
    explain_slow: bool = False,
    n_plus_one_threshold: int | None = None,
    capture_parameters: bool = False,
    pool_slow_ms: float = 100.0,
) -> SQLAlchemyHandle:
    """Instrument a SQLAlchemy ``Engine`` or ``AsyncEngine`` through its events.

    Instrumenting an engine that already is returns the existing handle unchanged (its
    options stay those of the first call; other options given again are warned about).

    Args:
        engine: an ``Engine`` or ``AsyncEngine``.
        slow_query_ms: the slow-statement threshold; ``None`` for the ``configure()`` value.
        explain_slow: add the plan of slow SELECTs to the ``"slow query"`` warning.
        n_plus_one_threshold: repetitions of one statement shape that count as N+1;
            ``None`` for the ``configure()`` value.
        capture_parameters: record bind values on spans (redacted, truncated).
        pool_slow_ms: a pool checkout slower than this logs ``"pool checkout slow"``.

    Returns:
        The handle; ``handle.uninstrument()`` removes everything.

    Raises:
        TypeError: ``engine`` is not an engine.
        ValueError: a threshold is negative (or ``n_plus_one_threshold`` below 2).
    """
    sync = _sync_engine(engine)
    for flag, flag_value in (
        ("explain_slow", explain_slow),
        ("capture_parameters", capture_parameters),
    ):
        if not isinstance(flag_value, bool):
            raise ValueError(  # noqa: TRY004 - configuration errors are ValueErrors here
                f"rag_instrument.instrument_sqlalchemy: invalid {flag} {flag_value!r}; "
                "expected True or False"
            )
    _check("slow_query_ms", slow_query_ms, 0)
    _check("n_plus_one_threshold", n_plus_one_threshold, 2, integer=True)
    _check("pool_slow_ms", pool_slow_ms, 0)
    options = {
        "slow_query_ms": slow_query_ms,
        "explain_slow": explain_slow,
        "n_plus_one_threshold": n_plus_one_threshold,
        "capture_parameters": capture_parameters,
        "pool_slow_ms": pool_slow_ms,
    }
    with _lock:
        existing = _handles.get(sync)
        if existing is not None and existing.instrumented:
            # Only options given this time (not at their defaults) can differ: a plain
            # instrument_sqlalchemy(engine) again (an app factory) asks for nothing else.
            changed = ", ".join(
                f"{name}={value!r}"
                for name, value in options.items()
                if value != _DEFAULT_OPTIONS[name] and existing.options.get(name) != value
            )
            if changed:
                warn_once.warning(
                    "rag_instrument.instrument_sqlalchemy: this engine is instrumented "
                    f"already: the first call's options stay, not {changed} (call "
                    "uninstrument_sqlalchemy(engine) first to change them)"
                )
            return existing
        instrumentation = EngineInstrumentation(
            sync,
            slow_query_ms=slow_query_ms,
            explain_slow=explain_slow,
            n_plus_one_threshold=n_plus_one_threshold,
            capture_parameters=capture_parameters,
            pool_slow_ms=pool_slow_ms,
        )
        instrumentation.install(sync)
        handle = SQLAlchemyHandle(sync, instrumentation)
        handle.options = options
        _handles[sync] = handle
        return handle


def uninstrument_sqlalchemy(engine: Any) -> None:
    """Undo :func:`instrument_sqlalchemy` for ``engine`` (no-op if not instrumented)."""
    with _lock:
        handle = _handles.get(_sync_engine(engine))
    if handle is not None:
        handle.uninstrument()


# --- db_session ---------------------------------------------------------------------------------


def _is_sync_session(session: Any) -> bool:
    """Whether ``session`` is SQLAlchemy's sync ``Session`` (not for ``async with``)."""
    try:
        from sqlalchemy.orm import Session
    except ImportError:  # pragma: no cover - the db module needs SQLAlchemy
        return False
    return isinstance(session, Session)


class DbSession(Generic[S]):
    """The context manager returned by :func:`db_session` (``with`` or ``async with``)."""

    def __init__(self, factory: Any) -> None:
        self._factory = factory
        self._session: Any = None
        self._span: trace_api.Span | None = None
        self._token: object | None = None
        self._counter: StatementCounter | None = None
        self._counter_token: Any = None

    # --- telemetry (never raises) --------------------------------------------------------

    def _open(self) -> None:
        rt = get_runtime()
        if not rt.enabled:
            return
        try:
            span = (
                trace_api.INVALID_SPAN
                if instrumentation_suppressed()
                else rt.tracer.start_span(SESSION_SPAN, kind=trace_api.SpanKind.INTERNAL)
            )
            self._span = span
            self._token = otel_context.attach(trace_api.set_span_in_context(span))
            self._counter = StatementCounter()
            self._counter_token = session_counter.set(self._counter)
        except Exception as exc:
            internal_error("db_session", exc)

    def _close(self, outcome: str, error: BaseException | None) -> None:
        span, self._span = self._span, None
        if span is None:
            return
        try:
            if self._counter_token is not None:
                try:
                    session_counter.reset(self._counter_token)
                except ValueError:
                    pass
            if self._token is not None:
                try:
                    otel_context.detach(self._token)  # type: ignore[arg-type]
                except Exception:
                    pass
            if span.is_recording():
                count = self._counter.count if self._counter is not None else 0
                span.set_attribute(SESSION_STATEMENTS, count)
                span.set_attribute(SESSION_OUTCOME, outcome)
                if error is not None:
                    span.set_attribute(attr.ERROR_TYPE, type(error).__qualname__)
                    if isinstance(error, Exception):
                        span.set_status(Status(StatusCode.ERROR, type(error).__name__))
                    else:
                        span.set_attribute(attr.RAG_CANCELLED, True)
            span.end()
        except Exception as exc:
            internal_error("db_session end", exc)

    def _rollback_failed(self, exc: BaseException) -> None:
        emit(
            "warning",
            "db session rollback failed",
            {"error_type": type(exc).__name__},
            trusted=True,
        )

    # --- ending: one decision core, a sync and an async loop around it --------------------

    def _ending(self, session: Any, exc: BaseException | None) -> Plan[BaseException | None]:
        """What ending the session takes, in order (carried out by ``_steps.run`` / ``arun``).

        ``commit`` (or ``rollback`` after an error in the block), then ``close``, then the
        span. Returns the exception the exit must raise, if any: a failed commit, an
        interrupt during rollback, or a failed close (as if it had failed in a
        ``finally``). A failed rollback after an error in the block is only logged: the
        original error matters more.
        """
        outcome, error, escaping = "commit", exc, None
        if exc is None:
            try:
                yield session.commit, ()
            except GeneratorExit:
                raise
            except BaseException as commit_exc:
                outcome, error, escaping = "rollback", commit_exc, commit_exc
        else:
            outcome = "rollback"
            try:
                yield session.rollback, ()
            except GeneratorExit:
                raise
            except Exception as rollback_exc:
                self._rollback_failed(rollback_exc)
            except BaseException as interrupt:
                escaping = interrupt
        try:
            yield session.close, ()
        except GeneratorExit:
            raise
        except BaseException as close_exc:
            if escaping is not None and close_exc.__context__ is None:
                close_exc.__context__ = escaping
            escaping = close_exc
        finally:
            self._close(outcome, error)
        return escaping

    # --- sync ----------------------------------------------------------------------------

    def __enter__(self) -> S:
        session = self._factory()
        if inspect.iscoroutinefunction(getattr(session, "commit", None)):
            raise TypeError("rag_instrument.db_session: use 'async with' for async sessions")
        self._session = session
        self._open()
        return session  # type: ignore[no-any-return]

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        session, self._session = self._session, None
        escaping = run(self._ending(session, exc))
        if escaping is not None:
            raise escaping

    # --- async ---------------------------------------------------------------------------

    async def __aenter__(self) -> S:
        session = self._factory()
        if _is_sync_session(session):  # before the block runs: it would commit, then fail
            session.close()
            raise TypeError("rag_instrument.db_session: use 'with' for sync sessions")
        self._session = session
        self._open()
        return session  # type: ignore[no-any-return]

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        session, self._session = self._session, None
        escaping = await arun(self._ending(session, exc))
        if escaping is not None:
            raise escaping


def db_session(session_factory: Any) -> DbSession[Any]:
    """A session from ``session_factory``, committed on success, rolled back on error.

    Works with ``with`` for a ``sessionmaker`` and ``async with`` for an
    ``async_sessionmaker``. The session is always closed; an exception from the block is
    re-raised as the same object after the rollback. One ``db.session`` span covers the
    block, with the number of statements instrumented engines ran in it
    (``rag.db.statement_count``).

    Args:
        session_factory: a ``sessionmaker``, ``async_sessionmaker`` or any callable
            returning a session.

    Example:
        >>> import rag_instrument as ri
        >>> from sqlalchemy import create_engine, text
        >>> from sqlalchemy.orm import sessionmaker
        >>> Session = sessionmaker(create_engine("sqlite://"))
        >>> with ri.db_session(Session) as session:
        ...     session.execute(text("SELECT 1")).scalar()
        1
    """
    return DbSession(session_factory)
