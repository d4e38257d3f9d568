"""Query plans of slow SELECTs (``db/_explain``): sanitised, once per shape per minute."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Engine, text
from sqlalchemy.pool import StaticPool

import rag_instrument as ri
from rag_instrument.db import _explain
from rag_instrument.db._explain import Explainer, sanitize_plan
from rag_instrument.testing import capture


@pytest.fixture
def users_engine(sqlite_engine: Any) -> Iterator[Engine]:
    eng = sqlite_engine(poolclass=StaticPool)
    with eng.begin() as conn:
        conn.execute(text("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT UNIQUE)"))
    yield eng
    ri.uninstrument_sqlalchemy(eng)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(_explain, "time", fake)
    return fake


def test_plans_are_sanitised_too() -> None:
    plan = [{"Plan": {"Node Type": "Seq Scan", "Filter": "(email = 'a@b.c'::text)", "Rows": 3}}]
    assert sanitize_plan(plan) == [
        {"Plan": {"Node Type": "Seq Scan", "Filter": "(email = ?::text)", "Rows": 3}}
    ]


def test_explain_slow_adds_the_sqlite_plan_once_per_shape_per_minute(users_engine: Engine) -> None:
    ri.instrument_sqlalchemy(users_engine, slow_query_ms=0, explain_slow=True)
    with capture() as cap, users_engine.connect() as conn:
        for email in ("a@x", "b@x"):
            rows = conn.execute(text("SELECT id FROM users WHERE email = :e"), {"e": email})
            assert rows.all() == []
        conn.execute(text("INSERT INTO users (email) VALUES ('c@x')"))
    first, second, insert = cap.find_logs("slow query")
    assert first["plan"] == ["SEARCH users USING COVERING INDEX sqlite_autoindex_users_1 (email=?)"]
    assert "plan" not in second  # same shape within the minute
    assert "plan" not in insert  # never for anything but SELECT
    assert len(cap.spans) == 3  # no span for the EXPLAIN


@given(st.text(min_size=1).filter(lambda s: "'" not in s))
def test_no_literal_survives_anywhere_in_a_plan(secret: str) -> None:
    plan = [
        {
            "Plan": {
                "Node Type": "Index Scan",
                "Index Cond": f"(email = '{secret}'::text)",
                "Plans": [{"Filter": f"(note <> '{secret}')", "Rows": 7, "Cost": 1.5}],
            }
        }
    ]
    clean = sanitize_plan(plan, "postgresql")
    assert f"'{secret}'" not in repr(clean)
    inner = clean[0]["Plan"]
    assert inner["Node Type"] == "Index Scan"  # keys, names and numbers are kept
    assert inner["Index Cond"] == "(email = ?::text)"
    assert inner["Plans"][0]["Rows"] == 7
    assert inner["Plans"][0]["Cost"] == 1.5


def test_a_shape_is_explained_at_most_once_a_minute(clock: FakeClock) -> None:
    explainer = Explainer("postgresql")
    assert explainer.due("SELECT ? FROM a") is True
    assert explainer.due("SELECT ? FROM a") is False
    assert explainer.due("SELECT ? FROM b") is True  # shapes are independent
    clock.now += 59.0
    assert explainer.due("SELECT ? FROM a") is False
    clock.now += 1.0
    assert explainer.due("SELECT ? FROM a") is True


def test_remembered_shapes_stay_bounded(clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_explain, "_MAX_SHAPES", 10)
    explainer = Explainer("sqlite")
    for i in range(10):
        assert explainer.due(f"SELECT {i}")
    clock.now += 61.0  # all ten are past their minute: the next new shape forgets them
    assert explainer.due("SELECT new")
    assert len(explainer._last) == 1
    assert explainer.due("SELECT 0")  # forgotten, so due again


def test_only_sqlite_and_postgresql_plans_are_read() -> None:
    assert Explainer("sqlite").supported
    assert Explainer("postgresql").supported
    assert not Explainer("mysql").supported


def test_the_sqlite_plan_is_a_sanitised_tree_and_leaves_the_applications_cursor_alone() -> None:
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute("CREATE TABLE a (id INTEGER PRIMARY KEY, email TEXT)")
        conn.execute("CREATE TABLE b (a_id INTEGER, v TEXT)")
        conn.executemany("INSERT INTO a (email) VALUES (?)", [("x@y",), ("z@y",)])
        app_cursor = conn.execute("SELECT email FROM a ORDER BY id")
        assert app_cursor.fetchone() == ("x@y",)
        plan = Explainer("sqlite").plan(
            conn,
            "SELECT * FROM a WHERE id IN (SELECT a_id FROM b WHERE v = 'opal') AND email = ?",
            ("harbour@x",),
        )
        assert app_cursor.fetchone() == ("z@y",)  # its pending row is still there
    finally:
        conn.close()
    assert "opal" not in repr(plan)
    assert "harbour" not in repr(plan)
    assert plan[0].startswith("SEARCH a")
    subquery = next(i for i, line in enumerate(plan) if "SUBQUERY" in line)
    assert plan[subquery + 1] == "  SCAN b"  # a child node is indented under its parent
