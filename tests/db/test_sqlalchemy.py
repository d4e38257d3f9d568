"""instrument_sqlalchemy on SQLite: spans, sanitised text, errors, slow queries, pool, sessions."""

from __future__ import annotations

import asyncio
import gc
import math
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.trace import SpanKind, StatusCode
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

import rag_instrument as ri
from rag_instrument import _runtime
from rag_instrument import db as ri_db
from rag_instrument.db import _listeners
from rag_instrument.testing import capture


@pytest.fixture
def engine() -> Iterator[Engine]:
    eng = create_engine("sqlite://", poolclass=StaticPool)
    with eng.begin() as conn:
        conn.execute(text("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT UNIQUE)"))
    yield eng
    ri_db.uninstrument_sqlalchemy(eng)
    eng.dispose()


def _everything(cap: object) -> str:
    """Every span name, attribute, event and log line as one string."""
    parts: list[str] = []
    for span in cap.spans:  # type: ignore[attr-defined]
        parts.append(span.name)
        parts.append(repr(dict(span.attributes or {})))
        parts.append(repr(span.status.description))
        parts.extend(repr(dict(e.attributes or {})) for e in span.events)
    parts.extend(repr(line) for line in cap.logs)  # type: ignore[attr-defined]
    return "\n".join(parts)


def test_one_client_span_per_statement_inside_the_stage(engine: Engine) -> None:
    ri.instrument_sqlalchemy(engine)
    with capture() as cap:
        with ri.stage("retrieval"):
            with engine.connect() as conn:
                conn.execute(text("SELECT id FROM users WHERE id = :id"), {"id": 1})
    span = cap.span("SELECT users")
    stage = cap.span("retrieval")
    assert span.kind is SpanKind.CLIENT
    assert span.parent is not None
    assert span.parent.span_id == stage.context.span_id
    assert dict(span.attributes or {}) == {
        "db.system.name": "sqlite",
        "db.operation.name": "SELECT",
        "db.collection.name": "users",
        "db.query.text": "SELECT id FROM users WHERE id = ?",  # what the driver receives
    }
    completed = cap.find_logs("retrieval completed")[0]
    assert completed["breakdown"]["db"]["count"] == 1
    points = cap.metrics()["db.client.operation.duration"]
    assert points[0].count == 1
    assert points[0].attributes["db.operation.name"] == "SELECT"


def test_literals_and_parameters_never_leak(engine: Engine) -> None:
    """RELIABILITY G39: neither the bound value nor the inline literal appears anywhere."""
    ri.instrument_sqlalchemy(engine, slow_query_ms=0)
    with capture() as cap:
        with ri.stage("retrieval"):
            with engine.connect() as conn:
                conn.execute(
                    text("SELECT id FROM users WHERE email = :e OR email = '123-45-6789'"),
                    {"e": "alice@x.example"},
                )
    everything = _everything(cap)
    assert "alice@x.example" not in everything
    assert "123-45-6789" not in everything
    assert "email = ? OR email = ?" in cap.span("SELECT users").attributes["db.query.text"]


def test_parameters_are_captured_redacted_when_asked(engine: Engine) -> None:
    ri.instrument_sqlalchemy(engine, capture_parameters=True)
    with capture() as cap, engine.connect() as conn:
        conn.execute(
            text("SELECT :email AS e, :password AS p, :n AS n"),
            {"email": "a@b.c", "password": "hunter22", "n": 3},
        )
    attrs = dict(cap.span("SELECT").attributes or {})
    assert attrs["db.query.parameter.email"] == "a@b.c"
    assert attrs["db.query.parameter.n"] == 3
    assert attrs["db.query.parameter.password"] == "[REDACTED]"
    assert "hunter22" not in _everything(cap)


