"""ri.profile: the "profile" line, memory, .prof files, degrading, and scoping to a task."""

from __future__ import annotations

import asyncio
import cProfile
import inspect
import pstats
import sys
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import rag_instrument as ri
from rag_instrument.testing import Capture, capture

MODULE = __name__


def busy_sum(n: int = 20_000) -> int:
    return sum(i * i for i in range(n))


def other_tasks_work(n: int = 20_000) -> int:
    return sum(i for i in range(n))


def consumer_work() -> int:
    return sum(range(5_000))


def allocate_blocks() -> list[bytes]:
    return [bytes(1024) for _ in range(2048)]  # about 2 MiB, on this line


def line_of(fn: Any) -> int:
    return inspect.getsourcelines(fn)[1]


def only_profile_line(cap: Capture) -> dict[str, Any]:
    lines = cap.find_logs("profile")
    assert len(lines) == 1, lines
    return lines[0]


def functions(line: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["function"]: row for row in line.get("functions", [])}


def label(fn: Any) -> str:
    return f"{MODULE}:{fn.__qualname__}:{line_of(fn)}"


# --- the line ---------------------------------------------------------------------------------


def test_with_block_logs_top_functions() -> None:
    with capture() as cap, ri.profile("scoring"):
        for _ in range(3):
            busy_sum()
    line = only_profile_line(cap)
    assert line["level"] == "info"
    assert line["profile"] == "scoring"
    assert line["profiled"] is True
    assert line["sort"] == "cumulative"
    assert line["wall_ms"] > 0
    row = functions(line)[label(busy_sum)]
    assert row["calls"] == 3
    assert 0 < row["tottime_ms"] <= row["cumtime_ms"]
    cumulative = [r["cumtime_ms"] for r in line["functions"]]
    assert cumulative == sorted(cumulative, reverse=True)
    assert "context" not in line or "pipeline_stage" not in line["context"]


def test_builtins_are_named_module_name_zero() -> None:
    with capture() as cap, ri.profile():
        sorted([3, 1, 2])
    assert "builtins:sorted:0" in functions(only_profile_line(cap))


def test_top_and_sort_choose_the_rows() -> None:
    with capture() as cap, ri.profile(top=2, sort="calls"):
        for _ in range(5):
            consumer_work()
        busy_sum()
    line = only_profile_line(cap)
    assert len(line["functions"]) == 2
    calls = [r["calls"] for r in line["functions"]]
    assert calls == sorted(calls, reverse=True)
    assert label(busy_sum) not in functions(line)  # called once: not in the top 2 by calls


def test_decorator_default_name_and_results_pass_through() -> None:
    @ri.profile(top=5)
    def compute(n: int) -> int:
        return busy_sum(n)

    @ri.profile()
    def fail() -> None:
        raise KeyError("boom")

    with capture() as cap:
        assert compute(1000) == busy_sum(1000)
        with pytest.raises(KeyError) as info:
            fail()
    assert info.value.args == ("boom",)
    names = [line["profile"] for line in cap.find_logs("profile")]
    assert names == [
        f"{MODULE}:test_decorator_default_name_and_results_pass_through.<locals>.compute",
        f"{MODULE}:test_decorator_default_name_and_results_pass_through.<locals>.fail",
    ]
    assert compute.__name__ == "compute"
    assert label(busy_sum) in functions(cap.find_logs("profile")[0])


def test_inside_a_stage_names_the_stage_top_level() -> None:
    with capture() as cap, ri.stage("reranking"), ri.profile("r"):
        busy_sum(100)
    line = only_profile_line(cap)
    assert line["stage"] == "reranking"
    assert "pipeline_stage" not in line["context"]
    assert line["trace_id"] == cap.span("reranking").context.trace_id.to_bytes(16, "big").hex()


# --- memory and files -------------------------------------------------------------------------


