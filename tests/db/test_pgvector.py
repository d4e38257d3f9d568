"""pgvector searches on the real PostgreSQL: RETRIEVER spans with rag.vector.* attributes."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from typing import Any

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
    # A sequential scan: neither index type's setting applied to it.
    assert not [k for k in attrs if k.startswith("rag.vector.params.")]
    handle.uninstrument()


def test_a_search_no_index_can_serve_reports_no_index(tables: tuple[Engine, str, str]) -> None:
    # pgvector's indexes serve ORDER BY distance ... LIMIT only: a filter on the distance,
    # or an ORDER BY without LIMIT, is a sequential scan whatever indexes the table has.
    engine, hnsw, _ = tables
    handle = ri.instrument_sqlalchemy(engine)
    query = "[0.5,0.5,0.5]"
    with capture() as cap, engine.connect() as conn:
        conn.execute(text(f"SELECT id FROM {hnsw} ORDER BY embedding <-> CAST(:q AS vector)"), {"q": query})
        conn.execute(
            text(f"SELECT id FROM {hnsw} WHERE embedding <-> CAST(:q AS vector) < 0.3"), {"q": query}
        ).all()
        conn.execute(
            text(f"SELECT id, embedding <-> CAST(:q AS vector) AS d FROM {hnsw} ORDER BY d LIMIT 2"),
            {"q": query},
        ).all()
    unserved, filtered, served = [s for s in cap.spans if s.name == f"SELECT {hnsw}"]
    for span in (unserved, filtered):
        assert "rag.vector.index_type" not in span.attributes
        assert not [k for k in span.attributes if k.startswith("rag.vector.params.")]
    assert served.attributes["rag.vector.index_type"] == "hnsw"  # by its alias
    assert served.attributes["rag.vector.top_k"] == 2
    handle.uninstrument()


def test_table_without_vector_index_reports_no_search_settings(
    tables: tuple[Engine, str, str],
) -> None:
    engine, _, _ = tables
    plain = unique("vec_plain")
    with engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {plain} (id serial PRIMARY KEY, embedding vector(3))"))
        conn.execute(
            text(f"INSERT INTO {plain} (embedding) VALUES (CAST(:v AS vector))"),
            [{"v": v} for v in VECTORS],
        )
    handle = ri.instrument_sqlalchemy(engine)
    try:
        with capture() as cap, engine.connect() as conn:
            assert len(_search(conn, plain, "<->", 3)) == 3
        attrs = dict(cap.span(f"SELECT {plain}").attributes or {})
        assert attrs["rag.vector.metric"] == "l2"
        assert attrs["rag.vector.result_count"] == 3
        assert "rag.vector.index_type" not in attrs
        assert "rag.vector.params.hnsw.ef_search" not in attrs
        assert "rag.vector.params.ivfflat.probes" not in attrs
    finally:
        handle.uninstrument()
        with engine.begin() as conn:
            conn.execute(text(f"DROP TABLE IF EXISTS {plain}"))


def test_index_created_through_the_engine_is_seen_at_once(
    tables: tuple[Engine, str, str],
) -> None:
    engine, _, _ = tables
    table = unique("vec_late")
    handle = ri.instrument_sqlalchemy(engine)
    try:
        with capture() as cap, engine.connect() as conn:
            conn.execute(text(f"CREATE TABLE {table} (id serial PRIMARY KEY, embedding vector(3))"))
            conn.execute(
                text(f"INSERT INTO {table} (embedding) VALUES (CAST(:v AS vector))"),
                [{"v": v} for v in VECTORS],
            )
            _search(conn, table, "<->", 2)
            conn.execute(text(f"CREATE INDEX ON {table} USING hnsw (embedding vector_l2_ops)"))
            _search(conn, table, "<->", 2)
            conn.commit()
        before, after = [s for s in cap.spans if s.name == f"SELECT {table}"]
        assert "rag.vector.index_type" not in before.attributes
        assert after.attributes["rag.vector.index_type"] == "hnsw"
        assert after.attributes["rag.vector.index_name"] == f"{table}_embedding_idx"
        assert after.attributes["rag.vector.params.hnsw.ef_search"] == 40
    finally:
        handle.uninstrument()
        with engine.begin() as conn:
            conn.execute(text(f"DROP TABLE IF EXISTS {table}"))


def test_explained_slow_search_reports_the_index_the_plan_used(
    tables: tuple[Engine, str, str],
) -> None:
    engine, hnsw, _ = tables
    handle = ri.instrument_sqlalchemy(engine, slow_query_ms=0, explain_slow=True)
    try:
        with capture() as cap, engine.connect() as conn:
            # With index scans off, the planner reads the table although an index exists.
            conn.execute(text("SET enable_indexscan = off"))
            _search(conn, hnsw, "<->", 2)
            conn.execute(text("RESET enable_indexscan"))
            conn.execute(text("SET enable_seqscan = off"))
            # Another statement shape (each shape is explained at most once a minute).
            rows = conn.execute(
                text(
                    f"SELECT id AS found FROM {hnsw} "
                    "ORDER BY embedding <-> CAST(:q AS vector) LIMIT :k"
                ),
                {"q": "[1,1,1]", "k": 2},
            )
            assert len(rows.all()) == 2
            conn.rollback()
        seq_scan, index_scan = [s for s in cap.spans if s.name == f"SELECT {hnsw}"]
        assert "rag.vector.index_type" not in seq_scan.attributes
        assert "rag.vector.params.hnsw.ef_search" not in seq_scan.attributes
        assert index_scan.attributes["rag.vector.index_type"] == "hnsw"
        assert index_scan.attributes["rag.vector.params.hnsw.ef_search"] == 40
        slow = [line for line in cap.find_logs("slow query") if hnsw in line["db.query.text"]]
        assert len(slow) == 2
        assert "Index Name" not in str(slow[0]["plan"])
        assert "Index Name" in str(slow[1]["plan"])
    finally:
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


# --- sweeps: recall rises with ef_search (HNSW) and probes (IVFFlat) -------------------------

SWEEP_DIM = 16


@pytest.fixture(scope="module")
def sweep_table() -> Iterator[tuple[Engine, str, list[str]]]:
    require_extension("vector")
    table = unique("vec_sweep")
    rng = random.Random(2024)
    rows = [
        {"id": i, "v": "[" + ",".join(f"{rng.gauss(0, 1):.5f}" for _ in range(SWEEP_DIM)) + "]"}
        for i in range(3000)
    ]
    queries = [
        "[" + ",".join(f"{rng.gauss(0, 1):.5f}" for _ in range(SWEEP_DIM)) + "]" for _ in range(30)
    ]
    engine = create_engine(PG_URL)
    try:  # everything made is undone on every path, a failed setup included
        with engine.begin() as conn:
            conn.execute(
                text(f"CREATE TABLE {table} (id int PRIMARY KEY, embedding vector({SWEEP_DIM}))")
            )
            conn.execute(text(f"INSERT INTO {table} VALUES (:id, CAST(:v AS vector))"), rows)
        yield engine, table, queries
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
        engine.dispose()


def _sweep_pg(
    engine: Engine, table: str, queries: list[str], setting: str, values: list[int]
) -> list[Any]:
    statement = text(f"SELECT id FROM {table} ORDER BY embedding <-> CAST(:q AS vector) LIMIT 10")
    # A statement of its own for the exact answer: psycopg prepares statements it runs
    # often, and a prepared plan (index or sequential scan) outlives later SET enable_*.
    exact_statement = text(
        f"SELECT id FROM {table} ORDER BY embedding <-> CAST(:q AS vector) LIMIT 10 -- exact"
    )
    name = setting.split(".")[1]
    with engine.connect() as conn:
        # 3,000 rows: left alone, the planner would rather scan the table than the index.
        conn.execute(text("SET enable_seqscan = off"))
        current: dict[str, int] = {}

        def exact(query: str) -> list[int]:
            conn.execute(text("SET enable_indexscan = off"))
            conn.execute(text("SET enable_seqscan = on"))
            try:
                return [r[0] for r in conn.execute(exact_statement, {"q": query})]
            finally:
                conn.execute(text("RESET enable_indexscan"))
                conn.execute(text("SET enable_seqscan = off"))

        def search(query: str, **kwargs: int) -> list[int]:
            if current.get(name) != kwargs[name]:
                conn.execute(text(f"SET {setting} = {int(kwargs[name])}"))
                current[name] = kwargs[name]
            return [r[0] for r in conn.execute(statement, {"q": query})]

        return ri.sweep(search, name, values, queries, ground_truth=exact, k=10)


def test_sweep_ivfflat_probes_recall_rises(sweep_table: tuple[Engine, str, list[str]]) -> None:
    engine, table, queries = sweep_table
    index = f"{table}_ivf"
    with engine.begin() as conn:
        conn.execute(
            text(
                f"CREATE INDEX {index} ON {table} "
                "USING ivfflat (embedding vector_l2_ops) WITH (lists = 64)"
            )
        )
    try:
        rows = _sweep_pg(engine, table, queries, "ivfflat.probes", [1, 4, 16, 64])
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DROP INDEX {index}"))
    recalls = [row.recall for row in rows]
    assert recalls == sorted(recalls)
    assert recalls[0] < 0.6
    assert recalls[-1] == 1.0  # probes == lists: every list is searched
    assert "probes" in ri.format_table(rows).splitlines()[0]


def test_sweep_hnsw_ef_search_recall_rises(sweep_table: tuple[Engine, str, list[str]]) -> None:
    engine, table, queries = sweep_table
    index = f"{table}_hnsw"
    with engine.begin() as conn:
        conn.execute(
            text(
                f"CREATE INDEX {index} ON {table} "
                "USING hnsw (embedding vector_l2_ops) WITH (m = 4, ef_construction = 8)"
            )
        )
    try:
        rows = _sweep_pg(engine, table, queries, "hnsw.ef_search", [10, 20, 80, 400])
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DROP INDEX {index}"))
    recalls = [row.recall for row in rows]
    assert all(later >= earlier - 0.02 for earlier, later in itertools.pairwise(recalls))
    assert recalls[0] < recalls[-1]
    assert recalls[-1] > 0.9
