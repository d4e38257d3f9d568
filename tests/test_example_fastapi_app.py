"""examples/fastapi_app: the example RAG service, end to end through httpx's ASGI transport."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from examples.fastapi_app.app import create_app

from rag_instrument.testing import Capture, capture

DOCS = [
    {"source": "pool.md", "text": "Connection pool exhaustion makes retrieval slow under load."},
    {"source": "hnsw.md", "text": "HNSW indexes trade recall for speed; tune ef_search."},
    {"source": "cache.md", "text": "Cache LLM answers for repeated questions to save tokens."},
]


async def _client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=transport, base_url="http://example") as client:
            yield client


@pytest_asyncio.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Capture]]:
    with capture() as cap:
        app = create_app(
            f"sqlite+aiosqlite:///{tmp_path / 'rag.db'}", llm_latency_ms=1, configure=False
        )
        async for client in _client(app):
            yield client, cap


async def _search_flow(client: httpx.AsyncClient, cap: Capture) -> None:
    assert (await client.get("/health")).json() == {"status": "ok"}
    ingest = await client.post("/api/ingest", json={"documents": DOCS})
    assert ingest.json() == {"ingested": 3}
    cap.clear()
    response = await client.post(
        "/api/search",
        json={"query": "why is retrieval slow?", "top_k": 2},
        headers={"x-request-id": "req-1"},
    )
    assert response.status_code == 200
    body = response.json()
    assert body["sources"][0] == "pool.md"
    assert response.headers["x-request-id"] == "req-1"
    timing = response.headers["server-timing"]
    for name in (
        "query_rewriting",
        "retrieval",
        "reranking",
        "generation",
        "search",
        "db",
        "llm",
        "total",
    ):
        assert f"{name};" in timing, (name, timing)

    names = [span.name for span in cap.spans]
    assert "POST /api/search" in names
    request_span = next(s for s in cap.spans if s.name == "POST /api/search")
    assert {s.context.trace_id for s in cap.spans} == {request_span.context.trace_id}
    (line,) = cap.find_logs("request completed")
    assert (line["method"], line["route"], line["status"]) == ("POST", "/api/search", 200)
    assert line["breakdown"]["llm"]["count"] == 2
    assert line["breakdown"]["db"]["count"] >= 1
    stages = [
        entry["context"]["pipeline_stage"]
        for entry in cap.logs
        if "pipeline_stage" in entry["context"]
    ]
    assert stages == [
        "query_rewriting",
        "embedding",
        "retrieval",
        "reranking",
        "generation",
        "search",
    ]
    assert all(
        entry["context"].get("request_id") == "req-1"
        for entry in cap.logs
        if entry["logger"] != "httpx"
    )


@pytest.mark.asyncio
async def test_search_runs_every_stage_in_one_trace(
    served: tuple[httpx.AsyncClient, Capture],
) -> None:
    client, cap = served
    await _search_flow(client, cap)


@pytest.mark.asyncio
async def test_health_is_traced_but_not_logged(served: tuple[httpx.AsyncClient, Capture]) -> None:
    client, cap = served
    cap.clear()  # the start-up's CREATE TABLE statements
    await client.get("/health")
    assert [s.name for s in cap.spans] == ["GET /health"]
    assert cap.find_logs("request completed") == []


@pytest.mark.asyncio
async def test_streamed_search_keeps_the_stage_open_until_the_last_token(
    served: tuple[httpx.AsyncClient, Capture],
) -> None:
    client, cap = served
    await client.post("/api/ingest", json={"documents": DOCS})
    cap.clear()
    response = await client.post("/api/search/stream", json={"query": "cache answers"})
    assert response.status_code == 200
    assert response.text.strip()
    search = cap.span("search")
    generation = cap.span("generation")
    assert generation.parent.span_id == search.context.span_id  # type: ignore[union-attr]
    request_span = cap.span("POST /api/search/stream")
    assert search.parent.span_id == request_span.context.span_id  # type: ignore[union-attr]
    # Headers go out before the stream: Server-Timing cannot list the streamed stages.
    assert "search;" not in response.headers["server-timing"]


@pytest.mark.asyncio
async def test_invalid_input_is_a_422_with_its_request_line(
    served: tuple[httpx.AsyncClient, Capture],
) -> None:
    client, cap = served
    response = await client.post("/api/search", json={"query": ""})
    assert response.status_code == 422
    (line,) = cap.find_logs("request completed")
    assert (line["route"], line["status"]) == ("/api/search", 422)


@pytest.mark.asyncio
async def test_uninstrumented_app_serves_the_same_answers(tmp_path: Path) -> None:
    app = create_app(
        f"sqlite+aiosqlite:///{tmp_path / 'plain.db'}",
        llm_latency_ms=1,
        configure=False,
        instrument=False,
    )
    async for client in _client(app):
        await client.post("/api/ingest", json={"documents": DOCS})
        response = await client.post("/api/search", json={"query": "why is retrieval slow?"})
        assert response.json()["sources"][0] == "pool.md"
        assert "server-timing" not in response.headers


@pytest.mark.asyncio
async def test_default_database_is_under_the_temporary_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    work, temp = tmp_path / "checkout", tmp_path / "tmp"
    work.mkdir()
    temp.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.delenv("RAG_EXAMPLE_DATABASE_URL", raising=False)
    app = create_app(llm_latency_ms=1, configure=False, instrument=False)
    async for client in _client(app):
        assert (await client.post("/api/ingest", json={"documents": DOCS})).json() == {
            "ingested": 3
        }
    assert (temp / "rag_instrument_example" / "rag_example.db").is_file()
    assert list(work.iterdir()) == []  # nothing written into the working directory


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_postgresql_by_url() -> None:
    from db.db_helpers import PG_ASYNC_URL, require_postgres, unique

    require_postgres()
    from examples.fastapi_app.app import documents_table
    from sqlalchemy.ext.asyncio import create_async_engine

    table = unique("rag_example")
    try:
        with capture() as cap:
            app = create_app(PG_ASYNC_URL, llm_latency_ms=1, configure=False, table_name=table)
            async for client in _client(app):
                await _search_flow(client, cap)
    finally:
        engine = create_async_engine(PG_ASYNC_URL)
        async with engine.begin() as conn:
            await conn.run_sync(documents_table(table).metadata.drop_all)
        await engine.dispose()


def test_the_stand_in_models_waits_stray_within_the_jitter_the_same_way_each_time() -> None:
    from examples.fastapi_app.app import FakeModel

    fixed = FakeModel(300)
    assert {fixed.wait_s() for _ in range(5)} == {0.3}
    first, second = FakeModel(300, jitter=0.5), FakeModel(300, jitter=0.5)
    waits = [first.wait_s() for _ in range(200)]
    assert all(0.15 <= wait <= 0.45 for wait in waits)
    assert min(waits) < 0.2  # spread over the range, not one value
    assert max(waits) > 0.4
    assert waits == [second.wait_s() for _ in range(200)]  # both servers of a load test


@pytest.mark.parametrize("jitter", ["1", "-0.1", "half"])
def test_an_unusable_jitter_is_refused_before_anything_is_configured(
    jitter: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import rag_instrument as ri

    configured: list[object] = []
    monkeypatch.setattr(ri, "configure", lambda *a, **kw: configured.append(kw))
    monkeypatch.setenv("RAG_EXAMPLE_LLM_JITTER", jitter)
    with pytest.raises(ValueError, match=r"(?i)jitter"):
        create_app(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    assert configured == []
