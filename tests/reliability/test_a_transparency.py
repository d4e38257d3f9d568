"""A. Transparency of wrapped code (RELIABILITY.md A1-A8)."""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import StatusCode

import rag_instrument as ri
from rag_instrument.testing import Capture

SENTINEL = object()


def sync_fn(a: int, b: int = 2) -> object:
    """Doc."""
    return SENTINEL


async def async_fn(a: int, b: int = 2) -> object:
    """Doc."""
    return SENTINEL


def gen_fn(n: int) -> Iterator[object]:
    """Doc."""
    yield SENTINEL


async def agen_fn(n: int) -> AsyncIterator[object]:
    """Doc."""
    yield SENTINEL


class Thing:
    def method(self, x: int) -> object:
        return SENTINEL

    @classmethod
    def cls_method(cls, x: int) -> object:
        return SENTINEL

    @staticmethod
    def static(x: int) -> object:
        return SENTINEL


class CallableObject:
    def __call__(self, x: int) -> object:
        return SENTINEL


@pytest.mark.parametrize("fn", [sync_fn, async_fn, gen_fn, agen_fn])
def test_a01_function_kinds_keep_identity_metadata_and_kind(fn: Any) -> None:
    for decorate in (ri.stage("retrieval"), ri.traced):
        wrapped = decorate(fn)
        assert wrapped.__wrapped__ is fn
        assert inspect.signature(wrapped) == inspect.signature(fn)
        for name in ("__name__", "__qualname__", "__doc__"):
            assert getattr(wrapped, name) == getattr(fn, name)
        assert inspect.iscoroutinefunction(wrapped) == inspect.iscoroutinefunction(fn)
        assert inspect.isasyncgenfunction(wrapped) == inspect.isasyncgenfunction(fn)
        assert inspect.isgeneratorfunction(wrapped) == inspect.isgeneratorfunction(fn)


def test_a01_return_values_are_the_same_object(rag_capture: Capture) -> None:
    async def consume() -> tuple[object, object, object]:
        out = await ri.stage("a")(async_fn)(1)
        items = [x async for x in ri.stage("b")(agen_fn)(1)]
        return out, items[0], next(iter(ri.stage("c")(gen_fn)(1)))

    assert ri.stage("d")(sync_fn)(1) is SENTINEL
    assert all(value is SENTINEL for value in asyncio.run(consume()))
    thing = Thing()
    decorated = type(
        "Decorated",
        (),
        {
            "method": ri.stage("m")(Thing.method),
            "cls_method": ri.stage("c")(classmethod(Thing.cls_method.__func__)),
            "static": ri.stage("s")(staticmethod(Thing.static)),
        },
    )
    assert decorated().method(1) is SENTINEL
    assert decorated.cls_method(1) is SENTINEL
    assert decorated.static(1) is SENTINEL
    assert ri.stage("p")(functools.partial(sync_fn, 1))() is SENTINEL
    assert ri.stage("o")(CallableObject())(1) is SENTINEL
    assert thing.method(1) is SENTINEL


try:  # at module level, as an application imports it (its annotations are resolved here)
    import fastapi
except ImportError:  # pragma: no cover - the web extra is not installed
    fastapi = None  # type: ignore[assignment]


def dependency() -> str:
    return "dep"


def test_a02_fastapi_route_with_annotated_depends_is_unchanged() -> None:
    # This module has postponed annotations (from __future__ import annotations): FastAPI
    # must resolve "Annotated[str, Depends(dependency)]" through the decorator.
    if fastapi is None:
        pytest.skip("needs FastAPI (the web extra)")
    from fastapi.testclient import TestClient

    def build(decorate: bool) -> Any:
        app = fastapi.FastAPI()

        async def route(q: str, d: Annotated[str, fastapi.Depends(dependency)]) -> dict[str, str]:
            return {"q": q, "d": d}

        app.get("/r")(ri.stage("search")(route) if decorate else route)
        return app

    with TestClient(build(False)) as plain_client, TestClient(build(True)) as wrapped_client:
        plain = plain_client.get("/r?q=x")
        wrapped = wrapped_client.get("/r?q=x")
    assert (wrapped.status_code, wrapped.json()) == (plain.status_code, plain.json())
    assert (plain.status_code, plain.json()) == (200, {"q": "x", "d": "dep"})


def test_a03_exception_is_the_same_object_with_chain_and_one_event(rag_capture: Capture) -> None:
    cause = KeyError("k")
    raised = ValueError("bad")

    @ri.stage("retrieval")
    def fail() -> None:
        raise raised from cause

    with pytest.raises(ValueError) as info:
        fail()
    assert info.value is raised
    assert info.value.__cause__ is cause
    frames = [f.name for f in info.traceback]
    assert frames[-1] == "fail"  # the traceback reaches user code
    span = rag_capture.span("retrieval")
    assert span.status.status_code is StatusCode.ERROR
    assert [e.name for e in span.events] == ["exception"]


class _Exploding(SpanExporter):
    def export(self, spans: Any) -> SpanExportResult:
        raise RuntimeError("exporter exploded")


