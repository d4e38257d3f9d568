"""Stages on every function kind: spans, lines, exceptions, generators, cancellation, context."""

from __future__ import annotations

import asyncio
import functools
import gc
import inspect
import json
import logging
import traceback
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.trace import StatusCode

import rag_instrument as ri
from rag_instrument.testing import Capture, capture


def _completed(cap: Capture, stage_name: str) -> list[dict[str, Any]]:
    return cap.find_logs(f"{stage_name} completed")


# --- transparency ---------------------------------------------------------------------------


def plain(a: int, b: int = 2) -> int:
    """Add."""
    return a + b


async def coro(a: int, b: int = 2) -> int:
    """Add later."""
    await asyncio.sleep(0)
    return a + b


def gen(n: int) -> Iterator[int]:
    """Count."""
    yield from range(n)


async def agen(n: int) -> AsyncIterator[int]:
    """Count later."""
    for i in range(n):
        await asyncio.sleep(0)
        yield i


@pytest.mark.parametrize("fn", [plain, coro, gen, agen])
def test_decorator_keeps_metadata_and_kind(fn: Any) -> None:
    wrapped = ri.stage("retrieval")(fn)
    assert wrapped.__name__ == fn.__name__
    assert wrapped.__qualname__ == fn.__qualname__
    assert wrapped.__doc__ == fn.__doc__
    assert wrapped.__wrapped__ is fn
    assert inspect.signature(wrapped) == inspect.signature(fn)
    for check in (
        inspect.iscoroutinefunction,
        inspect.isgeneratorfunction,
        inspect.isasyncgenfunction,
    ):
        assert check(wrapped) == check(fn)


def test_return_value_is_the_same_object() -> None:
    sentinel = object()
    wrapped = ri.stage("retrieval")(lambda: sentinel)
    with capture():
        assert wrapped() is sentinel


def test_sync_stage_span_and_line(rag_capture: Capture) -> None:
    @ri.stage(ri.PipelineStage.RETRIEVAL, top_k=5)
    def retrieve() -> list[str]:
        return ["a"]

    with ri.request_context(request_id="r-1"):
        assert retrieve() == ["a"]
    span = rag_capture.span("retrieval")
    assert span.attributes is not None
    assert span.attributes["rag.stage"] == "retrieval"
    assert span.attributes["openinference.span.kind"] == "RETRIEVER"
    assert span.attributes["top_k"] == 5
    assert span.attributes["request_id"] == "r-1"
    assert span.status.status_code is StatusCode.UNSET
    (line,) = _completed(rag_capture, "retrieval")
    assert line["level"] == "info"
    assert line["logger"] == "rag_instrument"
    assert line["context"] == {"pipeline_stage": "retrieval", "request_id": "r-1"}
    assert line["trace_id"] == format(span.context.trace_id, "032x")
    assert line["span_id"] == format(span.context.span_id, "016x")
    assert span.end_time is not None
    assert span.start_time is not None
    duration_ms = (span.end_time - span.start_time) / 1e6
    assert line["execution_time_ms"] == pytest.approx(duration_ms, abs=1.0)


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("retrieval", "RETRIEVER"),
        ("reranking", "RERANKER"),
        ("embedding", "EMBEDDING"),
        ("generation", "LLM"),
        ("query_rewriting", "CHAIN"),
        ("search", "CHAIN"),
        ("my_custom_step", "CHAIN"),
    ],
)
def test_openinference_span_kind(name: str, kind: str, rag_capture: Capture) -> None:
    with ri.pipeline_stage_context(name):
        pass
    attributes = rag_capture.span(name).attributes
    assert attributes is not None
    assert attributes["openinference.span.kind"] == kind


def test_pipeline_stage_enum_values() -> None:
    assert [s.value for s in ri.PipelineStage] == [
        "query_rewriting",
        "embedding",
        "retrieval",
        "reranking",
        "generation",
        "chain_of_thought",
        "ingestion",
        "search",
    ]
    assert isinstance(ri.PipelineStage.SEARCH, str)


def test_bad_stage_names_fail_at_decoration() -> None:
    with pytest.raises(TypeError, match="str or PipelineStage"):
        ri.stage(42)(plain)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must not be empty"):
        ri.stage("  ")(plain)
    with pytest.raises(ValueError, match="must not be empty"):
        ri.traced("")(plain)
    with pytest.raises(TypeError, match="not callable"):
        ri.stage("x")(3)  # type: ignore[type-var]


