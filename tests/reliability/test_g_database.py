"""G. Database (RELIABILITY.md G39-G42), with properties over SQL texts."""

from __future__ import annotations

import asyncio
import gc
import json
import sqlite3
import weakref
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, event, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import StaticPool

import rag_instrument as ri
from rag_instrument.db._sql import sanitize
from rag_instrument.testing import Capture


def _everything(cap: Capture) -> str:
    out = json.dumps(cap.logs)
    for span in cap.spans:
        out += span.name + repr(dict(span.attributes or {})) + repr(span.status.description)
        out += repr([(e.name, dict(e.attributes or {})) for e in span.events])
    return out


def test_g39_bound_values_and_literals_never_recorded(rag_capture: Capture) -> None:
    engine = create_engine("sqlite://", poolclass=StaticPool)
    handle = ri.instrument_sqlalchemy(engine, slow_query_ms=0, explain_slow=True)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE people (email TEXT, ssn TEXT)"))
            conn.execute(text("INSERT INTO people VALUES (:e, '123-45-6789')"), {"e": "alice@x"})
            with ri.stage("retrieval"):
                conn.execute(text("SELECT * FROM people WHERE email=:e"), {"e": "alice@x"})
                conn.execute(text("SELECT * FROM people WHERE ssn='123-45-6789'"))
        everything = _everything(rag_capture)
        assert "alice@x" not in everything
        assert "123-45-6789" not in everything
        texts = [s.attributes.get("db.query.text") for s in rag_capture.spans]
        assert "SELECT * FROM people WHERE ssn=?" in texts
    finally:
        handle.uninstrument()
        engine.dispose()


def test_g40_the_driver_receives_byte_identical_sql() -> None:
    received: dict[bool, list[tuple[str, Any]]] = {False: [], True: []}

    def run(instrumented: bool) -> None:
        engine = create_engine("sqlite://", poolclass=StaticPool)

        @event.listens_for(engine, "before_cursor_execute", retval=False)
        def spy(conn: Any, cursor: Any, statement: str, params: Any, *rest: Any) -> None:
            received[instrumented].append((statement, params))

        handle = ri.instrument_sqlalchemy(engine) if instrumented else None
        try:
            with ri.stage("retrieval"), engine.begin() as conn:
                conn.execute(text("CREATE TABLE t (a INT, b TEXT)"))
                conn.execute(text("INSERT INTO t VALUES (:a, :b)"), [{"a": 1, "b": "x"}] * 3)
                conn.execute(text("SELECT a, 'lit' FROM t WHERE a > :n -- note"), {"n": 0})
        finally:
            if handle is not None:
                handle.uninstrument()
            engine.dispose()

    ri.configure(exporter="memory")
    run(False)
    run(True)
    assert received[True] == received[False]


def test_g41_a_thousand_engines_leave_nothing_behind(rag_capture: Capture) -> None:
    refs: list[weakref.ref[Any]] = []

    async def one_async() -> None:
        engine = create_async_engine("sqlite+aiosqlite://")
        handle = ri.instrument_sqlalchemy(engine)
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        handle.uninstrument()
        await engine.dispose()
        refs.append(weakref.ref(engine))

    for i in range(1_000):
        engine = create_engine("sqlite://")
        handle = ri.instrument_sqlalchemy(engine)
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        if i % 2:
            handle.uninstrument()
        engine.dispose()
        refs.append(weakref.ref(engine))
        del engine, handle, conn
    for _ in range(20):
        asyncio.run(one_async())
    gc.collect()
    assert sum(1 for r in refs if r() is not None) == 0
    statements = [s for s in rag_capture.spans if s.name.startswith("SELECT")]
    assert len(statements) == 1_020  # one ended span per execute


class _NoWeakref:
    """A DBAPI cursor that refuses weak references (like some C-extension drivers)."""

    __slots__ = ("_cursor",)

    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self._cursor = cursor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)


class _Connection:
    __slots__ = ("_conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def cursor(self) -> _NoWeakref:
        return _NoWeakref(self._conn.cursor())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def test_g42_odd_cursors_and_failures_mid_transaction_match_the_uninstrumented_run() -> None:
    def run(instrumented: bool) -> tuple[list[Any], str, list[Any]]:
        raw = sqlite3.connect(":memory:", check_same_thread=False)
        engine = create_engine("sqlite://", creator=lambda: _Connection(raw), poolclass=StaticPool)
        handle = ri.instrument_sqlalchemy(engine) if instrumented else None
        try:
            with engine.connect() as conn:
                conn.execute(text("CREATE TABLE t (a INT UNIQUE)"))
                conn.commit()
                rows = conn.execute(text("SELECT 1")).all()
                conn.commit()
                error = ""
                try:
                    with conn.begin():
                        conn.execute(text("INSERT INTO t VALUES (1)"))
                        conn.execute(text("INSERT INTO t VALUES (1)"))
                except Exception as exc:
                    error = type(exc).__name__
                after = conn.execute(text("SELECT count(*) FROM t")).all()
            return [tuple(r) for r in rows], error, [tuple(r) for r in after]
        finally:
            if handle is not None:
                handle.uninstrument()
            engine.dispose()
            raw.close()

    ri.configure(exporter="memory")
    assert run(True) == run(False) == ([(1,)], "IntegrityError", [(0,)])


SQL = st.sampled_from(
    [
        "SELECT * FROM t WHERE a = {v}",
        "UPDATE t SET b = {v} WHERE id = 3",
        "INSERT INTO t (a, b) VALUES ({v}, {v})",
        "SELECT {v} AS x FROM t WHERE name LIKE {v}",
    ]
)
LITERAL_VALUES = st.one_of(
    st.integers(min_value=10_000, max_value=10**12).map(str),
    st.text("abcdefghijklmnopqrstuvwxyz0123456789@.-", min_size=6, max_size=20).map(
        lambda s: "'" + s + "'"
    ),
)


@settings(max_examples=200, deadline=None)
@given(SQL, LITERAL_VALUES)
def test_g_property_literals_never_survive_sanitising(template: str, literal: str) -> None:
    out = sanitize(template.format(v=literal), "postgresql")
    assert literal.strip("'") not in out
    assert "?" in out