class _ExplodingProcessor(SpanProcessor):
    def on_end(self, span: ReadableSpan) -> None:
        raise RuntimeError("processor exploded")


def test_a04_raising_exporter_or_processor_never_replaces_the_result(
    no_internal_raise: None,
) -> None:
    from opentelemetry.sdk.trace import TracerProvider

    provider = TracerProvider()
    provider.add_span_processor(_ExplodingProcessor())
    ri.configure(exporter=_Exploding(), tracer_provider=provider)

    @ri.stage("retrieval")
    def ok() -> object:
        return SENTINEL

    @ri.stage("retrieval")
    def fail() -> None:
        raise ValueError("app")

    assert ok() is SENTINEL
    with pytest.raises(ValueError, match="app"):
        fail()
    ri.shutdown()
    provider.shutdown()


def test_a05_raising_repr_or_hook_is_rate_limited_and_harmless(
    rag_capture: Capture, caplog: pytest.LogCaptureFixture, no_internal_raise: None
) -> None:
    class Hostile:
        def __repr__(self) -> str:
            raise RuntimeError("repr")

    @ri.stage("retrieval", arg=Hostile())
    def run(x: Any) -> object:
        return SENTINEL

    with caplog.at_level(logging.WARNING, logger="rag_instrument.internal"):
        for _ in range(50):
            assert run(Hostile()) is SENTINEL
            ri.get_logger().info("x", value=Hostile())
    assert len(caplog.records) <= 1


def test_a07_disabled_or_unconfigured_passes_through(capsys: pytest.CaptureFixture[str]) -> None:
    @ri.stage("retrieval")
    def run() -> object:
        return SENTINEL

    assert run() is SENTINEL  # unconfigured: no SDK provider set
    ri.configure(enabled=False)
    assert run() is SENTINEL
    with ri.stage("x"), ri.traced("y"):
        pass
    assert capsys.readouterr().err == ""


def test_a08_a_handler_that_logs_back_never_deadlocks(rag_capture: Capture) -> None:
    class Echo(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            ri.get_logger().warning("echo", of=record.getMessage())
            with ri.stage("inside-handler"):
                pass

    handler = Echo()
    internal = logging.getLogger("rag_instrument.internal")
    internal.addHandler(handler)
    done = threading.Event()

    def work() -> None:
        from rag_instrument._utils import warn_once

        for i in range(20):
            warn_once.warning(f"message {i}")
            ri.get_logger().info("app line")
        done.set()

    try:
        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        assert done.wait(10), "deadlock"
    finally:
        internal.removeHandler(handler)


@pytest.mark.asyncio
async def test_a06_llm_stream_proxy_behaves_like_the_sdk_stream() -> None:
    openai = pytest.importorskip("openai")
    from rag_instrument.integrations.openai import instrument_openai
    from rag_instrument.testing import capture
    from support.fake_llm import FakeLLMServer

    messages = [{"role": "user", "content": "hi"}]
    with FakeLLMServer() as server, capture() as cap:
        kw: dict[str, Any] = {"api_key": "k" * 20, "base_url": server.openai_base_url}
        client = instrument_openai(openai.OpenAI(max_retries=0, **kw))
        stream = client.chat.completions.create(model="m", messages=messages, stream=True)
        assert isinstance(stream, openai.Stream)
        assert stream.response.status_code == 200
        with stream as same:
            assert same is stream
            assert list(stream)
        closed = client.chat.completions.create(model="m", messages=messages, stream=True)
        closed.close()
        raw = client.chat.completions.with_raw_response.create(model="m", messages=messages)
        assert raw.parse().choices[0].message.content == server.reply_text
        aclient = instrument_openai(openai.AsyncOpenAI(max_retries=0, **kw))
        astream = await aclient.chat.completions.create(model="m", messages=messages, stream=True)
        assert isinstance(astream, openai.AsyncStream)
        async with astream as asame:
            assert asame is astream
            assert [chunk async for chunk in astream]
        client.close()
        await aclient.close()
    assert len([s for s in cap.spans if s.name == "chat m"]) == 4


class _ExplodingOnStart(SpanProcessor):
    def on_start(self, span: Any, parent_context: Any = None) -> None:
        raise RuntimeError("on_start exploded")


def test_a04_a_processor_raising_at_start_loses_no_line(
    no_internal_raise: None, tmp_path: Any
) -> None:
    # The stage went on as a bare pass-through: no span, and no line either, although the
    # line does not depend on the application's processor.
    from opentelemetry.sdk.trace import TracerProvider

    provider = TracerProvider()
    provider.add_span_processor(_ExplodingOnStart())
    log = tmp_path / "app.jsonl"
    ri.configure(exporter="memory", tracer_provider=provider, log_file=str(log))

    @ri.stage("retrieval")
    def ok() -> object:
        return SENTINEL

    @ri.stage("retrieval")
    def fail() -> None:
        raise ValueError("app")

    try:
        assert ok() is SENTINEL
        with pytest.raises(ValueError, match="app"):
            fail()
    finally:
        ri.shutdown()
        provider.shutdown()
    events = [json.loads(line)["event"] for line in log.read_text().splitlines()]
    assert "retrieval completed" in events
    assert "retrieval failed" in events
