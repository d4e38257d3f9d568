"""The demo's RAG application: a database, an embedder, a vector index and a model.

Written the way an application uses the library: SQLAlchemy ORM models (collections,
documents, chunks) instrumented with ``ri.instrument_sqlalchemy``, ingestion through an
``EMBEDDING`` stage, an in-process vector index, and a stand-in LLM behind ``RetryMixin``
and ``CacheMixin``. Two deliberate problems for the analysis to find: the reranker loads
each candidate's chunks one by one (an N+1 through the ``Document.chunks`` relationship),
and every tenth request runs a slow statistics query.

Without SQLAlchemy installed (``pip install 'rag_instrument[sqlalchemy]'``) the demo runs
without the database steps and says so.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import rag_instrument as ri
from rag_instrument import _breakdown

__all__ = [
    "DIMENSIONS",
    "Corpus",
    "InProcessIndex",
    "StandInLLM",
    "TransientError",
    "VectorIndex",
    "embed_texts",
    "open_corpus",
    "search",
]

DIMENSIONS = 64
#: The slow statement: a recursive count that takes 60 ms or more on any engine, well over
#: the demo's 25 ms slow-query threshold on a fast machine (200,000 rows took 24.6 ms).
SLOW_SQL = (
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 500000) "
    "SELECT count(*) FROM c"
)
_TOPICS = ("postgres", "milvus", "embeddings", "reranking", "caching", "budgets")


class TransientError(ConnectionError):
    """A stand-in for a 503 from the model API (retried by :class:`StandInLLM`)."""

    status_code = 503


class StandInLLM(ri.CacheMixin, ri.RetryMixin, ri.LLMProvider):
    """A local model with latency, token counts and an occasional transient fault."""

    system = "stand-in"
    model = "demo-llm"
    retry_attempts = 3
    retry_wait_min = 0.005
    retry_wait_max = 0.02
    timeout = 2.0

    def __init__(self, fault_rate: float, seed: int = 7) -> None:
        self._rng = random.Random(seed)  # noqa: S311 - simulated faults, not security
        self._fault_rate = fault_rate
        self._faulted: set[str] = set()

    async def _generate(self, prompt: str, **params: Any) -> ri.LLMResult:
        mean_ms = float(params.get("mean_ms", 40.0))
        await asyncio.sleep(max(1.0, self._rng.gauss(mean_ms, mean_ms / 4)) / 1000)
        # Transient: a prompt that failed once succeeds when retried.
        if prompt not in self._faulted and self._rng.random() < self._fault_rate:
            self._faulted.add(prompt)
            raise TransientError("model overloaded, try again")
        words = prompt.split()
        return ri.LLMResult(
            text=f"answer based on {len(words)} words",
            input_tokens=len(words),
            output_tokens=12,
            finish_reason="stop",
            model=self.model,
        )


def _vector(text: str) -> list[float]:
    """A deterministic bag-of-words embedding (hashed words), unit length."""
    vector = [0.0] * DIMENSIONS
    for word in text.lower().split():
        digest = hashlib.blake2b(word.encode(), digest_size=4).digest()
        vector[int.from_bytes(digest[:2], "big") % DIMENSIONS] += 1.0 if digest[2] & 1 else -1.0
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


@ri.stage(ri.PipelineStage.EMBEDDING)
async def embed_texts(texts: list[str], rng: random.Random) -> list[list[float]]:
    """Embed a batch of texts (a stand-in model: hashed words, with latency)."""
    ms = max(1.0, rng.gauss(3 + 0.2 * len(texts), 1))
    await asyncio.sleep(ms / 1000)
    _breakdown.record("embedding", ms)
    return [_vector(text) for text in texts]


class VectorIndex(Protocol):
    """What the demo needs from a vector store (``--milvus`` plugs in here)."""

    async def add(self, ids: list[int], vectors: list[list[float]]) -> None:
        """Store vectors under ids."""

    async def search(self, vector: list[float], k: int) -> list[int]:
        """The ids of the ``k`` nearest vectors."""

    def close(self) -> None:
        """Release what the index holds."""


class InProcessIndex:
    """Exact inner-product search over vectors kept in memory, with index latency."""

    def __init__(self, rng: random.Random) -> None:
        self._items: list[tuple[int, list[float]]] = []
        self._rng = rng

    async def add(self, ids: list[int], vectors: list[list[float]]) -> None:
        """Store vectors under ids."""
        self._items.extend(zip(ids, vectors, strict=True))

    async def search(self, vector: list[float], k: int) -> list[int]:
        """The ids of the ``k`` nearest vectors; one search in four hits a cold partition."""
        started = time.perf_counter()
        mean_ms = 70 if self._rng.random() < 0.25 else 18
        await asyncio.sleep(max(1.0, self._rng.gauss(mean_ms, 4)) / 1000)
        scored = sorted(
            self._items, key=lambda item: -sum(a * b for a, b in zip(vector, item[1], strict=True))
        )
        _breakdown.record("vector", (time.perf_counter() - started) * 1000.0)
        return [doc_id for doc_id, _ in scored[:k]]

    def close(self) -> None:
        """Nothing to release."""


@dataclass
class Corpus:
    """The database (when SQLAlchemy is there) and the vector index."""

    index: VectorIndex
    texts: dict[int, str]
    engine: Any = None
    models: dict[str, Any] = field(default_factory=dict)

    def close(self) -> None:
        """Close the index; drop the demo's tables on a shared database, dispose of it."""
        self.index.close()
        if self.engine is None:
            return
        if self.engine.dialect.name != "sqlite":
            self.models["base"].metadata.drop_all(self.engine)
        self.engine.dispose()


