"""PostgreSQL health report: the usual ``pg_stat_*`` checks as one typed, read-only report.

Usage::

    from sqlalchemy import create_engine
    from rag_instrument.db.postgres import diagnose

    report = diagnose(create_engine("postgresql+psycopg://app@db/rag"))
    print(report.cache_hit.rows[0].table_ratio)   # should be above 0.90
    for finding in report.findings:
        print(finding.level, finding.message)

Every section runs in its own read-only transaction. A section that cannot be read (the
``pg_stat_statements`` extension is absent or not preloaded, a permission is missing) is
reported with ``unavailable`` set to the reason, and the other sections are still read.
A non-superuser sees everything with the ``pg_read_all_stats`` role; without it,
``pg_stat_activity`` and ``pg_stat_statements`` hide other users' query texts.

Statement texts from ``pg_stat_statements`` are sanitised like ``db.query.text``: literals
become ``?``, so a utility statement such as ``ALTER ROLE ... PASSWORD '...'`` leaks nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from rag_instrument.db._sql import _scan

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "CACHE_HIT_MIN_READS",
    "CACHE_HIT_TARGET",
    "CacheHit",
    "ConnectionState",
    "DatabaseInfo",
    "Finding",
    "IndexUsage",
    "Report",
    "Section",
    "SeqScanTable",
    "StatementStats",
    "TableSize",
    "adiagnose",
    "diagnose",
]

T = TypeVar("T")

CACHE_HIT_TARGET = 0.90
#: Block reads below which a low hit ratio is noise (a freshly started or idle database).
CACHE_HIT_MIN_READS = 1000
"""The usual target for the buffer cache hit ratio of tables and indexes."""
_SEQ_SCAN_MIN_ROWS = 10_000
_SLOW_MEAN_MS = 1000.0


@dataclasses.dataclass(frozen=True)
class Section(Generic[T]):
    """One part of the report: its rows, or why it could not be read."""

    rows: list[T] = dataclasses.field(default_factory=list)
    unavailable: str | None = None

    @property
    def available(self) -> bool:
        """Whether the section could be read."""
        return self.unavailable is None


@dataclasses.dataclass(frozen=True)
class DatabaseInfo:
    """The server and database the report is about."""

    database: str
    server_version: str
    user: str
    size_bytes: int
    max_connections: int


@dataclasses.dataclass(frozen=True)
class ConnectionState:
    """Connections to this database in one state (``pg_stat_activity``)."""

    state: str
    wait_event_type: str | None
    wait_event: str | None
    count: int


@dataclasses.dataclass(frozen=True)
class TableSize:
    """A table's size, indexes and TOAST included (``total_bytes``) or not."""

    schema: str
    table: str
    total_bytes: int
    table_bytes: int
    estimated_rows: int


@dataclasses.dataclass(frozen=True)
class CacheHit:
    """Buffer cache hits and disk reads of user tables and indexes (ratio ``None``: no I/O)."""

    table_hits: int
    table_reads: int
    table_ratio: float | None
    index_hits: int
    index_reads: int
    index_ratio: float | None


@dataclasses.dataclass(frozen=True)
class IndexUsage:
    """How often an index was scanned since statistics were last reset."""

    schema: str
    table: str
    index: str
    scans: int
    tuples_read: int
    tuples_fetched: int
    size_bytes: int
    unique: bool


@dataclasses.dataclass(frozen=True)
class SeqScanTable:
    """A table read by sequential scans (``pg_stat_user_tables``)."""

    schema: str
    table: str
    seq_scans: int
    seq_rows_read: int
    index_scans: int
    live_rows: int


@dataclasses.dataclass(frozen=True)
class StatementStats:
    """One normalised statement from ``pg_stat_statements`` (times in milliseconds)."""

    query: str
    calls: int
    total_ms: float
    mean_ms: float
    max_ms: float
    stddev_ms: float
    rows: int


@dataclasses.dataclass(frozen=True)
class Finding:
    """Something worth a look, measured against the usual targets."""

    level: str
    section: str
    message: str


