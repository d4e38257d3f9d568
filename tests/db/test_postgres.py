"""The real PostgreSQL: statement spans, errors, EXPLAIN with savepoints, pool, diagnose()."""

from __future__ import annotations

import gc
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from db_helpers import (
    PG_ASYNC_URL,
    PG_DB,
    PG_READER_URL,
    PG_URL,
    require_extension,
    require_postgres,
    require_role,
    unique,
)
from opentelemetry.trace import StatusCode
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import create_async_engine

import rag_instrument as ri
from rag_instrument.db import _explain, postgres
from rag_instrument.testing import capture

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg() -> Iterator[tuple[Engine, str]]:
    require_postgres()
    engine = create_engine(PG_URL, pool_size=2, max_overflow=3)
    table = unique("pg_items")
    try:  # everything made is undone on every path, a failed setup included
        with engine.begin() as conn:
            conn.execute(text(f"CREATE TABLE {table} (id serial PRIMARY KEY, email text UNIQUE)"))
            conn.execute(text(f"INSERT INTO {table} (email) VALUES ('a@x'), ('b@x')"))
        yield engine, table
    finally:
        ri.db.uninstrument_sqlalchemy(engine)
        with engine.begin() as conn:
            conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
        engine.dispose()


def test_statement_span_on_postgresql(pg: tuple[Engine, str]) -> None:
    engine, table = pg
    ri.instrument_sqlalchemy(engine)
    with capture() as cap, engine.connect() as conn:
        conn.execute(text(f"SELECT id FROM {table} WHERE email = :e AND id > 0"), {"e": "a@x"})
    attrs = dict(cap.span(f"SELECT {table}").attributes or {})
    assert attrs["db.system.name"] == "postgresql"
    assert attrs["db.namespace"] == PG_DB
    assert attrs["server.address"] == "127.0.0.1"
    assert attrs["server.port"] == 5432
    assert attrs["db.query.text"] == f"SELECT id FROM {table} WHERE email = %(e)s AND id > ?"
    assert "openinference.span.kind" not in attrs


def test_error_carries_sqlstate_and_leaks_no_value(pg: tuple[Engine, str]) -> None:
    engine, table = pg
    ri.instrument_sqlalchemy(engine)
    with capture() as cap:
        with pytest.raises(sa_exc.IntegrityError), engine.begin() as conn:
            conn.execute(text(f"INSERT INTO {table} (email) VALUES (:e)"), {"e": "a@x"})
    span = cap.span(f"INSERT {table}")
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "psycopg.errors.UniqueViolation"
    assert span.attributes["db.response.status_code"] == "23505"
    assert "a@x" not in repr(span.status.description) + repr(span.attributes)
    # the duration metric's failed point says the same (databases.md)
    failed = [
        p
        for p in cap.metrics()["db.client.operation.duration"]
        if "error.type" in p.attributes
    ]
    assert [dict(p.attributes)["db.response.status_code"] for p in failed] == ["23505"]


@pytest.mark.asyncio
async def test_asyncpg_errors_name_the_drivers_class_and_sqlstate() -> None:
    # SQLAlchemy raises an adapter (AsyncAdapt_asyncpg_dbapi.ProgrammingError) from
    # asyncpg's own exception: error.type names the driver's class, as with psycopg.
    require_postgres()
    engine = create_async_engine(PG_ASYNC_URL)
    handle = ri.instrument_sqlalchemy(engine)
    try:
        with capture() as cap:
            with pytest.raises(sa_exc.ProgrammingError):
                async with engine.connect() as conn:
                    await conn.execute(text("SELECT * FROM rag_no_such_table_here"))
            points = cap.metrics()["db.client.operation.duration"]
        span = cap.span("SELECT rag_no_such_table_here")
        assert span.attributes["error.type"] == "asyncpg.exceptions.UndefinedTableError"
        assert span.attributes["db.response.status_code"] == "42P01"
        (failed,) = [p for p in points if "error.type" in p.attributes]
        assert failed.attributes["error.type"] == "asyncpg.exceptions.UndefinedTableError"
        assert failed.attributes["db.response.status_code"] == "42P01"
    finally:
        handle.uninstrument()
        await engine.dispose()


def _record_sent_sql(engine: Engine) -> list[str]:
    """Every statement psycopg sends on ``engine``'s new connections, our EXPLAIN included.

    The plan is read through a fresh DBAPI cursor that SQLAlchemy's events never see, so
    the recording is on the driver's cursor class itself.
    """
    sent: list[str] = []

    class RecordingCursor(psycopg.Cursor[Any]):
        def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
            sent.append(query if isinstance(query, str) else repr(query))
            return super().execute(query, params, **kwargs)

    def on_connect(dbapi_conn: Any, record: Any) -> None:
        dbapi_conn.cursor_factory = RecordingCursor

    engine.dispose()  # pooled connections predate the listener
    event.listen(engine, "connect", on_connect)
    return sent


