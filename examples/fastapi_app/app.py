"""A small RAG service on FastAPI, instrumented end to end with rag_instrument.

Routes:
    GET  /health             liveness (traced, kept out of the logs)
    POST /api/ingest         store documents: {"documents": [{"source": ..., "text": ...}]}
    POST /api/search         {"query": ..., "top_k": 3}: rewrite, retrieval, rerank, generation
    POST /api/search/stream  the same, the answer streamed token by token

Run it (SQLite by default; any SQLAlchemy async URL, e.g. PostgreSQL, by environment)::

    export RAG_EXAMPLE_DATABASE_URL=postgresql+asyncpg://localhost/test
    uvicorn examples.fastapi_app.app:create_app --factory

The "model" is a stand-in that waits ``RAG_EXAMPLE_LLM_MS`` milliseconds (default 20) per
call, like a remote LLM would (``RAG_EXAMPLE_LLM_JITTER=0.5``: each wait drawn between half
and one and a half times that); everything else (SQL, scoring) is real work.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import math
import os
import random
import re
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy import Column, Integer, MetaData, String, Table, Text, select
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import rag_instrument as ri
from rag_instrument import PipelineStage as S

__all__ = ["FakeModel", "create_app", "default_database_url", "documents_table", "embed"]

DIMENSIONS = 64
_WORD = re.compile(r"[a-z0-9]+")


def documents_table(name: str = "rag_example_documents") -> Table:
    """The documents table (its name is configurable so tests can share a database)."""
    return Table(
        name,
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("source", String(200), nullable=False),
        Column("text", Text, nullable=False),
        Column("embedding", Text, nullable=False),
        Column("terms", Text, nullable=False),
    )


class Document(BaseModel):
    """One document to ingest."""

    source: str = Field(max_length=200)
    text: str = Field(min_length=1, max_length=20_000)


class IngestRequest(BaseModel):
    """A batch of documents."""

    documents: list[Document] = Field(min_length=1, max_length=500)


class SearchRequest(BaseModel):
    """A question."""

    query: str = Field(min_length=1, max_length=2000)
    top_k: int = Field(default=3, ge=1, le=20)


class FakeModel(ri.LLMProvider):
    """A stand-in for a remote LLM: waits like one, answers from the prompt."""

    system = "example"
    model = "example-model"
    timeout = 10.0

    def __init__(self, latency_ms: float, jitter: float = 0.0, seed: int = 0) -> None:
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"llm jitter must be at least 0 and below 1, got {jitter!r}")
        self.latency_s = latency_ms / 1000.0
        self.jitter = jitter
        # The same waits, in order, in every server (a simulation, not a secret).
        self._random = random.Random(seed)  # noqa: S311

    def wait_s(self) -> float:
        """How long the next call waits: the latency, within +/- ``jitter`` of it."""
        if not self.jitter:
            return self.latency_s
        return self.latency_s * (1.0 + self.jitter * (2.0 * self._random.random() - 1.0))

    async def _generate(self, prompt: str, **params: Any) -> ri.LLMResult:
        await asyncio.sleep(self.wait_s())
        words = _WORD.findall(prompt.lower())
        text = " ".join(words[-24:]) or "no answer"
        return ri.LLMResult(text=text, input_tokens=len(words), output_tokens=min(len(words), 24))


def embed(text: str) -> list[float]:
    """A deterministic bag-of-words embedding (hashing trick), unit length."""
    vector = [0.0] * DIMENSIONS
    for word in _WORD.findall(text.lower()):
        digest = hashlib.blake2b(word.encode(), digest_size=2).digest()
        vector[int.from_bytes(digest, "big") % DIMENSIONS] += 1.0
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


def _fastapi(**kwargs: Any) -> FastAPI:
    # Newer FastAPI versions trace requests natively once a tracer provider exists; the
    # middleware's span is the request span here, so theirs is turned off.
    if "telemetry" in inspect.signature(FastAPI).parameters:
        kwargs["telemetry"] = {"tracing": False, "metrics": False}
    return FastAPI(**kwargs)


def default_database_url() -> str:
    """The default database: a SQLite file outside the checkout.

    ``rag_example.db`` in ``rag_instrument_example/`` under the system's temporary
    directory (``$TMPDIR``, usually ``/tmp``), created if needed.
    """
    directory = os.path.join(tempfile.gettempdir(), "rag_instrument_example")
    os.makedirs(directory, exist_ok=True)
    return "sqlite+aiosqlite:///" + os.path.join(directory, "rag_example.db")


def create_app(
    database_url: str | None = None,
    *,
    llm_latency_ms: float | None = None,
    llm_jitter: float | None = None,
    configure: bool = True,
    instrument: bool | None = None,
    table_name: str = "rag_example_documents",
) -> FastAPI:
    """Build the service.

    Args:
        database_url: a SQLAlchemy async URL (default ``RAG_EXAMPLE_DATABASE_URL``, else a
            SQLite file, :func:`default_database_url`).
        llm_latency_ms: the stand-in model's latency (default ``RAG_EXAMPLE_LLM_MS`` or 20).
        llm_jitter: how far each wait strays from it, as a fraction (0 to below 1; default
            ``RAG_EXAMPLE_LLM_JITTER`` or 0: every wait the same).
        configure: call ``ri.configure()`` (settings from ``RAG_INSTRUMENT_*``) at start-up.
        instrument: add the middleware and instrument the engine (default: on unless
            ``RAG_EXAMPLE_INSTRUMENT=0``); the load test compares both.
        table_name: the documents table.
    """
    documents = documents_table(table_name)
    url = database_url or os.environ.get("RAG_EXAMPLE_DATABASE_URL") or default_database_url()
    latency = (
        llm_latency_ms
        if llm_latency_ms is not None
        else float(os.environ.get("RAG_EXAMPLE_LLM_MS", "20"))
    )
    jitter = llm_jitter
    if jitter is None:
        raw = os.environ.get("RAG_EXAMPLE_LLM_JITTER") or "0"
        try:
            jitter = float(raw)
        except ValueError:
            raise ValueError(f"RAG_EXAMPLE_LLM_JITTER must be a number, got {raw!r}") from None
    if not 0.0 <= jitter < 1.0:  # before anything is configured
        raise ValueError(f"llm_jitter must be at least 0 and below 1, got {jitter!r}")
    if instrument is None:
        instrument = os.environ.get("RAG_EXAMPLE_INSTRUMENT", "1") != "0"
    if configure and instrument:
        ri.configure()
    elif configure:
        ri.configure(enabled=False)
    engine: AsyncEngine = create_async_engine(url)
    if instrument:
        ri.instrument_sqlalchemy(engine)
    model = FakeModel(latency, jitter)
    log = ri.get_logger("example.search")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with engine.begin() as conn:
            await conn.run_sync(documents.metadata.create_all)
        yield
        await engine.dispose()

    app = _fastapi(title="rag_instrument example", lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/api/ingest")
    @ri.stage(S.INGESTION)
    async def ingest(body: IngestRequest) -> dict[str, int]:
        rows = []
        with ri.stage(S.EMBEDDING, documents=len(body.documents)):
            for doc in body.documents:
                terms = " ".join(sorted(set(_WORD.findall(doc.text.lower()))))
                rows.append(
                    {
                        "source": doc.source,
                        "text": doc.text,
                        "embedding": orjson.dumps(embed(doc.text)).decode(),
                        "terms": terms,
                    }
                )
        async with engine.begin() as conn:
            await conn.execute(documents.insert(), rows)
        log.info("documents ingested", count=len(rows))
        return {"ingested": len(rows)}

    @ri.stage(S.QUERY_REWRITING)
    async def rewrite(query: str) -> str:
        result = await model.generate(f"Rewrite as a search query: {query}")
        text = result.text if isinstance(result, ri.LLMResult) else result
        return f"{query} {text}"

    @ri.stage(S.RETRIEVAL)
    async def retrieve(query: str, top_k: int) -> list[dict[str, Any]]:
        with ri.stage(S.EMBEDDING):
            query_vector = embed(query)
        words = sorted(set(_WORD.findall(query.lower())))[:8]
        statement = select(
            documents.c.id, documents.c.source, documents.c.text, documents.c.embedding
        )
        if words:
            statement = statement.where(
                documents.c.terms.contains(words[0]) | documents.c.terms.contains(words[-1])
            )
        async with engine.connect() as conn:
            rows = (await conn.execute(statement.limit(200))).mappings().all()
        scored = []
        for row in rows:
            vector = orjson.loads(row["embedding"])
            score = sum(a * b for a, b in zip(query_vector, vector, strict=True))
            scored.append(
                {"id": row["id"], "source": row["source"], "text": row["text"], "score": score}
            )
        scored.sort(key=lambda d: d["score"], reverse=True)
        return scored[: top_k * 3]

    @ri.stage(S.RERANKING)
    async def rerank(query: str, docs: list[dict[str, Any]], top_k: int) -> list[dict[str, Any]]:
        terms = set(_WORD.findall(query.lower()))
        for doc in docs:
            overlap = len(terms & set(_WORD.findall(doc["text"].lower())))
            doc["score"] = doc["score"] + 0.1 * overlap
        return sorted(docs, key=lambda d: d["score"], reverse=True)[:top_k]

    def prompt_for(query: str, docs: list[dict[str, Any]]) -> str:
        context = "\n".join(doc["text"][:500] for doc in docs)
        return f"Answer from the context.\n{context}\nQuestion: {query}"

    @app.post("/api/search")
    @ri.stage(S.SEARCH)
    async def search(body: SearchRequest) -> dict[str, Any]:
        query = await rewrite(body.query)
        docs = await rerank(query, await retrieve(query, body.top_k), body.top_k)
        with ri.stage(S.GENERATION):
            result = await model.generate(prompt_for(body.query, docs))
        answer = result.text if isinstance(result, ri.LLMResult) else result
        return {"answer": answer, "sources": [doc["source"] for doc in docs]}

    # The right pattern for a streamed answer: the stage decorates the generator that
    # StreamingResponse iterates, so it lasts until the last token is sent. Decorating the
    # endpoint instead would end the stage when the response object is returned.
    @ri.stage(S.SEARCH)
    async def answer_stream(body: SearchRequest) -> AsyncIterator[bytes]:
        query = await rewrite(body.query)
        docs = await rerank(query, await retrieve(query, body.top_k), body.top_k)
        with ri.stage(S.GENERATION):
            result = await model.generate(prompt_for(body.query, docs))
        answer = result.text if isinstance(result, ri.LLMResult) else result
        for token in answer.split():
            yield (token + " ").encode()

    @app.post("/api/search/stream")
    async def search_stream(body: SearchRequest) -> StreamingResponse:
        return StreamingResponse(answer_stream(body), media_type="text/plain")

    if instrument:
        app.add_middleware(ri.RequestMiddleware, quiet_paths=["/health"])
    return app
