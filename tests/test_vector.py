"""vector_search, embed_in_batches / aembed_in_batches, sweep and format_table."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.trace import StatusCode

import rag_instrument as ri
from rag_instrument._sweep import percentile, recall_at_k
from rag_instrument.testing import capture
from rag_instrument.vector import query_shape, result_count
from support.gc_cycles import library_garbage

# --- vector_search --------------------------------------------------------------------------


@ri.vector_search(db_system="qdrant", index_type="HNSW", metric="COSINE", params={"ef": 64})
def search(vectors: list[list[float]], limit: int = 10) -> list[list[int]]:
    return [list(range(min(limit, 3))) for _ in vectors]


@ri.vector_search(db_system="pgvector")
async def asearch(query: str, *, top_k: int = 5) -> list[dict[str, Any]]:
    await asyncio.sleep(0)
    return [{"id": i} for i in range(top_k)]


def test_sync_search_span_attributes_from_decorator_and_call() -> None:
    with capture() as cap:
        with ri.stage("retrieval"):
            hits = search([[0.1, 0.2, 0.3], [0.4123789, 0.5987321, 0.6]], limit=2)
    assert hits == [[0, 1], [0, 1]]
    attrs = dict(cap.span(search.__qualname__).attributes or {})
    assert attrs == {
        "db.system.name": "qdrant",
        "db.operation.name": "search",
        "openinference.span.kind": "RETRIEVER",
        "rag.vector.index_type": "HNSW",
        "rag.vector.metric": "COSINE",
        "rag.vector.params.ef": 64,
        "rag.vector.top_k": 2,
        "rag.vector.query_count": 2,
        "rag.vector.dimensions": 3,
        "rag.vector.result_count": 4,
    }
    (line,) = cap.find_logs("retrieval completed")
    assert line["breakdown"] == {"vector": {"count": 1, "ms": line["breakdown"]["vector"]["ms"]}}
    dumped = cap.span(search.__qualname__).to_json()
    # Values no timestamp or id can contain by chance (a bare "0.5" matched "…:50.5…Z").
    assert "4123789" not in dumped
    assert "5987321" not in dumped


def test_a_numpy_integer_top_k_is_recorded() -> None:
    numpy = pytest.importorskip("numpy")
    with capture() as cap:
        search([[1.0, 2.0]], numpy.int64(3))
    (span,) = [s for s in cap.spans if s.name == search.__qualname__]
    assert span.attributes["rag.vector.top_k"] == 3
    assert type(span.attributes["rag.vector.top_k"]) is int


def test_positional_limit_and_default_limit() -> None:
    with capture() as cap:
        search([[1.0, 2.0]], 1)
        search([[1.0, 2.0]])
    first, second = [s for s in cap.spans if s.name == search.__qualname__]
    assert first.attributes["rag.vector.top_k"] == 1
    assert first.attributes["rag.vector.result_count"] == 1
    assert second.attributes["rag.vector.top_k"] == 10
    assert second.attributes["rag.vector.query_count"] == 1


@pytest.mark.asyncio
async def test_async_search_with_text_query_and_top_k() -> None:
    with capture() as cap:
        async with ri.stage("retrieval"):
            hits = await asearch("cheap flights", top_k=4)
    assert len(hits) == 4
    attrs = dict(cap.span(asearch.__qualname__).attributes or {})
    assert attrs["rag.vector.top_k"] == 4
    assert attrs["rag.vector.query_count"] == 1
    assert attrs["rag.vector.result_count"] == 4
    assert "rag.vector.index_type" not in attrs
    assert "cheap flights" not in cap.span(asearch.__qualname__).to_json()
    assert cap.find_logs("retrieval completed")[0]["breakdown"]["vector"]["count"] == 1
    assert asyncio.iscoroutinefunction(asearch)


def test_method_and_metadata_are_kept() -> None:
    class Store:
        @ri.vector_search(db_system="faiss")
        def search(self, query_vector: list[float], top_k: int = 3) -> list[tuple[int, float]]:
            """Find neighbours."""
            return [(i, 0.5) for i in range(top_k)]

    with capture() as cap:
        assert len(Store().search([0.0] * 8, top_k=2)) == 2
    assert Store.search.__doc__ == "Find neighbours."
    attrs = cap.span(Store.search.__qualname__).attributes
    assert attrs["rag.vector.top_k"] == 2
    assert attrs["rag.vector.result_count"] == 2  # (id, score) tuples are hits, not a batch
    assert attrs["rag.vector.query_count"] == 1
    assert attrs["rag.vector.dimensions"] == 8


def test_exception_is_recorded_and_reraised_unchanged() -> None:
    boom = ConnectionError("store unreachable")

    @ri.vector_search(db_system="milvus")
    def failing(data: list[list[float]], limit: int = 3) -> list[Any]:
        raise boom

    with capture() as cap:
        with pytest.raises(ConnectionError) as info, ri.stage("retrieval"):
            failing([[0.1]])
    assert info.value is boom
    span = cap.span(failing.__qualname__)
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "ConnectionError"
    assert cap.find_logs("retrieval failed")[0]["breakdown"]["vector"]["count"] == 1


def test_nested_vector_searches_count_once_but_other_work_rolls_up() -> None:
    @ri.vector_search(db_system="inner")
    def inner(data: list[list[float]]) -> list[list[int]]:
        return [[1]]

    @ri.vector_search(db_system="outer")
    def outer(data: list[list[float]]) -> list[list[int]]:
        with ri.traced("lookup"):
            pass
        from rag_instrument import _breakdown

        _breakdown.record("db", 1.0)
        return inner(data)

    with capture() as cap:
        with ri.stage("retrieval"):
            outer([[0.0]])
    breakdown = cap.find_logs("retrieval completed")[0]["breakdown"]
    assert breakdown["vector"]["count"] == 1
    assert breakdown["db"]["count"] == 1
    inner_span = cap.span(inner.__qualname__)
    assert inner_span.parent.span_id == cap.span(outer.__qualname__).context.span_id


def test_searches_inside_a_stage_leave_nothing_for_the_garbage_collector() -> None:
    # An operation's frame once referred back to the operation: a reference cycle holding
    # the span and the breakdown until a collection.
    with capture():
        with ri.stage("retrieval"):
            search([[0.0]])  # first use: the library's caches are filled here
        with library_garbage() as garbage:
            for _ in range(3):
                with ri.stage("retrieval"):
                    search([[0.0]])
                    asyncio.run(asearch("q"))
                    with pytest.raises(TypeError):
                        search(None)  # type: ignore[arg-type]
    assert garbage == []


def test_disabled_is_a_pass_through() -> None:
    with capture(enabled=False) as cap:
        assert search([[1.0]], limit=1) == [[0]]
    assert cap.spans == []


def test_configuration_errors_name_the_culprit() -> None:
    with pytest.raises(ValueError, match="db_system"):
        ri.vector_search(db_system="")
    with pytest.raises(ValueError, match="params must be a mapping"):
        ri.vector_search(db_system="x", params=[("ef", 64)])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="index_type"):
        ri.vector_search(db_system="x", index_type=3)  # type: ignore[arg-type]

    def gen() -> Any:
        yield 1

    with pytest.raises(TypeError, match="generator"):
        ri.vector_search(db_system="x")(gen)


@given(
    st.integers(min_value=0, max_value=20),
    st.integers(min_value=1, max_value=16),
    st.integers(min_value=0, max_value=5),
)
def test_query_and_result_shapes(queries: int, dims: int, hits: int) -> None:
    batch = [[0.5] * dims for _ in range(queries)]
    count, dimensions, batched = query_shape(batch)
    assert count == queries
    assert batched is True
    if queries:
        assert dimensions == dims
        assert query_shape(batch[0]) == (1, dims, False)
    result = [list(range(hits)) for _ in range(queries)]
    assert result_count(result, batched) == queries * hits
    assert result_count(list(range(hits)), False) == hits


# --- embeddings in batches ------------------------------------------------------------------


def _embed(texts: list[str]) -> list[list[float]]:
    return [[float(len(t)), 1.0, 2.0] for t in texts]


def test_one_span_per_batch_in_input_order() -> None:
    texts = [f"text {'x' * i}" for i in range(10)]
    with capture() as cap:
        with ri.stage("ingestion"):
            vectors = ri.embed_in_batches(texts, _embed, batch_size=4)
    assert vectors == _embed(texts)
    spans = [s for s in cap.spans if s.name == "embedding batch"]
    assert [s.attributes["rag.embedding.batch.index"] for s in spans] == [0, 1, 2]
    assert [s.attributes["rag.embedding.batch.size"] for s in spans] == [4, 4, 2]
    assert {s.attributes["rag.embedding.batch.count"] for s in spans} == {3}
    assert {s.attributes["rag.embedding.dimensions"] for s in spans} == {3}
    assert {s.attributes["openinference.span.kind"] for s in spans} == {"EMBEDDING"}
    assert "text x" not in " ".join(s.to_json() for s in spans)
    breakdown = cap.find_logs("ingestion completed")[0]["breakdown"]
    assert breakdown["embedding"]["count"] == 3


def test_failing_batch_names_itself_and_what_was_embedded() -> None:
    original = RuntimeError("rate limited")

    def flaky(texts: list[str]) -> list[list[float]]:
        if "t5" in texts:
            raise original
        return _embed(texts)

    with capture() as cap:
        with pytest.raises(ri.EmbeddingBatchError) as info:
            ri.embed_in_batches([f"t{i}" for i in range(9)], flaky, batch_size=2)
    error = info.value
    assert error.__cause__ is original
    assert (error.batch_index, error.embedded, error.total, error.batch_count) == (2, 4, 9, 5)
    assert "batch 2" in str(error)
    assert "4 of 9" in str(error)
    failed = [s for s in cap.spans if s.name == "embedding batch"][-1]
    assert failed.status.status_code is StatusCode.ERROR


def test_wrong_number_of_embeddings_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="returned 1 embeddings for batch 0 of 2"):
        ri.embed_in_batches(["a", "b"], lambda texts: [[1.0]], batch_size=2)


def test_batch_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        ri.embed_in_batches(["a"], _embed, batch_size=0)


def test_instrumented_embedding_call_inside_a_batch_counts_once() -> None:
    from rag_instrument import _breakdown

    def embed(texts: list[str]) -> list[list[float]]:
        _breakdown.record("embedding", 1.0)  # what an instrumented SDK call reports
        return _embed(texts)

    with capture() as cap:
        with ri.stage("embedding"):
            ri.embed_in_batches(["a", "b", "c"], embed, batch_size=2)
    assert cap.find_logs("embedding completed")[0]["breakdown"]["embedding"]["count"] == 2


@pytest.mark.asyncio
async def test_async_batches_bounded_concurrency_in_order() -> None:
    in_flight = 0
    peak = 0
    release = asyncio.Event()

    async def embed(texts: list[str]) -> list[list[float]]:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        if peak >= 3:
            release.set()
        await release.wait()
        # Later batches finish first: order must still follow the input.
        await asyncio.sleep(0 if texts[0] > "t5" else 0.001)
        in_flight -= 1
        return _embed(texts)

    texts = [f"t{i}" + "x" * i for i in range(10)]
    with capture() as cap:
        async with ri.stage("ingestion"):
            vectors = await ri.aembed_in_batches(texts, embed, batch_size=2, concurrency=3)
    assert vectors == _embed(texts)
    assert peak == 3
    spans = [s for s in cap.spans if s.name == "embedding batch"]
    assert sorted(s.attributes["rag.embedding.batch.index"] for s in spans) == [0, 1, 2, 3, 4]
    assert cap.find_logs("ingestion completed")[0]["breakdown"]["embedding"]["count"] == 5


@pytest.mark.asyncio
async def test_async_failure_cancels_the_rest_and_names_the_batch() -> None:
    original = ValueError("bad input")
    cancelled: list[int] = []
    started = asyncio.Event()

    async def embed(texts: list[str]) -> list[list[float]]:
        index = int(texts[0][1:]) // 2
        if index == 0:
            return _embed(texts)
        if index == 1:
            await started.wait()
            raise original
        try:
            started.set()
            await asyncio.Event().wait()  # never finishes on its own
        except asyncio.CancelledError:
            cancelled.append(index)
            raise
        return []

    with capture():
        with pytest.raises(ri.EmbeddingBatchError) as info:
            await ri.aembed_in_batches(
                [f"t{i}" for i in range(6)], embed, batch_size=2, concurrency=3
            )
    assert info.value.__cause__ is original
    assert info.value.batch_index == 1
    assert info.value.embedded == 2
    assert cancelled == [2]


@pytest.mark.asyncio
async def test_async_sequential_failure() -> None:
    async def embed(texts: list[str]) -> list[list[float]]:
        raise KeyError(texts[0])

    with pytest.raises(ri.EmbeddingBatchError) as info:
        await ri.aembed_in_batches(["a", "b"], embed, batch_size=1)
    assert isinstance(info.value.__cause__, KeyError)
    assert (info.value.batch_index, info.value.embedded) == (0, 0)
    with pytest.raises(ValueError, match="concurrency"):
        await ri.aembed_in_batches(["a"], embed, concurrency=0)


# --- sweeps -------------------------------------------------------------------------------


class _Clock:
    """A fake index: the first ``nprobe`` of the exact ten neighbours are found."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, query: int, *, nprobe: int) -> list[dict[str, int]]:
        self.calls.append(nprobe)
        exact = [query * 100 + i for i in range(10)]
        found = exact[: min(10, nprobe)] + [-1] * (10 - min(10, nprobe))
        return [{"id": i} for i in found]


