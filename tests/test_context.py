"""Per-task and per-thread state (``_context``): bound values, the current stage, copies."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import rag_instrument as ri
from rag_instrument._context import bound, current_frame, current_stage
from rag_instrument.testing import Capture, capture


def test_bound_context_is_isolated_and_unbound(rag_capture: Capture) -> None:
    log = ri.get_logger()
    ri.bind_context(user="u1", tenant="t1")
    ri.unbind_context("user", "missing")

    def other_thread() -> None:
        log.info("thread line")

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    log.info("main line")
    with ri.request_context(request_id="r-9"):
        log.info("inside request")
    log.info("after request")
    lines = {line["event"]: line["context"] for line in rag_capture.logs}
    assert lines["thread line"] == {}
    assert lines["main line"] == {"tenant": "t1"}
    assert lines["inside request"] == {"tenant": "t1", "request_id": "r-9"}
    assert lines["after request"] == {"tenant": "t1"}


def test_pipeline_stage_cannot_be_forged_by_binding(rag_capture: Capture) -> None:
    ri.bind_context(pipeline_stage="generation", user="u")
    with ri.stage("retrieval"):
        ri.get_logger().info("inside")
    assert rag_capture.find_logs("inside")[0]["context"] == {
        "pipeline_stage": "retrieval",
        "user": "u",
    }


@pytest.mark.asyncio
async def test_concurrent_tasks_never_see_each_other(rag_capture: Capture) -> None:
    @ri.stage("retrieval")
    async def retrieve(i: int) -> None:
        for _ in range(i % 5):  # interleave the tasks: each yields a different number of times
            await asyncio.sleep(0)
        ri.get_logger().info("inside", i=i)

    @ri.stage("search")
    async def search(i: int) -> None:
        ri.bind_context(request_id=f"r-{i}")
        await retrieve(i)

    await asyncio.gather(*(search(i) for i in range(200)))
    spans = {s.context.span_id: s for s in rag_capture.spans}
    for line in rag_capture.find_logs("inside"):
        assert line["context"] == {"pipeline_stage": "retrieval", "request_id": f"r-{line['i']}"}
    for span in rag_capture.spans:
        if span.name == "retrieval":
            assert span.parent is not None
            parent = spans[span.parent.span_id]
            assert parent.attributes is not None
            assert span.attributes is not None
            assert parent.name == "search"
            assert span.attributes["request_id"] == f"r-{_i(rag_capture, span)}"
    assert bound().log == {}
    assert current_frame() is None


def _i(cap: Capture, span: Any) -> int:
    for line in cap.find_logs("inside"):
        if line["span_id"] == format(span.context.span_id, "016x"):
            return int(line["i"])
    raise AssertionError("no line for span")


def test_threads_never_see_each_other(rag_capture: Capture) -> None:
    barrier = threading.Barrier(8)
    seen: dict[int, Any] = {}

    @ri.stage("retrieval")
    def work(i: int) -> None:
        ri.bind_context(worker=i)
        barrier.wait(timeout=5)
        seen[i] = (current_stage(), dict(bound().log))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(8)))
    assert seen == {i: ("retrieval", {"worker": i}) for i in range(8)}


def test_wrap_context_carries_stage_into_executor(rag_capture: Capture) -> None:
    def child() -> str | None:
        with ri.traced("child op"):
            return current_stage()

    with ri.stage("retrieval"), ThreadPoolExecutor(2) as pool:
        assert pool.submit(ri.wrap_context(child)).result() == "retrieval"
        # Without it the worker thread has no stage.
        assert pool.submit(child).result() is None
    parent = rag_capture.span("retrieval")
    children = [s for s in rag_capture.spans if s.name == "child op"]
    assert any(s.parent and s.parent.span_id == parent.context.span_id for s in children)


def test_bound_values_are_redacted_once_and_become_stage_attributes(rag_capture: Capture) -> None:
    ri.bind_context(api_key="sk-live-abcdefghijklmnop1234", user="u1", blob=object())
    with ri.stage("retrieval"):
        ri.get_logger().info("inside")
    context = rag_capture.find_logs("inside")[0]["context"]
    assert context["api_key"] == "[REDACTED]"
    assert context["user"] == "u1"
    assert context["blob"].startswith("<")  # a placeholder, never a crash
    attrs = dict(rag_capture.span("retrieval").attributes or {})
    assert attrs["api_key"] == "[REDACTED]"
    assert attrs["user"] == "u1"
    assert "abcdefghijklmnop1234" not in repr(rag_capture.logs) + repr(attrs)


def test_request_context_restores_the_previous_values_when_the_block_raises(
    rag_capture: Capture,
) -> None:
    ri.bind_context(tenant="t1")
    with pytest.raises(KeyError), ri.request_context(request_id="r-1", tenant="t2"):
        ri.get_logger().info("inside")
        raise KeyError("boom")
    ri.get_logger().info("after")
    lines = {line["event"]: line["context"] for line in rag_capture.logs}
    assert lines["inside"] == {"tenant": "t2", "request_id": "r-1"}
    assert lines["after"] == {"tenant": "t1"}


def test_request_context_left_in_another_context_touches_nothing(rag_capture: Capture) -> None:
    manager = ri.request_context(request_id="r-1")
    manager.__enter__()
    other = contextvars.Context()
    other.run(ri.bind_context, intruder=True)
    # Exiting in a context that never entered (a generator finalised elsewhere): no error,
    # and that context's own values are left alone.
    other.run(manager.__exit__, None, None, None)
    assert other.run(lambda: dict(bound().log)) == {"intruder": True}
    assert dict(bound().log) == {"request_id": "r-1"}
    ri.unbind_context("request_id")
    assert bound().log == {}


@pytest.mark.asyncio
async def test_a_task_works_on_a_copy_of_its_creators_values(rag_capture: Capture) -> None:
    ri.bind_context(request_id="r-1")
    bound_in_task = asyncio.Event()

    async def child() -> dict[str, Any]:
        ri.bind_context(step="child")
        ri.unbind_context("request_id")
        bound_in_task.set()
        return dict(bound().log)

    task = asyncio.create_task(child())
    await bound_in_task.wait()
    assert dict(bound().log) == {"request_id": "r-1"}  # the child's changes stay its own
    assert await task == {"step": "child"}


def test_wrap_context_gives_each_call_a_fresh_copy() -> None:
    ri.bind_context(request_id="r-1")
    seen: list[dict[str, Any]] = []

    def job(i: int) -> None:
        seen.append(dict(bound().log))
        ri.bind_context(job=i)  # must not reach the next job on the same worker thread

    wrapped = ri.wrap_context(job)
    with ThreadPoolExecutor(1) as pool:
        for i in range(3):
            pool.submit(wrapped, i).result()
    assert seen == [{"request_id": "r-1"}] * 3
    assert wrapped.__wrapped__ is job  # type: ignore[attr-defined]
    assert wrapped.__name__ == "job"


def test_outside_any_stage_there_is_no_stage_or_frame() -> None:
    assert current_stage() is None
    assert current_frame() is None
    with ri.stage("retrieval"), ri.traced("inner op"):
        assert current_stage() == "retrieval"  # a traced operation reports its stage
        frame = current_frame()
        assert frame is not None
        assert frame.name == "inner op"
    assert current_stage() is None


def test_a_long_bound_value_is_cut_once_on_stage_spans() -> None:
    # The marker gives the original length, on the span as in the line (cut once).
    value = "q" * 2500
    with capture() as cap, ri.request_context(user_query=value, api_key="sk-x"):
        with ri.stage("retrieval"):
            pass
    line = cap.find_logs("retrieval completed")[0]
    attributes = cap.span("retrieval").attributes
    assert line["context"]["user_query"].endswith("[truncated, 2500 chars]")
    assert attributes["user_query"].endswith("[truncated, 2500 chars]")
    assert attributes["user_query"] == line["context"]["user_query"]
    assert attributes["api_key"] == "[REDACTED]"


def test_a_bound_object_reads_the_same_on_spans_and_lines() -> None:
    # On spans its repr was JSON-quoted ('"<T object ...>"'), in lines it was not.
    class Tenant:
        def __repr__(self) -> str:
            return "<Tenant acme>"

    with capture() as cap:
        with ri.request_context(tenant=Tenant(), ids={"a": 1}):
            with ri.stage("retrieval"):
                pass
    attributes = cap.span("retrieval").attributes
    assert attributes["tenant"] == "<Tenant acme>" == cap.logs[0]["context"]["tenant"]
    assert attributes["ids"] == '{"a":1}'  # a structure stays its JSON text on a span


def test_unbind_context_takes_a_list_of_keys_and_never_raises(rag_capture: Capture) -> None:
    ri.bind_context(request_id="r", tenant="t", user="u")
    ri.unbind_context(["request_id", "tenant"])
    ri.unbind_context({"a": 1})  # type: ignore[arg-type]  # no key in it: nothing, no error
    ri.unbind_context(3)  # type: ignore[arg-type]
    ri.get_logger("t").info("x")
    assert rag_capture.find_logs("x")[0]["context"] == {"user": "u"}
    ri.unbind_context("user")


@pytest.mark.asyncio
async def test_request_context_with_async_with_and_as_a_decorator(rag_capture: Capture) -> None:
    log = ri.get_logger("t")
    async with ri.request_context(request_id="a-1"):
        log.info("inside async with")
    log.info("after")

    @ri.request_context(request_id="d-1")
    async def handler() -> int:
        log.info("inside decorated")
        return 7

    assert await handler() == 7
    assert rag_capture.find_logs("inside async with")[0]["context"] == {"request_id": "a-1"}
    assert rag_capture.find_logs("after")[0]["context"] == {}
    assert rag_capture.find_logs("inside decorated")[0]["context"] == {"request_id": "d-1"}


@pytest.mark.asyncio
async def test_one_request_context_object_entered_again_restores_each_time(
    rag_capture: Capture,
) -> None:
    shared = ri.request_context(user="u1")
    with shared:
        with shared:
            pass
        assert bound().log == {"user": "u1"}
    assert bound().log == {}

    async def task(i: int) -> None:
        async with shared:
            await asyncio.sleep(0)
            ri.bind_context(i=i)
            await asyncio.sleep(0)
        assert bound().log == {}

    await asyncio.gather(*(task(i) for i in range(5)))
    assert bound().log == {}


@pytest.mark.asyncio
async def test_request_context_decorates_generators_every_step_bound(
    rag_capture: Capture,
) -> None:
    log = ri.get_logger("t")

    @ri.request_context(request_id="gen-1")
    def numbers() -> Any:
        for n in range(2):
            log.info("step", n=n)
            yield n

    @ri.request_context(request_id="agen-1")
    async def anumbers() -> Any:
        for n in range(2):
            log.info("astep", n=n)
            yield n

    assert list(numbers()) == [0, 1]
    assert bound().log == {}  # the consumer's context is left alone
    assert [n async for n in anumbers()] == [0, 1]
    assert bound().log == {}
    steps = rag_capture.find_logs("step") + rag_capture.find_logs("astep")
    assert [line["context"]["request_id"] for line in steps] == ["gen-1"] * 2 + ["agen-1"] * 2


def test_request_context_keeps_what_it_decorates_recognisable() -> None:
    import inspect

    @ri.request_context(a=1)
    async def coro() -> None: ...

    @ri.request_context(a=1)
    def gen() -> Any:
        yield 1

    @ri.request_context(a=1)
    async def agen() -> Any:
        yield 1

    assert inspect.iscoroutinefunction(coro)
    assert inspect.isgeneratorfunction(gen)
    assert inspect.isasyncgenfunction(agen)
    assert gen.__name__ == "gen"


def test_one_request_context_object_shared_by_threads_never_raises() -> None:
    import sys

    shared = ri.request_context(tenant="t1")
    errors: list[BaseException] = []

    def work() -> None:
        for _ in range(2000):
            try:
                with shared:
                    assert bound().log == {"tenant": "t1"}
            except BaseException as exc:  # collected for the assertion
                errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    assert shared._tokens == []
