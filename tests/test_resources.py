"""configure(resource_metrics=True): cpu_ms on stages where it means something, process metrics."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import rag_instrument as ri
from rag_instrument import _resources
from rag_instrument.testing import Capture, capture

SPIN_MS = 30.0


def spin_cpu(ms: float = SPIN_MS) -> None:
    """Use ``ms`` of this thread's CPU time (not wall time: a loaded machine cannot shrink it)."""
    end = time.thread_time() + ms / 1000
    while time.thread_time() < end:
        pass


def stage_line(cap: Capture, name: str) -> dict[str, Any]:
    (line,) = cap.find_logs(f"{name} completed")
    return line


def test_a_sync_stage_reports_its_cpu_time_on_line_and_span() -> None:
    @ri.stage("reranking")
    def rerank() -> str:
        spin_cpu()
        return "ok"

    with capture(resource_metrics=True) as cap:
        assert rerank() == "ok"
    line = stage_line(cap, "reranking")
    assert SPIN_MS <= line["cpu_ms"] <= line["execution_time_ms"] + 1
    assert cap.span("reranking").attributes["rag.cpu_ms"] == line["cpu_ms"]


def test_a_waiting_stage_uses_little_cpu() -> None:
    @ri.stage("retrieval")
    def retrieve() -> None:
        time.sleep(0.2)

    with capture(resource_metrics=True) as cap:
        retrieve()
    line = stage_line(cap, "retrieval")
    assert line["execution_time_ms"] >= 200
    assert line["cpu_ms"] < line["execution_time_ms"] / 2  # waiting, not computing


def test_a_with_block_outside_any_loop_reports_cpu_time() -> None:
    with capture(resource_metrics=True) as cap, ri.stage("embedding"):
        spin_cpu()
    assert stage_line(cap, "embedding")["cpu_ms"] >= SPIN_MS


def test_in_another_thread_each_stage_measures_its_own_thread() -> None:
    def work() -> None:
        with ri.stage("ingestion"):
            spin_cpu()

    with capture(resource_metrics=True) as cap:
        thread = threading.Thread(target=ri.wrap_context(work))
        thread.start()
        spin_cpu(3 * SPIN_MS)  # the main thread's CPU is not the stage's
        thread.join()
    line = stage_line(cap, "ingestion")
    assert SPIN_MS <= line["cpu_ms"] <= line["execution_time_ms"] + 1


def test_an_async_stage_that_never_suspends_reports_cpu_time() -> None:
    @ri.stage("reranking")
    async def rerank() -> int:
        spin_cpu()
        return 1

    with capture(resource_metrics=True) as cap:
        assert asyncio.run(rerank()) == 1
    assert stage_line(cap, "reranking")["cpu_ms"] >= SPIN_MS


def test_an_async_stage_that_awaits_reports_none() -> None:
    async def neighbour() -> None:
        spin_cpu()  # runs while the stage is suspended: not the stage's CPU

    @ri.stage("retrieval")
    async def retrieve() -> int:
        task = asyncio.create_task(neighbour())
        await asyncio.sleep(0)
        await task
        return 2

    with capture(resource_metrics=True) as cap:
        assert asyncio.run(retrieve()) == 2
    line = stage_line(cap, "retrieval")
    assert "cpu_ms" not in line
    assert "rag.cpu_ms" not in cap.span("retrieval").attributes


def test_a_with_block_inside_a_running_loop_reports_none() -> None:
    async def main() -> None:
        async with ri.stage("generation"):
            spin_cpu(1)
        with ri.stage("reranking"):
            spin_cpu(1)

    with capture(resource_metrics=True) as cap:
        asyncio.run(main())
    assert "cpu_ms" not in stage_line(cap, "generation")
    assert "cpu_ms" not in stage_line(cap, "reranking")


def test_a_generator_stage_reports_none() -> None:
    @ri.stage("retrieval")
    def stream() -> Iterator[int]:
        yield 1
        yield 2

    with capture(resource_metrics=True) as cap:
        for _ in stream():
            spin_cpu(1)  # the consumer's CPU
    assert "cpu_ms" not in stage_line(cap, "retrieval")


def test_async_results_and_exceptions_pass_through_when_measured() -> None:
    @ri.stage("retrieval")
    async def fails() -> None:
        await asyncio.sleep(0)
        raise KeyError("missing")

    @ri.stage("retrieval")
    async def cancelled() -> None:
        await asyncio.sleep(30)

    async def main() -> None:
        with pytest.raises(KeyError) as info:
            await fails()
        assert info.value.args == ("missing",)
        task = asyncio.create_task(cancelled())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with capture(resource_metrics=True) as cap:
        asyncio.run(main())
    assert [line["event"] for line in cap.logs] == ["retrieval failed", "retrieval cancelled"]


def test_off_by_default() -> None:
    @ri.stage("reranking")
    def rerank() -> None:
        spin_cpu(1)

    with capture() as cap:
        rerank()
    assert "cpu_ms" not in stage_line(cap, "reranking")
    assert not {"process.cpu.time", "rag.gc.pause.time"} & set(cap.metrics())


# --- process metrics ----------------------------------------------------------------------------


def values(cap: Capture, name: str) -> dict[tuple[tuple[str, Any], ...], Any]:
    return {tuple(sorted(p.attributes.items())): p.value for p in cap.metrics()[name]}


def test_process_metrics() -> None:
    with capture(resource_metrics=True) as cap:
        spin_cpu(5)
        gc.collect()
        cpu = values(cap, "process.cpu.time")
        assert cpu[(("cpu.mode", "user"),)] > 0
        assert (("cpu.mode", "system"),) in cpu
        assert values(cap, "process.memory.usage")[()] > 1_000_000
        assert values(cap, "process.open_file_descriptor.count")[()] >= 3
        assert values(cap, "process.thread.count")[()] >= 1
        collections = values(cap, "cpython.gc.collections")
        assert collections[(("cpython.gc.generation", 2),)] >= 1
        assert values(cap, "rag.gc.pause.time")[()] > 0
    assert _resources._gc_pauses not in gc.callbacks  # removed with the configuration


def test_settings_from_arguments_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ri.configure().resource_metrics is False
    monkeypatch.setenv("RAG_INSTRUMENT_RESOURCE_METRICS", "yes")
    assert ri.configure().resource_metrics is True
    monkeypatch.setenv("RAG_INSTRUMENT_RESOURCE_METRICS", "sometimes")
    with pytest.raises(ValueError, match="resource_metrics"):
        ri.configure()


def test_cpu_ms_never_exceeds_the_stages_own_time() -> None:
    """One thread cannot compute longer than the time that passed: short stages, whose
    bookkeeping is a large part of them, too."""

    @ri.stage("tiny")
    def tiny() -> int:
        return sum(range(200))

    with capture(resource_metrics=True) as cap:
        for _ in range(300):
            tiny()
    lines = cap.find_logs("tiny completed")
    assert len(lines) == 300
    assert all(line["cpu_ms"] <= line["execution_time_ms"] for line in lines)