def test_sweep_rows_and_recall_against_a_list() -> None:
    index = _Clock()
    queries = [1, 2, 3]
    truth = [[q * 100 + i for i in range(10)] for q in queries]
    rows = ri.sweep(index, "nprobe", [1, 5, 10], queries, ground_truth=truth, k=10)
    assert [r.value for r in rows] == [1, 5, 10]
    assert [r.recall for r in rows] == pytest.approx([0.1, 0.5, 1.0])
    assert all(r.queries == 3 and r.k == 10 and r.param == "nprobe" for r in rows)
    assert all(0 < r.p50_ms <= r.p95_ms and r.qps > 0 for r in rows)
    assert index.calls == [1] * 4 + [5] * 4 + [10] * 4  # one warm-up search per value


def test_sweep_with_callable_ground_truth_and_batch_shaped_hits() -> None:
    def searcher(query: int, ef: int) -> list[list[tuple[int, float]]]:
        return [[(i, 0.0) for i in range(ef)]]

    calls: list[int] = []

    def exact(query: int) -> list[int]:
        calls.append(query)
        return list(range(4))

    rows = ri.sweep(searcher, "ef", [2, 4], [7, 8], ground_truth=exact, k=4, warmup=0)
    assert [r.recall for r in rows] == [0.5, 1.0]
    assert calls == [7, 8]  # once per query, not per value