def test_parameters_compared_with_or_stored_in_secret_columns_are_redacted(
    engine: Engine,
) -> None:
    """Whatever the parameter's name: ``password_1`` (an ORM ``where``), ``:p`` next to a
    ``password`` column, a ``VALUES`` position under ``api_key``."""
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE accounts (email TEXT, password TEXT, api_key TEXT)"))
    ri.instrument_sqlalchemy(engine, capture_parameters=True)
    with capture() as cap, engine.begin() as conn:
        conn.execute(
            text("INSERT INTO accounts (email, api_key) VALUES (:e, :k)"),
            {"e": "a@b.c", "k": "key-value-1"},
        )
        conn.execute(
            text("SELECT email FROM accounts WHERE email = :e AND password=:p"),
            {"e": "a@b.c", "p": "hunter22"},
        )
        conn.execute(
            text("SELECT email FROM accounts WHERE password = :password_1"),
            {"password_1": "swordfish9"},
        )
    everything = _everything(cap)
    for secret in ("key-value-1", "hunter22", "swordfish9"):
        assert secret not in everything
    assert everything.count("'db.query.parameter.e': 'a@b.c'") == 2  # the rest is kept
    select = next(s for s in cap.spans if s.name == "SELECT accounts")
    # Positional parameters, with literals and an IN list before them, and several rows.
    with capture() as cap, engine.begin() as conn:
        conn.exec_driver_sql(
            "SELECT email FROM accounts WHERE email = 'x' AND email IN (?, ?, ?) "
            "AND password = ?",
            ("a", "b", "c", "positional-pw"),
        )
        conn.exec_driver_sql(
            "INSERT INTO accounts (email, password) VALUES ('lit', ?), (?, ?)",
            ("row1-pw", "row2@b.c", "row2-pw"),
        )
    everything = _everything(cap)
    for secret in ("positional-pw", "row1-pw", "row2-pw"):
        assert secret not in everything
    assert "'b'" in everything  # the others are kept
    assert "row2@b.c" in everything
    # The statement keeps its placeholders: "password=?" names a parameter, it holds none.
    assert select.attributes["db.query.text"] == (
        "SELECT email FROM accounts WHERE email = ? AND password=?"
    )


def test_sql_reaching_the_database_is_byte_identical(tmp_path: Path) -> None:
    """RELIABILITY G40: no comment or anything else is added to the statement."""

    def run(instrument: bool) -> list[str]:
        seen: list[str] = []

        def creator() -> sqlite3.Connection:
            raw = sqlite3.connect(str(tmp_path / f"db{instrument}.sqlite"))
            raw.set_trace_callback(seen.append)
            return raw

        eng = create_engine("sqlite://", creator=creator)
        handle = ri.instrument_sqlalchemy(eng, slow_query_ms=0) if instrument else None
        with capture(), eng.begin() as conn:
            conn.execute(text("CREATE TABLE t (a TEXT)"))
            conn.execute(text("INSERT INTO t VALUES (:a)"), [{"a": "x"}, {"a": "y"}])
            conn.execute(text("SELECT a FROM t WHERE a = 'x'")).all()
        if handle is not None:
            handle.uninstrument()
        eng.dispose()
        return seen

    assert run(instrument=True) == run(instrument=False)


def test_executemany_is_one_span_with_the_batch_size(engine: Engine) -> None:
    ri.instrument_sqlalchemy(engine)
    with capture() as cap, engine.begin() as conn:
        conn.execute(
            text("INSERT INTO users (email) VALUES (:e)"),
            [{"e": "a@x"}, {"e": "b@x"}, {"e": "c@x"}],
        )
    span = cap.span("INSERT users")
    assert span.attributes["db.operation.batch.size"] == 3


def test_errors_mark_the_span_and_pass_through_unchanged(engine: Engine) -> None:
    ri.instrument_sqlalchemy(engine)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO users (email) VALUES ('dup@x')"))
    with capture() as cap:
        with pytest.raises(sa_exc.IntegrityError) as info, engine.begin() as conn:
            conn.execute(text("INSERT INTO users (email) VALUES ('dup@x')"))
    assert isinstance(info.value.orig, sqlite3.IntegrityError)
    span = cap.span("INSERT users")
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "sqlite3.IntegrityError"
    assert "dup@x" not in _everything(cap)
    point = cap.metrics()["db.client.operation.duration"][0]
    assert point.attributes["error.type"] == "sqlite3.IntegrityError"


