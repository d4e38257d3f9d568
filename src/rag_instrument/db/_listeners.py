"""SQLAlchemy engine events: one span per statement, slow queries, N+1, pgvector, breakdown.

Only SQLAlchemy's own events are used (``before_cursor_execute``, ``after_cursor_execute``,
``handle_error``, pool events, ``commit`` / ``rollback`` for pgvector settings, and the ORM's
``do_orm_execute`` to name the relationship behind a lazy load). The statement and the
parameters are read, never changed, so the SQL that reaches the database is byte for byte
what it would be without rag_instrument.
"""

from __future__ import annotations

import contextvars
import functools
import re
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Final

from opentelemetry.trace import SpanKind, Status, StatusCode
from sqlalchemy import event
from sqlalchemy.orm import ORMExecuteState, Session

from rag_instrument import _breakdown
from rag_instrument import attributes as attr
from rag_instrument._context import current_stage
from rag_instrument._runtime import Runtime, get_runtime
from rag_instrument._sanitize import REDACTED, to_attribute_value
from rag_instrument._utils import internal_error, warn_once
from rag_instrument.attributes import (
    DB_COLLECTION_NAME as DB_COLLECTION,
)
from rag_instrument.attributes import (
    DB_NAMESPACE,
    DB_QUERY_TEXT,
    SERVER_ADDRESS,
    SERVER_PORT,
)
from rag_instrument.attributes import (
    DB_OPERATION_BATCH_SIZE as DB_BATCH_SIZE,
)
from rag_instrument.attributes import (
    DB_OPERATION_NAME as DB_OPERATION,
)
from rag_instrument.attributes import (
    DB_QUERY_PARAMETER_PREFIX as DB_PARAMETER,
)
from rag_instrument.attributes import (
    DB_RESPONSE_STATUS_CODE as DB_STATUS_CODE,
)
from rag_instrument.attributes import (
    DB_SYSTEM_NAME as DB_SYSTEM,
)
from rag_instrument.attributes import (
    METRIC_DB_OPERATION_DURATION as METRIC_DURATION,
)
from rag_instrument.attributes import (
    RAG_VECTOR_INDEX_TYPE as VECTOR_INDEX_TYPE,
)
from rag_instrument.attributes import (
    RAG_VECTOR_METRIC as VECTOR_METRIC,
)
from rag_instrument.attributes import (
    RAG_VECTOR_PARAMS_PREFIX as VECTOR_PARAMS,
)
from rag_instrument.attributes import (
    RAG_VECTOR_RESULT_COUNT as VECTOR_RESULT_COUNT,
)
from rag_instrument.attributes import (
    RAG_VECTOR_TOP_K as VECTOR_TOP_K,
)
from rag_instrument.db import _pgvector
from rag_instrument.db._explain import Explainer
from rag_instrument.db._pool import PoolInstrumentation
from rag_instrument.db._scope import scope_counts, session_counter
from rag_instrument.db._sql import StatementInfo, analyze, limit_value
from rag_instrument.logs import emit

if TYPE_CHECKING:
    from opentelemetry.trace import Span
    from sqlalchemy.engine import Connection, Engine, ExceptionContext

__all__ = ["EngineInstrumentation", "batch_rows", "connection_lost", "db_failure"]

# --- attribute names (OpenTelemetry database semantic conventions, and ours) ---------------

_SYSTEMS: Final = {"mssql": "microsoft.sql_server", "oracle": "oracle.db"}
_DEFAULT_PORTS: Final = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306, "mssql": 1433}
_PENDING: Final = "_rag_instrument_pending"

#: ``plan`` not looked for yet (``None`` means looked for, and there is none).
_NOT_EXPLAINED: Final = object()
#: Statements after which a table's indexes may differ.
_DDL: Final = frozenset({"CREATE", "DROP", "ALTER", "REINDEX", "TRUNCATE"})


def connection_lost(exc: BaseException) -> bool:
    """Whether ``exc`` says the database connection is gone.

    Killed by the server, a network cut, a failover: an expected condition, not a bug of
    ours.
    """
    from sqlalchemy import exc as sa_exc

    if isinstance(exc, sa_exc.DBAPIError):
        return True  # the driver's own error, wrapped: whatever it says, it is the database's
    if isinstance(exc, sa_exc.PendingRollbackError | sa_exc.ResourceClosedError):
        return True
    module = type(exc).__module__ or ""
    return module.split(".", 1)[0] in ("psycopg", "psycopg2", "asyncpg", "sqlite3", "pymysql")