def test_name_keyword_is_an_attribute_not_the_stage(rag_capture: Capture) -> None:
    # The stage is positional-only: ``name=`` (or any keyword) is a span attribute.
    with ri.stage("retrieval", name="my-index", stage="x"):
        pass
    with ri.pipeline_stage_context("reranking", name="cross-encoder"):
        pass

    @ri.stage("generation", name="granite")
    def generate() -> str:
        return "ok"

    assert generate() == "ok"
    for stage_name, attribute in [
        ("retrieval", "my-index"),
        ("reranking", "cross-encoder"),
        ("generation", "granite"),
    ]:
        span = rag_capture.span(stage_name)
        assert span.attributes is not None
        assert span.attributes["rag.stage"] == stage_name
        assert span.attributes["name"] == attribute
    assert rag_capture.span("retrieval").attributes["stage"] == "x"  # type: ignore[index]


def test_stage_keyword_alone_names_the_stage(rag_capture: Capture) -> None:
    with ri.stage(stage="retrieval", top_k=3):
        pass
    with ri.pipeline_stage_context(stage=ri.PipelineStage.RERANKING):
        pass

    @ri.stage(stage="generation")
    def generate() -> str:
        return "ok"

    assert generate() == "ok"
    assert [s.name for s in rag_capture.spans] == ["retrieval", "reranking", "generation"]
    attributes = rag_capture.span("retrieval").attributes
    assert attributes is not None
    assert attributes["top_k"] == 3
    assert "stage" not in attributes
    assert [line["context"]["pipeline_stage"] for line in rag_capture.logs] == [
        "retrieval",
        "reranking",
        "generation",
    ]


def test_stage_without_a_stage_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="missing 1 required argument: 'stage'"):
        ri.stage(top_k=3)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="pipeline_stage_context"):
        ri.pipeline_stage_context()  # type: ignore[call-overload]


def test_traced_name_keyword(rag_capture: Capture) -> None:
    # ``name=`` alone is the span name; next to a positional name it is an attribute.
    with ri.traced(name="lookup", top_k=2):
        pass
    with ri.traced("fetch", name="my-index"):
        pass

    @ri.traced(name="parse")
    def parse() -> int:
        return 1

    assert parse() == 1
    assert [s.name for s in rag_capture.spans] == ["lookup", "fetch", "parse"]
    lookup = rag_capture.span("lookup").attributes
    assert lookup is not None
    assert "name" not in lookup
    assert lookup["top_k"] == 2
    assert rag_capture.span("fetch").attributes["name"] == "my-index"  # type: ignore[index]


def test_bad_stage_name_at_run_time_never_fails_the_request(
    rag_capture: Capture, caplog: pytest.LogCaptureFixture
) -> None:
    names: list[Any] = [None, "", "retrieval"]
    ran = []
    with caplog.at_level(logging.WARNING, logger="rag_instrument.internal"):
        for name in names:
            with ri.pipeline_stage_context(name):
                ran.append(name)
    assert ran == names
    assert [s.name for s in rag_capture.spans] == ["retrieval"]
    assert "not traced" in caplog.text


def test_inline_context_manager_shares_its_description() -> None:
    first = ri.pipeline_stage_context("retrieval")
    second = ri.pipeline_stage_context("retrieval")
    with capture():
        with first, second:
            pass
    assert first._spec is second._spec


def test_exception_is_reraised_unchanged(rag_capture: Capture) -> None:
    cause = KeyError("k")
    error = ValueError("boom")

    @ri.stage("generation")
    def fail() -> None:
        raise error from cause

    with pytest.raises(ValueError, match="boom") as info:
        fail()
    assert info.value is error
    assert info.value.__cause__ is cause
    # The innermost traceback frame is the user's function.
    tb = info.tb
    while tb.tb_next is not None:
        tb = tb.tb_next
    assert tb.tb_frame.f_code.co_name == "fail"
    span = rag_capture.span("generation")
    assert span.status.status_code is StatusCode.ERROR
    assert [e.name for e in span.events] == ["exception"]
    assert span.events[0].attributes is not None
    assert span.events[0].attributes["exception.type"] == "ValueError"
    (line,) = rag_capture.find_logs("generation failed")
    assert line["level"] == "error"
    assert line["error_type"] == "ValueError"
    assert line["error_message"] == "boom"
    assert isinstance(line["execution_time_ms"], float)