def _orm(prefix: str) -> dict[str, Any]:
    # Classic Column attributes: annotations would be resolved in this module's namespace,
    # where SQLAlchemy is not imported (it is an extra).
    from sqlalchemy import Column, ForeignKey, Integer, String, Text
    from sqlalchemy.orm import DeclarativeBase, relationship

    class Base(DeclarativeBase):
        pass

    collection = type(
        "Collection",
        (Base,),
        {
            "__tablename__": f"{prefix}collections",
            "id": Column(Integer, primary_key=True),
            "name": Column(String(100), nullable=False),
        },
    )
    document = type(
        "Document",
        (Base,),
        {
            "__tablename__": f"{prefix}documents",
            "id": Column(Integer, primary_key=True),
            "collection_id": Column(ForeignKey(f"{prefix}collections.id"), nullable=False),
            "title": Column(String(200), nullable=False),
            "collection": relationship(collection),
            # lazy="select": touching .chunks runs one SELECT per document (the N+1 path).
            "chunks": relationship("Chunk", back_populates="document", lazy="select"),
        },
    )
    chunk = type(
        "Chunk",
        (Base,),
        {
            "__tablename__": f"{prefix}chunks",
            "id": Column(Integer, primary_key=True),
            "document_id": Column(ForeignKey(f"{prefix}documents.id"), nullable=False),
            "text": Column(Text, nullable=False),
            "document": relationship(document, back_populates="chunks"),
        },
    )
    return {"base": Base, "collection": collection, "document": document, "chunk": chunk}


def _documents(count: int, rng: random.Random) -> list[tuple[int, str, str, list[str]]]:
    docs = []
    for i in range(count):
        topic = _TOPICS[i % len(_TOPICS)]
        title = f"Notes on {topic} #{i}"
        chunks = [
            f"{topic} {rng.choice(_TOPICS)} part {j} of document {i} about latency and {topic}"
            for j in range(3)
        ]
        docs.append((i + 1, title, topic, chunks))
    return docs


@ri.stage(ri.PipelineStage.INGESTION)
async def _ingest(
    corpus: Corpus, docs: list[tuple[int, str, str, list[str]]], rng: random.Random
) -> None:
    """Store the documents and their chunks, embed them in batches, index the vectors."""
    if corpus.engine is not None:
        from sqlalchemy import insert
        from sqlalchemy.orm import Session

        m = corpus.models
        topics = {t: i + 1 for i, t in enumerate(_TOPICS)}
        with Session(corpus.engine) as session, session.begin():
            # One executemany per table, not a statement per row.
            session.execute(
                insert(m["collection"]), [{"id": i, "name": t} for t, i in topics.items()]
            )
            session.execute(
                insert(m["document"]),
                [{"id": d[0], "title": d[1], "collection_id": topics[d[2]]} for d in docs],
            )
            session.execute(
                insert(m["chunk"]),
                [{"document_id": d[0], "text": c} for d in docs for c in d[3]],
            )
    for start in range(0, len(docs), 16):
        batch = docs[start : start + 16]
        vectors = await embed_texts([" ".join(d[3]) for d in batch], rng)
        await corpus.index.add([d[0] for d in batch], vectors)