@dataclasses.dataclass(frozen=True)
class Report:
    """What :func:`diagnose` found; :meth:`to_dict` gives plain JSON-ready data."""

    database: Section[DatabaseInfo]
    connections: Section[ConnectionState]
    largest_tables: Section[TableSize]
    cache_hit: Section[CacheHit]
    index_usage: Section[IndexUsage]
    unused_indexes: Section[IndexUsage]
    seq_scan_tables: Section[SeqScanTable]
    slowest_by_mean: Section[StatementStats]
    slowest_by_total: Section[StatementStats]
    findings: list[Finding]

    def to_dict(self) -> dict[str, Any]:
        """The report as dicts, lists and scalars (``json.dumps`` ready)."""
        return dataclasses.asdict(self)


# --- queries ------------------------------------------------------------------------------------

_DATABASE = """
SELECT current_database(), current_setting('server_version'), current_user,
       pg_database_size(current_database()), current_setting('max_connections')::int
"""
_CONNECTIONS = """
SELECT coalesce(state, 'background') AS state, wait_event_type, wait_event, count(*)
FROM pg_stat_activity WHERE datname = current_database()
GROUP BY 1, 2, 3 ORDER BY 4 DESC, 1
"""
_TABLES = """
SELECT n.nspname, c.relname, pg_total_relation_size(c.oid), pg_relation_size(c.oid),
       greatest(c.reltuples, 0)::bigint
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'm')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'
ORDER BY 3 DESC, 1, 2 LIMIT :top
"""
_CACHE = """
SELECT (SELECT coalesce(sum(heap_blks_hit), 0)::bigint FROM pg_statio_user_tables),
       (SELECT coalesce(sum(heap_blks_read), 0)::bigint FROM pg_statio_user_tables),
       (SELECT coalesce(sum(idx_blks_hit), 0)::bigint FROM pg_statio_user_indexes),
       (SELECT coalesce(sum(idx_blks_read), 0)::bigint FROM pg_statio_user_indexes)
"""
_INDEXES = """
SELECT s.schemaname, s.relname, s.indexrelname, s.idx_scan, s.idx_tup_read, s.idx_tup_fetch,
       pg_relation_size(s.indexrelid), i.indisunique
FROM pg_stat_user_indexes s JOIN pg_index i ON i.indexrelid = s.indexrelid
{where}
ORDER BY s.idx_scan, 7 DESC, 1, 3 LIMIT :top
"""
_SEQ_SCANS = """
SELECT schemaname, relname, seq_scan, seq_tup_read, coalesce(idx_scan, 0), n_live_tup
FROM pg_stat_user_tables WHERE seq_scan > 0
ORDER BY seq_tup_read DESC, seq_scan DESC, 1, 2 LIMIT :top
"""
_PSS_PRESENT = "SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements'"
_STATEMENTS = """
SELECT query, calls, {total}, {mean}, {max}, {stddev}, rows
FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
ORDER BY {order} DESC LIMIT :top
"""


def _reason(exc: BaseException) -> str:
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    message = str(orig).strip().splitlines()[0] if str(orig).strip() else ""
    return f"{type(orig).__name__}: {message}" if message else type(orig).__name__


def _section(conn: Connection, read: Callable[[Connection], list[T]]) -> Section[T]:
    try:
        with conn.begin():
            return Section(rows=read(conn))
    except SQLAlchemyError as exc:
        return Section(unavailable=_reason(exc))


def _ratio(hits: int, reads: int) -> float | None:
    total = hits + reads
    return round(hits / total, 4) if total else None


def _statements(conn: Connection, top: int, order: str) -> list[StatementStats]:
    if conn.execute(text(_PSS_PRESENT)).first() is None:
        raise _Unavailable(
            "extension pg_stat_statements is not installed in this database "
            "(CREATE EXTENSION pg_stat_statements; it must also be in shared_preload_libraries)"
        )
    version = int(conn.execute(text("SHOW server_version_num")).scalar_one())
    suffix = "_exec_time" if version >= 130000 else "_time"
    columns = {c: f"{c}{suffix}" for c in ("total", "mean", "max", "stddev")}
    sql = _STATEMENTS.format(order=columns[order], **columns)
    rows = conn.execute(text(sql), {"top": top})
    return [
        StatementStats(
            query=_scan(str(r[0]), "postgresql")[0],
            calls=int(r[1]),
            total_ms=round(float(r[2]), 3),
            mean_ms=round(float(r[3]), 3),
            max_ms=round(float(r[4]), 3),
            stddev_ms=round(float(r[5]), 3),
            rows=int(r[6]),
        )
        for r in rows
    ]