def test_exception_message_is_redacted(rag_capture: Capture) -> None:
    @ri.stage("generation")
    def fail() -> None:
        raise RuntimeError("auth failed for sk-abcdefghijklmnop1234")

    with pytest.raises(RuntimeError):
        fail()
    span = rag_capture.span("generation")
    text = repr(span.events[0].attributes) + repr(span.status.description)
    assert "sk-abcdefghijklmnop1234" not in text
    (line,) = rag_capture.find_logs("generation failed")
    assert "sk-abcdefghijklmnop1234" not in line["error_message"]
    assert "[REDACTED]" in line["error_message"]


class Service:
    factor = 3

    @ri.stage("retrieval")
    def method(self, x: int) -> int:
        return x * self.factor

    @ri.stage("reranking")
    @classmethod
    def klass(cls, x: int) -> int:
        return x * cls.factor

    @ri.stage("embedding")
    @staticmethod
    def static(x: int) -> int:
        return x + 1

    @ri.stage("generation")
    async def amethod(self, x: int) -> int:
        return x * self.factor


def test_methods_classmethods_staticmethods(rag_capture: Capture) -> None:
    svc = Service()
    assert svc.method(2) == 6
    assert Service.klass(2) == 6
    assert Service.static(2) == 3
    assert asyncio.run(svc.amethod(2)) == 6
    assert {s.name for s in rag_capture.spans} == {
        "retrieval",
        "reranking",
        "embedding",
        "generation",
    }


def test_partial_and_callable_object(rag_capture: Capture) -> None:
    class Scorer:
        def __call__(self, x: int) -> int:
            return x * 2

    assert ri.stage("reranking")(Scorer())(3) == 6
    assert ri.stage("retrieval")(functools.partial(plain, 1))(b=5) == 6
    assert len(rag_capture.spans) == 2


# --- async ----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_async_stage_nesting_parents(rag_capture: Capture) -> None:
    @ri.stage("retrieval")
    async def retrieve() -> int:
        await asyncio.sleep(0)
        return 1

    @ri.stage("search")
    async def search() -> int:
        return await retrieve()

    assert await search() == 1
    outer = rag_capture.span("search")
    inner = rag_capture.span("retrieval")
    assert inner.parent is not None
    assert inner.parent.span_id == outer.context.span_id
    assert trace.get_current_span() is trace.INVALID_SPAN


@pytest.mark.asyncio
async def test_wait_for_timeout_marks_cancelled(rag_capture: Capture) -> None:
    @ri.stage("generation")
    async def slow() -> None:
        await asyncio.sleep(5)

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(slow(), 0.05)
    span = rag_capture.span("generation")
    assert span.attributes is not None
    assert span.attributes["rag.cancelled"] is True
    assert span.status.status_code is not StatusCode.ERROR
    (line,) = rag_capture.find_logs("generation cancelled")
    assert line["error_type"] == "CancelledError"


@pytest.mark.asyncio
async def test_asyncio_timeout_and_taskgroup(rag_capture: Capture) -> None:
    @ri.stage("retrieval")
    async def slow() -> None:
        await asyncio.sleep(5)

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await slow()

    async def boom() -> None:
        await asyncio.sleep(0)  # tasks start in creation order: slow() is inside its stage
        raise ValueError("sibling failed")

    with pytest.raises(ExceptionGroup):
        async with asyncio.TaskGroup() as tg:
            tg.create_task(slow())
            tg.create_task(boom())
    spans = [s for s in rag_capture.spans if s.name == "retrieval"]
    assert len(spans) == 2
    assert all(s.attributes and s.attributes["rag.cancelled"] is True for s in spans)


# --- generators -----------------------------------------------------------------------------


def test_generator_exhausted(rag_capture: Capture) -> None:
    wrapped = ri.stage("generation")(gen)
    assert list(wrapped(3)) == [0, 1, 2]
    span = rag_capture.span("generation")
    assert span.attributes is not None
    assert span.attributes["rag.stream.items"] == 3
    assert span.attributes["rag.stream.completed"] is True
    assert _completed(rag_capture, "generation")[0]["items"] == 3


def test_generator_break_ends_span_and_restores_context(rag_capture: Capture) -> None:
    wrapped = ri.stage("generation")(gen)
    before = trace.get_current_span()
    for item in wrapped(10):
        assert trace.get_current_span() is before  # the consumer never sees the stage's span
        if item == 1:
            break
    gc.collect()
    span = rag_capture.span("generation")
    assert span.attributes is not None
    assert span.attributes["rag.stream.items"] == 2
    assert span.attributes["rag.stream.completed"] is False
    assert span.status.status_code is StatusCode.UNSET