async def open_corpus(
    database_url: str | None, documents: int, seed: int, index: VectorIndex | None = None
) -> Corpus:
    """Create the schema, ingest the documents; SQLite in memory unless a URL is given."""
    rng = random.Random(seed)  # noqa: S311 - simulated latency, not security
    docs = _documents(documents, rng)
    corpus = Corpus(index=index or InProcessIndex(rng), texts={d[0]: d[1] for d in docs})
    try:
        import sqlalchemy
    except ImportError:
        if database_url is not None:
            raise
    else:
        from sqlalchemy.pool import StaticPool

        if database_url is None:
            engine = sqlalchemy.create_engine(
                "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False}
            )
            prefix = "demo_"
        else:
            engine = sqlalchemy.create_engine(database_url)
            prefix = f"rag_demo_{seed}_{int(time.time() * 1000) % 10**8}_"
        corpus.engine = engine
        corpus.models = _orm(prefix)
        ri.instrument_sqlalchemy(engine, slow_query_ms=25.0, n_plus_one_threshold=5)
        corpus.models["base"].metadata.create_all(engine)
    await _ingest(corpus, docs, rng)
    return corpus


@ri.stage(ri.PipelineStage.QUERY_REWRITING)
async def _rewrite(question: str, llm: StandInLLM) -> str:
    await llm.generate(f"Rewrite as a search query: {question}", temperature=0, mean_ms=8)
    return question.lower().strip("?")


@ri.stage(ri.PipelineStage.RETRIEVAL, top_k=5)
async def _retrieve(query: str, corpus: Corpus, rng: random.Random, stats: bool) -> list[int]:
    (vector,) = await embed_texts([query], rng)
    ids = await corpus.index.search(vector, 5)
    if corpus.engine is not None:
        from sqlalchemy import select, text
        from sqlalchemy.orm import Session, selectinload

        m = corpus.models
        with Session(corpus.engine) as session:
            docs = session.scalars(
                select(m["document"])
                .where(m["document"].id.in_(ids))
                .options(selectinload(m["document"].collection))
            ).all()
            ids = [d.id for d in docs]
            if stats:  # the dashboard's statistics query, slow on purpose
                session.execute(text(SLOW_SQL)).scalar()
    return ids


@ri.stage(ri.PipelineStage.RERANKING)
async def _rerank(query: str, ids: list[int], corpus: Corpus, rng: random.Random) -> list[int]:
    await asyncio.sleep(max(1.0, rng.gauss(6, 1.5)) / 1000)
    scores = {i: hash((query, i)) for i in ids}
    if corpus.engine is not None:
        from sqlalchemy import select
        from sqlalchemy.orm import Session

        m = corpus.models
        with Session(corpus.engine) as session:
            docs = session.scalars(select(m["document"]).where(m["document"].id.in_(ids))).all()
            for doc in docs:  # the deliberate N+1: one lazy load of .chunks per document
                scores[doc.id] = sum(len(c.text) for c in doc.chunks) % 97
    return sorted(ids, key=lambda i: scores[i])[:3]


@ri.stage(ri.PipelineStage.GENERATION)
async def _generate(query: str, ids: list[int], corpus: Corpus, llm: StandInLLM) -> str:
    context = " ".join(corpus.texts.get(i, "") for i in ids)
    result = await llm.generate(f"Context: {context}\nQuestion: {query}", temperature=0)
    return result.text if isinstance(result, ri.LLMResult) else str(result)


@ri.stage(ri.PipelineStage.SEARCH)
async def search(
    question: str, request_id: str, seed: int, corpus: Corpus, llm: StandInLLM
) -> str:
    """One request through the whole pipeline."""
    rng = random.Random(seed)  # noqa: S311 - simulated latency, not security
    ri.bind_context(request_id=request_id)
    query = await _rewrite(question, llm)
    ids = await _retrieve(query, corpus, rng, stats=seed % 10 == 9)
    top = await _rerank(query, ids, corpus, rng)
    return await _generate(query, top, corpus, llm)