def test_explain_slow_postgres_plan_inside_a_transaction(pg: tuple[Engine, str]) -> None:
    engine, table = pg
    sent = _record_sent_sql(engine)
    ri.instrument_sqlalchemy(engine, slow_query_ms=0, explain_slow=True)
    with capture() as cap:
        with engine.begin() as conn:
            conn.execute(text(f"INSERT INTO {table} (email) VALUES ('c@x')"))
            rows = conn.execute(
                text(f"SELECT id FROM {table} WHERE email = :e"), {"e": "secret@x"}
            ).all()
            assert rows == []
    with engine.connect() as conn:
        assert conn.execute(text(f"SELECT count(*) FROM {table}")).scalar() == 3
    (line,) = [x for x in cap.find_logs("slow query") if "plan" in x]
    plan = line["plan"][0]["Plan"]
    assert plan["Node Type"] in ("Seq Scan", "Index Scan", "Index Only Scan", "Bitmap Heap Scan")
    assert plan["Relation Name"] == table
    assert "Actual Rows" not in plan  # what ANALYZE would add
    assert "secret@x" not in repr(line)
    # What actually reached the server: one EXPLAIN, of that SELECT, without ANALYZE.
    explains = [q for q in sent if q.lstrip().upper().startswith("EXPLAIN")]
    assert explains == [f"EXPLAIN (FORMAT JSON) SELECT id FROM {table} WHERE email = %(e)s"]
    assert not any("ANALYZE" in q.upper() for q in sent)
    assert len([s for s in cap.spans if s.name.startswith("SELECT")]) == 1


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT 1; INSERT INTO {table} (email) VALUES ('multi@x')",
        "WITH i AS (INSERT INTO {table} (email) VALUES ('cte@x') RETURNING id) SELECT * FROM i",
    ],
)
def test_explain_never_runs_a_write(pg: tuple[Engine, str], statement: str) -> None:
    """A multi-statement string or a data-modifying CTE is not explained: run once only."""
    engine, table = pg
    sent = _record_sent_sql(engine)
    ri.instrument_sqlalchemy(engine, slow_query_ms=0, explain_slow=True)
    with capture() as cap, engine.begin() as conn:
        conn.exec_driver_sql(statement.format(table=table))
    with engine.connect() as conn:
        assert conn.execute(text(f"SELECT count(*) FROM {table}")).scalar() == 3
    (line,) = [
        x
        for x in cap.find_logs("slow query")
        if x["db.query.text"].startswith(("SELECT ?;", "WITH"))
    ]
    assert "plan" not in line
    assert not any(q.lstrip().upper().startswith("EXPLAIN") for q in sent)


def test_literals_in_arrays_comments_and_dollar_quotes_never_leak(pg: tuple[Engine, str]) -> None:
    engine, _ = pg
    ri.instrument_sqlalchemy(engine, n_plus_one_threshold=3)
    statements = [
        "SELECT ARRAY[current_user::text, 'alice@x.com']",
        "SELECT 1 /* a /* nested */ alice@x.com */",
        "SELECT $$alice@x.com$$ AS tag, 1 AS id",
        "SELECT $$b$$, relname FROM pg_class LIMIT 1",
        "SELECT $$c$$, datname FROM pg_database LIMIT 1",
    ]
    with capture() as cap, ri.stage("retrieval"), engine.connect() as conn:
        for statement in statements:
            conn.execute(text(statement)).all()
    texts = [s.attributes["db.query.text"] for s in cap.spans if s.name != "retrieval"]
    assert texts == [
        "SELECT ARRAY[current_user::text, ?]",
        "SELECT ?",
        "SELECT ? AS tag, ? AS id",
        "SELECT ?, relname FROM pg_class LIMIT ?",
        "SELECT ?, datname FROM pg_database LIMIT ?",
    ]
    assert "alice" not in repr(texts) + repr(cap.logs)
    assert cap.find_logs("n+1 query detected") == []  # three different statements


