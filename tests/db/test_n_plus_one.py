"""N+1 detection: the classic lazy-loaded relationship in a loop, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from db_helpers import PG_URL, require_postgres, unique
from sqlalchemy import Engine, ForeignKey, create_engine, select, text
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    selectinload,
)

import rag_instrument as ri
from rag_instrument.db import _scope
from rag_instrument.testing import capture


def _models(suffix: str) -> tuple[Any, Any, Any]:
    class Base(DeclarativeBase):
        pass

    class Collection(Base):
        __tablename__ = f"collections_{suffix}"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str]
        documents: Mapped[list[Document]] = relationship(back_populates="collection")

    class Document(Base):
        __tablename__ = f"documents_{suffix}"
        id: Mapped[int] = mapped_column(primary_key=True)
        collection_id: Mapped[int] = mapped_column(ForeignKey(f"collections_{suffix}.id"))
        title: Mapped[str]
        collection: Mapped[Collection] = relationship(back_populates="documents")

    return Base, Collection, Document


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def setup(request: pytest.FixtureRequest) -> Iterator[tuple[Engine, Any]]:
    if request.param == "postgresql":
        require_postgres()
        engine = create_engine(PG_URL)
    else:
        engine = create_engine("sqlite://")
    base, collection_cls, document_cls = _models(unique("n1"))
    handle = None
    try:  # everything made is undone on every path, a failed setup included
        base.metadata.create_all(engine)
        with Session(engine) as session:
            for i in range(8):
                session.add(
                    collection_cls(
                        id=i,
                        name=f"c{i}",
                        documents=[document_cls(id=i * 10 + j, title=f"d{j}") for j in range(2)],
                    )
                )
            session.commit()
        handle = ri.instrument_sqlalchemy(engine)
        yield engine, collection_cls
    finally:
        if handle is not None:
            handle.uninstrument()
        base.metadata.drop_all(engine)
        engine.dispose()


def _touch_every_collection(engine: Engine, collection_cls: Any, *, eager: bool = False) -> int:
    with Session(engine) as session:
        query = select(collection_cls).order_by(collection_cls.id)
        if eager:
            query = query.options(selectinload(collection_cls.documents))
        return sum(len(c.documents) for c in session.scalars(query))


def test_lazy_loads_in_a_loop_log_one_warning(setup: tuple[Engine, Any]) -> None:
    engine, collection_cls = setup
    with capture(n_plus_one_threshold=5) as cap:
        with ri.stage("retrieval"):
            assert _touch_every_collection(engine, collection_cls) == 16
    (warning,) = cap.find_logs("n+1 query detected")
    assert warning["level"] == "warning"
    assert warning["count"] == 8  # the final count, not the threshold
    assert warning["pipeline_stage"] == "retrieval"
    assert warning["relationship"] == "Collection.documents"
    assert collection_cls.__tablename__.replace("collections", "documents") in warning["statement"]
    assert "WHERE" in warning["statement"]
    assert cap.find_logs("retrieval completed")[0]["breakdown"]["db"]["count"] == 9


def test_below_the_threshold_or_eager_loading_is_quiet(setup: tuple[Engine, Any]) -> None:
    engine, collection_cls = setup
    with capture(n_plus_one_threshold=9) as cap, ri.stage("retrieval"):
        _touch_every_collection(engine, collection_cls)  # 8 lazy loads
    assert cap.find_logs("n+1 query detected") == []
    with capture(n_plus_one_threshold=2) as cap, ri.stage("retrieval"):
        _touch_every_collection(engine, collection_cls, eager=True)
    assert cap.find_logs("n+1 query detected") == []


def test_handle_threshold_overrides_configure(setup: tuple[Engine, Any]) -> None:
    engine, collection_cls = setup
    ri.instrument_sqlalchemy(engine).uninstrument()
    handle = ri.instrument_sqlalchemy(engine, n_plus_one_threshold=3)
    with capture(n_plus_one_threshold=100) as cap, ri.stage("retrieval"):
        _touch_every_collection(engine, collection_cls)
    assert [w["count"] for w in cap.find_logs("n+1 query detected")] == [8]
    handle.uninstrument()


def test_each_stage_counts_on_its_own(setup: tuple[Engine, Any]) -> None:
    engine, collection_cls = setup
    with capture(n_plus_one_threshold=5) as cap:
        for _ in range(2):
            with ri.stage("retrieval"):
                _touch_every_collection(engine, collection_cls)
    assert len(cap.find_logs("n+1 query detected")) == 2


def test_outside_any_scope_nothing_is_counted(sqlite_engine) -> None:
    engine = sqlite_engine()
    handle = ri.instrument_sqlalchemy(engine)
    with capture(n_plus_one_threshold=2) as cap, engine.connect() as conn:
        for i in range(5):
            conn.execute(text("SELECT :i"), {"i": i})
    assert cap.find_logs("n+1 query detected") == []
    handle.uninstrument()


def test_db_scope_counts_without_a_stage(sqlite_engine) -> None:
    engine = sqlite_engine()
    handle = ri.instrument_sqlalchemy(engine)
    with capture(n_plus_one_threshold=3) as cap:
        with ri.db_scope() as scope, engine.connect() as conn:
            for i in range(4):
                conn.execute(text(f"SELECT {i} + :x"), {"x": i})
    (warning,) = cap.find_logs("n+1 query detected")
    assert warning["statement"] == "SELECT ? + ?"
    assert warning["count"] == 4
    assert "pipeline_stage" not in warning  # no stage: no null field
    assert "stage" not in warning
    assert "relationship" not in warning
    assert scope.counts == {"SELECT ? + ?": 4}
    handle.uninstrument()


@pytest.mark.asyncio
async def test_db_scope_async_and_nested_stage_counts_separately(sqlite_engine) -> None:
    engine = sqlite_engine()
    handle = ri.instrument_sqlalchemy(engine)
    with capture(n_plus_one_threshold=3) as cap:
        async with ri.db_scope() as scope:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
                with ri.stage("retrieval"):
                    for _ in range(3):
                        conn.execute(text("SELECT 2"))
    assert scope.counts == {"SELECT ?": 1}
    assert [w["pipeline_stage"] for w in cap.find_logs("n+1 query detected")] == ["retrieval"]
    assert [w["stage"] for w in cap.find_logs("n+1 query detected")] == ["retrieval"]
    handle.uninstrument()


def test_db_scope_inside_a_stage_wins_under_a_traced_operation(sqlite_engine) -> None:
    """The scope opened inside the stage counts, also under a traced op opened inside it."""
    engine = sqlite_engine()
    handle = ri.instrument_sqlalchemy(engine)
    with capture(n_plus_one_threshold=3) as cap, ri.stage("retrieval"):
        with ri.db_scope() as scope, ri.traced("load"), engine.connect() as conn:
            for i in range(3):
                conn.execute(text("SELECT :i"), {"i": i})
        with ri.traced("after"), engine.connect() as conn:  # the scope is closed: the stage
            conn.execute(text("SELECT :i"), {"i": 9})
            with ri.db_scope() as inner, ri.stage("rerank"), engine.connect() as conn2:
                conn2.execute(text("SELECT :i"), {"i": 9})  # a stage inside the scope
    assert scope.counts == {"SELECT ?": 3}
    assert inner.counts == {}
    (warning,) = cap.find_logs("n+1 query detected")
    assert warning["pipeline_stage"] == "retrieval"
    handle.uninstrument()


def test_scope_resolution_is_cached_per_frame(monkeypatch: pytest.MonkeyPatch, sqlite_engine) -> None:
    engine = sqlite_engine()
    handle = ri.instrument_sqlalchemy(engine)
    walks: list[int] = []
    original = _scope._resolve

    def counting(frame: Any, scope: Any) -> Any:
        walks.append(1)
        return original(frame, scope)

    monkeypatch.setattr(_scope, "_resolve", counting)
    with capture(), ri.stage("retrieval"), ri.traced("inner"), engine.connect() as conn:
        for _ in range(10):
            conn.execute(text("SELECT 1"))
        with ri.db_scope() as scope:
            for _ in range(10):
                conn.execute(text("SELECT 1"))
    assert len(walks) == 2  # once for the stage, once for the scope
    assert scope.counts == {"SELECT ?": 10}
    handle.uninstrument()


class _CountingLock:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.acquired = 0

    def __enter__(self) -> None:
        self.lock.acquire()
        self.acquired += 1

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


def test_shape_counts_take_the_lock_only_near_the_threshold() -> None:
    shapes = _scope.ShapeCounts()
    lock = _CountingLock()
    shapes.lock = lock  # type: ignore[assignment]
    reports = [shapes.add("SELECT ?", 50) for _ in range(200)]
    assert [r for r in reports if r] == [50]
    assert shapes.counts == {"SELECT ?": 200}
    assert lock.acquired <= 3  # the first time, and at the threshold


def test_shape_counts_report_once_under_threads() -> None:
    shapes = _scope.ShapeCounts()
    reports: list[int] = []
    start = threading.Barrier(8)

    def work() -> None:
        start.wait()
        reports.extend(r for r in (shapes.add("SELECT ?", 100) for _ in range(500)) if r)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(reports) == 1
    assert reports[0] >= 100


def test_sqlite_tables_with_quoted_names_are_different_statements(sqlite_engine) -> None:
    # SQLAlchemy double-quotes mixed-case names; SQLite's "x" was masked as a string, so
    # one query on each of five tables looked like one statement run five times.
    from sqlalchemy import Column, Integer, MetaData, Table

    engine = sqlite_engine()
    metadata = MetaData()
    tables = [Table(f"Docs{n}", metadata, Column("id", Integer, primary_key=True)) for n in range(5)]
    metadata.create_all(engine)
    ri.instrument_sqlalchemy(engine)
    with capture() as cap:  # the default threshold: 5 runs of one statement
        with ri.stage("retrieval"), engine.connect() as conn:
            for table in tables:
                conn.execute(select(table).where(table.c.id == 1)).all()
    assert cap.find_logs("n+1 query detected") == []
    texts = {s.attributes.get("db.query.text") for s in cap.spans if s.name.startswith("SELECT")}
    assert len(texts) == 5
