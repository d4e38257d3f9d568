"""instrument_milvus against a real embedded Milvus (milvus-lite), sync and async clients."""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.trace import SpanKind, StatusCode

pymilvus = pytest.importorskip("pymilvus")
from pymilvus import (  # noqa: E402
    AnnSearchRequest,
    AsyncMilvusClient,
    DataType,
    MilvusClient,
    MilvusException,
    RRFRanker,
)

import rag_instrument as ri  # noqa: E402
from rag_instrument.integrations.milvus import (  # noqa: E402
    filter_shape,
    instrument_milvus,
    uninstrument_milvus,
)
from rag_instrument.testing import Capture, capture  # noqa: E402

DIM = 8
SECRET_TEXT = "the-stored-document-text-42"


@pytest.fixture(scope="module")
def db_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = str(tmp_path_factory.mktemp("milvus") / "lite.db")
    client = MilvusClient(path)  # starts the milvus-lite server for this file
    try:
        yield path
    finally:
        client.close()


def _vec(rng: random.Random) -> list[float]:
    return [rng.random() for _ in range(DIM)]


def _make_collection(
    client: MilvusClient,
    *,
    index: str = "IVF_FLAT",
    metric: str = "L2",
    rows: int = 200,
    tag_index: bool = True,
    hybrid: bool = False,
) -> str:
    name = f"c_{uuid.uuid4().hex[:10]}"
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=True)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=DIM)
    if hybrid:
        schema.add_field("sparse", DataType.FLOAT_VECTOR, dim=DIM)
    schema.add_field("tag", DataType.VARCHAR, max_length=64)
    schema.add_field("year", DataType.INT64)
    schema.add_field("text", DataType.VARCHAR, max_length=128)
    params = client.prepare_index_params()
    extra = {"nlist": 8} if index.startswith("IVF") else {}
    params.add_index("vector", index_type=index, metric_type=metric, params=extra)
    if hybrid:
        params.add_index("sparse", index_type="FLAT", metric_type="IP")
    if tag_index:
        params.add_index("tag", index_type="INVERTED")
    client.create_collection(name, schema=schema, index_params=params)
    rng = random.Random(3)
    client.insert(
        name,
        [
            {
                "id": i,
                "vector": _vec(rng),
                **({"sparse": _vec(rng)} if hybrid else {}),
                "tag": "news" if i % 2 else "blog",
                "year": 2000 + i % 30,
                "text": SECRET_TEXT,
            }
            for i in range(rows)
        ],
    )
    return name


@pytest.fixture
def client(db_path: str) -> Iterator[MilvusClient]:
    c = MilvusClient(db_path)
    try:
        yield c
    finally:
        uninstrument_milvus(c)
        c.close()


def _attrs(cap: Capture, name: str) -> dict[str, Any]:
    return dict(cap.span(name).attributes or {})


def _nothing_stored_leaks(cap: Capture, vectors: list[list[float]]) -> None:
    dumped = " ".join(s.to_json() for s in cap.spans) + " ".join(map(str, cap.logs))
    assert SECRET_TEXT not in dumped
    for vector in vectors:
        assert repr(vector[0]) not in dumped
        assert f"{vector[0]:.6f}"[:8] not in dumped


def test_search_span_has_collection_filter_params_index_and_counts(client: MilvusClient) -> None:
    name = _make_collection(client)
    instrument_milvus(client)
    rng = random.Random(9)
    queries = [_vec(rng), _vec(rng)]
    with capture() as cap:
        with ri.stage("retrieval"):
            hits = client.search(
                name,
                data=queries,
                limit=5,
                filter='tag == "news" and year > 2010',
                search_params={"metric_type": "L2", "params": {"nprobe": 4}},
                output_fields=["text"],
            )
    assert len(hits) == 2
    span = cap.span(f"search {name}")
    attrs = dict(span.attributes or {})
    assert span.kind is SpanKind.CLIENT
    assert attrs["db.system.name"] == "milvus"
    assert attrs["db.operation.name"] == "search"
    assert attrs["db.collection.name"] == name
    assert attrs["openinference.span.kind"] == "RETRIEVER"
    assert attrs["rag.vector.top_k"] == 5
    assert attrs["rag.vector.query_count"] == 2
    assert attrs["rag.vector.dimensions"] == DIM
    assert attrs["rag.vector.result_count"] == sum(len(h) for h in hits) == 10
    assert attrs["rag.vector.filter"] == "tag == ? and year > ?"
    assert attrs["rag.vector.params.nprobe"] == 4
    assert attrs["rag.vector.index_type"] == "IVF_FLAT"
    assert attrs["rag.vector.metric"] == "L2"
    assert attrs["rag.vector.field"] == "vector"
    (line,) = cap.find_logs("retrieval completed")
    assert line["breakdown"]["vector"]["count"] == 1
    assert "news" not in span.to_json()
    _nothing_stored_leaks(cap, queries)
    points = cap.metrics()["db.client.operation.duration"]
    assert any(p.attributes.get("db.operation.name") == "search" for p in points)


