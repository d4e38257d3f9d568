"""Database faults and counts: killed connections, driver DETAIL text, batch rows, N+1 counts.

Regression tests for issue 11, items 3, 16 and 21.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from db_helpers import PG_URL, require_postgres, unique
from sqlalchemy import Column, Engine, Integer, MetaData, String, Table, create_engine, text
from sqlalchemy import exc as sa_exc

import rag_instrument as ri
from rag_instrument.testing import Capture, capture


@pytest.fixture
def pg() -> Iterator[tuple[Engine, str]]:
    require_postgres()
    engine = create_engine(PG_URL, pool_size=2, max_overflow=2)
    table = unique("faults")
    try:
        with engine.begin() as conn:
            conn.execute(text(f"CREATE TABLE {table} (id serial PRIMARY KEY, email text UNIQUE)"))
            conn.execute(text(f"INSERT INTO {table} (email) VALUES ('alice@example.com')"))
        yield engine, table
    finally:
        ri.db.uninstrument_sqlalchemy(engine)
        with engine.begin() as conn:
            conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
        engine.dispose()


# --- item 16 ---------------------------------------------------------------------------------


@pytest.mark.postgres
def test_connection_killed_by_the_server_is_one_quiet_line(
    pg: tuple[Engine, str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Our suite raises internal errors; an expected condition must not be one.
    engine, _table = pg
    ri.instrument_sqlalchemy(engine)
    admin = create_engine(PG_URL)
    caplog.set_level(logging.DEBUG, logger="rag_instrument.internal")
    try:
        with capture() as cap:
            for _ in range(3):
                with engine.connect() as conn:
                    pid = conn.execute(text("SELECT pg_backend_pid()")).scalar()
                    with admin.connect() as other:
                        other.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
                    with pytest.raises(sa_exc.OperationalError), ri.stage("retrieval"):
                        conn.execute(text("SELECT 1"))
            with engine.connect() as conn:  # the pool recovers
                assert conn.execute(text("SELECT 2")).scalar() == 2
    finally:
        admin.dispose()
    records = [r for r in caplog.records if r.name == "rag_instrument.internal"]
    assert all("internal error" not in r.getMessage() for r in records)
    assert all(r.exc_info is None for r in records)  # no traceback
    assert all(r.levelno <= logging.INFO for r in records)
    assert len(records) <= 1  # rate-limited: one line, not one per connection
    assert len(cap.find_logs("retrieval failed")) == 3


def _raise(exc: BaseException) -> None:
    raise exc


# --- item 3 ----------------------------------------------------------------------------------


@pytest.mark.postgres
def test_unique_violation_detail_never_reaches_the_log(pg: tuple[Engine, str]) -> None:
    engine, table = pg
    ri.instrument_sqlalchemy(engine)

    class SignupError(Exception):
        pass

    log = ri.get_logger()
    with capture() as cap:
        try:
            try:
                with engine.begin() as conn:
                    conn.execute(
                        text(f"INSERT INTO {table} (email) VALUES (:e)"),
                        {"e": "alice@example.com"},
                    )
            except sa_exc.IntegrityError as exc:
                raise SignupError(f"signup failed: {exc.orig}") from exc
        except SignupError:
            log.exception("signup failed")
        try:
            with engine.begin() as conn:
                conn.execute(
                    text(f"INSERT INTO {table} (email) VALUES (:e)"), {"e": "alice@example.com"}
                )
        except sa_exc.IntegrityError as exc:
            try:
                _raise(ExceptionGroup("batch", [exc]))
            except ExceptionGroup:
                log.exception("batch failed")
    text_out = json.dumps(cap.logs)
    assert "alice@example.com" not in text_out
    assert "duplicate key value violates unique constraint" in text_out


# --- item 21 ---------------------------------------------------------------------------------


def _batch_sizes(cap: Capture) -> list[Any]:
    return [
        s.attributes.get("db.operation.batch.size")
        for s in cap.spans
        if s.attributes and "db.operation.batch.size" in s.attributes
    ]


@pytest.mark.parametrize("url", ["sqlite://", "postgres"])
def test_batch_size_counts_rows_not_parameters(url: str) -> None:
    if url == "postgres":
        require_postgres()
        url = PG_URL
    engine = create_engine(url)
    metadata = MetaData()
    table = Table(
        unique("batch"),
        metadata,
        Column("id", Integer, primary_key=True),
        Column("a", Integer),
        Column("b", String),
    )
    metadata.create_all(engine)
    try:
        ri.instrument_sqlalchemy(engine)
        rows = [{"a": i, "b": f"r{i}"} for i in range(10)]
        with capture() as cap:
            with engine.begin() as conn:
                conn.execute(table.insert(), rows)  # insertmanyvalues: one multi-row INSERT
                conn.execute(table.insert().returning(table.c.id), rows)
            with engine.begin() as conn:
                conn.exec_driver_sql(  # a plain DBAPI executemany
                    f"INSERT INTO {table.name} (a, b) VALUES "
                    + ("(?, ?)" if engine.dialect.name == "sqlite" else "(%s, %s)"),
                    [(i, "x") for i in range(10)],
                )
        assert _batch_sizes(cap) == [10, 10, 10]
    finally:
        ri.db.uninstrument_sqlalchemy(engine)
        metadata.drop_all(engine)
        engine.dispose()


def test_n_plus_one_count_is_the_final_count() -> None:
    engine = create_engine("sqlite://")
    handle = ri.instrument_sqlalchemy(engine)
    try:
        with capture(n_plus_one_threshold=3) as cap:
            with ri.stage("retrieval"), engine.connect() as conn:
                for i in range(12):
                    conn.execute(text("SELECT :i"), {"i": i})
            with ri.db_scope(), engine.connect() as conn:
                for i in range(7):
                    conn.execute(text("SELECT :i + 1"), {"i": i})
        counts = [w["count"] for w in cap.find_logs("n+1 query detected")]
        assert counts == [12, 7]
        (warning,) = cap.find_logs("n+1 query detected", pipeline_stage="retrieval")
        assert warning["statement"] == "SELECT ?"
    finally:
        handle.uninstrument()
        engine.dispose()


def test_a_connection_failure_says_why_not_sql_hidden() -> None:
    # No statement was sent: "[SQL hidden]" hid nothing and lost the cause.
    engine = create_engine("postgresql+psycopg://postgres:hunter2-secret@127.0.0.1:1/test")
    ri.instrument_sqlalchemy(engine)
    try:
        with capture() as cap:
            with pytest.raises(sa_exc.OperationalError), ri.stage("retrieval"):
                with engine.connect() as conn:
                    conn.execute(text("SELECT 1"))
        line = cap.find_logs("retrieval failed")[0]
        assert "Connection refused" in line["error_message"]
        assert "SQL hidden" not in line["error_message"]
        assert "hunter2" not in json.dumps(cap.logs)
    finally:
        ri.db.uninstrument_sqlalchemy(engine)
        engine.dispose()