def test_memory_reports_peak_and_allocation_sites() -> None:
    assert not tracemalloc.is_tracing()
    with capture() as cap, ri.profile(memory=True, top=5):
        kept = allocate_blocks()
        transient = allocate_blocks()
        del transient
    line = only_profile_line(cap)
    assert len(kept) == 2048
    assert line["peak_kib"] >= 4000  # both lists were alive at once
    site = f"{__file__}:{line_of(allocate_blocks) + 1}"
    assert line["allocations"][0]["site"] == site  # what is still held, by site
    assert line["allocations"][0]["size_kib"] >= 2000
    ours = str(Path(ri.profiling.__file__).parent)  # type: ignore[attr-defined]
    assert not any(a["site"].startswith(ours) for a in line["allocations"])
    assert not tracemalloc.is_tracing()  # stopped again: tracing costs every allocation


def test_memory_while_tracemalloc_is_already_tracing_degrades() -> None:
    tracemalloc.start()
    try:
        with capture() as cap, ri.profile(memory=True):
            busy_sum(100)
        assert tracemalloc.is_tracing()  # someone else's tracing is left alone
    finally:
        tracemalloc.stop()
    line = only_profile_line(cap)
    assert line["level"] == "warning"
    assert "tracemalloc" in line["reason"]
    assert "peak_kib" not in line
    assert line["profiled"] is True


def test_save_to_writes_a_file_pstats_opens(tmp_path: Path) -> None:
    target = tmp_path / "run.prof"
    with capture() as cap, ri.profile(save_to=target):
        busy_sum()
    line = only_profile_line(cap)
    assert line["saved_to"] == str(target)
    stats = pstats.Stats(str(target))
    names = {key[2] for key in stats.stats}  # type: ignore[attr-defined]
    assert "busy_sum" in names
    ours = str(Path(ri.profiling.__file__).parent)  # type: ignore[attr-defined]
    assert not [key for key in stats.stats if key[0].startswith(ours)]  # none of our machinery
    assert not [key for key in stats.stats if "_lsprof" in key[2]]


def test_save_to_an_unwritable_place_is_reported_not_raised(tmp_path: Path) -> None:
    target = tmp_path / "missing-dir" / "run.prof"
    with capture() as cap, ri.profile(save_to=target):
        busy_sum(100)
    line = only_profile_line(cap)
    assert "saved_to" not in line
    assert "FileNotFoundError" in line["save_error"]


# --- profiling already active -----------------------------------------------------------------


def test_nested_profile_degrades_to_timing_with_one_warning() -> None:
    with capture() as cap:
        with ri.profile("outer"):
            with ri.profile("inner"):
                busy_sum()
    inner, outer = cap.find_logs("profile")
    assert inner["profile"] == "inner"
    assert inner["level"] == "warning"
    assert inner["profiled"] is False
    assert "enclosing ri.profile" in inner["reason"]
    assert inner["wall_ms"] > 0
    assert inner["functions"] == []  # the same shape as a profiled line
    assert outer["profiled"] is True
    assert label(busy_sum) in functions(outer)
    assert [line["level"] for line in cap.logs] == ["warning", "info"]


def test_a_running_cprofile_is_left_alone() -> None:
    theirs = cProfile.Profile()
    theirs.enable()
    try:
        with capture() as cap, ri.profile("mine"):
            busy_sum()
    finally:
        theirs.disable()
    line = only_profile_line(cap)
    assert line["profiled"] is False
    assert line["level"] == "warning"
    assert "another profiler is active" in line["reason"]
    names = {key[2] for key in pstats.Stats(theirs).stats}  # type: ignore[attr-defined]
    assert "busy_sum" in names  # their profile still saw everything


def test_disabled_library_profiles_and_logs_nothing() -> None:
    @ri.profile()
    def compute() -> int:
        return busy_sum(100)

    with capture(enabled=False) as cap:
        with ri.profile():
            assert compute() == busy_sum(100)
            assert sys.getprofile() is None  # no profiler was switched on
    assert cap.logs == []