def test_collection_is_read_once_and_again_after_reindexing(
    client: MilvusClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = _make_collection(client)
    reads: list[str] = []
    real = MilvusClient.describe_collection

    def counting(self: MilvusClient, collection_name: str, *a: Any, **k: Any) -> Any:
        reads.append(collection_name)
        return real(self, collection_name, *a, **k)

    monkeypatch.setattr(MilvusClient, "describe_collection", counting)
    instrument_milvus(client)
    query = [[0.5] * DIM]
    with capture() as cap:
        for _ in range(5):
            client.search(name, data=query, limit=3)
        client.query(name, filter="year > 2005", limit=2)
        assert reads == [name]
        client.release_collection(name)
        client.drop_index(name, "vector")
        params = client.prepare_index_params()
        params.add_index("vector", index_type="HNSW", metric_type="COSINE", params={"M": 8})
        client.create_index(name, params)
        client.load_collection(name)
        client.search(name, data=query, limit=3, search_params={"params": {"ef": 32}})
        client.search(name, data=query, limit=3, search_params={"params": {"ef": 32}})
    assert reads == [name, name]
    spans = [s for s in cap.spans if s.name == f"search {name}"]
    assert [s.attributes["rag.vector.index_type"] for s in spans] == ["IVF_FLAT"] * 5 + ["HNSW"] * 2
    assert spans[-1].attributes["rag.vector.metric"] == "COSINE"
    assert spans[-1].attributes["rag.vector.params.ef"] == 32


def test_drop_collection_through_the_client_forgets_it(client: MilvusClient) -> None:
    name = _make_collection(client, index="IVF_FLAT")
    instrument_milvus(client)
    with capture() as cap:
        client.search(name, data=[[0.1] * DIM], limit=2)
        client.drop_collection(name)
        schema = MilvusClient.create_schema(auto_id=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=DIM)
        params = client.prepare_index_params()
        params.add_index("vector", index_type="FLAT", metric_type="IP")
        client.create_collection(name, schema=schema, index_params=params)
        client.insert(name, [{"id": 1, "vector": [0.2] * DIM}])
        client.search(name, data=[[0.1] * DIM], limit=2)
    first, second = [s for s in cap.spans if s.name == f"search {name}"]
    assert first.attributes["rag.vector.index_type"] == "IVF_FLAT"
    assert second.attributes["rag.vector.index_type"] == "FLAT"
    assert second.attributes["rag.vector.metric"] == "IP"
    client.drop_collection(name)


def test_every_other_method_sync(client: MilvusClient) -> None:
    name = _make_collection(client, rows=50, hybrid=True)
    instrument_milvus(client)
    rng = random.Random(5)
    row = {"id": 1000, "vector": _vec(rng), "sparse": _vec(rng), "tag": "x", "year": 1, "text": "t"}
    with capture() as cap:
        with ri.stage("ingestion"):
            assert client.insert(name, [row, {**row, "id": 1001}])["insert_count"] == 2
            assert client.upsert(name, {**row, "tag": "y"})["upsert_count"] == 1
        got = client.get(name, ids=[1000, 1001, 1], output_fields=["tag"])
        queried = client.query(name, filter="id in [1, 2, 3]", output_fields=["id"])
        client.delete(name, ids=[1000])
        client.delete(name, filter='tag == "y"')
        reqs = [
            AnnSearchRequest(
                data=[_vec(rng)], anns_field="vector", param={"params": {"nprobe": 2}}, limit=4
            ),
            AnnSearchRequest(data=[_vec(rng)], anns_field="sparse", param={}, limit=4),
        ]
        hybrid = client.hybrid_search(name, reqs, RRFRanker(), limit=3)
    assert len(got) == 3
    assert len(queried) == 3
    insert = _attrs(cap, f"insert {name}")
    assert insert["rag.vector.row_count"] == 2
    assert insert["db.operation.name"] == "insert"
    assert "openinference.span.kind" not in insert
    assert _attrs(cap, f"upsert {name}")["rag.vector.row_count"] == 1
    get = _attrs(cap, f"get {name}")
    assert get["rag.vector.row_count"] == 3
    assert get["rag.vector.result_count"] == 3
    query = _attrs(cap, f"query {name}")
    assert query["rag.vector.filter"] == "id in [?]"
    assert query["rag.vector.result_count"] == 3
    deletes = [dict(s.attributes or {}) for s in cap.spans if s.name == f"delete {name}"]
    assert deletes[0]["rag.vector.row_count"] == 1
    assert deletes[1]["rag.vector.filter"] == "tag == ?"
    hybrid_attrs = _attrs(cap, f"hybrid_search {name}")
    assert hybrid_attrs["openinference.span.kind"] == "RETRIEVER"
    assert hybrid_attrs["rag.vector.field"] == "vector,sparse"
    assert hybrid_attrs["rag.vector.index_type"] == "IVF_FLAT,FLAT"
    assert hybrid_attrs["rag.vector.params.vector.nprobe"] == 2
    assert hybrid_attrs["rag.vector.top_k"] == 3
    assert hybrid_attrs["rag.vector.result_count"] == len(hybrid[0]) == 3
    (line,) = cap.find_logs("ingestion completed")
    assert line["breakdown"]["vector"]["count"] == 2
    _nothing_stored_leaks(cap, [row["vector"]])  # type: ignore[list-item]


def test_server_error_is_recorded_and_reraised_unchanged(
    client: MilvusClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    raised: list[BaseException] = []
    real = MilvusClient.search

    def spy(self: MilvusClient, *args: Any, **kwargs: Any) -> Any:
        try:
            return real(self, *args, **kwargs)
        except BaseException as exc:
            raised.append(exc)
            raise

    monkeypatch.setattr(MilvusClient, "search", spy)
    instrument_milvus(client)
    with capture() as cap:
        with pytest.raises(MilvusException) as info, ri.stage("retrieval"):
            client.search("no_such_collection", data=[[0.1] * DIM], limit=2)
    assert info.value is raised[0]
    span = cap.span("search no_such_collection")
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "MilvusException"
    assert span.attributes["db.response.status_code"] == str(info.value.code)
    # A leaf span: the sanitised message is the status description.
    assert span.status.description == (
        "MilvusException: MilvusException(code=100): collection ? does not exist"
    )
    (line,) = cap.find_logs("retrieval failed")
    assert line["breakdown"]["vector"]["count"] == 1


def test_the_librarys_own_collection_read_adds_no_pymilvus_error_line(
    client: MilvusClient, caplog: pytest.LogCaptureFixture
) -> None:
    """pymilvus logs each failed call at ERROR: the application's own, not ours too."""

    def rpc_errors() -> int:
        return sum("RPC error" in r.getMessage() for r in caplog.records)

    with caplog.at_level(logging.ERROR, logger="pymilvus"):
        with pytest.raises(MilvusException):
            client.search("no_such_collection", data=[[0.1] * DIM], limit=2)
        plain = rpc_errors()
        caplog.clear()
        instrument_milvus(client)
        with pytest.raises(MilvusException):
            client.search("no_such_collection", data=[[0.1] * DIM], limit=2)
        assert rpc_errors() == plain >= 1


def test_filter_values_quoted_in_a_server_error_are_hidden(client: MilvusClient) -> None:
    name = _make_collection(client, rows=10)
    instrument_milvus(client)
    secret = "a-secret-" + "literal-77"  # a value, as in an application: not in the source
    expr = f'year > "{secret}"'
    with capture() as cap:
        with pytest.raises(MilvusException) as info, ri.stage("retrieval"):
            client.query(name, filter=expr, limit=1)
    assert secret in str(info.value)  # the application still sees it all
    dumped = " ".join(s.to_json() for s in cap.spans) + " ".join(map(str, cap.logs))
    assert secret not in dumped
    description = cap.span(f"query {name}").status.description
    assert "year > ?" in description
    message = cap.find_logs("retrieval failed")[0]["error_message"]
    assert "year > ?" in message
    assert description == f"MilvusException: {message}"


def test_unindexed_filter_field_warns_once_per_collection_and_field(
    client: MilvusClient,
) -> None:
    name = _make_collection(client, tag_index=True)
    instrument_milvus(client)
    with capture() as cap:
        for _ in range(3):
            client.search(name, data=[[0.1] * DIM], limit=2, filter='tag == "a" and year > 1')
            client.query(name, filter='id > 3 and year < 2020 and color == "red"', limit=1)
    warnings = cap.find_logs("unindexed filter field")
    assert sorted((w["field"], w["dynamic_field"]) for w in warnings) == [
        ("color", True),
        ("year", False),
    ]
    assert {w["db.collection.name"] for w in warnings} == {name}
    assert warnings[0]["filter"] == "tag == ? and year > ?"
    assert all(w["level"] == "warning" for w in warnings)


def test_instrumenting_is_idempotent_and_reversible(client: MilvusClient) -> None:
    name = _make_collection(client, rows=20)
    assert instrument_milvus(client) is client
    instrument_milvus(client)
    with capture() as cap:
        client.search(name, data=[[0.1] * DIM], limit=2)
    assert len([s for s in cap.spans if s.name == f"search {name}"]) == 1
    uninstrument_milvus(client)
    uninstrument_milvus(client)
    assert "search" not in vars(client)
    assert "drop_collection" not in vars(client)
    with capture() as cap:
        client.search(name, data=[[0.1] * DIM], limit=2)
    assert cap.spans == []


def test_uninstrument_restores_an_override_the_application_had(db_path: str) -> None:
    client = MilvusClient(db_path)
    canned = [[{"id": 1, "distance": 0.0}]]

    def override(*args: Any, **kwargs: Any) -> Any:
        return canned

    client.search = override  # type: ignore[method-assign]
    instrument_milvus(client)
    with capture() as cap:
        assert client.search("anything", data=[[0.0] * DIM], limit=1) is canned
    assert cap.span("search anything").attributes["rag.vector.result_count"] == 1
    uninstrument_milvus(client)
    assert client.search is override
    client.close()


def test_rejects_what_is_not_a_milvus_client() -> None:
    with pytest.raises(TypeError, match="MilvusClient"):
        instrument_milvus(object())


def test_disabled_passes_through(client: MilvusClient) -> None:
    name = _make_collection(client, rows=20)
    instrument_milvus(client)
    with capture(enabled=False) as cap:
        assert len(client.search(name, data=[[0.1] * DIM], limit=2)[0]) == 2
    assert cap.spans == []


def test_not_recording_still_counts_and_passes_through(client: MilvusClient) -> None:
    name = _make_collection(client, rows=20)
    instrument_milvus(client)
    with capture(sample_ratio=0.0) as cap:
        with ri.stage("retrieval"):
            hits = client.search(name, data=[[0.1] * DIM], limit=3)
    assert len(hits[0]) == 3
    assert cap.spans == []
    assert cap.find_logs("retrieval completed")[0]["breakdown"]["vector"]["count"] == 1


def test_vector_search_around_an_instrumented_client_counts_once(client: MilvusClient) -> None:
    name = _make_collection(client, rows=50)
    instrument_milvus(client)

    @ri.vector_search(db_system="milvus", index_type="IVF_FLAT", params={"nprobe": 4})
    def retrieve(data: list[list[float]], limit: int = 10) -> Any:
        return client.search(name, data=data, limit=limit, search_params={"params": {"nprobe": 4}})

    with capture() as cap:
        with ri.stage("retrieval"):
            hits = retrieve([[0.3] * DIM], limit=4)
    outer = cap.span(retrieve.__qualname__)
    inner = cap.span(f"search {name}")
    assert inner.parent is not None
    assert inner.parent.span_id == outer.context.span_id
    assert outer.attributes["rag.vector.result_count"] == len(hits[0]) == 4
    assert outer.attributes["rag.vector.top_k"] == 4
    (line,) = cap.find_logs("retrieval completed")
    assert line["breakdown"]["vector"]["count"] == 1


def test_sweep_ivf_nprobe_recall_rises_against_flat(client: MilvusClient) -> None:
    rng = random.Random(1234)
    vectors = [[rng.gauss(0, 1) for _ in range(16)] for _ in range(3000)]
    names = {}
    for index, extra in (("IVF_FLAT", {"nlist": 64}), ("FLAT", {})):
        name = f"sweep_{index.lower()}_{uuid.uuid4().hex[:6]}"
        schema = MilvusClient.create_schema(auto_id=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=16)
        params = client.prepare_index_params()
        params.add_index("vector", index_type=index, metric_type="L2", params=extra)
        client.create_collection(name, schema=schema, index_params=params)
        client.insert(name, [{"id": i, "vector": v} for i, v in enumerate(vectors)])
        client.flush(name)  # seal the segment: growing segments are searched exhaustively
        names[index] = name
    instrument_milvus(client)
    queries = [[rng.gauss(0, 1) for _ in range(16)] for _ in range(40)]

    def search(query: list[float], nprobe: int) -> Any:
        params = {"params": {"nprobe": nprobe}}
        return client.search(names["IVF_FLAT"], data=[query], limit=10, search_params=params)

    def exact(query: list[float]) -> list[int]:
        return [hit["id"] for hit in client.search(names["FLAT"], data=[query], limit=10)[0]]

    with capture() as cap:
        rows = ri.sweep(search, "nprobe", [1, 4, 16, 64], queries, ground_truth=exact, k=10)
    recalls = [row.recall for row in rows]
    assert recalls == sorted(recalls)
    assert recalls[0] < 0.5
    assert recalls[-1] > 0.95
    assert [row.value for row in rows] == [1, 4, 16, 64]
    assert all(row.p95_ms >= row.p50_ms > 0 and row.qps > 0 for row in rows)
    table = ri.format_table(rows)
    assert table.splitlines()[0].split() == ["nprobe", "p50", "ms", "p95", "ms", "qps", "recall@10"]
    nprobes = {s.attributes.get("rag.vector.params.nprobe") for s in cap.spans}
    assert {1, 4, 16, 64} <= nprobes


# --- async client ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_async_client_every_method_and_error(
    db_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sync = MilvusClient(db_path)
    name = _make_collection(sync, rows=60, hybrid=True)
    reads: list[str] = []
    real = AsyncMilvusClient.describe_collection

    async def counting(self: Any, collection_name: str, *a: Any, **k: Any) -> Any:
        reads.append(collection_name)
        return await real(self, collection_name, *a, **k)

    monkeypatch.setattr(AsyncMilvusClient, "describe_collection", counting)
    client = instrument_milvus(AsyncMilvusClient(db_path))
    rng = random.Random(11)
    row = {"id": 5000, "vector": _vec(rng), "sparse": _vec(rng), "tag": "z", "year": 3, "text": "t"}
    try:
        with capture() as cap:
            async with ri.stage("retrieval"):
                results = await asyncio.gather(
                    *(
                        client.search(
                            name,
                            data=[_vec(rng)],
                            anns_field="vector",
                            limit=3,
                            filter="year >= 2001",
                            search_params={"params": {"nprobe": 2}},
                        )
                        for _ in range(4)
                    )
                )
            await client.insert(name, [row])
            await client.upsert(name, [{**row, "tag": "w"}])
            await client.get(name, ids=[5000])
            await client.query(name, filter='tag == "w"', output_fields=["id"])
            await client.delete(name, ids=[5000])
            reqs = [AnnSearchRequest(data=[_vec(rng)], anns_field="vector", param={}, limit=3)]
            await client.hybrid_search(name, reqs, RRFRanker(), limit=2)
            with pytest.raises(MilvusException):
                await client.query("no_such_collection_async", filter="id > 0")
        assert reads.count(name) == 1  # four concurrent first searches, one read
        assert all(len(r[0]) == 3 for r in results)
        searches = [s for s in cap.spans if s.name == f"search {name}"]
        assert len(searches) == 4
        assert {s.attributes["rag.vector.index_type"] for s in searches} == {"IVF_FLAT"}
        assert {s.attributes["rag.vector.filter"] for s in searches} == {"year >= ?"}
        (line,) = cap.find_logs("retrieval completed")
        assert line["breakdown"]["vector"]["count"] == 4
        for operation in ("insert", "upsert", "get", "query", "delete", "hybrid_search"):
            assert cap.span(f"{operation} {name}").attributes["db.operation.name"] == operation
        failed = cap.span("query no_such_collection_async")
        assert failed.status.status_code is StatusCode.ERROR
        assert failed.attributes["error.type"] == "MilvusException"
        _nothing_stored_leaks(cap, [row["vector"]])  # type: ignore[list-item]
    finally:
        uninstrument_milvus(client)
        assert "search" not in vars(client)
        await client.close()
        sync.close()


# --- filter shapes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "shape", "fields"),
    [
        ('tag == "news" and year > 2010', "tag == ? and year > ?", ("tag", "year")),
        ("id in [1, 2, 3]", "id in [?]", ("id",)),
        ("price <= 9.99 or not (flag == true)", "price <= ? or not (flag == ?)", ("price", "flag")),
        ('meta["lang"] == "en"', 'meta["lang"] == ?', ("meta",)),
        ("ARRAY_CONTAINS(tags, 'x')", "ARRAY_CONTAINS(tags, ?)", ("tags",)),
        ("title like 'abc%'", "title like ?", ("title",)),
        ("age > {age}", "age > {age}", ("age",)),
        ('name == "it\\"s"', "name == ?", ("name",)),
        # a quote never closed, comments and backtick strings: their text is never shown
        ('email == "dana@example.com', "email == ?", ("email",)),
        ("email == 'dana@example.com", "email == ?", ("email",)),
        ('email == "x" /* dana@example.com */', "email == ? ?", ("email",)),
        ("email == 1 # dana@example.com", "email == ? ?", ("email",)),
        ("email == `dana@example.com`", "email == ?", ("email",)),
    ],
)
def test_filter_shape(expr: str, shape: str, fields: tuple[str, ...]) -> None:
    assert filter_shape(expr) == (shape, fields)


@given(
    st.text(alphabet=st.characters(blacklist_characters='"\\', codec="utf-8"), min_size=3),
    st.integers(min_value=10_000, max_value=10**12),
)
def test_filter_shape_never_shows_literal_values(text: str, number: int) -> None:
    shape, fields = filter_shape(f'body == "{text}" and n == {number} or k in ["{text}", 1]')
    assert text not in shape or text in "body == ? and n == ? or k in [?]"
    assert str(number) not in shape
    assert fields == ("body", "n", "k")


@pytest.mark.parametrize(
    "message",
    [
        'unterminated string literal at column 9\n  email == "dana@example.com',
        "cannot parse: email == 'x' /* dana@example.com */ and y",
        "cannot parse: email == `dana@example.com`",
        "invalid expression: a == 1 # dana@example.com",
        "invalid expression: a == 1 // dana@example.com",
    ],
)
def test_error_messages_hide_open_quotes_comments_and_backticks(message: str) -> None:
    from rag_instrument.integrations._milvus_expr import sanitize_error

    shown = sanitize_error(ValueError(message))
    assert shown is not None
    assert "dana@example.com" not in shown


def test_module_db_path_is_a_file(db_path: str) -> None:
    assert Path(db_path).exists()


def test_error_messages_keep_a_urls_double_slash() -> None:
    from rag_instrument.integrations._milvus_expr import sanitize_error

    assert sanitize_error(ValueError("cannot connect: http://milvus:19530/db")) == (
        "ValueError: cannot connect: http://milvus:?/db"
    )


def test_hybrid_search_over_fields_of_different_sizes_gives_each_size(
    client: MilvusClient,
) -> None:
    from pymilvus import AnnSearchRequest, RRFRanker

    name = f"c_{uuid.uuid4().hex[:10]}"
    schema = MilvusClient.create_schema(auto_id=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("dense", DataType.FLOAT_VECTOR, dim=8)
    schema.add_field("small", DataType.FLOAT_VECTOR, dim=4)
    params = client.prepare_index_params()
    params.add_index("dense", index_type="FLAT", metric_type="L2")
    params.add_index("small", index_type="FLAT", metric_type="IP")
    client.create_collection(name, schema=schema, index_params=params)
    client.insert(name, [{"id": i, "dense": [i / 20] * 8, "small": [i / 20] * 4} for i in range(20)])
    ri.instrument_milvus(client)
    requests = [
        AnnSearchRequest(data=[[0.5] * 8], anns_field="dense", param={}, limit=5),
        AnnSearchRequest(data=[[0.5] * 4], anns_field="small", param={}, limit=5),
    ]
    with capture() as cap:
        client.hybrid_search(name, requests, RRFRanker(), limit=3)
        client.hybrid_search(name, requests[:1], RRFRanker(), limit=3)
    first, second = (s.attributes for s in cap.spans)
    assert first["rag.vector.field"] == "dense,small"
    assert first["rag.vector.dimensions"] == "8,4"
    assert second["rag.vector.dimensions"] == 8