def test_generator_close_and_throw(rag_capture: Capture) -> None:
    wrapped = ri.stage("generation")(gen)
    g = wrapped(10)
    next(g)
    g.close()
    g2 = wrapped(10)
    next(g2)
    with pytest.raises(ValueError, match="stop"):
        g2.throw(ValueError("stop"))
    spans = [s for s in rag_capture.spans if s.name == "generation"]
    assert [s.status.status_code for s in spans] == [StatusCode.UNSET, StatusCode.ERROR]


def test_generator_send_and_return_value(rag_capture: Capture) -> None:
    @ri.stage("reranking")
    def echo() -> Iterator[int]:
        total = 0
        while True:
            got = yield total
            if got is None:
                return
            total += got

    g = echo()
    assert next(g) == 0
    assert g.send(5) == 5
    assert g.send(2) == 7
    with pytest.raises(StopIteration):
        next(g)
    assert rag_capture.span("reranking").attributes["rag.stream.completed"] is True  # type: ignore[index]


def test_generator_dropped_after_one_item_is_collected(rag_capture: Capture) -> None:
    wrapped = ri.stage("generation")(gen)
    g = wrapped(10)
    next(g)
    del g
    gc.collect()
    assert rag_capture.span("generation").end_time is not None


def test_generator_never_iterated_opens_nothing(rag_capture: Capture) -> None:
    from rag_instrument._context import current_frame

    g = ri.stage("generation")(gen)(10)
    del g
    gc.collect()
    assert rag_capture.spans == []
    assert current_frame() is None
    assert trace.get_current_span() is trace.INVALID_SPAN


def test_with_block_ends_even_if_something_inside_is_left_open(rag_capture: Capture) -> None:
    def rows():  # a plain generator holding a traced block across its yield
        with ri.traced("fetch rows"):
            yield 1
            yield 2

    with ri.stage("retrieval") as outer:
        it = rows()
        next(it)
    # The stage ended and the context is what it was before it, despite the open block.
    assert rag_capture.span("retrieval").end_time is not None
    assert trace.get_current_span() is trace.INVALID_SPAN
    from rag_instrument._context import current_frame

    assert current_frame() is None
    with ri.stage("next request") as nxt:
        pass
    assert nxt.get_span_context().trace_id != outer.get_span_context().trace_id
    del it  # closing the generator ends its block, and restores nothing in a moved-on context
    assert rag_capture.span("fetch rows").end_time is not None
    assert trace.get_current_span() is trace.INVALID_SPAN
    assert current_frame() is None


def test_closing_a_generator_is_not_a_cancellation_of_blocks_inside(
    rag_capture: Capture,
) -> None:
    @ri.stage("generation")
    def stream() -> Iterator[int]:
        with ri.traced("decode"):
            yield 1
            yield 2

    for _ in stream():
        break
    gc.collect()
    decode = rag_capture.span("decode")
    assert decode.attributes is not None
    assert "rag.cancelled" not in decode.attributes
    assert decode.status.status_code is StatusCode.UNSET
    assert rag_capture.find_logs("decode cancelled") == []


def test_generator_span_parents_spans_opened_across_yield(rag_capture: Capture) -> None:
    tracer = trace.get_tracer("test")

    @ri.stage("generation")
    def stream() -> Iterator[int]:
        with tracer.start_as_current_span("inner"):
            yield 1
            with tracer.start_as_current_span("after-yield"):
                yield 2

    with ri.stage("search"):
        for _ in stream():
            with tracer.start_as_current_span("consumer"):
                pass
    spans = {s.name: s for s in rag_capture.spans}
    assert spans["after-yield"].parent.span_id == spans["inner"].context.span_id  # type: ignore[union-attr]
    assert spans["inner"].parent.span_id == spans["generation"].context.span_id  # type: ignore[union-attr]
    # The consumer's spans belong to the consumer's stage, not the generator's.
    assert spans["consumer"].parent.span_id == spans["search"].context.span_id  # type: ignore[union-attr]


@pytest.mark.asyncio
async def test_async_generator_break_then_finalised(rag_capture: Capture) -> None:
    wrapped = ri.stage("generation")(agen)
    before = trace.get_current_span()
    async for item in wrapped(10):
        assert trace.get_current_span() is before
        if item == 1:
            break
    gc.collect()
    for _ in range(5):
        await asyncio.sleep(0)
    span = rag_capture.span("generation")
    assert span.attributes is not None
    assert span.attributes["rag.stream.items"] == 2
    assert span.attributes["rag.stream.completed"] is False
    assert span.status.status_code is StatusCode.UNSET