def test_sweep_validation() -> None:
    with pytest.raises(ValueError, match="ground_truth has 1 entries for 2 queries"):
        ri.sweep(_Clock(), "nprobe", [1], [1, 2], ground_truth=[[1]])
    with pytest.raises(ValueError, match="values"):
        ri.sweep(_Clock(), "nprobe", [], [1], ground_truth=[[1]])
    with pytest.raises(ValueError, match="queries"):
        ri.sweep(_Clock(), "nprobe", [1], [], ground_truth=[])
    with pytest.raises(ValueError, match="k must"):
        ri.sweep(_Clock(), "nprobe", [1], [1], ground_truth=[[1]], k=0)
    with pytest.raises(ValueError, match="param"):
        ri.sweep(_Clock(), "", [1], [1], ground_truth=[[1]])
    with pytest.raises(ValueError, match="search must be a function"):
        ri.sweep(None, "nprobe", [1], [1], ground_truth=[[1]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ground_truth must be"):
        ri.sweep(_Clock(), "nprobe", [1], [1], ground_truth=5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="an entry is not a list of ids"):
        ri.sweep(_Clock(), "nprobe", [1], [1, 2], ground_truth=["0123456789", "abc"])
    with pytest.raises(TypeError, match="must return the ids"):
        ri.sweep(lambda q, **p: None, "nprobe", [1], [1], ground_truth=[[1]])


@pytest.mark.parametrize("target", [1.5, -0.1, 0.0, float("nan"), "x", True])
def test_format_table_refuses_a_target_recall_that_is_not_one(target: Any) -> None:
    rows = [ri.SweepRow("nprobe", 1, 0.5, 0.9, 2000.0, 0.42, 10, 50)]
    with pytest.raises(ValueError, match="target_recall"):
        ri.format_table(rows, target_recall=target)


def test_format_table_marks_the_fastest_value_reaching_the_target() -> None:
    rows = [
        ri.SweepRow("nprobe", 1, 0.5, 0.9, 2000.0, 0.42, 10, 50),
        ri.SweepRow("nprobe", 16, 1.5, 2.0, 650.0, 0.96, 10, 50),
        ri.SweepRow("nprobe", 64, 4.0, 5.0, 250.0, 1.0, 10, 50),
    ]
    table = ri.format_table(rows)
    lines = table.splitlines()
    assert lines[0].split() == ["nprobe", "p50", "ms", "p95", "ms", "qps", "recall@10"]
    assert lines[2].split() == ["1", "0.500", "0.900", "2000.0", "0.420"]
    assert lines[-1] == "fastest nprobe reaching recall@10 >= 0.95: 16 (p50 1.500 ms)"
    assert len({len(line) for line in lines[:5]}) <= 2  # aligned columns
    assert ri.format_table([r.as_dict() for r in rows]) == table
    assert "no nprobe value" in ri.format_table(rows[:1])
    assert ri.format_table([]) == "(no rows)"


@settings(max_examples=50)
@given(st.lists(st.floats(min_value=0, max_value=1e6), min_size=1, max_size=50))
def test_percentile_is_within_the_data(values: list[float]) -> None:
    ordered = sorted(values)
    for q in (0, 50, 95, 100):
        p = percentile(ordered, q)
        assert ordered[0] <= p <= ordered[-1] or math.isclose(p, ordered[0])
    assert percentile(ordered, 0) == ordered[0]
    assert percentile(ordered, 100) == ordered[-1]


@given(st.lists(st.integers(0, 30), unique=True), st.lists(st.integers(0, 30), unique=True))
def test_recall_at_k_bounds(found: list[int], exact: list[int]) -> None:
    value = recall_at_k(found, exact, 10)
    assert 0.0 <= value <= 1.0
    assert recall_at_k(exact, exact, 10) == 1.0


def test_not_recording_spans_still_pass_results_through() -> None:
    with capture(sample_ratio=0.0) as cap:
        with ri.stage("retrieval"):
            assert search([[1.0, 2.0]], limit=2) == [[0, 1]]
            assert ri.embed_in_batches(["a", "b"], _embed, batch_size=1) == _embed(["a", "b"])
    assert cap.spans == []
    breakdown = cap.find_logs("retrieval completed")[0]["breakdown"]
    assert breakdown["vector"]["count"] == 1
    assert breakdown["embedding"]["count"] == 2


def test_openai_embeddings_inside_a_batch_count_once_as_embedding() -> None:
    openai = pytest.importorskip("openai")
    from support.fake_llm import FakeLLMServer

    with FakeLLMServer() as server:
        client = ri.instrument_openai(
            openai.OpenAI(api_key="sk-test", base_url=server.openai_base_url, max_retries=0)
        )

        def embed(texts: list[str]) -> list[list[float]]:
            reply = client.embeddings.create(model="text-embedding-3-small", input=texts)
            return [item.embedding for item in reply.data]

        try:
            with capture() as cap:
                with ri.stage("embedding"):
                    vectors = ri.embed_in_batches(["a", "b", "c"], embed, batch_size=2)
        finally:
            client.close()
    assert len(vectors) == 3
    batches = [s for s in cap.spans if s.name == "embedding batch"]
    sdk = [s for s in cap.spans if s.name == "embeddings text-embedding-3-small"]
    assert len(batches) == len(sdk) == 2
    assert {s.parent.span_id for s in sdk} == {s.context.span_id for s in batches}
    breakdown = cap.find_logs("embedding completed")[0]["breakdown"]
    assert breakdown["embedding"]["count"] == 2
    assert "llm" not in breakdown


def test_search_params_of_any_kind_are_attributes_as_reliability_23_says() -> None:
    # None left out; a dict or a mixed list as its JSON text; never an error at decoration.
    @ri.vector_search(
        db_system="milvus",
        params={"ef": None, "filters": {"lang": "en"}, "mix": [1, "a"], "nprobe": 16},
    )
    def search(query: list[float], limit: int = 3) -> list[list[int]]:
        return [[1, 2]]

    with capture() as cap:
        assert search([0.1], limit=3) == [[1, 2]]
    attributes = cap.spans[0].attributes
    assert "rag.vector.params.ef" not in attributes
    assert attributes["rag.vector.params.filters"] == '{"lang":"en"}'
    assert attributes["rag.vector.params.mix"] == '[1,"a"]'
    assert attributes["rag.vector.params.nprobe"] == 16


@pytest.mark.parametrize("as_callable", [False, True])
def test_sweep_ground_truth_may_be_hits_like_the_searchs(as_callable: bool) -> None:
    # A FLAT search as the ground truth returns hits, as the search does: read them alike.
    exact = {"q1": [{"id": 1, "distance": 0.1}, {"id": 2, "distance": 0.2}]}

    def search(query: str, nprobe: int) -> list[dict[str, Any]]:
        return [{"id": 1, "distance": 0.1}, {"id": 9, "distance": 0.3}]

    truth: Any = (lambda q: exact[q]) if as_callable else [exact["q1"]]
    (row,) = ri.sweep(search, "nprobe", [4], ["q1"], ground_truth=truth, k=2)
    assert row.recall == 0.5