class _Unavailable(Exception):
    """A section that cannot be read, with the reason already worded."""


def _statement_section(conn: Connection, top: int, order: str) -> Section[StatementStats]:
    try:
        with conn.begin():
            return Section(rows=_statements(conn, top, order))
    except _Unavailable as exc:
        return Section(unavailable=str(exc))
    except SQLAlchemyError as exc:
        return Section(unavailable=_reason(exc))


def _indexes(conn: Connection, top: int, unused: bool) -> list[IndexUsage]:
    where = "WHERE s.idx_scan = 0 AND NOT i.indisunique AND NOT i.indisprimary" if unused else ""
    rows = conn.execute(text(_INDEXES.format(where=where)), {"top": top})
    return [
        IndexUsage(r[0], r[1], r[2], int(r[3]), int(r[4]), int(r[5]), int(r[6]), r[7]) for r in rows
    ]


def _collect(conn: Connection, top: int) -> Report:
    conn = conn.execution_options(postgresql_readonly=True)
    database = _section(
        conn,
        lambda c: [
            DatabaseInfo(str(r[0]), str(r[1]), str(r[2]), int(r[3]), int(r[4]))
            for r in c.execute(text(_DATABASE))
        ],
    )
    connections = _section(
        conn,
        lambda c: [
            ConnectionState(r[0], r[1], r[2], int(r[3])) for r in c.execute(text(_CONNECTIONS))
        ],
    )
    tables = _section(
        conn,
        lambda c: [
            TableSize(r[0], r[1], int(r[2]), int(r[3]), int(r[4]))
            for r in c.execute(text(_TABLES), {"top": top})
        ],
    )

    def cache(c: Connection) -> list[CacheHit]:
        th, tr, ih, ir = (int(v) for v in c.execute(text(_CACHE)).one())
        return [CacheHit(th, tr, _ratio(th, tr), ih, ir, _ratio(ih, ir))]

    cache_hit = _section(conn, cache)
    index_usage = _section(conn, lambda c: _indexes(c, top, unused=False))
    unused = _section(conn, lambda c: _indexes(c, top, unused=True))
    seq_scans = _section(
        conn,
        lambda c: [
            SeqScanTable(r[0], r[1], int(r[2]), int(r[3]), int(r[4]), int(r[5]))
            for r in c.execute(text(_SEQ_SCANS), {"top": top})
        ],
    )
    by_mean = _statement_section(conn, top, "mean")
    by_total = _statement_section(conn, top, "total")
    report = Report(
        database=database,
        connections=connections,
        largest_tables=tables,
        cache_hit=cache_hit,
        index_usage=index_usage,
        unused_indexes=unused,
        seq_scan_tables=seq_scans,
        slowest_by_mean=by_mean,
        slowest_by_total=by_total,
        findings=[],
    )
    report.findings.extend(_findings(report))
    return report


