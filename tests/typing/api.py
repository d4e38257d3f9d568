"""Type-checked usage of the public API (``mypy`` checks this file; it is never run).

If a decorator loses a signature or a return type, mypy fails here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import rag_instrument as ri


@ri.stage(ri.PipelineStage.RETRIEVAL, top_k=5)
def retrieve(query: str, k: int = 5) -> list[str]:
    return [query] * k


@ri.stage("generation")
async def generate(prompt: str) -> str:
    return prompt


@ri.stage("generation")
def stream(n: int) -> Iterator[int]:
    yield from range(n)


@ri.stage("generation")
async def astream(n: int) -> AsyncIterator[int]:
    for i in range(n):
        yield i


@ri.traced
def helper(x: int) -> int:
    return x


@ri.traced("named")
def named(x: int) -> int:
    return x


@ri.stage(stage="retrieval", name="my-index")
def keyword_stage(x: int) -> int:
    return x


@ri.traced(name="keyword")
def keyword_traced(x: int) -> int:
    return x


async def use() -> None:
    docs: list[str] = retrieve("q", k=2)
    text: str = await generate("p")
    numbers: list[int] = list(stream(3))
    async for value in astream(2):
        numbers.append(value)
    total: int = helper(1) + named(2) + keyword_stage(3) + keyword_traced(4)
    with ri.pipeline_stage_context("reranking") as span:
        span.set_attribute("docs", len(docs))
    async with ri.stage("search"):
        pass
    with ri.stage("retrieval", name="my-index"), ri.stage(stage="reranking", top_k=3):
        pass
    with ri.pipeline_stage_context(stage=ri.PipelineStage.GENERATION, name="granite"):
        pass
    with ri.traced(name="lookup"), ri.traced("fetch", name="my-index"):
        pass
    settings: ri.Settings = ri.configure(service_name="svc", budgets={"search": 2000})
    ri.bind_context(request_id="r-1")
    with ri.request_context(user="u"):
        ri.get_logger(__name__).info("done", text=text, total=total, ratio=settings.sample_ratio)
    ri.unbind_context("request_id")
    flushed: bool = ri.force_flush(timeout=1.0) and ri.shutdown(timeout=1.0)
    del flushed
    watch: ri.EventLoopWatch = ri.watch_event_loop(100)
    with ri.profile("block", top=5, sort="tottime", memory=True, save_to="x.prof"):
        watch.stop()
    async with ri.profile():
        pass
    profiled_total: int = profiled(3)
    del profiled_total


@ri.profile
def bare_profiled(x: int) -> int:
    return x


@ri.profile(top=5)
def profiled(x: int) -> int:
    return x


def runtime_accessor() -> None:
    runtime: ri.Runtime = ri.get_runtime()
    configured: bool = ri.is_configured()
    settings: ri.Settings = runtime.settings
    ms: float = settings.slow_query_ms
    assert configured is runtime.configured
    assert ms >= 0


@ri.vector_search(db_system="milvus", index_type="HNSW", metric="COSINE", params={"ef": 64})
def vector_lookup(data: list[list[float]], limit: int = 10) -> list[list[int]]:
    return [[0] * limit for _ in data]


@ri.vector_search(db_system="pgvector")
async def avector_lookup(query: str, top_k: int = 5) -> list[str]:
    return [query] * top_k


async def retrieval() -> None:
    hits: list[list[int]] = vector_lookup([[0.1, 0.2]], limit=3)
    texts: list[str] = await avector_lookup("q", top_k=2)
    vectors: list[list[float]] = ri.embed_in_batches(["a", "b"], lambda b: [[1.0]] * len(b))

    async def embed(batch: list[str]) -> list[list[float]]:
        return [[float(len(t))] for t in batch]

    more: list[list[float]] = await ri.aembed_in_batches(["c"], embed, concurrency=2)
    rows: list[ri.SweepRow] = ri.sweep(
        lambda q, nprobe: [1], "nprobe", [1, 2], [[0.0]], ground_truth=[[1]], k=1
    )
    table: str = ri.format_table(rows)
    del hits, texts, vectors, more, table


async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
    return None


def use_web() -> None:
    app = ri.RequestMiddleware(asgi_app, server_timing=False, quiet_paths=["/health"])
    headers: dict[str, str] = ri.inject_headers()
    kept: dict[str, str] = ri.inject_headers({"accept": "*/*"})
    ctx = ri.extract_context(headers)
    work = ri.wrap_context(len)
    size: int = work("abc")
    del app, kept, ctx, size


def use_web_frameworks() -> None:
    from fastapi import FastAPI
    from starlette.applications import Starlette

    api = FastAPI()
    api.add_middleware(ri.RequestMiddleware, quiet_paths=["/health"])
    wrapped = ri.RequestMiddleware(Starlette(), exclude_paths=["/static/*"])
    del wrapped