def test_double_quoted_strings_are_literals_on_sqlite(engine: Engine) -> None:
    """SQLite reads "..." as a string when no such column exists: it must not leak."""
    ri.instrument_sqlalchemy(engine)
    with capture() as cap, engine.connect() as conn:
        rows = conn.execute(text('SELECT id FROM users WHERE email = "alice@x.com"')).all()
        assert rows == []
    assert cap.span("SELECT users").attributes["db.query.text"] == (
        "SELECT id FROM users WHERE email = ?"
    )
    assert "alice" not in _everything(cap)


def test_failed_statement_inside_a_stage_leaks_no_bound_value(engine: Engine) -> None:
    """The stage's exception event and failed line render the error without parameters."""
    ri.instrument_sqlalchemy(engine)
    email = "-".join(["alice", "x.example"])  # not in this file's source (the traceback)
    with capture() as cap:
        with pytest.raises(sa_exc.IntegrityError) as info:
            with ri.stage("ingestion"), engine.begin() as conn:
                for _ in range(2):
                    conn.execute(text("INSERT INTO users (email) VALUES (:e)"), {"e": email})
    assert email in str(info.value)  # the application's exception is unchanged
    assert email not in _everything(cap)
    expected = "IntegrityError: [SQL: INSERT INTO users (email) VALUES (?)]"
    assert cap.find_logs("ingestion failed")[0]["error_message"] == expected
    (event,) = cap.span("ingestion").events
    assert event.attributes["exception.message"] == expected
    # The statement span itself: the driver exception's type only, no message, no event.
    (failed,) = [x for x in cap.spans if x.name == "INSERT users" and x.status.description]
    assert failed.status.description == "IntegrityError"
    assert list(failed.events) == []