def db_failure(where: str, exc: BaseException) -> None:
    """Report a failure inside our database listeners.

    One quiet line when the connection went away under us, an internal error otherwise.
    """
    if connection_lost(exc):
        warn_once.info(
            f"rag_instrument: database connection lost during {where} "
            f"({type(exc).__name__}); telemetry for it skipped"
        )
        return
    internal_error(where, exc)


def batch_rows(parameters: Any, context: Any) -> int | None:
    """The rows an executemany call sends (``db.operation.batch.size``).

    A list of parameter sets is one set per row. SQLAlchemy's "insertmanyvalues" instead
    sends each batch as one multi-row ``INSERT ... VALUES (...), (...)`` with one flat
    parameter set holding every row's values (a tuple, or a dict for named paramstyles):
    its rows are the values divided by the values of one row, which the statement's
    compiled parameters give.
    """
    try:
        count = len(parameters)
    except TypeError:
        return None
    if count == 0:
        return 0
    first = next(iter(parameters.values() if isinstance(parameters, dict) else parameters))
    if not isinstance(parameters, dict) and isinstance(first, tuple | list | dict):
        return count  # one parameter set per row
    compiled = getattr(context, "compiled_parameters", None)
    per_row = len(compiled[0]) if isinstance(compiled, list) and compiled else 0
    if per_row <= 0 or count % per_row:
        return None  # cannot tell: say nothing rather than something wrong
    return count // per_row


class _Pending:
    """One statement between ``before_cursor_execute`` and its end."""

    __slots__ = ("info", "metric_attributes", "rt", "span", "start_ns")

    def __init__(
        self,
        span: Span,
        start_ns: int,
        info: StatementInfo,
        rt: Runtime,
        metric_attributes: dict[str, Any],
    ) -> None:
        self.span = span
        self.start_ns = start_ns
        self.info = info
        self.rt = rt
        self.metric_attributes = metric_attributes


# --- the ORM relationship behind a lazy load ------------------------------------------------

# (the statement being executed for a relationship load, "Parent.relationship")
_orm_load: contextvars.ContextVar[tuple[Any, str] | None] = contextvars.ContextVar(
    "rag_instrument.db.orm_load", default=None
)
_orm_users = [0]
_orm_lock = threading.Lock()


def _on_orm_execute(state: ORMExecuteState) -> None:
    try:
        if not state.is_relationship_load:
            return
        path = state.loader_strategy_path
        prop = path[-1] if path is not None and len(path) else None
        key = getattr(prop, "key", None)
        parent = getattr(getattr(prop, "parent", None), "class_", None)
        if key is None or parent is None:
            return
        _orm_load.set((state.statement, f"{parent.__name__}.{key}"))
    except Exception as exc:
        internal_error("do_orm_execute", exc)


def _orm_acquire() -> None:
    with _orm_lock:
        _orm_users[0] += 1
        if _orm_users[0] == 1:
            event.listen(Session, "do_orm_execute", _on_orm_execute)


def _orm_release() -> None:
    with _orm_lock:
        _orm_users[0] -= 1
        if _orm_users[0] == 0 and event.contains(Session, "do_orm_execute", _on_orm_execute):
            event.remove(Session, "do_orm_execute", _on_orm_execute)


_SQLSTATE: Final = re.compile(r"[0-9A-Z]{5}")  # five characters, by the SQL standard


def _driver_exception(exc: BaseException) -> BaseException:
    """The driver's own exception, for ``error.type`` and the SQLSTATE.

    SQLAlchemy's adapters of async drivers (``AsyncAdapt_asyncpg_dbapi.ProgrammingError``)
    are raised from it.
    """
    cause = exc.__cause__
    if (
        cause is not None
        and (type(exc).__module__ or "").startswith("sqlalchemy.dialects.")
        and not (type(cause).__module__ or "").startswith("sqlalchemy")
        and type(cause).__module__ != "builtins"
    ):
        return cause
    return exc


def _error_type(exc: BaseException) -> str:
    cls = type(exc)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


