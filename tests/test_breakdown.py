"""The internal recording API integrations report work through."""

from __future__ import annotations

import asyncio
import sys
import threading

import pytest

import rag_instrument as ri
from rag_instrument import _breakdown
from rag_instrument.testing import Capture


def test_recording_outside_a_stage_is_a_no_op(rag_capture: Capture) -> None:
    _breakdown.record("db", 5.0)
    _breakdown.record_cache(hit=True)
    with ri.stage("retrieval"):
        pass
    assert "breakdown" not in rag_capture.find_logs("retrieval completed")[0]


def test_work_rolls_up_into_enclosing_stages(rag_capture: Capture) -> None:
    with ri.stage("search"):
        _breakdown.record("llm", 100.0)
        with ri.stage("retrieval"):
            _breakdown.record("db", 2.0)
            _breakdown.record("db", 3.0, count=2)
            _breakdown.record("vector", 40.0)
            with ri.traced("lookup"):
                _breakdown.record("db", 1.0)
        _breakdown.record_cache(hit=True)
        _breakdown.record_cache(hit=False)
        _breakdown.record_cache(hit=False)
    retrieval = rag_capture.find_logs("retrieval completed")[0]["breakdown"]
    assert retrieval == {"db": {"count": 4, "ms": 6.0}, "vector": {"count": 1, "ms": 40.0}}
    search = rag_capture.find_logs("search completed")[0]["breakdown"]
    assert search == {
        "llm": {"count": 1, "ms": 100.0},
        "db": {"count": 4, "ms": 6.0},
        "vector": {"count": 1, "ms": 40.0},
        "cache": {"hits": 1, "misses": 2},
    }
    attributes = rag_capture.span("search").attributes
    assert attributes is not None
    assert attributes["rag.breakdown.db.count"] == 4
    assert attributes["rag.breakdown.cache.misses"] == 2


@pytest.mark.asyncio
async def test_concurrent_children_all_count(rag_capture: Capture) -> None:
    async def child(i: int) -> None:
        with ri.stage("retrieval"):
            for _ in range(i % 3):  # interleave: the stages overlap and end out of order
                await asyncio.sleep(0)
            _breakdown.record("db", 1.0)

    with ri.stage("search"):
        await asyncio.gather(*(child(i) for i in range(50)))
    search = rag_capture.find_logs("search completed")[0]["breakdown"]
    assert search == {"db": {"count": 50, "ms": 50.0}}


def test_threads_via_wrap_context_roll_up_without_losing_counts(rag_capture: Capture) -> None:
    # Switch threads as often as possible so that unguarded read-modify-writes lose counts.
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:

        def worker() -> None:
            for _ in range(500):
                _breakdown.record("db", 0.5)  # straight into the shared stage frame
                with ri.traced("op"):
                    _breakdown.record("vector", 1.0)  # rolled up at the op's exit

        with ri.stage("ingestion"):
            threads = [threading.Thread(target=ri.wrap_context(worker)) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    finally:
        sys.setswitchinterval(previous)
    ingestion = rag_capture.find_logs("ingestion completed")[0]["breakdown"]
    assert ingestion == {"db": {"count": 4000, "ms": 2000.0}, "vector": {"count": 4000, "ms": 4000.0}}


def test_largest_entry() -> None:
    assert _breakdown.largest(None) is None
    assert _breakdown.largest({"cache": {"hits": 1, "misses": 0}}) is None
    assert _breakdown.largest(
        {"db": {"count": 3, "ms": 12.1}, "vector": {"count": 1, "ms": 800.2}}
    ) == {"kind": "vector", "count": 1, "ms": 800.2}


def test_a_breakdown_that_cannot_be_rendered_still_ends_its_stage(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A library bug (an amount that is not a number) loses the breakdown, not the stage's
    # span or line.
    from rag_instrument._context import current_frame
    from rag_instrument.testing import capture

    monkeypatch.delenv("RAG_INSTRUMENT_RAISE_INTERNAL_ERRORS")
    with capture() as cap:
        with ri.stage("retrieval"):
            frame = current_frame()
            assert frame is not None
            frame.breakdown = {"db": {"count": 1, "ms": "not a number"}}  # type: ignore[dict-item]
    (line,) = cap.find_logs("retrieval completed")
    assert "breakdown" not in line
    assert "rag.breakdown.db.ms" not in (cap.span("retrieval").attributes or {})
    assert _breakdown.safe_forms(None) is None


@pytest.mark.asyncio
async def test_work_outliving_its_stage_counts_in_the_stage_still_open(
    rag_capture: Capture,
) -> None:
    """A task started in one stage and awaited in the enclosing one: its work is the
    enclosing stage's (it waited for it), not lost with the stage that ended."""
    released = asyncio.Event()

    async def prefetch() -> None:
        await released.wait()
        _breakdown.record("db", 2.0)
        with ri.stage("late_child"):  # a stage started there, ending after its parent
            _breakdown.record("vector", 3.0)

    @ri.stage("query_rewriting")
    async def rewrite() -> asyncio.Task[None]:
        return asyncio.create_task(prefetch())

    @ri.stage("search")
    async def search() -> None:
        task = await rewrite()
        released.set()
        await task

    await search()
    rewrite_line = rag_capture.find_logs("query_rewriting completed")[0]
    assert "breakdown" not in rewrite_line  # it had ended: nothing of it ran inside
    search_line = rag_capture.find_logs("search completed")[0]
    assert search_line["breakdown"]["db"] == {"count": 1, "ms": 2.0}
    assert search_line["breakdown"]["vector"] == {"count": 1, "ms": 3.0}