def test_duration_histogram_is_looked_up_once_per_runtime(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    ri.instrument_sqlalchemy(engine)
    looked_up: list[str] = []
    original = _runtime.Runtime.histogram

    def counting(self: _runtime.Runtime, name: str, unit: str, description: str = "") -> object:
        looked_up.append(name)
        return original(self, name, unit, description)

    monkeypatch.setattr(_runtime.Runtime, "histogram", counting)
    with capture() as cap, engine.connect() as conn:
        for _ in range(20):
            conn.execute(text("SELECT 1"))
    assert looked_up.count("db.client.operation.duration") == 1
    assert cap.metrics()["db.client.operation.duration"][0].count == 20
    with capture() as cap, engine.connect() as conn:  # a new runtime: a new instrument
        conn.execute(text("SELECT 1"))
    assert looked_up.count("db.client.operation.duration") == 2
    assert cap.metrics()["db.client.operation.duration"][0].count == 1


def test_instrumenting_twice_returns_the_same_handle_and_one_span(engine: Engine) -> None:
    first = ri.instrument_sqlalchemy(engine)
    assert ri.instrument_sqlalchemy(engine) is first
    with capture() as cap, engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    assert len(cap.spans) == 1


def test_instrumenting_again_with_other_options_says_they_are_not_taken(
    engine: Engine,
) -> None:
    ri.instrument_sqlalchemy(engine)
    with capture() as cap:
        ri.instrument_sqlalchemy(engine)  # the same options: nothing to say
        assert not cap.logs
        ri.instrument_sqlalchemy(engine, slow_query_ms=0, explain_slow=True)
    (line,) = cap.logs
    assert line["level"] == "warning"
    assert "slow_query_ms=0" in line["event"]
    assert "explain_slow=True" in line["event"]


def test_instrumenting_again_without_options_says_nothing(engine: Engine) -> None:
    # An application factory instrumenting the engine it was handed again asks for nothing.
    ri.instrument_sqlalchemy(engine, slow_query_ms=200, explain_slow=True)
    with capture() as cap:
        ri.instrument_sqlalchemy(engine)
    assert not cap.logs


def test_a_sqlite_failure_carries_its_result_code(engine: Engine) -> None:
    ri.instrument_sqlalchemy(engine)
    with capture() as cap, engine.connect() as conn:
        conn.exec_driver_sql("CREATE TABLE unique_ids (id INTEGER PRIMARY KEY)")
        conn.exec_driver_sql("INSERT INTO unique_ids VALUES (1)")
        with pytest.raises(sa_exc.IntegrityError):
            conn.exec_driver_sql("INSERT INTO unique_ids VALUES (1)")
    failed = cap.spans[-1]
    assert failed.attributes["db.response.status_code"] == str(
        sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY
    )
    (point,) = [
        p for p in cap.metrics()["db.client.operation.duration"] if "error.type" in p.attributes
    ]
    assert point.attributes["db.response.status_code"] == "1555"


def test_uninstrument_removes_every_listener(engine: Engine) -> None:
    pool = engine.pool
    handle = ri.instrument_sqlalchemy(engine)
    listeners = list(handle._instrumentation._listeners)
    assert all(event.contains(engine, name, fn) for name, fn in listeners)
    assert "connect" in pool.__dict__
    handle.uninstrument()
    handle.uninstrument()  # idempotent
    assert not handle.instrumented
    assert "connect" not in pool.__dict__
    assert not any(event.contains(engine, name, fn) for name, fn in listeners)
    with capture() as cap, engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    assert cap.spans == []
    assert ri.instrument_sqlalchemy(engine) is not handle  # can be instrumented again


def test_disabled_is_a_pass_through(engine: Engine) -> None:
    ri.instrument_sqlalchemy(engine, slow_query_ms=0)
    with capture(enabled=False) as cap, engine.connect() as conn:
        assert conn.execute(text("SELECT 41 + 1")).scalar() == 42
    assert cap.spans == []
    assert cap.logs == []


def test_instrumented_before_configure_honours_later_configuration(engine: Engine) -> None:
    ri.instrument_sqlalchemy(engine)  # slow_query_ms=None: read at statement time
    with capture(slow_query_ms=0) as cap, engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    assert cap.find_logs("slow query")
    with capture(slow_query_ms=60_000) as cap, engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    assert cap.find_logs("slow query") == []


def test_not_recording_spans_are_fine(engine: Engine) -> None:
    ri.instrument_sqlalchemy(engine, capture_parameters=True)
    with capture(sample_ratio=0.0) as cap, engine.connect() as conn:
        assert conn.execute(text("SELECT :x"), {"x": 5}).scalar() == 5
    assert cap.spans == []


def test_slow_query_warning(engine: Engine) -> None:
    ri.instrument_sqlalchemy(engine, slow_query_ms=0)
    with capture() as cap:
        with ri.stage("retrieval"), engine.connect() as conn:
            conn.execute(text("SELECT id FROM users WHERE email = 'x@y'"))
    (line,) = cap.find_logs("slow query")
    assert line["level"] == "warning"
    assert line["db.query.text"] == "SELECT id FROM users WHERE email = ?"
    assert line["pipeline_stage"] == "retrieval"
    assert line["stage"] == "retrieval"
    assert line["execution_time_ms"] >= 0
    assert "plan" not in line
    assert line["span_id"] == format(cap.span("SELECT users").context.span_id, "016x")


def test_slow_query_outside_a_stage_has_no_stage_fields(engine: Engine) -> None:
    ri.instrument_sqlalchemy(engine, slow_query_ms=0)
    with capture() as cap, engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    (line,) = cap.find_logs("slow query")
    assert line["db.query.text"] == "SELECT ?"
    assert "pipeline_stage" not in line  # absent, not null
    assert "stage" not in line


def test_async_engine_with_aiosqlite() -> None:
    import asyncio

    async def main() -> None:
        eng = create_async_engine("sqlite+aiosqlite://")
        handle = ri.instrument_sqlalchemy(eng)
        assert ri.instrument_sqlalchemy(eng.sync_engine) is handle
        with capture() as cap:
            async with ri.stage("retrieval"):
                async with eng.connect() as conn:
                    assert (await conn.execute(text("SELECT 7"))).scalar() == 7
        handle.uninstrument()
        await eng.dispose()
        assert cap.span("SELECT").attributes["db.system.name"] == "sqlite"
        assert cap.find_logs("retrieval completed")[0]["breakdown"]["db"]["count"] == 1

    asyncio.run(main())


def test_many_engines_do_not_accumulate() -> None:
    """RELIABILITY G41: create and dispose sync and async engines without uninstrument().

    Nothing of ours keeps them alive, the process-wide ORM listener is released with the
    last engine, and every execute is exactly one span.
    """
    import asyncio

    gc.collect()
    users_before = _listeners._orm_users[0]
    handles_before = len(ri_db._handles)

    async def one_async() -> None:
        eng = create_async_engine("sqlite+aiosqlite://")
        ri.instrument_sqlalchemy(eng)
        async with eng.connect() as conn:
            await conn.execute(text("SELECT 2"))
        await eng.dispose()

    with capture() as cap:
        for _ in range(100):
            eng = create_engine("sqlite://")
            ri.instrument_sqlalchemy(eng)
            with eng.connect() as conn:
                conn.execute(text("SELECT 1"))
            eng.dispose()
            del eng, conn
            asyncio.run(one_async())
        gc.collect()
    assert [s.name for s in cap.spans] == ["SELECT"] * 200
    assert len(ri_db._handles) <= handles_before + 2
    assert _listeners._orm_users[0] == users_before
    if users_before == 0:
        assert not event.contains(Session, "do_orm_execute", _listeners._on_orm_execute)


def test_orm_listener_count_is_released_once(engine: Engine) -> None:
    """uninstrument() then the engine's collection: one release, not two."""
    gc.collect()
    before = _listeners._orm_users[0]
    eng = create_engine("sqlite://")
    handle = ri.instrument_sqlalchemy(eng)
    assert _listeners._orm_users[0] == before + 1
    handle.uninstrument()
    handle.uninstrument()
    assert _listeners._orm_users[0] == before
    eng.dispose()
    del eng
    gc.collect()
    assert _listeners._orm_users[0] == before


def test_invalid_arguments_raise_at_instrument_time(engine: Engine) -> None:
    with pytest.raises(ValueError, match="slow_query_ms"):
        ri.instrument_sqlalchemy(engine, slow_query_ms=-1)
    with pytest.raises(ValueError, match="n_plus_one_threshold"):
        ri.instrument_sqlalchemy(engine, n_plus_one_threshold=1)
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="slow_query_ms"):
            ri.instrument_sqlalchemy(engine, slow_query_ms=bad)
        with pytest.raises(ValueError, match="n_plus_one_threshold"):
            ri.instrument_sqlalchemy(engine, n_plus_one_threshold=bad)
    # "no" is a true value in Python: refused, rather than read as asking for parameters.
    with pytest.raises(ValueError, match="capture_parameters"):
        ri.instrument_sqlalchemy(engine, capture_parameters="no")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="explain_slow"):
        ri.instrument_sqlalchemy(engine, explain_slow="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Engine"):
        ri.instrument_sqlalchemy(object())


