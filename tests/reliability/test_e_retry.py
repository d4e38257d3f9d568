"""E. Retry (RELIABILITY.md E27-E31)."""

from __future__ import annotations

import asyncio
import inspect
import traceback
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

import rag_instrument as ri
from rag_instrument.testing import Capture


class HTTPError(Exception):
    def __init__(self, status_code: int) -> None:
        super().__init__(f"HTTP {status_code}")
        self.status_code = status_code


PREDICATES = [None, lambda e: not isinstance(e, ValueError)]  # default, and a negated one


@pytest.mark.asyncio
@pytest.mark.parametrize("predicate", PREDICATES, ids=["default", "negated"])
async def test_e27_cancel_during_backoff_or_attempt_is_not_retried(predicate: Any) -> None:
    attempts = 0
    in_backoff = asyncio.Event()

    def judge(exc: BaseException) -> bool:
        in_backoff.set()  # decided: the backoff sleep comes next
        return True if predicate is None else bool(predicate(exc))

    @ri.retry(attempts=5, wait_min=5, wait_max=5, is_retryable=judge)
    async def flaky() -> None:
        nonlocal attempts
        attempts += 1
        raise ConnectionError

    task = asyncio.create_task(flaky())
    await in_backoff.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert attempts == 1

    started = asyncio.Event()

    @ri.retry(attempts=5, wait_min=0, wait_max=0, is_retryable=predicate)
    async def hanging() -> None:
        nonlocal attempts
        attempts += 1
        started.set()
        await asyncio.sleep(60)

    attempts = 0
    task = asyncio.create_task(hanging())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert attempts == 1


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit, GeneratorExit])
@pytest.mark.parametrize("predicate", PREDICATES, ids=["default", "negated"])
def test_e27_control_flow_is_never_retried(exc_type: type[BaseException], predicate: Any) -> None:
    calls = 0

    @ri.retry(attempts=5, wait_min=0, wait_max=0, is_retryable=predicate)
    def sync() -> None:
        nonlocal calls
        calls += 1
        raise exc_type

    @ri.retry(attempts=5, wait_min=0, wait_max=0, is_retryable=predicate)
    async def coro() -> None:
        nonlocal calls
        calls += 1
        raise exc_type

    with pytest.raises(exc_type):
        sync()
    with pytest.raises(exc_type):
        asyncio.run(coro())
    assert calls == 2


def test_e28_persistent_503_raises_the_original_with_events(rag_capture: Capture) -> None:
    errors: list[HTTPError] = []

    @ri.retry(attempts=3, wait_min=0, wait_max=0)
    def call() -> None:
        errors.append(HTTPError(503))
        raise errors[-1]

    with pytest.raises(HTTPError) as info, ri.stage("generation"):
        call()
    assert info.value is errors[-1]
    assert len(errors) == 3
    assert "call" in [frame.name for frame in traceback.extract_tb(info.value.__traceback__)]
    span = rag_capture.span("generation")
    assert [e.attributes["attempt"] for e in span.events if e.name == "retry"] == [1, 2]


@pytest.mark.asyncio
async def test_e28_async_backoff_never_blocks_the_loop() -> None:
    ticks = 0
    stop = asyncio.Event()

    async def heartbeat() -> None:
        nonlocal ticks
        while not stop.is_set():
            await asyncio.sleep(0.01)
            ticks += 1

    calls = 0

    @ri.retry(attempts=2, wait_min=0.3, wait_max=0.3)
    async def once_flaky() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise HTTPError(503)
        return "ok"

    beat = asyncio.create_task(heartbeat())
    assert await once_flaky() == "ok"
    stop.set()
    await beat
    assert ticks >= 5  # a blocking sleep would have allowed none


def test_e29_a_non_transient_failure_after_a_side_effect_runs_once() -> None:
    side_effects: list[str] = []

    @ri.retry(attempts=5, wait_min=0, wait_max=0)
    def post_order() -> None:
        side_effects.append("order created")
        raise ValueError("response could not be parsed")

    with pytest.raises(ValueError):
        post_order()
    assert side_effects == ["order created"]


def test_e30_stream_failing_after_its_first_chunk_is_not_retried() -> None:
    runs = 0

    @ri.retry(attempts=3, wait_min=0, wait_max=0)
    def after_first() -> Iterator[int]:
        nonlocal runs
        runs += 1
        yield 1
        raise ConnectionError

    with pytest.raises(ConnectionError):
        list(after_first())
    assert runs == 1

    runs = 0

    @ri.retry(attempts=3, wait_min=0, wait_max=0)
    def before_first() -> Iterator[int]:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise ConnectionError
        yield 1

    assert list(before_first()) == [1]
    assert runs == 2


@pytest.mark.asyncio
async def test_e30_async_stream_failing_after_its_first_chunk_is_not_retried() -> None:
    runs = 0

    @ri.retry(attempts=3, wait_min=0, wait_max=0)
    async def after_first() -> AsyncIterator[int]:
        nonlocal runs
        runs += 1
        yield 1
        raise ConnectionError

    with pytest.raises(ConnectionError):
        _ = [x async for x in after_first()]
    assert runs == 1


@pytest.mark.asyncio
async def test_e31_retry_and_trace_stacked_either_way(rag_capture: Capture) -> None:
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls % 3:
            raise HTTPError(503)
        return "ok"

    outer_trace = ri.traced("call")(ri.retry(attempts=3, wait_min=0, wait_max=0)(flaky))
    outer_retry = ri.retry(attempts=3, wait_min=0, wait_max=0)(ri.traced("attempt")(flaky))
    assert inspect.iscoroutinefunction(outer_trace)
    assert inspect.iscoroutinefunction(outer_retry)
    with ri.stage("generation"):
        assert await outer_trace() == "ok"
        assert await outer_retry() == "ok"
    parent = rag_capture.span("generation")
    call = rag_capture.span("call")
    assert call.parent is not None
    assert call.parent.span_id == parent.context.span_id
    assert call.attributes["rag.retry.attempts"] == 3
    attempts = [s for s in rag_capture.spans if s.name == "attempt"]
    assert len(attempts) == 3
    assert {s.parent.span_id for s in attempts if s.parent} == {parent.context.span_id}