def test_failing_explain_leaves_the_transaction_intact(
    pg: tuple[Engine, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, table = pg
    monkeypatch.setattr(_explain, "_PG_EXPLAIN", "EXPLAIN (FORMAT NOPE) ")
    ri.instrument_sqlalchemy(engine, slow_query_ms=0, explain_slow=True)
    with capture() as cap:
        with engine.begin() as conn:
            conn.execute(text(f"INSERT INTO {table} (email) VALUES ('d@x')"))
            conn.execute(text(f"SELECT id FROM {table} WHERE id = 1")).all()
            conn.execute(text(f"INSERT INTO {table} (email) VALUES ('e@x')"))
    with engine.connect() as conn:
        assert conn.execute(text(f"SELECT count(*) FROM {table}")).scalar() == 4
    assert all("plan" not in x for x in cap.find_logs("slow query"))


@pytest.mark.asyncio
async def test_asyncpg_statement_span_and_explain(pg: tuple[Engine, str]) -> None:
    _, table = pg
    engine = create_async_engine(PG_ASYNC_URL)
    handle = ri.instrument_sqlalchemy(engine, slow_query_ms=0, explain_slow=True)
    try:
        with capture() as cap:
            async with ri.stage("retrieval"), engine.begin() as conn:
                result = await conn.execute(
                    text(f"SELECT id FROM {table} WHERE email = :e"), {"e": "a@x"}
                )
                assert len(result.all()) == 1
        span = cap.span(f"SELECT {table}")
        assert span.attributes["db.query.text"] == f"SELECT id FROM {table} WHERE email = $1"
        (line,) = cap.find_logs("slow query")
        assert line["plan"][0]["Plan"]["Node Type"]
        assert cap.find_logs("retrieval completed")[0]["breakdown"]["db"]["count"] == 1
    finally:
        handle.uninstrument()
        await engine.dispose()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("cast", "value"),
    [("integer", "123-45-6789"), ("uuid", "UuidSecret-not-a-uuid"), ("integer", 2**70)],
)
async def test_asyncpg_argument_errors_keep_the_value_out_of_logged_exceptions(
    cast: str, value: object
) -> None:
    # asyncpg checks bound values itself, and its errors (and the ValueError it raises them
    # from) quote the value: "invalid input for query argument $1: '123-45-6789' (...)".
    require_postgres()
    engine = create_async_engine(PG_ASYNC_URL)
    handle = ri.instrument_sqlalchemy(engine)
    try:
        with capture() as cap:
            try:
                async with engine.connect() as conn:
                    await conn.execute(text(f"SELECT CAST(:v AS {cast})"), {"v": value})
            except Exception:
                ri.get_logger("app").exception("lookup failed")
        (line,) = cap.find_logs("lookup failed")
        assert str(value) not in str(line)
        messages = [stack["exc_value"] for stack in line["exception"]]
        assert any("query argument $1: ?" in m for m in messages), messages
    finally:
        handle.uninstrument()
        await engine.dispose()


def test_pool_gauges_on_a_queue_pool(pg: tuple[Engine, str]) -> None:
    engine, _ = pg
    gc.collect()  # earlier tests' engines kept by cycles report their pools until freed
    ri.instrument_sqlalchemy(engine)
    with capture() as cap:
        with engine.connect(), engine.connect():
            metrics = cap.metrics()
    assert [p.value for p in metrics["db.client.connection.max"]] == [5]
    counts = {
        p.attributes["db.client.connection.state"]: p.value
        for p in metrics["db.client.connection.count"]
    }
    assert counts["used"] == 2
    name = metrics["db.client.connection.max"][0].attributes["db.client.connection.pool.name"]
    assert name == "127.0.0.1:5432/test"


# --- diagnose() -------------------------------------------------------------------------------


def test_diagnose_as_a_non_superuser(pg: tuple[Engine, str]) -> None:
    require_role("rag_reader")
    require_extension("pg_stat_statements")
    engine, table = pg
    with engine.begin() as conn:
        conn.execute(text(f"CREATE INDEX ix_{table} ON {table} (id, email)"))
        conn.execute(text(f"ANALYZE {table}"))
        for _ in range(3):
            conn.execute(text(f"SELECT * FROM {table} WHERE email LIKE '%x'")).all()
        # Statistics are flushed at most once a second; make this transaction's visible now.
        if conn.dialect.server_version_info >= (15,):
            conn.execute(text("SELECT pg_stat_force_next_flush()"))
    reader = create_engine(PG_READER_URL)
    try:
        report = postgres.diagnose(reader, top=50)
    finally:
        reader.dispose()
    data = report.to_dict()
    assert data["database"]["rows"][0]["user"] == "rag_reader"
    assert data["database"]["rows"][0]["size_bytes"] > 0
    assert any(c["count"] >= 1 for c in data["connections"]["rows"])
    assert table in {t["table"] for t in data["largest_tables"]["rows"]}
    assert report.cache_hit.available
    assert len(report.cache_hit.rows) == 1
    assert f"ix_{table}" in {i.index for i in report.index_usage.rows}
    assert f"ix_{table}" in {i.index for i in report.unused_indexes.rows}
    assert table in {t.table for t in report.seq_scan_tables.rows}
    assert report.slowest_by_mean.available, report.slowest_by_mean.unavailable
    assert report.slowest_by_total.rows
    assert any(f.section == "unused_indexes" for f in report.findings)
    assert all("'%x'" not in s.query for s in report.slowest_by_total.rows)


def test_diagnose_reports_a_missing_extension_instead_of_failing() -> None:
    require_postgres()
    name = f"rag_diag_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    engine = create_engine(PG_URL.rsplit("/", 1)[0] + f"/{name}")
    try:
        with admin.connect() as conn:
            conn.execute(text(f"CREATE DATABASE {name}"))
        report = postgres.diagnose(engine)
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        admin.dispose()
    assert report.database.available
    assert not report.slowest_by_mean.available
    assert "pg_stat_statements is not installed" in (report.slowest_by_mean.unavailable or "")
    assert any("slowest_by_total" in f.section for f in report.findings)


def test_diagnose_section_failure_is_reported_not_raised(
    pg: tuple[Engine, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, _ = pg
    monkeypatch.setattr(postgres, "_SEQ_SCANS", "SELECT * FROM no_such_view_for_rag LIMIT :top")
    report = postgres.diagnose(engine)
    assert (report.seq_scan_tables.unavailable or "").startswith("UndefinedTable")
    assert report.largest_tables.available
    assert report.slowest_by_total.available


def test_diagnose_is_read_only(pg: tuple[Engine, str], monkeypatch: pytest.MonkeyPatch) -> None:
    engine, table = pg
    monkeypatch.setattr(
        postgres, "_TABLES", f"INSERT INTO {table} (email) VALUES ('z') RETURNING 1"
    )
    report = postgres.diagnose(engine)
    assert "ReadOnlySqlTransaction" in (report.largest_tables.unavailable or "")


def test_diagnose_refuses_other_databases() -> None:
    with pytest.raises(ValueError, match="PostgreSQL"):
        postgres.diagnose(create_engine("sqlite://"))
    with pytest.raises(TypeError, match=r"create_engine\(url\)"):
        postgres.diagnose("postgresql://postgres@127.0.0.1:5432/test")  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_diagnose_and_adiagnose_name_each_other_for_the_wrong_engine() -> None:
    # No server is needed: the engine's kind is checked before any connection.
    async_engine = create_async_engine("postgresql+asyncpg://nobody@127.0.0.1:1/none")
    try:
        with pytest.raises(TypeError, match="adiagnose"):
            postgres.diagnose(async_engine)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"use diagnose\(\)"):
            await postgres.adiagnose(create_engine("postgresql+psycopg://nobody@127.0.0.1:1/x"))  # type: ignore[arg-type]
    finally:
        await async_engine.dispose()


@pytest.mark.asyncio
async def test_adiagnose() -> None:
    require_postgres()
    engine = create_async_engine(PG_ASYNC_URL)
    try:
        report = await postgres.adiagnose(engine, top=3)
    finally:
        await engine.dispose()
    assert report.database.rows[0].database == "test"


def test_in_lists_of_any_length_are_one_shape_on_postgresql(pg: tuple[Engine, str]) -> None:
    # SQLAlchemy expands IN lists into a cast placeholder per value on PostgreSQL
    # (%(id_1_1)s::INTEGER, ...): six lengths are still one statement shape, so the N+1
    # warning fires as it does on SQLite.
    from sqlalchemy import Integer, column, select
    from sqlalchemy import table as sa_table

    engine, name = pg
    items = sa_table(name, column("id", Integer))
    ri.instrument_sqlalchemy(engine)
    with capture() as cap, engine.connect() as conn, ri.stage("reranking"):
        for n in range(1, 7):
            conn.execute(select(items.c.id).where(items.c.id.in_(list(range(n)))))
    texts = {s.attributes["db.query.text"] for s in cap.spans if s.name.startswith("SELECT")}
    assert texts == {f"SELECT {name}.id FROM {name} WHERE {name}.id IN (?)"}
    (warning,) = cap.find_logs("n+1 query detected")
    assert warning["count"] == 6


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT a FROM t WHERE id IN (%(id_1_1)s::INTEGER, %(id_1_2)s::INTEGER)",
        "SELECT a FROM t WHERE id IN ($1::INTEGER, $2::INTEGER, $3::INTEGER)",
        "SELECT a FROM t WHERE id IN (%s, %s)",
        "SELECT a FROM t WHERE id IN (%(p_1)s::VARCHAR(30), %(p_2)s::NUMERIC(10, 2))",
    ],
)
def test_driver_placeholders_in_in_lists_collapse(sql: str) -> None:
    from rag_instrument.db._sql import collapse_in_lists

    assert collapse_in_lists(sql) == "SELECT a FROM t WHERE id IN (?)"