# --- arguments --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "culprit"),
    [
        ({"top": 0}, "top"),
        ({"top": True}, "top"),
        ({"sort": "speed"}, "sort"),
        ({"memory": "yes"}, "memory"),
        ({"save_to": 3}, "save_to"),
        ({"name": ""}, "name"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs: dict[str, Any], culprit: str) -> None:
    with pytest.raises(ValueError, match=culprit):
        ri.profile(**kwargs)


def test_decorating_a_non_callable_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="not callable"):
        ri.profile()(42)  # type: ignore[arg-type]


# --- generators: the consumer's work is not the generator's ------------------------------------


def test_generator_profile_excludes_the_consumer() -> None:
    @ri.profile("gen")
    def produce() -> Iterator[int]:
        for i in range(3):
            busy_sum(2000)
            yield i

    with capture() as cap:
        got = []
        for item in produce():
            consumer_work()
            got.append(item)
    assert got == [0, 1, 2]
    rows = functions(only_profile_line(cap))
    assert rows[label(busy_sum)]["calls"] == 3
    assert label(consumer_work) not in rows


# --- async: only this task's awaited code ------------------------------------------------------


class BusyNeighbour:
    """A concurrent task that keeps the loop busy with other_tasks_work() between our steps."""

    def __init__(self) -> None:
        self.runs = 0
        self.stop = asyncio.Event()

    async def run(self) -> None:
        while not self.stop.is_set():
            other_tasks_work()
            self.runs += 1
            await asyncio.sleep(0)


async def awaited_work(steps: int, neighbour: BusyNeighbour) -> int:
    total = 0
    for _ in range(steps):
        total += busy_sum(2000)
        before = neighbour.runs
        # The neighbour really ran while we were suspended.
        while neighbour.runs == before:  # noqa: ASYNC110
            await asyncio.sleep(0)
    return total


async def with_neighbour(body: Any) -> Any:
    neighbour = BusyNeighbour()
    task = asyncio.create_task(neighbour.run())
    try:
        return await body(neighbour)
    finally:
        neighbour.stop.set()
        await task


def test_async_decorator_covers_only_its_task() -> None:
    @ri.profile("answer")
    async def answer(neighbour: BusyNeighbour) -> int:
        return await awaited_work(5, neighbour)

    with capture() as cap:
        result = asyncio.run(with_neighbour(answer))
    assert result == 5 * busy_sum(2000)
    rows = functions(only_profile_line(cap))
    assert rows[label(busy_sum)]["calls"] == 5
    assert label(other_tasks_work) not in rows


def test_async_with_covers_only_its_task() -> None:
    async def body(neighbour: BusyNeighbour) -> int:
        async with ri.profile("block"):
            return await awaited_work(5, neighbour)

    with capture() as cap:
        asyncio.run(with_neighbour(body))
    line = only_profile_line(cap)
    assert line["profiled"] is True, line
    rows = functions(line)
    assert rows[label(busy_sum)]["calls"] == 5
    assert label(other_tasks_work) not in rows


def test_plain_with_in_a_coroutine_covers_only_its_task() -> None:
    async def body(neighbour: BusyNeighbour) -> int:
        with ri.profile("plain-with"):
            return await awaited_work(5, neighbour)

    with capture() as cap:
        asyncio.run(with_neighbour(body))
    line = only_profile_line(cap)
    assert line["profiled"] is True, line
    rows = functions(line)
    assert rows[label(busy_sum)]["calls"] == 5
    assert label(other_tasks_work) not in rows