@pytest.mark.asyncio
async def test_async_generator_finalised_from_another_task(
    rag_capture: Capture, caplog: pytest.LogCaptureFixture
) -> None:
    seen_in_finally: list[Any] = []

    @ri.stage("generation")
    async def stream() -> AsyncIterator[int]:
        try:
            for i in range(10):
                yield i
                await asyncio.sleep(0)
        finally:
            from rag_instrument._context import bound

            seen_in_finally.append(dict(bound().log))

    async def consume() -> AsyncIterator[int]:
        ri.bind_context(request_id="owner")
        g = stream()
        await g.__anext__()
        return g  # type: ignore[return-value]

    g = await asyncio.create_task(consume())

    async def other_request() -> None:
        ri.bind_context(request_id="intruder")
        await g.aclose()

    with caplog.at_level(logging.ERROR):
        await asyncio.create_task(other_request())
    assert seen_in_finally == [{"request_id": "owner"}]
    assert "Failed to detach context" not in caplog.text
    assert rag_capture.span("generation").end_time is not None


def test_with_block_in_async_generator_closed_by_the_loop_at_shutdown() -> None:
    # The generator is left half-consumed; asyncio.run's shutdown_asyncgens closes it in
    # a task of its own, another context than the one that entered the block.
    async def stream() -> AsyncIterator[int]:
        with ri.stage("generation"):
            for i in range(10):
                yield i

    kept: list[AsyncIterator[int]] = []

    async def main() -> None:
        g = stream()
        await g.__anext__()
        kept.append(g)

    with capture() as cap:
        asyncio.run(main())
    assert [s.name for s in cap.spans] == ["generation"]
    assert [line["event"] for line in cap.logs] == ["generation completed"]


@pytest.mark.asyncio
async def test_with_block_in_dropped_async_generator_ends_when_collected(
    rag_capture: Capture,
) -> None:
    # A server that drops a streaming response's body iterator (a client gone) leaves it
    # to the collector: the loop's finalizer closes it in a new task.
    closed = asyncio.Event()

    async def body() -> AsyncIterator[str]:
        try:
            with ri.stage("generation"):
                for i in range(10):
                    yield f"data: {i}"
        finally:
            closed.set()

    dropped: list[AsyncIterator[str]] = []

    async def respond() -> None:
        g = body()
        await g.__anext__()  # one chunk sent, then the client is gone
        dropped.append(g)  # held by the server until it lets go, elsewhere

    with ri.stage("request"):
        await asyncio.create_task(respond())
    dropped.clear()  # the last reference goes in another context than the stage's
    gc.collect()
    await asyncio.wait_for(closed.wait(), timeout=30)
    span = rag_capture.span("generation")
    assert span.end_time is not None
    assert span.parent is not None
    assert span.parent.span_id == rag_capture.span("request").context.span_id  # type: ignore[union-attr]
    assert [line["event"] for line in rag_capture.logs].count("generation completed") == 1


@pytest.mark.asyncio
async def test_async_generator_athrow_and_asend(rag_capture: Capture) -> None:
    @ri.stage("reranking")
    async def acc() -> AsyncIterator[int]:
        total = 0
        while True:
            try:
                got = yield total
            except KeyError:
                total = -1
                continue
            total += got or 0

    g = acc()
    assert await g.__anext__() == 0
    assert await g.asend(4) == 4
    assert await g.athrow(KeyError("k")) == -1
    await g.aclose()
    assert rag_capture.span("reranking").status.status_code is StatusCode.UNSET


@pytest.mark.asyncio
async def test_async_generator_error_propagates(rag_capture: Capture) -> None:
    error = RuntimeError("stream broke")

    @ri.stage("generation")
    async def broken() -> AsyncIterator[int]:
        yield 1
        raise error

    with pytest.raises(RuntimeError) as info:
        async for _ in broken():
            pass
    assert info.value is error
    assert rag_capture.span("generation").status.status_code is StatusCode.ERROR


@pytest.mark.asyncio
async def test_async_generator_cancelled_consumer(rag_capture: Capture) -> None:
    @ri.stage("generation")
    async def slow_stream() -> AsyncIterator[int]:
        yield 1
        await asyncio.sleep(5)
        yield 2

    async def consume() -> None:
        async for _ in slow_stream():
            pass

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(consume(), 0.05)
    span = rag_capture.span("generation")
    assert span.attributes is not None
    assert span.attributes["rag.cancelled"] is True


# --- context managers -----------------------------------------------------------------------


