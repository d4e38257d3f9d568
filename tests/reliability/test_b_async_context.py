"""B. Async, threads, context (RELIABILITY.md B9-B16)."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.trace import StatusCode

import rag_instrument as ri
from rag_instrument._context import current_frame
from rag_instrument.testing import Capture


@pytest.mark.asyncio
async def test_b09_consumer_breaks_after_two_items(
    rag_capture: Capture, caplog: pytest.LogCaptureFixture
) -> None:
    @ri.stage("generation")
    async def stream() -> AsyncIterator[int]:
        for i in range(10):
            yield i

    before = trace.get_current_span()
    with caplog.at_level(logging.ERROR):
        gen = stream()
        async for item in gen:
            if item == 1:
                break
        await gen.aclose()
    assert trace.get_current_span() is before
    assert current_frame() is None
    (span,) = rag_capture.spans
    assert span.status.status_code is StatusCode.UNSET
    assert span.attributes["rag.stream.items"] == 2
    assert span.attributes["rag.stream.completed"] is False
    assert not [r for r in caplog.records if "Failed to detach" in r.getMessage()]


@pytest.mark.asyncio
async def test_b10_generator_abandoned_and_finalised_elsewhere(
    rag_capture: Capture, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[Any] = []

    @ri.stage("generation")
    async def stream() -> AsyncIterator[int]:
        try:
            for i in range(10):
                yield i
        finally:
            seen.append(ri.get_logger)  # runs; must not run under another request's values

    async def owner() -> Any:
        with ri.request_context(request_id="owner"):
            gen = stream()
            await gen.__anext__()
            return gen

    gen = await owner()

    async def other() -> None:
        with ri.request_context(request_id="other"):
            await gen.aclose()

    with caplog.at_level(logging.ERROR):
        await asyncio.create_task(other())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [s.name for s in rag_capture.spans] == ["generation"]
    (line,) = rag_capture.find_logs("generation completed")
    assert line["context"].get("request_id") == "owner"


def test_b11_close_is_unset_and_throw_is_error(rag_capture: Capture) -> None:
    @ri.stage("generation")
    def stream() -> Iterator[int]:
        yield from range(5)

    gen = stream()
    next(gen)
    gen.close()
    gen2 = stream()
    next(gen2)
    with pytest.raises(ValueError):
        gen2.throw(ValueError("boom"))
    first, second = rag_capture.spans
    assert first.status.status_code is StatusCode.UNSET
    assert second.status.status_code is StatusCode.ERROR


@pytest.mark.asyncio
async def test_b12_timeouts_reach_the_caller_and_mark_cancelled(rag_capture: Capture) -> None:
    @ri.stage("retrieval")
    async def slow() -> None:
        await asyncio.sleep(10)

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(slow(), 0.05)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await slow()
    with pytest.raises(ExceptionGroup):
        async with asyncio.TaskGroup() as group:
            group.create_task(slow())
            group.create_task(_fail())
    spans = rag_capture.spans
    assert len(spans) == 3
    assert all(s.attributes.get("rag.cancelled") is True for s in spans)


async def _fail() -> None:
    await asyncio.sleep(0.01)
    raise ValueError("sibling failed")


@pytest.mark.asyncio
async def test_b13_two_hundred_tasks_keep_their_own_context(rag_capture: Capture) -> None:
    @ri.stage("retrieval")
    async def child(i: int) -> None:
        await asyncio.sleep(0)
        ri.get_logger().info("inside", i=i)

    async def request(i: int) -> None:
        with ri.request_context(request_id=f"r-{i}"), ri.stage("search"):
            await asyncio.sleep(0)
            await child(i)

    await asyncio.gather(*(request(i) for i in range(200)))
    assert current_frame() is None
    for line in rag_capture.find_logs("inside"):
        assert line["context"]["request_id"] == f"r-{line['i']}"
    parents = {s.context.span_id: s for s in rag_capture.spans if s.name == "search"}
    for span in rag_capture.spans:
        if span.name == "retrieval":
            assert span.parent is not None
            assert span.parent.span_id in parents
            assert span.context.trace_id == parents[span.parent.span_id].context.trace_id


@pytest.mark.asyncio
async def test_b14_executors_and_threads_are_parented_and_reused_threads_clean(
    rag_capture: Capture,
) -> None:
    def work(tag: str) -> dict[str, Any]:
        with ri.stage("reranking"):
            pass
        return {"frame": current_frame(), "tag": tag}

    with ri.request_context(request_id="r-1"), ri.stage("search"):
        with ThreadPoolExecutor(max_workers=1) as pool:
            first = await asyncio.get_running_loop().run_in_executor(
                pool, ri.wrap_context(work), "a"
            )
            second = pool.submit(work, "b").result()  # reused thread, no propagation
        third = await asyncio.to_thread(ri.wrap_context(work), "c")
    assert first["frame"] is not None  # the caller's stage, carried over
    assert first["frame"].name == "search"
    assert second["frame"] is None  # the same worker thread afterwards: nothing left over
    assert third["frame"] is not None
    search = next(s for s in rag_capture.spans if s.name == "search")
    reranks = [s for s in rag_capture.spans if s.name == "reranking"]
    parented = [s for s in reranks if s.parent and s.parent.span_id == search.context.span_id]
    assert len(parented) == 2  # the wrapped ones; the plain submit starts its own trace
    lines = rag_capture.find_logs("reranking completed")
    assert sorted(line["context"].get("request_id", "-") for line in lines) == ["-", "r-1", "r-1"]


def test_b15_streaming_response_span_lasts_until_the_last_chunk(rag_capture: Capture) -> None:
    fastapi = pytest.importorskip("fastapi")
    from fastapi.responses import StreamingResponse
    from fastapi.testclient import TestClient

    @ri.stage("generation")
    def chunks() -> Iterator[str]:
        for i in range(3):
            with ri.traced("chunk"):
                yield f"c{i}"

    app = fastapi.FastAPI()
    app.get("/s")(lambda: StreamingResponse(chunks()))
    assert TestClient(app).get("/s").text == "c0c1c2"
    generation = rag_capture.span("generation")
    for span in rag_capture.spans:
        if span.name == "chunk":
            assert span.context.trace_id == generation.context.trace_id
            assert span.end_time <= generation.end_time


def test_b16_a_dropped_stream_still_ends_its_span(rag_capture: Capture) -> None:
    @ri.stage("generation")
    def stream() -> Iterator[int]:
        yield from range(5)

    gen = stream()
    next(gen)
    del gen
    gc.collect()
    assert [s.name for s in rag_capture.spans] == ["generation"]
    assert current_frame() is None
    assert threading.active_count() >= 1