def test_two_tasks_profile_at_once_each_their_own_work() -> None:
    def left_work() -> int:
        return sum(range(3000))

    def right_work() -> int:
        return sum(range(3000))

    @ri.profile("left")
    async def left() -> None:
        for _ in range(4):
            left_work()
            await asyncio.sleep(0)

    @ri.profile("right")
    async def right() -> None:
        for _ in range(4):
            right_work()
            await asyncio.sleep(0)

    async def main() -> None:
        await asyncio.gather(left(), right())

    with capture() as cap:
        asyncio.run(main())
    by_name = {line["profile"]: line for line in cap.find_logs("profile")}
    assert by_name["left"]["profiled"]
    assert by_name["right"]["profiled"]
    left_rows, right_rows = functions(by_name["left"]), functions(by_name["right"])
    assert label(left_work) in left_rows
    assert label(right_work) not in left_rows
    assert label(right_work) in right_rows
    assert label(left_work) not in right_rows


def test_async_generator_profile_excludes_the_consumer() -> None:
    @ri.profile("agen")
    async def produce() -> AsyncIterator[int]:
        for i in range(3):
            busy_sum(2000)
            await asyncio.sleep(0)
            yield i

    async def main() -> list[int]:
        got = []
        async for item in produce():
            consumer_work()
            got.append(item)
        return got

    with capture() as cap:
        assert asyncio.run(main()) == [0, 1, 2]
    rows = functions(only_profile_line(cap))
    assert rows[label(busy_sum)]["calls"] == 3
    assert label(consumer_work) not in rows


def test_async_cancellation_passes_through_and_still_logs() -> None:
    @ri.profile("slow")
    async def slow() -> None:
        await asyncio.sleep(30)

    async def main() -> None:
        task = asyncio.create_task(slow())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with capture() as cap:
        asyncio.run(main())
    assert only_profile_line(cap)["profiled"] is True


@pytest.mark.skipif(sys.version_info < (3, 12), reason="sys.monitoring is 3.12+")
def test_async_with_releases_its_monitoring_tool() -> None:
    async def main() -> None:
        async with ri.profile():
            await asyncio.sleep(0)

    with capture():
        asyncio.run(main())
    monitoring: Any = getattr(sys, "monitoring")  # noqa: B009 - not in 3.11's stubs
    assert all(monitoring.get_tool(tool) != "rag_instrument.profile" for tool in range(6))


# --- generators: what the consumer sends, throws and closes reaches the profiled code ----------


def test_generator_send_throw_and_return_value_pass_through() -> None:
    @ri.profile("echo")
    def echo() -> Any:
        received = []
        while True:
            try:
                value = yield len(received)
            except KeyError as exc:
                received.append(f"caught {exc.args[0]}")
                continue
            if value is None:
                return received
            received.append(value)

    with capture() as cap:
        gen = echo()
        assert next(gen) == 0
        assert gen.send("a") == 1
        assert gen.throw(KeyError("k")) == 2
        with pytest.raises(StopIteration) as stop:
            gen.send(None)
    assert stop.value.value == ["a", "caught k"]
    assert only_profile_line(cap)["profiled"] is True


@pytest.mark.parametrize("how", ["close", "abandon"])
def test_closed_or_abandoned_generator_profiles_its_cleanup_and_logs_once(how: str) -> None:
    cleaned: list[bool] = []

    @ri.profile("gen")
    def produce() -> Iterator[int]:
        try:
            yield 1
            yield 2
        finally:
            busy_sum(2000)  # the generator's own work, though the consumer stopped early
            cleaned.append(True)

    with capture() as cap:
        gen = produce()
        assert next(gen) == 1
        if how == "close":
            gen.close()
        else:
            del gen  # reference counting finalises it here (close(), as the collector would)
    assert cleaned == [True]
    rows = functions(only_profile_line(cap))
    assert rows[label(busy_sum)]["calls"] == 1


def test_generator_exception_passes_through_unchanged_and_logs() -> None:
    error = ValueError("bad item")

    @ri.profile("gen")
    def produce() -> Iterator[int]:
        yield 1
        raise error

    with capture() as cap, pytest.raises(ValueError) as info:
        list(produce())
    assert info.value is error
    assert only_profile_line(cap)["profiled"] is True