# --- db_session ---------------------------------------------------------------------------------


def _count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM users")).scalar_one())


def test_db_session_commits_and_counts_statements(engine: Engine) -> None:
    ri.instrument_sqlalchemy(engine)
    factory = sessionmaker(engine)
    with capture() as cap:
        with ri.db_session(factory) as session:
            session.execute(text("INSERT INTO users (email) VALUES ('s@x')"))
            session.execute(text("SELECT 1"))
    assert _count(engine) == 1
    span = cap.span("db.session")
    assert span.attributes["rag.db.statement_count"] == 2
    assert span.attributes["rag.db.session.outcome"] == "commit"
    children = [s for s in cap.spans if s.parent and s.parent.span_id == span.context.span_id]
    assert len(children) == 2


def test_db_session_under_async_with_on_a_sync_factory_runs_nothing(engine: Engine) -> None:
    # It ran the block, committed, then failed with "NoneType can't be used in 'await'".
    factory = sessionmaker(engine)
    ran: list[bool] = []

    async def misuse() -> None:
        async with ri.db_session(factory) as session:
            ran.append(True)
            session.execute(text("INSERT INTO users (email) VALUES ('a@x')"))

    with pytest.raises(TypeError, match="use 'with' for sync sessions"):
        asyncio.run(misuse())
    assert ran == []
    assert _count(engine) == 0


