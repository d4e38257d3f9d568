"""inject_headers / extract_context across services, and wrap_context across threads."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry import context as otel_context
from opentelemetry import trace
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import rag_instrument as ri
from rag_instrument import _breakdown
from rag_instrument._context import bound, current_frame, current_stage
from rag_instrument.testing import Capture, capture

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def trace_id_of(ctx: otel_context.Context) -> str:
    return format(trace.get_current_span(ctx).get_span_context().trace_id, "032x")


# --- inject / extract ------------------------------------------------------------------------


def test_inject_then_extract_round_trips_the_current_span() -> None:
    with capture(), ri.stage("retrieval") as span:
        headers = ri.inject_headers()
        same = {"accept": "*/*"}
        assert ri.inject_headers(same) is same
    assert headers["traceparent"].split("-")[1] == format(span.get_span_context().trace_id, "032x")
    assert same["traceparent"] == headers["traceparent"]
    remote = trace.get_current_span(ri.extract_context(headers)).get_span_context()
    assert remote.is_remote
    assert remote.trace_id == span.get_span_context().trace_id
    assert remote.span_id == span.get_span_context().span_id


def test_inject_outside_any_span_adds_nothing() -> None:
    with capture():
        assert ri.inject_headers() == {}


def test_inject_works_on_a_framework_headers_object() -> None:
    with capture(), ri.stage("retrieval"):
        headers = ri.inject_headers(httpx.Headers({"Accept": "*/*"}))
    assert isinstance(headers, httpx.Headers)
    assert headers["traceparent"].startswith("00-")


@pytest.mark.parametrize(
    "headers",
    [
        {"Traceparent": TRACEPARENT},
        {"TRACEPARENT": TRACEPARENT.encode()},
        [(b"traceparent", TRACEPARENT.encode()), (b"x", b"\xff")],
        httpx.Headers({"traceparent": TRACEPARENT}),
        {"traceparent": [TRACEPARENT]},
        {"traceparent": (TRACEPARENT.encode(),)},
    ],
    ids=["mixed-case", "bytes-values", "asgi-pairs", "httpx-headers", "list", "tuple-bytes"],
)
def test_extract_accepts_any_header_shape(headers: Any) -> None:
    assert trace_id_of(ri.extract_context(headers)) == "0af7651916cd43dd8448eb211c80319c"


@given(
    st.one_of(
        st.none(),
        st.dictionaries(st.text(max_size=20), st.text(max_size=200), max_size=5),
        st.lists(st.tuples(st.binary(max_size=20), st.binary(max_size=200)), max_size=5),
        st.dictionaries(
            st.just("traceparent"), st.text(max_size=80) | st.binary(max_size=80), max_size=1
        ),
    )
)
def test_extract_never_raises_and_garbage_gives_no_parent(headers: Any) -> None:
    ctx = ri.extract_context(headers)
    span_context = trace.get_current_span(ctx).get_span_context()
    if span_context.is_valid:
        assert isinstance(headers, dict)
        assert "traceparent" in {str(k).lower() for k in headers}


# --- two services, one trace -----------------------------------------------------------------


def served(app: Any) -> Any:
    """Serve ``app`` as a separate process would: each request in a fresh, empty context."""

    async def asgi(scope: Any, receive: Any, send: Any) -> None:
        task = asyncio.get_running_loop().create_task(
            app(scope, receive, send), context=contextvars.Context()
        )
        await task

    return asgi


def build_services(propagate: bool) -> tuple[Any, Any]:
    async def answer(request: Request) -> Response:
        with ri.stage("generation"):
            pass
        return JSONResponse({"request_id": request.headers.get("x-request-id")})

    service_b = served(ri.RequestMiddleware(Starlette(routes=[Route("/answer", answer)])))

    async def search(request: Request) -> Response:
        with ri.stage("search"):
            headers = ri.inject_headers() if propagate else {}
            transport = httpx.ASGITransport(app=service_b)
            async with httpx.AsyncClient(transport=transport, base_url="http://b") as client:
                response = await client.get("/answer", headers=headers)
        return JSONResponse(response.json())

    service_a = served(ri.RequestMiddleware(Starlette(routes=[Route("/search", search)])))
    return service_a, service_b


@pytest.mark.asyncio
async def test_two_services_calling_each_other_make_one_trace() -> None:
    service_a, _ = build_services(propagate=True)
    with capture() as cap:
        transport = httpx.ASGITransport(app=service_a)
        async with httpx.AsyncClient(transport=transport, base_url="http://a") as client:
            await client.get("/search", headers={"traceparent": TRACEPARENT})
    spans = {s.name: s for s in cap.spans}
    assert set(spans) >= {"GET /search", "search", "GET /answer", "generation"}
    assert {format(s.context.trace_id, "032x") for s in cap.spans} == {
        "0af7651916cd43dd8448eb211c80319c"
    }
    server_b = spans["GET /answer"]
    assert server_b.kind is trace.SpanKind.SERVER
    assert server_b.parent is not None
    assert server_b.parent.is_remote
    assert server_b.parent.span_id == spans["search"].context.span_id
    assert spans["generation"].parent.span_id == server_b.context.span_id  # type: ignore[union-attr]
    lines = cap.find_logs("request completed")
    assert [line["route"] for line in lines] == ["/answer", "/search"]
    assert lines[0]["trace_id"] == lines[1]["trace_id"]


@pytest.mark.asyncio
async def test_without_propagation_the_services_make_two_traces() -> None:
    service_a, _ = build_services(propagate=False)
    with capture() as cap:
        transport = httpx.ASGITransport(app=service_a)
        async with httpx.AsyncClient(transport=transport, base_url="http://a") as client:
            await client.get("/search")
    lines = cap.find_logs("request completed")
    assert lines[0]["trace_id"] != lines[1]["trace_id"]


# --- wrap_context: threads and executors -------------------------------------------------------


def snapshot() -> dict[str, Any]:
    """What a job sees of the caller's context."""
    span = trace.get_current_span().get_span_context()
    return {
        "stage": current_stage(),
        "bound": dict(bound().log),
        "trace_id": span.trace_id if span.is_valid else None,
        "span_id": span.span_id if span.is_valid else None,
        "frame": current_frame() is not None,
    }