def _findings(report: Report) -> list[Finding]:
    out: list[Finding] = []
    for hit in report.cache_hit.rows:
        for kind, ratio, reads in (
            ("table", hit.table_ratio, hit.table_reads),
            ("index", hit.index_ratio, hit.index_reads),
        ):
            if ratio is not None and ratio < CACHE_HIT_TARGET and reads < CACHE_HIT_MIN_READS:
                out.append(
                    Finding(
                        "info",
                        "cache_hit",
                        f"{kind} cache hit ratio {ratio:.1%} is below the {CACHE_HIT_TARGET:.0%}"
                        f" target, but from only {reads} block reads (fewer than "
                        f"{CACHE_HIT_MIN_READS:,}): too few to judge, so not a warning",
                    )
                )
            if ratio is not None and ratio < CACHE_HIT_TARGET and reads >= CACHE_HIT_MIN_READS:
                out.append(
                    Finding(
                        "warning",
                        "cache_hit",
                        f"{kind} cache hit ratio {ratio:.1%} is below the usual "
                        f"{CACHE_HIT_TARGET:.0%} target: the working set does not fit in "
                        "shared_buffers (more memory, or fewer rows read per query)",
                    )
                )
    if report.unused_indexes.rows:
        names = ", ".join(i.index for i in report.unused_indexes.rows[:5])
        out.append(
            Finding(
                "info",
                "unused_indexes",
                f"{len(report.unused_indexes.rows)} non-unique index(es) never scanned since "
                f"statistics were reset ({names}): each one slows every write",
            )
        )
    out.extend(
        Finding(
            "warning",
            "seq_scan_tables",
            f"{table.schema}.{table.table} ({table.live_rows} rows) is read by "
            f"{table.seq_scans} sequential scans against {table.index_scans} index "
            "scans: a filter column probably lacks an index",
        )
        for table in report.seq_scan_tables.rows
        if table.live_rows >= _SEQ_SCAN_MIN_ROWS and table.seq_scans > table.index_scans
    )
    max_connections = report.database.rows[0].max_connections if report.database.rows else 0
    total = sum(c.count for c in report.connections.rows)
    if max_connections and total > 0.8 * max_connections:
        out.append(
            Finding(
                "warning",
                "connections",
                f"{total} of max_connections={max_connections} in use: pool sizes add up "
                "to too much, or connections leak",
            )
        )
    idle_tx = sum(c.count for c in report.connections.rows if c.state.startswith("idle in"))
    if idle_tx:
        out.append(
            Finding(
                "warning",
                "connections",
                f"{idle_tx} connection(s) idle in transaction: they hold locks and block "
                "vacuum (a session not committed or closed)",
            )
        )
    out.extend(
        Finding(
            "warning",
            "slowest_by_mean",
            f"a statement averages {stmt.mean_ms:.0f} ms over {stmt.calls} calls: "
            f"{stmt.query[:120]}",
        )
        for stmt in report.slowest_by_mean.rows
        if stmt.mean_ms >= _SLOW_MEAN_MS
    )
    # One finding per reason: pg_stat_statements missing makes two sections unavailable.
    unavailable: dict[str, list[str]] = {}
    for field in dataclasses.fields(report):
        section = getattr(report, field.name)
        if isinstance(section, Section) and not section.available:
            unavailable.setdefault(str(section.unavailable), []).append(field.name)
    out.extend(
        Finding("info", ", ".join(names), f"not available: {reason}")
        for reason, names in unavailable.items()
    )
    return out


def _check_top(top: object) -> None:
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be a whole number of at least 1, got {top!r}")


def diagnose(engine: Engine, *, top: int = 10) -> Report:
    """Read the PostgreSQL health report through ``engine`` (read-only).

    Args:
        engine: a SQLAlchemy engine on PostgreSQL (any driver).
        top: how many rows the ranked sections keep.

    Returns:
        The report; sections that could not be read say why in ``unavailable``.

    Raises:
        sqlalchemy.exc.OperationalError: the server cannot be reached at all.
        ValueError: ``engine`` is not a PostgreSQL engine, or ``top`` is below 1.
        TypeError: ``engine`` is an ``AsyncEngine`` (use :func:`adiagnose`).
    """
    if hasattr(engine, "sync_engine"):  # an AsyncEngine: its connect() is async
        raise TypeError("diagnose() takes a sync Engine; for an AsyncEngine use adiagnose()")
    if not hasattr(engine, "dialect") or not callable(getattr(engine, "connect", None)):
        raise TypeError(
            f"diagnose() takes a SQLAlchemy Engine (create_engine(url)), got {engine!r:.80}"
        )
    if engine.dialect.name != "postgresql":
        raise ValueError(f"diagnose() needs a PostgreSQL engine, not {engine.dialect.name}")
    _check_top(top)
    with engine.connect() as conn:
        return _collect(conn, top)


async def adiagnose(engine: AsyncEngine, *, top: int = 10) -> Report:
    """:func:`diagnose` for an ``AsyncEngine`` (asyncpg or psycopg async)."""
    if not hasattr(engine, "sync_engine"):
        raise TypeError("adiagnose() takes an AsyncEngine; for a sync Engine use diagnose()")
    if engine.dialect.name != "postgresql":
        raise ValueError(f"adiagnose() needs a PostgreSQL engine, not {engine.dialect.name}")
    _check_top(top)
    async with engine.connect() as conn:
        return await conn.run_sync(_collect, top)