def test_db_session_rolls_back_and_reraises_the_same_exception(engine: Engine) -> None:
    ri.instrument_sqlalchemy(engine)
    closed: list[object] = []
    factory = sessionmaker(engine)
    event.listen(factory, "after_soft_rollback", lambda s, t: closed.append(s))
    boom = ValueError("boom")
    with capture() as cap:
        with pytest.raises(ValueError) as info, ri.db_session(factory) as session:
            session.execute(text("INSERT INTO users (email) VALUES ('r@x')"))
            raise boom
    assert info.value is boom
    assert _count(engine) == 0
    assert closed
    span = cap.span("db.session")
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["rag.db.session.outcome"] == "rollback"
    assert span.attributes["error.type"] == "ValueError"


def test_db_session_always_closes(engine: Engine) -> None:
    sessions: list[object] = []

    def factory() -> object:
        session = sessionmaker(engine)()
        sessions.append(session)
        return session

    with pytest.raises(KeyError), ri.db_session(factory):
        raise KeyError("x")
    with ri.db_session(factory):
        pass
    for session in sessions:
        assert not session.in_transaction()  # type: ignore[attr-defined]


def test_db_session_commit_failure_propagates(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO users (email) VALUES ('dup@x')"))
    factory = sessionmaker(engine)
    with capture() as cap:
        with pytest.raises(sa_exc.IntegrityError), ri.db_session(factory) as session:
            session.execute(text("INSERT INTO users (email) VALUES ('dup@x')"))
    assert cap.span("db.session").status.status_code is StatusCode.ERROR


@pytest.mark.asyncio
async def test_db_session_async(tmp_path: Path) -> None:
    eng = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'a.sqlite'}")
    handle = ri.instrument_sqlalchemy(eng)
    async with eng.begin() as conn:
        await conn.execute(text("CREATE TABLE t (a INTEGER)"))
    factory = async_sessionmaker(eng)
    with capture() as cap:
        async with ri.db_session(factory) as session:
            await session.execute(text("INSERT INTO t VALUES (1)"))
        with pytest.raises(RuntimeError):
            async with ri.db_session(factory) as session:
                await session.execute(text("INSERT INTO t VALUES (2)"))
                raise RuntimeError("no")
    async with eng.connect() as conn:
        assert (await conn.execute(text("SELECT a FROM t"))).scalars().all() == [1]
    outcomes = [s.attributes["rag.db.session.outcome"] for s in cap.spans if s.name == "db.session"]
    assert outcomes == ["commit", "rollback"]
    handle.uninstrument()
    await eng.dispose()


def test_db_session_refuses_with_for_async_sessions() -> None:
    eng = create_async_engine("sqlite+aiosqlite://")
    with pytest.raises(TypeError, match="async with"), ri.db_session(async_sessionmaker(eng)):
        pass