def job(tag: str) -> dict[str, Any]:
    """Runs in a worker: opens a stage, records db work, binds a value it must not leak."""
    seen = snapshot()
    with ri.stage("embedding"):
        _breakdown.record("db", 2.0)
    ri.bind_context(leaked=tag)
    return seen


def expected(span: Any) -> dict[str, Any]:
    ctx = span.get_span_context()
    return {
        "stage": "retrieval",
        "bound": {"request_id": "r-1"},
        "trace_id": ctx.trace_id,
        "span_id": ctx.span_id,
        "frame": True,
    }


def check_children(cap: Any, span: Any, runs: int) -> None:
    embeddings = [s for s in cap.spans if s.name == "embedding"]
    assert len(embeddings) == runs
    for child in embeddings:
        assert child.parent is not None
        assert child.parent.span_id == span.get_span_context().span_id
        assert child.attributes["request_id"] == "r-1"
    (line,) = cap.find_logs("retrieval completed")
    assert line["breakdown"]["db"]["count"] == runs


def test_thread_pool_executor_jobs_keep_trace_stage_and_bound_context() -> None:
    with capture() as cap, ThreadPoolExecutor(max_workers=1) as pool:
        with ri.request_context(request_id="r-1"), ri.stage("retrieval") as span:
            seen = [pool.submit(ri.wrap_context(job), f"job{n}").result() for n in range(2)]
            mapped = list(pool.map(ri.wrap_context(job), ["m1", "m2"]))
            want = expected(span)
        # The worker thread is reused: a plain job afterwards sees nothing of the others.
        leftover = pool.submit(snapshot).result()
    assert seen == [want, want]
    assert mapped == [want, want]
    assert leftover == {
        "stage": None,
        "bound": {},
        "trace_id": None,
        "span_id": None,
        "frame": False,
    }
    check_children(cap, span, runs=4)