def test_context_manager_returns_span_and_nests(rag_capture: Capture) -> None:
    with ri.stage("search") as outer:
        outer.set_attribute("custom", 1)
        with ri.pipeline_stage_context("retrieval") as inner:
            assert trace.get_current_span() is inner
        assert trace.get_current_span() is outer
    assert rag_capture.span("search").attributes["custom"] == 1  # type: ignore[index]
    assert rag_capture.span("retrieval").parent.span_id == outer.get_span_context().span_id  # type: ignore[union-attr]


@pytest.mark.asyncio
async def test_async_with_and_shared_object_across_tasks(rag_capture: Capture) -> None:
    shared = ri.stage("retrieval")

    async def one(i: int) -> None:
        async with shared:
            for _ in range(5 - i):  # the tasks overlap and leave in the reverse order
                await asyncio.sleep(0)

    await asyncio.gather(*(one(i) for i in range(5)))
    assert len([s for s in rag_capture.spans if s.name == "retrieval"]) == 5
    assert all(s.parent is None for s in rag_capture.spans)


def test_stage_on_contextmanager_factory_warns() -> None:
    @contextmanager
    def session() -> Iterator[int]:
        yield 1

    with pytest.warns(UserWarning, match="below @contextmanager"):
        ri.stage("retrieval")(session)


# --- traced ---------------------------------------------------------------------------------


def test_traced_default_name_and_stage_inheritance(rag_capture: Capture) -> None:
    @ri.traced
    def helper() -> int:
        ri.get_logger().info("in helper")
        return 1

    @ri.traced("named op", kind="x")
    def named() -> int:
        return 2

    with ri.stage("retrieval"):
        assert helper() == 1
        assert named() == 2
    helper_span = rag_capture.span(helper.__qualname__)
    assert helper_span.attributes is not None
    assert "rag.stage" not in helper_span.attributes
    assert rag_capture.span("named op").attributes["kind"] == "x"  # type: ignore[index]
    (line,) = rag_capture.find_logs("in helper")
    assert line["context"]["pipeline_stage"] == "retrieval"


def test_traced_line_is_info_and_not_attributed_to_stage() -> None:
    """API: ``traced`` is "the same" as a stage: one "<name> completed" line at info."""
    with capture() as cap:
        with ri.stage("retrieval"), ri.traced("lookup"):
            pass
    (line,) = cap.find_logs("lookup completed")
    assert line["level"] == "info"
    assert line["operation"] == "lookup"
    assert line["stage"] == "retrieval"
    assert isinstance(line["execution_time_ms"], float)
    assert "pipeline_stage" not in line["context"]  # the stage's run is counted once
    with capture() as cap, pytest.raises(KeyError), ri.traced("fetch"):
        raise KeyError("x")
    (failed,) = cap.find_logs("fetch failed")
    assert failed["level"] == "error"
    assert failed["error_type"] == "KeyError"


# --- budgets and metrics --------------------------------------------------------------------


def test_budget_exceeded_line_span_and_counter() -> None:
    from rag_instrument import _breakdown

    with capture(budgets={"retrieval": 0.0001, "search": 10_000}) as cap:
        with ri.stage("search"):
            with ri.stage("retrieval"):
                _breakdown.record("vector", 5.0)
                _breakdown.record("db", 1.0, count=3)
    (line,) = cap.find_logs("budget exceeded")
    assert line["level"] == "warning"
    assert line["stage"] == "retrieval"
    assert line["budget_ms"] == 0.0001
    assert line["execution_time_ms"] > 0.0001
    assert line["largest"] == {"kind": "vector", "count": 1, "ms": 5.0}
    assert "pipeline_stage" not in line["context"]
    retrieval = cap.span("retrieval").attributes
    assert retrieval is not None
    assert retrieval["rag.budget.exceeded"] is True
    assert "rag.budget.exceeded" not in (cap.span("search").attributes or {})
    points = cap.metrics()["rag.budget.exceeded"]
    assert [(p.value, dict(p.attributes)) for p in points] == [(1, {"rag.stage": "retrieval"})]


def test_stage_duration_histogram() -> None:
    with capture() as cap:
        for _ in range(3):
            with ri.stage("retrieval"):
                pass
        with ri.traced("not a stage"):
            pass
    points = cap.metrics()["rag.stage.duration"]
    assert [(dict(p.attributes), p.count) for p in points] == [({"rag.stage": "retrieval"}, 3)]


# --- enabled=False / unconfigured -----------------------------------------------------------


