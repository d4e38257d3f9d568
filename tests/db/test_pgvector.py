"""pgvector searches on the real PostgreSQL: RETRIEVER spans with rag.vector.* attributes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from db_helpers import PG_ASYNC_URL, PG_URL, require_extension, unique
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.ext.asyncio import create_async_engine

import rag_instrument as ri
from rag_instrument.testing import capture

pytestmark = pytest.mark.postgres

VECTORS = [f"[{i},{i % 3},{(i * 7) % 5}]" for i in range(1, 41)]


@pytest.fixture
def tables() -> Iterator[tuple[Engine, str, str]]:
    require_extension("vector")
    engine = create_engine(PG_URL)
    hnsw, ivf = unique("vec_hnsw"), unique("vec_ivf")
    try:  # everything made is undone on every path, a failed setup included
        with engine.begin() as conn:
            for table in (hnsw, ivf):
                conn.execute(
                    text(f"CREATE TABLE {table} (id serial PRIMARY KEY, embedding vector(3))")
                )
                conn.execute(
                    text(f"INSERT INTO {table} (embedding) VALUES (CAST(:v AS vector))"),
                    [{"v": v} for v in VECTORS],
                )
            conn.execute(text(f"CREATE INDEX ON {hnsw} USING hnsw (embedding vector_l2_ops)"))
            conn.execute(
                text(
                    f"CREATE INDEX ON {ivf} USING ivfflat (embedding vector_cosine_ops) "
                    "WITH (lists = 2)"
                )
            )
        yield engine, hnsw, ivf
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DROP TABLE IF EXISTS {hnsw}, {ivf}"))
        engine.dispose()


def _search(conn: object, table: str, operator: str, k: int) -> list[int]:
    rows = conn.execute(  # type: ignore[attr-defined]
        text(f"SELECT id FROM {table} ORDER BY embedding {operator} CAST(:q AS vector) LIMIT :k"),
        {"q": "[1,1,1]", "k": k},
    )
    return [r[0] for r in rows]


def test_hnsw_search_span(tables: tuple[Engine, str, str]) -> None:
    engine, hnsw, _ = tables
    handle = ri.instrument_sqlalchemy(engine)
    with capture() as cap:
        with ri.stage("retrieval"), engine.connect() as conn:
            assert len(_search(conn, hnsw, "<->", 5)) == 5
            conn.execute(text("SET hnsw.ef_search = 100"))
            assert len(_search(conn, hnsw, "<->", 3)) == 3
    first, second = [s for s in cap.spans if s.name == f"SELECT {hnsw}"]
    attrs = dict(first.attributes or {})
    assert attrs["openinference.span.kind"] == "RETRIEVER"
    assert attrs["db.system.name"] == "postgresql"
    assert attrs["rag.vector.metric"] == "l2"
    assert attrs["rag.vector.top_k"] == 5
    assert attrs["rag.vector.result_count"] == 5
    assert attrs["rag.vector.index_type"] == "hnsw"
    assert attrs["rag.vector.params.hnsw.ef_search"] == 40
    assert "rag.vector.params.ivfflat.probes" not in attrs
    assert second.attributes["rag.vector.params.hnsw.ef_search"] == 100
    assert second.attributes["rag.vector.top_k"] == 3
    breakdown = cap.find_logs("retrieval completed")[0]["breakdown"]
    assert breakdown["vector"]["count"] == 2
    assert breakdown["db"]["count"] == 1  # the SET
    assert len(cap.spans) == 4  # no span for our own look-ups
    handle.uninstrument()


def test_ivfflat_search_span_and_set_local(tables: tuple[Engine, str, str]) -> None:
    engine, _, ivf = tables
    handle = ri.instrument_sqlalchemy(engine)
    with capture() as cap:
        with engine.connect() as conn:
            _search(conn, ivf, "<=>", 4)
            conn.execute(text("SET LOCAL ivfflat.probes = 2"))
            _search(conn, ivf, "<=>", 4)
            conn.commit()  # SET LOCAL ends with the transaction
            _search(conn, ivf, "<=>", 4)
    spans = [s for s in cap.spans if s.name == f"SELECT {ivf}"]
    assert [s.attributes["rag.vector.params.ivfflat.probes"] for s in spans] == [1, 2, 1]
    assert {s.attributes["rag.vector.index_type"] for s in spans} == {"ivfflat"}
    assert {s.attributes["rag.vector.metric"] for s in spans} == {"cosine"}
    handle.uninstrument()


def test_no_matching_index_reports_no_index_type(tables: tuple[Engine, str, str]) -> None:
    engine, hnsw, _ = tables
    handle = ri.instrument_sqlalchemy(engine)
    with capture() as cap, engine.connect() as conn:
        _search(conn, hnsw, "<#>", 2)  # the HNSW index is for L2, not inner product
    attrs = dict(cap.span(f"SELECT {hnsw}").attributes or {})
    assert attrs["rag.vector.metric"] == "inner_product"
    assert "rag.vector.index_type" not in attrs
    assert attrs["rag.vector.params.hnsw.ef_search"] == 40
    assert attrs["rag.vector.params.ivfflat.probes"] == 1
    handle.uninstrument()


def test_settings_are_reread_after_checkin(tables: tuple[Engine, str, str]) -> None:
    engine, hnsw, _ = tables
    handle = ri.instrument_sqlalchemy(engine)
    with capture() as cap:
        with engine.connect() as conn:
            _search(conn, hnsw, "<->", 2)
        with engine.connect() as conn:
            # Changed behind our back (not through SQLAlchemy), then checked out again.
            raw = conn.connection.dbapi_connection
            raw.execute("SET hnsw.ef_search = 77")  # type: ignore[union-attr]
            raw.commit()  # type: ignore[union-attr]
        with engine.connect() as conn:
            _search(conn, hnsw, "<->", 2)
    values = [
        s.attributes["rag.vector.params.hnsw.ef_search"]
        for s in cap.spans
        if s.name == f"SELECT {hnsw}"
    ]
    assert values == [40, 77]
    handle.uninstrument()


@pytest.mark.asyncio
async def test_asyncpg_search_span(tables: tuple[Engine, str, str]) -> None:
    _, hnsw, _ = tables
    engine = create_async_engine(PG_ASYNC_URL)
    handle = ri.instrument_sqlalchemy(engine)
    try:
        with capture() as cap:
            async with ri.stage("retrieval"), engine.connect() as conn:
                rows = await conn.execute(
                    text(
                        f"SELECT id FROM {hnsw} ORDER BY embedding <-> CAST(:q AS vector) LIMIT 3"
                    ),
                    {"q": "[1,1,1]"},
                )
                assert len(rows.all()) == 3
        attrs = dict(cap.span(f"SELECT {hnsw}").attributes or {})
        assert attrs["rag.vector.top_k"] == 3
        assert attrs["rag.vector.index_type"] == "hnsw"
        assert attrs["rag.vector.params.hnsw.ef_search"] == 40
        assert cap.find_logs("retrieval completed")[0]["breakdown"]["vector"]["count"] == 1
    finally:
        handle.uninstrument()
        await engine.dispose()