def test_without_wrap_context_a_reused_worker_would_leak() -> None:
    """The failure wrap_context prevents (structlog#491): a worker keeps its last job's vars."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(ri.bind_context, leaked="yes").result()
        assert pool.submit(lambda: dict(bound().log)).result() == {"leaked": "yes"}
        pool.submit(ri.wrap_context(ri.bind_context), other="no").result()
        assert pool.submit(lambda: dict(bound().log)).result() == {"leaked": "yes"}


@pytest.mark.asyncio
async def test_run_in_executor_and_to_thread_keep_the_callers_context() -> None:
    loop = asyncio.get_running_loop()
    with capture() as cap, ThreadPoolExecutor(max_workers=1) as pool:
        with ri.request_context(request_id="r-1"), ri.stage("retrieval") as span:
            in_executor = await loop.run_in_executor(pool, ri.wrap_context(job), "e")
            # asyncio.to_thread copies the context itself; wrapping is harmless.
            to_thread = await asyncio.to_thread(job, "t")
            wrapped_to_thread = await asyncio.to_thread(ri.wrap_context(job), "w")
            want = expected(span)
        leftover = await loop.run_in_executor(pool, snapshot)
    assert in_executor == want
    assert to_thread == want
    assert wrapped_to_thread == want
    assert leftover["bound"] == {}
    assert leftover["trace_id"] is None
    check_children(cap, span, runs=3)


def test_wrap_context_keeps_the_function_and_its_results() -> None:
    sentinel = object()
    error = KeyError("k")

    def give(x: object) -> object:
        """Doc."""
        return x

    def fail() -> None:
        raise error

    wrapped = ri.wrap_context(give)
    assert wrapped(sentinel) is sentinel
    assert wrapped.__wrapped__ is give  # type: ignore[attr-defined]
    assert wrapped.__name__ == "give"
    assert wrapped.__doc__ == "Doc."
    with pytest.raises(KeyError) as raised:
        ri.wrap_context(fail)()
    assert raised.value is error


def test_concurrent_calls_of_one_wrapped_function_do_not_see_each_other() -> None:
    barrier = threading.Barrier(4)

    def bind_and_read(n: int) -> dict[str, Any]:
        ri.bind_context(n=n)
        barrier.wait(timeout=10)
        return dict(bound().log)

    with ri.request_context(request_id="r-1"):
        wrapped = ri.wrap_context(bind_and_read)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(wrapped, range(4)))
    assert results == [{"request_id": "r-1", "n": n} for n in range(4)]


def test_wrap_context_runs_an_async_functions_body_in_the_callers_context(
    rag_capture: Capture,
) -> None:
    import asyncio
    import inspect
    import threading

    async def answer(n: int) -> int:
        """Doc."""
        await asyncio.sleep(0)  # the body resumes after a step: still in the context
        ri.get_logger("app").info("in coroutine")
        return n * 2

    with ri.request_context(request_id="r-async"), ri.stage("generation"):
        wrapped = ri.wrap_context(answer)
    assert inspect.iscoroutinefunction(wrapped)
    assert wrapped.__qualname__ == answer.__qualname__
    assert wrapped.__doc__ == "Doc."
    results: list[int] = []
    worker = threading.Thread(target=lambda: results.append(asyncio.run(wrapped(7))))
    worker.start()
    worker.join()
    assert results == [14]
    (line,) = rag_capture.find_logs("in coroutine")
    assert line["context"] == {"pipeline_stage": "generation", "request_id": "r-async"}


def test_wrap_context_keeps_generators_and_their_context(rag_capture: Capture) -> None:
    import asyncio
    import inspect

    def numbers(n: int) -> Iterator[int]:
        for i in range(n):
            ri.get_logger("app").info("gen step", i=i)
            yield i
        return None

    async def anumbers(n: int) -> AsyncIterator[int]:
        for i in range(n):
            await asyncio.sleep(0)
            ri.get_logger("app").info("agen step", i=i)
            yield i

    with ri.request_context(request_id="r-gen"):
        gen = ri.wrap_context(numbers)
        agen = ri.wrap_context(anumbers)
    assert inspect.isgeneratorfunction(gen)
    assert inspect.isasyncgenfunction(agen)
    assert list(gen(3)) == [0, 1, 2]

    async def consume() -> list[int]:
        return [i async for i in agen(2)]

    assert asyncio.run(consume()) == [0, 1]
    steps = rag_capture.find_logs("gen step") + rag_capture.find_logs("agen step")
    assert len(steps) == 5
    assert all(line["context"] == {"request_id": "r-gen"} for line in steps)


def test_wrap_context_passes_exceptions_and_cancellation_through() -> None:
    import asyncio

    async def fails() -> None:
        await asyncio.sleep(0)
        raise KeyError("missing")

    async def waits(started: asyncio.Event) -> None:
        started.set()
        await asyncio.Event().wait()

    async def main() -> None:
        with pytest.raises(KeyError, match="missing"):
            await ri.wrap_context(fails)()
        started = asyncio.Event()
        task = asyncio.ensure_future(ri.wrap_context(waits)(started))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_wrap_context_keeps_a_types_coroutine_awaitable() -> None:
    import types

    @types.coroutine
    def legacy() -> Iterator[None]:
        yield
        return 5

    @types.coroutine
    def times(n: int) -> Iterator[None]:
        yield
        return n * 5

    async def main() -> tuple[int, int]:
        plain = await ri.wrap_context(legacy)()
        partial = await ri.wrap_context(functools.partial(times, 2))()
        return plain, partial  # type: ignore[return-value]

    assert asyncio.run(main()) == (5, 10)


@pytest.mark.parametrize("as_bytes", [False, True])
def test_inject_headers_fills_a_list_of_pairs(as_bytes: bool) -> None:
    # ASGI-style pairs (bytes) and str pairs: extract_context takes both, so inject does.
    stale = (b"traceparent", b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01")
    headers: list[tuple[Any, Any]] = [(b"accept", b"*/*"), stale] if as_bytes else [
        ("accept", "*/*"),
        (stale[0].decode(), stale[1].decode()),
    ]
    with capture(), ri.stage("retrieval") as span:
        same = ri.inject_headers(headers)
        expected = span.get_span_context().trace_id
    assert same is headers
    names = [name for name, _value in headers]
    assert names.count(b"traceparent" if as_bytes else "traceparent") == 1
    assert trace.get_current_span(ri.extract_context(headers)).get_span_context().trace_id == (
        expected
    )


def test_garbage_given_to_the_helpers_is_quiet_and_harmless(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert ri.extract_context(42) == otel_context.Context()  # type: ignore[arg-type]
    assert "Traceback" not in capsys.readouterr().err
    with capture() as cap, ri.stage("retrieval"):
        assert ri.inject_headers(42) == 42  # type: ignore[type-var]
    assert any("cannot hold headers" in line["event"] for line in cap.logs)
    not_pairs: list[Any] = [1, 2, 3]
    with capture() as cap, ri.stage("retrieval"):
        assert ri.inject_headers(not_pairs) is not_pairs
    assert not_pairs == [1, 2, 3]  # not changed: no pair added to a list of no pairs
    assert any("type list cannot hold headers" in line["event"] for line in cap.logs)


def test_inject_headers_gives_bytes_to_any_form_of_byte_pairs() -> None:
    # Pairs as lists (ASGI allows them) and bytearray names got str pairs added.
    for headers in ([[b"accept", b"*/*"]], [(bytearray(b"accept"), b"*/*")]):
        with capture(), ri.stage("retrieval"):
            ri.inject_headers(headers)
        added = [item for item in headers if bytes(item[0]) == b"traceparent"]
        assert len(added) == 1
        assert isinstance(added[0][1], bytes)