class EngineInstrumentation:
    """The listeners of one engine (created by ``instrument_sqlalchemy``)."""

    def __init__(
        self,
        engine: Engine,
        *,
        slow_query_ms: float | None,
        explain_slow: bool,
        n_plus_one_threshold: int | None,
        capture_parameters: bool,
        pool_slow_ms: float,
    ) -> None:
        self._engine = weakref.ref(engine)
        self.slow_query_ms = slow_query_ms
        self.explain_slow = explain_slow
        self.n_plus_one_threshold = n_plus_one_threshold
        self.capture_parameters = capture_parameters
        dialect = engine.dialect.name
        self.dialect = dialect
        self.is_postgres = dialect == "postgresql"
        self.system = _SYSTEMS.get(dialect, dialect)
        url = engine.url
        base: dict[str, Any] = {DB_SYSTEM: self.system}
        if url.database:
            base[DB_NAMESPACE] = url.database
        if url.host:
            base[SERVER_ADDRESS] = url.host
            port = url.port or _DEFAULT_PORTS.get(dialect)
            if port:
                base[SERVER_PORT] = port
        self.base_attributes = base
        # StatementInfo -> (span attributes, metric attributes), built once per statement.
        self._info_attrs: dict[StatementInfo, tuple[dict[str, Any], dict[str, Any]]] = {}
        # The duration histogram of the runtime it was created for.
        self._histogram: tuple[Runtime | None, Any] = (None, None)
        self._orm_finalizer: weakref.finalize[Any, Any] | None = None
        self._by_cursor: dict[int, _Pending] = {}
        self.explainer = Explainer(dialect)
        self.index_types = _pgvector.IndexTypes()
        location = f"{url.host}:{base.get(SERVER_PORT, '')}" if url.host else dialect
        # SQLAlchemy's own name for the pool when the application gave one
        # (create_engine(..., pool_logging_name="reader")): two pools on one database
        # (a writer and a reader) are then two series, not one summed.
        given = getattr(engine.pool, "logging_name", None)
        default = f"{location}/{url.database or ''}"
        pool_name = given if isinstance(given, str) and given else default
        self.pool = PoolInstrumentation(engine, pool_name, pool_slow_ms)
        # Names and functions only: a strong reference to the engine here would keep it
        # alive through the handle registry (a WeakKeyDictionary whose values are handles).
        # before_cursor_execute with retval=True: SQLAlchemy then calls _before directly
        # instead of through a wrapper; it returns the statement and parameters it got,
        # the very same objects.
        self._listeners: list[tuple[str, Any]] = [
            ("before_cursor_execute", self._before),
            ("after_cursor_execute", self._after),
            ("handle_error", self._error),
        ]
        if self.is_postgres:
            self._listeners += [
                ("commit", self._transaction_end),
                ("rollback", self._transaction_end),
                ("checkin", self._pool_checkin),
            ]
        self.active = False

    # --- install / remove ----------------------------------------------------------------

    def install(self, engine: Engine) -> None:
        """Add every listener."""
        for name, fn in self._listeners:
            event.listen(engine, name, fn, retval=name == "before_cursor_execute")
        self.pool.install(engine)
        _orm_acquire()
        # Released by remove(), or when the engine is collected without uninstrument():
        # a finalizer runs at most once, so the process-wide ORM listener count stays exact.
        finalizer = weakref.finalize(engine, _orm_release)
        finalizer.atexit = False
        self._orm_finalizer = finalizer
        self.active = True

    def remove(self) -> None:
        """Remove every listener added by :meth:`install` (idempotent)."""
        if not self.active:
            return
        self.active = False
        engine = self._engine()
        if engine is not None:
            for name, fn in self._listeners:
                if event.contains(engine, name, fn):
                    event.remove(engine, name, fn)
            self.pool.remove(engine)
        finalizer, self._orm_finalizer = self._orm_finalizer, None
        if finalizer is not None:
            finalizer()  # _orm_release(), unless the engine's collection already ran it

    # --- per-statement attribute dicts, computed once per statement text --------------------

    def _attributes(self, info: StatementInfo) -> tuple[dict[str, Any], dict[str, Any]]:
        """The span and the metric attributes of ``info`` (computed once, then shared)."""
        found = self._info_attrs.get(info)
        if found is not None:
            return found
        attrs = dict(self.base_attributes)
        attrs[DB_QUERY_TEXT] = get_runtime().sanitizer.statement(info.text)
        if info.operation:
            attrs[DB_OPERATION] = info.operation
        if info.collection:
            attrs[DB_COLLECTION] = info.collection
        if info.vector_metric is not None and self.is_postgres:
            attrs[attr.OPENINFERENCE_SPAN_KIND] = attr.SpanKind.RETRIEVER
            attrs[VECTOR_METRIC] = info.vector_metric
        metric_attrs = dict(self.base_attributes)
        if info.operation:
            metric_attrs[DB_OPERATION] = info.operation
        if info.collection:
            metric_attrs[DB_COLLECTION] = info.collection
        if len(self._info_attrs) > 2048:
            self._info_attrs.clear()
        found = self._info_attrs[info] = (attrs, metric_attrs)
        return found

    def _duration_histogram(self, rt: Runtime) -> Any:
        """``db.client.operation.duration`` of ``rt``, looked up once per runtime."""
        cached_rt, histogram = self._histogram
        if cached_rt is not rt:
            histogram = rt.histogram(
                METRIC_DURATION, "s", "Duration of database client operations."
            )
            self._histogram = (rt, histogram)
        return histogram

    def _parameters(
        self, rt: Runtime, parameters: Any, context: Any, info: StatementInfo
    ) -> dict[str, Any]:
        if isinstance(parameters, list) and parameters:  # executemany: the first set
            parameters = parameters[0]
        out: dict[str, Any] = {}
        # Parameters compared with or stored in a secret-named column (password = :p).
        secret = info.secret_params if rt.sanitizer.redact else frozenset()
        if isinstance(parameters, dict):
            items: list[tuple[str, Any, bool]] = [
                (str(k), v, k in secret) for k, v in parameters.items()
            ]
        elif isinstance(parameters, tuple | list):
            # Positional paramstyles (qmark, numeric): name values after the bind parameters
            # of the compiled statement, so that key-based redaction (password=...) works.
            names = getattr(getattr(context, "compiled", None), "positiontup", None)
            if names is None or len(names) != len(parameters):
                names = range(len(parameters))
            items = [
                (str(n), v, i in secret or n in secret)
                for i, (n, v) in enumerate(zip(names, parameters, strict=True))
            ]
        else:
            return out
        sanitizer = rt.sanitizer
        for key, value, is_secret in items[:128]:
            if is_secret:
                out[DB_PARAMETER + key] = REDACTED
                continue
            converted = to_attribute_value(sanitizer.value(value, key), sanitizer)
            if converted is not None:
                out[DB_PARAMETER + key] = converted
        return out

    # --- events --------------------------------------------------------------------------

    def _before(
        self,
        conn: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> tuple[str, Any]:
        rt = get_runtime()
        if not rt.enabled:
            return statement, parameters
        try:
            info = analyze(statement, self.dialect)
            attrs, metric_attrs = self._attributes(info)
            if executemany or self.capture_parameters:
                attrs = dict(attrs)
                if executemany:
                    rows = batch_rows(parameters, context)
                    if rows is not None:
                        attrs[DB_BATCH_SIZE] = rows
                if self.capture_parameters:
                    attrs.update(self._parameters(rt, parameters, context, info))
            span = rt.start_leaf_span(info.span_name, SpanKind.CLIENT, attrs, sanitized=True)
            pending = _Pending(span, time.perf_counter_ns(), info, rt, metric_attrs)
            if context is not None:
                setattr(context, _PENDING, pending)
            else:
                self._by_cursor[id(cursor)] = pending
        except Exception as exc:
            internal_error("before_cursor_execute", exc)
        return statement, parameters

    def _take(self, cursor: Any, context: Any) -> _Pending | None:
        if context is not None:
            pending: _Pending | None = getattr(context, _PENDING, None)
            if pending is not None:
                setattr(context, _PENDING, None)
            return pending
        return self._by_cursor.pop(id(cursor), None)

    def _after(
        self,
        conn: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> None:
        end_ns = time.perf_counter_ns()
        if context is not None:
            pending: _Pending | None = getattr(context, _PENDING, None)
            if pending is None:
                return
            setattr(context, _PENDING, None)
        else:
            pending = self._by_cursor.pop(id(cursor), None)
            if pending is None:
                return
        try:
            self._finish(pending, end_ns, conn, cursor, statement, parameters, context, executemany)
        except Exception as exc:
            db_failure("after_cursor_execute", exc)

    def _finish(
        self,
        pending: _Pending,
        end_ns: int,
        conn: Connection,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> None:
        info, span, rt = pending.info, pending.span, pending.rt
        ms = (end_ns - pending.start_ns) / 1e6
        end_wall: int | None = None  # None: the span reads its own clock, right now
        vector = False
        slow_ms = self.slow_query_ms
        if slow_ms is None:
            slow_ms = rt.settings.slow_query_ms
        slow = rt.log is not None and ms >= slow_ms
        plan: Any = _NOT_EXPLAINED
        if self.is_postgres:
            if info.touches_vector_settings:
                _pgvector.invalidate_settings(conn.info)
            if info.operation in _DDL:
                self.index_types.clear()  # an index may have come or gone
            vector = info.vector_metric is not None
            if vector and span.is_recording():
                # Reading pgvector settings can take a query: end the span before it.
                end_wall = time.time_ns()
                if slow:
                    # The plan says which index served the search (or that none did).
                    plan = self._explain(info, conn, statement, parameters, executemany)
                self._vector_attributes(span, info, conn, cursor, parameters, plan)
        span.end(end_time=end_wall)
        self._duration_histogram(rt).record(ms / 1000.0, pending.metric_attributes)
        _breakdown.record(attr.BREAKDOWN_VECTOR if vector else attr.BREAKDOWN_DB, ms)
        counter = session_counter.get()
        if counter is not None:
            counter.count += 1
        shapes, stage = scope_counts()
        if shapes is not None:
            threshold = self.n_plus_one_threshold or rt.settings.n_plus_one_threshold
            count = shapes.add(info.shape, threshold)
            if count and rt.log is not None:
                # Reported when the scope ends, with the final count rather than the
                # threshold; the lazy-loaded relationship is known only now.
                loaded = _orm_load.get()
                relationship = (
                    loaded[1]
                    if loaded is not None
                    and getattr(context, "invoked_statement", None) is loaded[0]
                    else None
                )
                shapes.defer(
                    info.shape,
                    functools.partial(self._report_n_plus_one, rt, info, stage, relationship),
                )
        if slow:
            self._report_slow(rt, info, ms, conn, pending, statement, parameters, executemany, plan)

    def _error(self, ctx: ExceptionContext) -> None:
        try:
            context = ctx.execution_context
            if context is None:
                return
            pending = self._take(None, context)
            if pending is None:
                return
            end_ns = time.perf_counter_ns()
            span, info, rt = pending.span, pending.info, pending.rt
            exc = _driver_exception(ctx.original_exception)
            error_type = _error_type(exc)
            code = None
            if isinstance(exc, Exception):
                code = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
                if not isinstance(code, str) or not _SQLSTATE.fullmatch(code):
                    code = None
                sqlite_code = getattr(exc, "sqlite_errorcode", None)
                if code is None and type(sqlite_code) is int:  # SQLite's (extended) result code
                    code = str(sqlite_code)
            if span.is_recording():
                span.set_attribute(attr.ERROR_TYPE, error_type)
                if isinstance(exc, Exception):
                    # Only the type: driver messages can quote the offending values.
                    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                    if code is not None:
                        span.set_attribute(DB_STATUS_CODE, code)
                else:
                    span.set_attribute(attr.RAG_CANCELLED, True)
            span.end()
            ms = (end_ns - pending.start_ns) / 1e6
            metric_attrs = {**pending.metric_attributes, attr.ERROR_TYPE: error_type}
            if code is not None:
                metric_attrs[DB_STATUS_CODE] = code
            self._duration_histogram(rt).record(ms / 1000.0, metric_attrs)
            vector = self.is_postgres and info.vector_metric is not None
            _breakdown.record(attr.BREAKDOWN_VECTOR if vector else attr.BREAKDOWN_DB, ms)
            counter = session_counter.get()
            if counter is not None:
                counter.count += 1
        except Exception as exc:
            db_failure("handle_error", exc)

    def _transaction_end(self, conn: Connection) -> None:
        try:
            if conn.invalidated:
                # Killed by the server or cut by the network: its pooled record is
                # discarded anyway. Expected in production: one quiet line.
                warn_once.info(
                    "rag_instrument: a database connection was invalidated "
                    "(closed by the server or the network)"
                )
                return
            if conn.closed:
                return
            _pgvector.invalidate_settings(conn.info)
        except Exception as exc:
            db_failure("transaction end", exc)

    def _pool_checkin(self, dbapi_conn: Any, record: Any) -> None:
        _pgvector.invalidate_settings(getattr(record, "info", None))

    # --- reports -------------------------------------------------------------------------

    def _vector_attributes(
        self,
        span: Span,
        info: StatementInfo,
        conn: Connection,
        cursor: Any,
        parameters: Any,
        plan: Any = _NOT_EXPLAINED,
    ) -> None:
        assert info.vector_metric is not None
        top_k = limit_value(info, parameters)
        if top_k is not None:
            span.set_attribute(VECTOR_TOP_K, top_k)
        rowcount = getattr(cursor, "rowcount", -1)
        if isinstance(rowcount, int) and rowcount >= 0:
            span.set_attribute(VECTOR_RESULT_COUNT, rowcount)
        try:
            dbapi_conn = conn.connection.dbapi_connection
            if plan is not _NOT_EXPLAINED and plan is not None:
                used = self.index_types.from_plan(dbapi_conn, info.collection, plan)
            elif info.index_servable:
                used = self.index_types.lookup(dbapi_conn, info.collection, info.vector_metric)
            else:  # no ORDER BY distance ... LIMIT: no pgvector index serves it
                used = None
            if used is None:
                # No vector index served it (an exact, sequential scan): no index type,
                # and hnsw.ef_search / ivfflat.probes did not apply.
                return
            settings = _pgvector.read_settings(conn.info, dbapi_conn)
        except Exception as exc:
            warn_once.warning(
                f"rag_instrument: reading pgvector settings failed: {type(exc).__name__}"
            )
            return
        index_type, index_name = used
        span.set_attribute(VECTOR_INDEX_TYPE, index_type)
        span.set_attribute(attr.RAG_VECTOR_INDEX_NAME, index_name)
        for name, value in settings.items():
            if name.startswith(index_type + "."):
                span.set_attribute(VECTOR_PARAMS + name, value)

    def _report_n_plus_one(
        self,
        rt: Runtime,
        info: StatementInfo,
        stage: str | None,
        relationship: str | None,
        count: int,
    ) -> None:
        fields: dict[str, Any] = {"statement": info.text, "count": count}
        if stage:  # outside a stage (a bare ``db_scope()``) the key is absent, not null
            fields["pipeline_stage"] = stage
        fields[DB_SYSTEM] = self.system
        # The relationship is named only when the statement was that lazy load.
        if relationship is not None:
            fields["relationship"] = relationship
        emit("warning", "n+1 query detected", fields, rt=rt, stage=stage or "")

    def _explain(
        self,
        info: StatementInfo,
        conn: Connection,
        statement: str,
        parameters: Any,
        executemany: bool,
    ) -> Any:
        """The sanitised plan of a slow statement, or ``None`` (not wanted, due or possible)."""
        if not (
            self.explain_slow
            and info.explainable
            and not executemany
            and self.explainer.supported
            and self.explainer.due(info.shape)
        ):
            return None
        try:
            dbapi_conn = conn.connection.dbapi_connection
            return self.explainer.plan(dbapi_conn, statement, parameters)
        except Exception as exc:
            warn_once.warning(
                f"rag_instrument: EXPLAIN of a slow query failed: {type(exc).__name__}"
            )
            return None

    def _report_slow(
        self,
        rt: Runtime,
        info: StatementInfo,
        ms: float,
        conn: Connection,
        pending: _Pending,
        statement: str,
        parameters: Any,
        executemany: bool,
        plan: Any = _NOT_EXPLAINED,
    ) -> None:
        fields: dict[str, Any] = {
            DB_QUERY_TEXT: info.text,
            "execution_time_ms": round(ms, 3),
        }
        stage = current_stage()
        if stage:  # outside a stage the key is absent, not null
            fields["pipeline_stage"] = stage
        fields[DB_SYSTEM] = self.system
        fields[DB_OPERATION] = info.operation
        if plan is _NOT_EXPLAINED:
            plan = self._explain(info, conn, statement, parameters, executemany)
        if plan is not None:
            fields["plan"] = plan
        emit("warning", "slow query", fields, span=pending.span, rt=rt, measures=True)