def test_async_generator_asend_athrow_and_aclose_pass_through() -> None:
    cleaned: list[str] = []

    @ri.profile("agen")
    async def echo() -> AsyncIterator[Any]:
        received: list[Any] = []
        try:
            while True:
                try:
                    value = yield len(received)
                except KeyError as exc:
                    received.append(f"caught {exc.args[0]}")
                    continue
                received.append(value)
        finally:
            busy_sum(2000)
            cleaned.append(",".join(map(str, received)))

    async def main() -> None:
        agen: Any = echo()
        assert await agen.asend(None) == 0
        assert await agen.asend("a") == 1
        assert await agen.athrow(KeyError("k")) == 2
        await agen.aclose()

    with capture() as cap:
        asyncio.run(main())
    assert cleaned == ["a,caught k"]
    rows = functions(only_profile_line(cap))
    assert rows[label(busy_sum)]["calls"] == 1


def test_the_librarys_bookkeeping_is_not_in_the_profile(tmp_path: Path) -> None:
    # The context variables and sets ri.profile itself touches around the block are not
    # the application's calls: neither the line nor the .prof file lists them.
    def tiny() -> int:
        return sum(range(200))

    path = tmp_path / "tiny.prof"
    with capture() as cap:
        with ri.profile("tiny", top=10, save_to=str(path)):
            tiny()

        @ri.profile("decorated", top=10)
        async def decorated() -> int:
            return tiny()

        asyncio.run(decorated())
    for line in cap.find_logs("profile"):
        labels = [row["function"] for row in line["functions"]]
        assert not [x for x in labels if "ContextVar" in x or "set.add" in x], labels
        assert any("sum" in x for x in labels), labels
    listed = {f"{name}" for _file, _line, name in pstats.Stats(str(path)).stats}  # type: ignore[attr-defined]
    assert not [name for name in listed if "ContextVar" in name or "'set'" in name], listed


def test_bare_profile_decorator_profiles_with_the_defaults() -> None:
    @ri.profile
    def work() -> int:
        return sum(range(100))

    with capture() as cap:
        assert work() == 4950
    (line,) = cap.find_logs("profile")
    assert line["profile"].endswith("work")
    assert any("sum" in row["function"] for row in line["functions"])


def test_a_recursive_profiled_function_writes_one_line_per_outermost_call() -> None:
    # Each level was a nested profile: 50 "profiled": false warnings and one real profile.
    @ri.profile
    def walk(n: int) -> int:
        return 0 if n == 0 else 1 + walk(n - 1)

    @ri.profile
    async def awalk(n: int) -> int:
        return 0 if n == 0 else 1 + await awalk(n - 1)

    with capture() as cap:
        assert walk(50) == 50
        assert walk(3) == 3
        assert asyncio.run(awalk(20)) == 20
    lines = cap.find_logs("profile")
    assert len(lines) == 3
    assert all(line["profiled"] is True for line in lines)


def test_calls_in_child_tasks_and_threads_are_runs_of_their_own() -> None:
    # The recursion check was inherited by child tasks and worker threads (the context is
    # copied there), so their calls were skipped, and their work was in no profile.
    @ri.profile
    async def crawl(depth: int) -> int:
        if depth == 0:
            return busy_sum()
        results = await asyncio.gather(*(crawl(depth - 1) for _ in range(3)))
        return sum(results)

    @ri.profile
    def fan(depth: int) -> int:
        if depth == 0:
            return busy_sum()
        with ThreadPoolExecutor(2) as pool:
            return sum(pool.map(ri.wrap_context(fan), [depth - 1] * 2))

    with capture() as cap:
        asyncio.run(crawl(1))
        fan(1)
    lines = cap.find_logs("profile")
    assert len(lines) == 1 + 3 + 1 + 2
    assert all(line["profiled"] is True for line in lines if line["level"] == "info")