def test_disabled_is_a_pass_through(capsys: pytest.CaptureFixture[str]) -> None:
    ri.configure(enabled=False, exporter="memory")
    calls = []

    @ri.stage("retrieval")
    def work() -> int:
        calls.append(trace.get_current_span())
        return 7

    assert work() == 7
    assert list(ri.stage("generation")(gen)(2)) == [0, 1]
    assert asyncio.run(ri.stage("generation")(coro)(1)) == 3
    with ri.stage("x") as span:
        assert not span.is_recording()
    assert calls == [trace.INVALID_SPAN]
    assert capsys.readouterr().err == ""


def test_unconfigured_runs_and_writes_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    @ri.stage("retrieval")
    def work() -> int:
        return 1

    assert work() == 1
    assert list(ri.stage("generation")(gen)(2)) == [0, 1]
    assert capsys.readouterr() == ("", "")


# --- telemetry failures never reach the application -----------------------------------------


def test_raising_exporter_and_processor_do_not_change_results(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from opentelemetry.sdk.trace import SpanProcessor
    from opentelemetry.sdk.trace.export import SpanExporter

    class BadExporter(SpanExporter):
        def export(self, spans: Any) -> Any:
            raise RuntimeError("exporter down")

    class BadProcessor(SpanProcessor):
        def on_end(self, span: Any) -> None:
            raise RuntimeError("processor broken")

    ri.configure(exporter=BadExporter())
    provider = trace.get_tracer_provider()
    provider.add_span_processor(BadProcessor())  # type: ignore[attr-defined]
    try:

        @ri.stage("retrieval")
        def ok() -> int:
            return 5

        @ri.stage("retrieval")
        def fails() -> None:
            raise ValueError("app error")

        with caplog.at_level(logging.WARNING, logger="rag_instrument.internal"):
            for _ in range(50):
                assert ok() == 5
                with pytest.raises(ValueError, match="app error"):
                    fails()
                assert ri.force_flush(timeout=2.0) is False  # the export failed, and says so
        warnings = [r.getMessage() for r in caplog.records if r.name == "rag_instrument.internal"]
        # 100 processor failures and 50 export failures: one warning each per 20 s.
        assert len([w for w in warnings if "processor broken" in w]) == 1
        assert len([w for w in warnings if "exporter down" in w]) == 1
    finally:
        # Remove the broken processor again (the provider outlives this test).
        active = provider._active_span_processor  # type: ignore[attr-defined]
        active._span_processors = tuple(
            p for p in active._span_processors if not isinstance(p, BadProcessor)
        )


def test_sql_statement_errors_never_show_parameters(rag_capture: Capture, sqlite_engine) -> None:
    sqlalchemy = pytest.importorskip("sqlalchemy")
    engine = sqlite_engine()
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE users (email TEXT UNIQUE)")
        conn.exec_driver_sql("INSERT INTO users VALUES ('alice@x.com')")

    @ri.stage("ingestion")
    def insert() -> None:
        with engine.begin() as conn:
            conn.execute(
                sqlalchemy.text("INSERT INTO users (email) VALUES (:e)"), {"e": "alice@x.com"}
            )

    with pytest.raises(sqlalchemy.exc.IntegrityError) as info:
        insert()
    assert "alice@x.com" in str(info.value)  # the application's exception is unchanged
    span = rag_capture.span("ingestion")
    recorded = repr(span.events[0].attributes) + repr(span.status.description)
    line = rag_capture.find_logs("ingestion failed")[0]
    assert "alice@x.com" not in recorded
    assert "alice@x.com" not in line["error_message"]
    assert "IntegrityError" in line["error_message"]


def _lookup(shelf: dict[str, str], key: str) -> str:
    return shelf[key]


def test_stack_traces_name_frames_but_hold_no_source_text(rag_capture: Capture) -> None:
    """The same on every Python version: file, line and function, never the code's text."""

    @ri.stage("retrieval")
    def body() -> str:
        return _lookup(
            {"vault": "opal-harbour-7"},  # a literal in the source of the failing call
            "drawer",
        )

    with pytest.raises(KeyError) as info:
        body()
    event = rag_capture.span("retrieval").events[0].attributes or {}
    recorded = str(event["exception.stacktrace"])
    assert "opal-harbour-7" not in recorded
    assert not [line for line in recorded.splitlines() if line.startswith("    ")]
    innermost = traceback.extract_tb(info.value.__traceback__)[-2:]  # body, then _lookup
    expected = "".join(
        f'  File "{frame.filename}", line {frame.lineno}, in {frame.name}\n'
        for frame in innermost
    )
    assert recorded.endswith(f"{expected}KeyError: 'drawer'\n")
    assert recorded.startswith("Traceback (most recent call last):\n")


def test_llm_sdk_error_messages_are_hidden_without_content_capture() -> None:
    class APIStatusError(Exception):
        status_code = 400

    APIStatusError.__module__ = "openai._exceptions"

    prompt = "the passports are in the " + "blue drawer"  # not in any source line

    @ri.stage("generation")
    def call() -> None:
        raise APIStatusError(f"Content rejected: {prompt!r}")

    for capture_content, visible in ((False, False), (True, True)):
        with capture(capture_content=capture_content) as cap:
            with pytest.raises(APIStatusError):
                call()
        line = cap.find_logs("generation failed")[0]
        assert ("blue drawer" in line["error_message"]) is visible
        assert "HTTP 400" in line["error_message"] or visible
        event = cap.span("generation").events[0].attributes or {}
        assert ("blue drawer" in str(event["exception.stacktrace"])) is visible


def test_a_stage_lines_timestamp_is_when_the_stage_ended(tmp_path: Path) -> None:
    # The analyzer nests stages by start = timestamp - execution_time_ms. The timestamp was
    # taken when the line was written, after the span ended (processors, end hooks), so on
    # a busy machine a stage seemed to start late and fell out of the one it ran in.
    import datetime
    import time as time_module

    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

    class Slow(SpanProcessor):
        def on_end(self, span: Any) -> None:
            time_module.sleep(0.3)

    provider = TracerProvider()
    provider.add_span_processor(Slow())
    log = tmp_path / "app.jsonl"
    ri.configure(exporter="memory", tracer_provider=provider, log_file=str(log))
    try:
        started = time_module.time()
        with ri.stage("retrieval"):
            pass
    finally:
        ri.shutdown()
        provider.shutdown()
    (line,) = [json.loads(text) for text in log.read_text().splitlines()]
    stamp = datetime.datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00"))
    derived_start = stamp.timestamp() - line["execution_time_ms"] / 1000
    assert derived_start - started < 0.15  # not after the processor's 0.3 s


def test_a_with_block_in_a_plain_generator_closed_in_another_request_keeps_its_own() -> None:
    # docs/stages.md: such a block ending elsewhere writes its line with the values bound
    # where it ran, whether the collector or the other request's code closes it.
    def held() -> Iterator[int]:
        with ri.stage("held"):
            yield 1
            yield 2

    gc.disable()
    try:
        with capture() as cap:
            with ri.request_context(request_id="A"):
                first = held()
                next(first)
                cycle: list[Any] = [first]
                cycle.append(cycle)  # only the collector frees it
                del first, cycle
            with ri.request_context(request_id="B"):
                gc.collect()
            with ri.request_context(request_id="C"):
                second = held()
                next(second)
            with ri.request_context(request_id="D"):
                second.close()
            with ri.request_context(request_id="E"), ri.stage("bound inside"):
                ri.bind_context(user="u-1")  # bound within the stage: in its line
            with ri.request_context(request_id="F", user="u-0"), ri.stage("rebound inside"):
                ri.bind_context(user="u-2", answer_id=7)  # a key bound again: the new value
                ri.unbind_context("request_id")
    finally:
        gc.enable()
    assert [line["context"]["request_id"] for line in cap.find_logs("held completed")] == [
        "A",
        "C",
    ]
    (inside,) = cap.find_logs("bound inside completed")
    assert inside["context"]["request_id"] == "E"
    assert inside["context"]["user"] == "u-1"
    (rebound,) = cap.find_logs("rebound inside completed")
    assert rebound["context"] == {"pipeline_stage": "rebound inside", "user": "u-2", "answer_id": 7}


def test_a_decorators_attributes_follow_the_settings_in_force_when_it_runs() -> None:
    with capture(redact=False):  # in force where the decorator is applied (an import)

        @ri.stage("configured later", api_key="secret-value-xyz", note="x" * 3000)
        def work() -> None:
            pass

    with capture(max_content_chars=100) as cap:
        work()
    attributes = cap.span("configured later").attributes
    assert attributes["api_key"] == "[REDACTED]"
    assert attributes["note"].startswith("x" * 100 + "...[truncated, 3000 chars]")
    with capture(redact=False, max_content_chars=5000) as cap:
        work()
    attributes = cap.span("configured later").attributes
    assert attributes["api_key"] == "secret-value-xyz"
    assert attributes["note"] == "x" * 3000