# --- db_session: every way ending a session can fail, sync and async ----------------------------


class _FakeSession:
    """Records the calls ending it; raises what it was told to raise at each."""

    def __init__(self, fail: dict[str, BaseException], calls: list[str]) -> None:
        self.fail = fail
        self.calls = calls

    def _do(self, name: str) -> None:
        self.calls.append(name)
        if name in self.fail:
            raise self.fail[name]

    def commit(self) -> None:
        self._do("commit")

    def rollback(self) -> None:
        self._do("rollback")

    def close(self) -> None:
        self._do("close")


class _AsyncFakeSession(_FakeSession):
    async def commit(self) -> None:  # type: ignore[override]
        self._do("commit")

    async def rollback(self) -> None:  # type: ignore[override]
        self._do("rollback")

    async def close(self) -> None:  # type: ignore[override]
        self._do("close")


def _run_session(
    is_async: bool, fail: dict[str, BaseException], body_error: BaseException | None
) -> tuple[list[str], BaseException | None]:
    import asyncio

    calls: list[str] = []
    kind = _AsyncFakeSession if is_async else _FakeSession

    def factory() -> _FakeSession:
        return kind(fail, calls)

    async def run_async() -> None:
        async with ri.db_session(factory):
            if body_error is not None:
                raise body_error

    def run_sync() -> None:
        with ri.db_session(factory):
            if body_error is not None:
                raise body_error

    try:
        asyncio.run(run_async()) if is_async else run_sync()
    except BaseException as exc:
        return calls, exc
    return calls, None


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize(
    ("fail", "body", "calls", "raised", "outcome"),
    [
        ({}, None, ["commit", "close"], None, "commit"),
        ({"commit": ValueError("c")}, None, ["commit", "close"], "commit", "rollback"),
        ({}, KeyError("b"), ["rollback", "close"], "body", "rollback"),
        ({"rollback": OSError("r")}, KeyError("b"), ["rollback", "close"], "body", "rollback"),
        ({"close": OSError("x")}, None, ["commit", "close"], "close", "commit"),
        (
            {"commit": ValueError("c"), "close": OSError("x")},
            None,
            ["commit", "close"],
            "close",
            "rollback",
        ),
    ],
    ids=["ok", "commit-fails", "body-fails", "rollback-fails", "close-fails", "both-fail"],
)
def test_db_session_endings(
    is_async: bool,
    fail: dict[str, BaseException],
    body: BaseException | None,
    calls: list[str],
    raised: str | None,
    outcome: str,
) -> None:
    with capture() as cap:
        made, error = _run_session(is_async, fail, body)
    assert made == calls
    expected = {
        None: None,
        "body": body,
        "commit": fail.get("commit"),
        "close": fail.get("close"),
    }[raised]
    assert error is expected  # the same object, never a wrapper
    if raised == "close" and "commit" in fail:
        assert error is not None
        assert error.__context__ is fail["commit"]
    (span,) = [s for s in cap.spans if s.name == "db.session"]
    assert span.attributes["rag.db.session.outcome"] == outcome
    assert bool(cap.find_logs("db session rollback failed")) == ("rollback" in fail)


def test_sqlite_ddl_with_if_exists_keeps_quoted_names(engine: Engine) -> None:
    ri.instrument_sqlalchemy(engine)
    with capture() as cap, engine.connect() as conn:
        conn.exec_driver_sql('CREATE TABLE IF NOT EXISTS "Docs" (id INTEGER)')
        conn.exec_driver_sql('DROP TABLE IF EXISTS "Docs"')
    create, drop = cap.spans
    assert create.attributes["db.query.text"] == 'CREATE TABLE IF NOT EXISTS "Docs" (id INTEGER)'
    assert create.attributes["db.collection.name"] == "Docs"
    assert drop.attributes["db.query.text"] == 'DROP TABLE IF EXISTS "Docs"'
    assert drop.attributes["db.collection.name"] == "Docs"
