"""N+1 detection: the classic lazy-loaded relationship in a loop, on SQLite and PostgreSQL."""

from __future__ import annotations

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
    try:
        yield engine, collection_cls
    finally:
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
    assert warning["count"] == 5
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
    assert [w["count"] for w in cap.find_logs("n+1 query detected")] == [3]
    handle.uninstrument()


def test_each_stage_counts_on_its_own(setup: tuple[Engine, Any]) -> None:
    engine, collection_cls = setup
    with capture(n_plus_one_threshold=5) as cap:
        for _ in range(2):
            with ri.stage("retrieval"):
                _touch_every_collection(engine, collection_cls)
    assert len(cap.find_logs("n+1 query detected")) == 2


def test_outside_any_scope_nothing_is_counted() -> None:
    engine = create_engine("sqlite://")
    handle = ri.instrument_sqlalchemy(engine)
    with capture(n_plus_one_threshold=2) as cap, engine.connect() as conn:
        for i in range(5):
            conn.execute(text("SELECT :i"), {"i": i})
    assert cap.find_logs("n+1 query detected") == []
    handle.uninstrument()


def test_db_scope_counts_without_a_stage() -> None:
    engine = create_engine("sqlite://")
    handle = ri.instrument_sqlalchemy(engine)
    with capture(n_plus_one_threshold=3) as cap:
        with ri.db_scope() as scope, engine.connect() as conn:
            for i in range(4):
                conn.execute(text(f"SELECT {i} + :x"), {"x": i})
    (warning,) = cap.find_logs("n+1 query detected")
    assert warning["statement"] == "SELECT ? + ?"
    assert warning["count"] == 3
    assert "relationship" not in warning
    assert scope.counts == {"SELECT ? + ?": 4}
    handle.uninstrument()


@pytest.mark.asyncio
async def test_db_scope_async_and_nested_stage_counts_separately() -> None:
    engine = create_engine("sqlite://")
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
    handle.uninstrument()
