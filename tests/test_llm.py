"""LLMProvider: spans, logs, metrics, breakdown, content capture, timeouts, batches."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from typing import Any

import pytest
from opentelemetry.trace import SpanKind, StatusCode

import rag_instrument as ri
from rag_instrument.testing import capture

SECRET_PROMPT = "What is the launch code of project zebra?"


class Echo(ri.LLMProvider):
    system = "acme"
    model = "acme-1"

    async def _generate(self, prompt: str, **params: Any) -> ri.LLMResult:
        return ri.LLMResult(
            f"answer to {prompt}", input_tokens=11, output_tokens=7, finish_reason="stop",
            model="acme-1-2026",
        )


class Failing(ri.LLMProvider):
    system = "acme"
    model = "acme-1"

    async def _generate(self, prompt: str, **params: Any) -> str:
        raise ValueError(f"model refused: {prompt}")


def _point_values(points: list[Any]) -> list[Any]:
    return [getattr(p, "sum", None) for p in points]


@pytest.mark.asyncio
async def test_generate_returns_result_and_records_genai_span() -> None:
    with capture() as cap:
        result = await Echo().generate("hello", temperature=0.0, max_tokens=64, top_p=1)
    assert result == ri.LLMResult("answer to hello", 11, 7, "stop", "acme-1-2026")
    span = cap.span("chat acme-1")
    assert span.kind is SpanKind.CLIENT
    attrs = dict(span.attributes or {})
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.provider.name"] == "acme"
    assert attrs["gen_ai.request.model"] == "acme-1"
    assert attrs["gen_ai.response.model"] == "acme-1-2026"
    assert attrs["gen_ai.usage.input_tokens"] == 11
    assert attrs["gen_ai.usage.output_tokens"] == 7
    assert tuple(attrs["gen_ai.response.finish_reasons"]) == ("stop",)
    assert attrs["openinference.span.kind"] == "LLM"
    assert attrs["gen_ai.request.temperature"] == 0.0
    assert attrs["gen_ai.request.max_tokens"] == 64
    (line,) = cap.find_logs("llm call completed")
    assert line["level"] == "info"
    assert line["execution_time_ms"] > 0
    assert line["input_tokens"] == 11


@pytest.mark.asyncio
async def test_prompt_and_prompts_by_keyword() -> None:
    # API: ``generate(prompt, **params)`` - the documented names work as keywords too.
    with capture() as cap:
        result = await Echo().generate(prompt="hi", temperature=0.5)
        batch = await Echo().generate_batch(prompts=["a", "b"], concurrency=1)
    assert isinstance(result, ri.LLMResult)
    assert result.text == "answer to hi"
    assert [r.text for r in batch if isinstance(r, ri.LLMResult)] == ["answer to a", "answer to b"]
    spans = [s for s in cap.spans if s.name == "chat acme-1"]
    assert len(spans) == 3
    assert spans[0].attributes is not None
    assert spans[0].attributes["gen_ai.request.temperature"] == 0.5


@pytest.mark.asyncio
async def test_str_result_passes_through_unchanged() -> None:
    marker = "exactly this object"

    class Plain(ri.LLMProvider):
        system, model = "acme", "m"

        async def _generate(self, prompt: str, **params: Any) -> str:
            return marker

    with capture():
        assert await Plain().generate("x") is marker


@pytest.mark.asyncio
async def test_metrics_duration_and_token_usage() -> None:
    with capture() as cap:
        await Echo().generate("hello")
        metrics = cap.metrics()
    (duration,) = metrics["gen_ai.client.operation.duration"]
    assert duration.count == 1
    assert duration.attributes["gen_ai.request.model"] == "acme-1"
    usage = {p.attributes["gen_ai.token.type"]: p.sum for p in metrics["gen_ai.client.token.usage"]}
    assert usage == {"input": 11, "output": 7}


@pytest.mark.asyncio
async def test_breakdown_reports_llm_work_to_the_stage() -> None:
    with capture() as cap:
        async with ri.stage("generation"):
            await Echo().generate("a")
            await Echo().generate("b")
    (line,) = cap.find_logs("generation completed")
    assert line["breakdown"]["llm"]["count"] == 2
    # the llm span is a child of the stage span
    stage = cap.span("generation")
    for span in cap.spans:
        if span.name == "chat acme-1":
            assert span.parent is not None
            assert span.parent.span_id == stage.context.span_id


@pytest.mark.asyncio
async def test_content_is_absent_by_default_everywhere() -> None:
    with capture() as cap:
        await Echo().generate(SECRET_PROMPT)
        with pytest.raises(ValueError):
            await Failing().generate(SECRET_PROMPT)
    dumped = repr([(s.attributes, [(e.name, e.attributes) for e in s.events], s.status)
                   for s in cap.spans]) + repr(cap.logs)
    assert "launch code" not in dumped
    assert "answer to" not in dumped


@pytest.mark.asyncio
async def test_content_captured_when_asked_truncated_and_redacted() -> None:
    prompt = "key sk-abcdefghijklmnopqrstuvwx " + "x" * 500
    with capture(capture_content=True, max_content_chars=100) as cap:
        await Echo().generate(prompt)
    attrs = dict(cap.span("chat acme-1").attributes or {})
    captured = attrs["gen_ai.input.messages"]
    assert "key " in captured
    assert "sk-abcdefghijklmnopqrstuvwx" not in captured
    assert "truncated" in captured
    assert "answer to key" in attrs["gen_ai.output.messages"]


@pytest.mark.asyncio
async def test_capture_content_from_the_otel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "SPAN_ONLY")
    settings = ri.configure(exporter="memory")
    assert settings.capture_content
    from rag_instrument import _runtime

    await Echo().generate("visible prompt")
    spans = _runtime.get_runtime().pipelines.memory_exporter.get_finished_spans()  # type: ignore[union-attr]
    assert "visible prompt" in spans[0].attributes["gen_ai.input.messages"]


@pytest.mark.asyncio
async def test_failure_is_reraised_as_itself_and_recorded() -> None:
    with capture() as cap:
        with pytest.raises(ValueError) as info:
            await Failing().generate("a prompt that must not leak")
    assert "a prompt that must not leak" in str(info.value)  # the caller's exception is intact
    span = cap.span("chat acme-1")
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "ValueError"
    (line,) = cap.find_logs("llm call failed")
    assert line["level"] == "error"
    assert line["error_type"] == "ValueError"
    assert "must not leak" not in line["error_message"]
    assert all("must not leak" not in str(e.attributes) for e in span.events)


@pytest.mark.asyncio
async def test_timeout_per_attempt_raises_timeout_error() -> None:
    class Slow(ri.LLMProvider):
        system, model, timeout = "acme", "slow", 0.05

        async def _generate(self, prompt: str, **params: Any) -> str:
            await asyncio.sleep(60)
            return "never"

    with capture() as cap:
        start = time.perf_counter()
        with pytest.raises(TimeoutError):
            await Slow().generate("x")
        assert time.perf_counter() - start < 30.0  # cut off, not the call's 60 s
    assert cap.span("chat slow").attributes["error.type"] == "TimeoutError"


@pytest.mark.asyncio
async def test_sync_generate_runs_in_a_thread_with_the_callers_context() -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    seen: dict[str, Any] = {}

    class Blocking(ri.LLMProvider):
        system, model = "vendor", "sync-1"

        def _generate(self, prompt: str, **params: Any) -> str:  # type: ignore[override]
            seen["thread"] = threading.current_thread()
            seen["var"] = var.get()
            # Blocks until the event loop has run again: it would never, were this call
            # blocking the loop's own thread.
            loop_ticked.clear()
            seen["loop_ran"] = loop_ticked.wait(timeout=30)
            return "done"

    loop_ticked = threading.Event()

    async def heartbeat() -> None:
        while True:
            await asyncio.sleep(0.005)
            loop_ticked.set()

    var.set("from-caller")
    with capture() as cap:
        beat = asyncio.create_task(heartbeat())
        async with ri.stage("generation"):
            assert await Blocking().generate("x") == "done"
        beat.cancel()
    assert seen["thread"] is not threading.main_thread()
    assert seen["var"] == "from-caller"
    assert seen["loop_ran"] is True  # the loop kept running while the vendor call blocked
    (line,) = cap.find_logs("generation completed")
    assert line["breakdown"]["llm"]["count"] == 1


@pytest.mark.asyncio
async def test_cancellation_is_not_an_error() -> None:
    class Hang(ri.LLMProvider):
        system, model = "acme", "hang"

        async def _generate(self, prompt: str, **params: Any) -> str:
            await asyncio.sleep(10)
            return ""

    with capture() as cap:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(Hang().generate("x"), 0.05)
    span = cap.span("chat hang")
    assert span.attributes["rag.cancelled"] is True
    assert span.status.status_code is not StatusCode.ERROR


@pytest.mark.asyncio
async def test_generate_batch_order_exceptions_and_concurrency() -> None:
    in_flight = peak = 0

    class Counting(ri.LLMProvider):
        system, model = "acme", "batch"

        async def _generate(self, prompt: str, **params: Any) -> str:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            for _ in range(1 + int(prompt) % 3):  # each call yields; some finish later
                await asyncio.sleep(0)
            in_flight -= 1
            if prompt == "4":
                raise ValueError("bad four")
            return f"r{prompt}"

    with capture() as cap:
        results = await Counting().generate_batch([str(i) for i in range(10)], concurrency=3)
    assert [r if isinstance(r, str) else "E" for r in results] == [
        "r0", "r1", "r2", "r3", "E", "r5", "r6", "r7", "r8", "r9"
    ]
    assert isinstance(results[4], ValueError)
    assert peak == 3
    assert len([s for s in cap.spans if s.name == "chat batch"]) == 10
    with pytest.raises(ValueError, match="concurrency"):
        await Counting().generate_batch(["1"], concurrency=0)
    for bad in (None, "4", 2.5, True):
        with pytest.raises(ValueError, match="concurrency"):
            await Counting().generate_batch(["1"], concurrency=bad)


@pytest.mark.asyncio
async def test_disabled_is_a_pass_through() -> None:
    with capture(enabled=False) as cap:
        assert (await Echo().generate("x")).text == "answer to x"
    assert cap.spans == []
    assert cap.logs == []


@pytest.mark.asyncio
async def test_exporter_failure_never_reaches_the_caller() -> None:
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class Broken(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            raise RuntimeError("collector down")

    ri.configure(exporter=Broken())
    assert (await Echo().generate("x")).text == "answer to x"


def test_llm_result_round_trips_through_dict() -> None:
    result = ri.LLMResult("t", 1, 2, "stop", "m")
    assert ri.LLMResult.from_dict(result.to_dict()) == result
    with pytest.raises(TypeError):
        ri.LLMResult.from_dict({"text": 3})


@pytest.mark.parametrize("value", ["5", float("nan"), 0, -1.0, True])
def test_a_timeout_that_is_not_one_is_refused_when_the_class_is_defined(value: Any) -> None:
    # "5" failed every call with a TypeError; NaN timed every call out.
    with pytest.raises(ValueError, match="Slow: timeout"):

        class Slow(ri.LLMProvider):
            system, model = "acme", "m"
            timeout = value

            async def _generate(self, prompt: str, **params: Any) -> str:
                return "answer"


def test_a_timeout_of_none_or_infinity_means_no_limit() -> None:
    for value in (None, float("inf"), 2):

        class Patient(ri.LLMProvider):
            system, model = "acme", "m"
            timeout = value

            async def _generate(self, prompt: str, **params: Any) -> str:
                return "answer"

        assert asyncio.run(Patient().generate("q")) == "answer"


def test_a_timeout_property_is_read_per_call_not_checked_at_definition() -> None:
    class PerInstance(ri.LLMProvider):
        system, model = "acme", "m"

        def __init__(self, seconds: float | None) -> None:
            self._seconds = seconds

        @property
        def timeout(self) -> float | None:  # type: ignore[override]
            return self._seconds

        async def _generate(self, prompt: str, **params: Any) -> str:
            await asyncio.sleep(0.5)
            return "answer"

    assert asyncio.run(PerInstance(None).generate("q")) == "answer"
    with pytest.raises(TimeoutError):
        asyncio.run(PerInstance(0.01).generate("q"))


def test_a_timeout_method_without_property_is_refused() -> None:
    with pytest.raises(ValueError, match="timeout"):

        class Forgot(ri.LLMProvider):
            system, model = "acme", "m"

            def timeout(self) -> float:  # type: ignore[override]  # @property forgotten
                return 5.0

            async def _generate(self, prompt: str, **params: Any) -> str:
                return "answer"


@pytest.mark.parametrize(("name", "value"), [("system", 3), ("model", 5), ("system", b"x")])
def test_a_provider_class_with_a_system_or_model_that_is_no_string_is_refused(
    name: str, value: object
) -> None:
    with pytest.raises(ValueError, match=name):
        type("Bad", (ri.LLMProvider,), {name: value})


@pytest.mark.asyncio
async def test_a_model_set_per_instance_or_by_a_property_is_accepted() -> None:
    import functools

    class PerInstance(ri.LLMProvider):
        system = "openai"
        model = None  # type: ignore[assignment]

        def __init__(self, model: str) -> None:
            self.model = model

        async def _generate(self, prompt: str, **params: Any) -> str:
            return prompt

    class ByProperty(PerInstance):
        @functools.cached_property
        def model(self) -> str:  # type: ignore[override]
            return "from-property"

    with capture() as cap:
        assert await PerInstance("gpt-4o").generate("a") == "a"
        assert await ByProperty("x").generate("b") == "b"
    models = [s.attributes["gen_ai.request.model"] for s in cap.spans]
    assert models == ["gpt-4o", "x"]  # the instance's own value wins over the class's
