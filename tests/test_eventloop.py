"""ri.watch_event_loop: a blocked loop is reported once, with the blocking line, the stage and a metric."""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import rag_instrument as ri
from rag_instrument import eventloop
from rag_instrument.eventloop import EventLoopWatch
from rag_instrument.testing import Capture, capture

BLOCK_S = 0.6  # ten times the threshold used below, so a loaded CI box still sees it
THRESHOLD_MS = 60
QUIET_THRESHOLD_MS = 500  # for tests that must see no block: far above scheduling hiccups


async def until(condition: Callable[[], bool], limit_s: float = 15.0) -> None:
    """Let the loop run until ``condition`` holds (a wide timeout, not a timing assertion)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.005)


async def started(watch: EventLoopWatch) -> EventLoopWatch:
    await until(lambda: watch._loop_thread is not None)
    return watch


def blocking_retrieve() -> None:
    time.sleep(BLOCK_S)


BLOCK_LINE = inspect.getsourcelines(blocking_retrieve)[1] + 1


def blocked_lines(cap: Capture) -> list[dict[str, Any]]:
    """The warnings about this module's deliberate blocks.

    A loaded machine can stall the loop past the threshold on its own (a descheduled
    thread, a long garbage collection); such warnings name other code and are not counted.
    """
    return [
        line
        for line in cap.find_logs("event loop blocked")
        if line["stack"] and " in block" in line["stack"][-1]
    ]


def test_a_sleep_inside_a_stage_is_reported_with_its_stack_and_stage() -> None:
    async def main() -> tuple[EventLoopWatch, str]:
        watch = await started(ri.watch_event_loop(threshold_ms=THRESHOLD_MS))
        with ri.stage("retrieval") as span:
            blocking_retrieve()
        await until(lambda: bool(blocked_lines(cap)))
        watch.stop()
        return watch, format(span.get_span_context().trace_id, "032x")

    with capture() as cap:
        watch, trace_id = asyncio.run(main())
    (line,) = blocked_lines(cap)
    assert line["level"] == "warning"
    assert BLOCK_S * 1000 * 0.5 <= line["blocked_ms"] <= BLOCK_S * 1000 * 20
    assert line["threshold_ms"] == THRESHOLD_MS
    assert line["stage"] == "retrieval"
    assert line["trace_id"] == trace_id
    assert "pipeline_stage" not in line["context"]
    # Sampled while the loop was blocked: the innermost Python frame is the sleeping line.
    # Each frame is file, line number and function, never source text (SECURITY.md).
    assert line["stack"][-1] == f"{__file__}:{BLOCK_LINE} in blocking_retrieve"
    assert any(
        entry.startswith(f"{__file__}:") and entry.endswith(" in main") for entry in line["stack"]
    )
    for entry in line["stack"]:
        assert re.fullmatch(r".+:\d+ in [\w<>.]+", entry), entry
    assert not any("time.sleep" in entry for entry in line["stack"])
    assert watch.blocks >= 1


def test_the_block_is_in_the_stage_breakdown_and_the_metric() -> None:
    async def main() -> None:
        watch = await started(ri.watch_event_loop(threshold_ms=THRESHOLD_MS))
        with ri.stage("generation"):
            blocking_retrieve()
            # Still inside the stage until the watchdog has measured the whole block.
            await until(lambda: bool(blocked_lines(cap)))
        watch.stop()

    with capture() as cap:
        asyncio.run(main())
    (stage_line,) = cap.find_logs("generation completed")
    blocked = stage_line["breakdown"]["blocked"]
    assert blocked["count"] >= 1
    assert BLOCK_S * 1000 * 0.5 <= blocked["ms"] <= stage_line["execution_time_ms"]
    (point,) = cap.metrics()["rag.event_loop.blocked"]
    assert dict(point.attributes) == {"rag.stage": "generation"}
    assert point.value >= 1


def test_an_awaiting_loop_is_not_blocked() -> None:
    async def main() -> EventLoopWatch:
        watch = await started(ri.watch_event_loop(threshold_ms=QUIET_THRESHOLD_MS))
        deadline = time.monotonic() + 0.8
        while time.monotonic() < deadline:  # busy with short steps, never blocked
            sum(range(1000))
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.3)  # idle
        watch.stop()
        return watch

    with capture() as cap:
        watch = asyncio.run(main())
    assert cap.find_logs("event loop blocked") == []
    assert watch.blocks == 0


def test_outside_any_stage_the_stage_is_null() -> None:
    async def main() -> None:
        watch = await started(ri.watch_event_loop(threshold_ms=THRESHOLD_MS))
        blocking_retrieve()
        await until(lambda: bool(blocked_lines(cap)))
        watch.stop()

    with capture() as cap:
        asyncio.run(main())
    (line,) = blocked_lines(cap)
    assert line["stage"] is None
    assert line["stack"][-1] == f"{__file__}:{BLOCK_LINE} in blocking_retrieve"


def test_the_blocked_requests_bound_context_is_on_the_line() -> None:
    # 3.12+: the blocked task's context; 3.11: the values bound where its stage started.
    async def main() -> None:
        watch = await started(ri.watch_event_loop(threshold_ms=THRESHOLD_MS))
        with ri.request_context(request_id="r-9"), ri.stage("retrieval"):
            blocking_retrieve()
        await until(lambda: bool(blocked_lines(cap)))
        watch.stop()

    with capture() as cap:
        asyncio.run(main())
    (line,) = blocked_lines(cap)
    assert line["context"] == {"request_id": "r-9"}


def test_a_long_block_is_reported_while_it_lasts_once() -> None:
    def block_until_reported() -> None:
        # Block the loop until the warning exists: it must be written during the block.
        deadline = time.monotonic() + 15
        while not cap.find_logs("event loop blocked", ongoing=True):
            if time.monotonic() > deadline:
                raise AssertionError("no warning during the block")
            time.sleep(0.01)
        time.sleep(0.1)

    async def main() -> EventLoopWatch:
        watch = await started(ri.watch_event_loop(threshold_ms=THRESHOLD_MS))
        watch._ongoing_after_s = 0.3
        block_until_reported()
        await asyncio.sleep(0.3)  # the end of the block must not log again
        watch.stop()
        return watch

    with capture() as cap:
        watch = asyncio.run(main())
    (line,) = [line for line in blocked_lines(cap) if "block_until_reported" in line["stack"][-1]]
    assert line["ongoing"] is True
    assert watch.blocks >= 1


def test_the_watch_ends_with_its_loop() -> None:
    async def main() -> EventLoopWatch:
        return await started(ri.watch_event_loop(threshold_ms=THRESHOLD_MS))

    with capture():
        watch = asyncio.run(main())  # closes the loop
        watch._thread.join(15)
    assert not watch.running
    assert watch.loop is None or watch.loop.is_closed()


def test_stop_ends_the_watch_and_later_blocks_go_unreported() -> None:
    async def main() -> EventLoopWatch:
        watch = await started(ri.watch_event_loop(threshold_ms=THRESHOLD_MS * 4))
        watch.stop()
        watch.stop()  # idempotent
        assert not watch.running
        blocking_retrieve()
        await asyncio.sleep(0)
        return watch

    with capture() as cap:
        watch = asyncio.run(main())
    assert blocked_lines(cap) == []
    assert watch.blocks == 0


def test_loops_in_several_threads_each_have_their_own_watch() -> None:
    ready = threading.Barrier(2, timeout=15)
    # Thread b's loop only awaits: a warning from it would name other code and show here.
    release = threading.Event()
    watches: dict[str, EventLoopWatch] = {}

    def blocking_in_thread_a() -> None:
        time.sleep(BLOCK_S)

    async def loop_a() -> None:
        watches["a"] = await started(ri.watch_event_loop(threshold_ms=THRESHOLD_MS))
        ready.wait()
        with ri.stage("thread_a_stage"):
            blocking_in_thread_a()
        await until(lambda: bool(blocked_lines(cap)))
        release.set()

    async def loop_b() -> None:
        watches["b"] = await started(ri.watch_event_loop(threshold_ms=THRESHOLD_MS))
        ready.wait()
        while not release.is_set():  # noqa: ASYNC110 - a threading.Event, set from thread a
            await asyncio.sleep(0.005)

    with capture() as cap:
        threads = [
            threading.Thread(target=asyncio.run, args=(coro(),)) for coro in (loop_a, loop_b)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        for watch in watches.values():
            watch._thread.join(15)
    (line,) = blocked_lines(cap)
    assert line["stage"] == "thread_a_stage"
    assert line["stack"][-1].endswith(" in blocking_in_thread_a")
    assert watches["a"] is not watches["b"]
    assert watches["a"].blocks >= 1
    assert not watches["a"].running
    assert not watches["b"].running


def test_watching_a_loop_again_replaces_its_watch() -> None:
    async def main() -> tuple[EventLoopWatch, EventLoopWatch]:
        first = await started(ri.watch_event_loop(threshold_ms=500))
        second = ri.watch_event_loop(threshold_ms=THRESHOLD_MS)
        assert not first.running
        second.stop()
        return first, second

    with capture():
        first, second = asyncio.run(main())
    assert (first.threshold_ms, second.threshold_ms) == (500, THRESHOLD_MS)


def test_watching_a_loop_from_another_thread() -> None:
    loop = asyncio.new_event_loop()
    watch = ri.watch_event_loop(threshold_ms=THRESHOLD_MS, loop=loop)

    async def main() -> None:
        await started(watch)
        blocking_retrieve()
        await until(lambda: bool(blocked_lines(cap)))

    try:
        with capture() as cap:
            loop.run_until_complete(main())
    finally:
        watch.stop()
        loop.close()
    assert len(blocked_lines(cap)) == 1


@pytest.mark.parametrize("threshold", [0, -5, float("nan"), float("inf"), "100", True, None])
def test_bad_thresholds_raise_value_error(threshold: Any) -> None:
    async def main() -> None:
        ri.watch_event_loop(threshold_ms=threshold)

    with pytest.raises(ValueError, match="threshold_ms"):
        asyncio.run(main())


def test_without_a_running_loop_or_with_a_closed_one() -> None:
    with pytest.raises(ValueError, match="no running event loop"):
        ri.watch_event_loop()
    loop = asyncio.new_event_loop()
    loop.close()
    with pytest.raises(ValueError, match="closed"):
        ri.watch_event_loop(loop=loop)
    with pytest.raises(ValueError, match="loop must be"):
        ri.watch_event_loop(loop="loop")  # type: ignore[arg-type]


# --- configure(event_loop_threshold_ms=...) ------------------------------------------------------


def watch_of(loop: asyncio.AbstractEventLoop) -> EventLoopWatch | None:
    return eventloop._watches.get(loop)


def test_the_setting_watches_each_loop_a_stage_runs_in() -> None:
    async def main() -> EventLoopWatch:
        loop = asyncio.get_running_loop()
        assert watch_of(loop) is None
        with ri.stage("query_rewriting"):
            pass
        watch = watch_of(loop)
        assert watch is not None
        assert watch.automatic
        assert watch.threshold_ms == THRESHOLD_MS
        with ri.stage("retrieval"):
            blocking_retrieve()
        await until(lambda: bool(blocked_lines(cap)))
        with ri.stage("retrieval"):  # the same watch, not a second one
            pass
        assert watch_of(loop) is watch
        return watch

    with capture(event_loop_threshold_ms=THRESHOLD_MS) as cap:
        watch = asyncio.run(main())
        watch._thread.join(15)  # ends with its loop
    (line,) = blocked_lines(cap)
    assert line["stage"] == "retrieval"
    assert line["stack"][-1] == f"{__file__}:{BLOCK_LINE} in blocking_retrieve"
    assert not watch.running


def test_without_the_setting_stages_start_no_watch() -> None:
    async def main() -> None:
        with ri.stage("retrieval"):
            pass
        assert watch_of(asyncio.get_running_loop()) is None

    with capture():
        asyncio.run(main())


def test_reconfiguring_stops_the_automatic_watches_but_not_explicit_ones() -> None:
    async def main() -> tuple[EventLoopWatch, EventLoopWatch]:
        with ri.stage("retrieval"):
            pass
        automatic = watch_of(asyncio.get_running_loop())
        assert automatic is not None
        other_loop = asyncio.new_event_loop()
        explicit = ri.watch_event_loop(THRESHOLD_MS, loop=other_loop)
        with pytest.warns(RuntimeWarning, match="inside testing.capture"):
            ri.configure(event_loop_threshold_ms=None)
        assert not automatic.running
        assert explicit.running
        explicit.stop()
        other_loop.close()
        return automatic, explicit

    with capture(event_loop_threshold_ms=THRESHOLD_MS):
        asyncio.run(main())


def test_the_setting_is_validated_and_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert ri.configure().event_loop_threshold_ms is None
    monkeypatch.setenv("RAG_INSTRUMENT_EVENT_LOOP_THRESHOLD_MS", "250")
    assert ri.configure().event_loop_threshold_ms == 250.0
    for bad in ("0", "-1", "soon"):
        monkeypatch.setenv("RAG_INSTRUMENT_EVENT_LOOP_THRESHOLD_MS", bad)
        with pytest.raises(ValueError, match="event_loop_threshold_ms"):
            ri.configure()
    monkeypatch.delenv("RAG_INSTRUMENT_EVENT_LOOP_THRESHOLD_MS")
    with pytest.raises(ValueError, match="event_loop_threshold_ms"):
        ri.configure(event_loop_threshold_ms=0)


def test_with_the_library_disabled_a_watch_writes_nothing(tmp_path: Path) -> None:
    # The application's own lines are still written with enabled=False; a watch started
    # by hand is instrumentation, and stays silent.
    log = tmp_path / "app.jsonl"
    ri.configure(enabled=False, log_file=str(log))

    async def main() -> None:
        watch = await started(ri.watch_event_loop(threshold_ms=THRESHOLD_MS))
        try:
            blocking_retrieve()
            await until(lambda: watch.blocks >= 1)  # the watchdog saw it
        finally:
            watch.stop()  # waits for the watchdog: its report, if any, is written

    try:
        asyncio.run(main())
        ri.get_logger("app").warning("app line")
    finally:
        ri.shutdown()
    events = [json.loads(line)["event"] for line in log.read_text().splitlines()]
    assert events == ["app line"]
