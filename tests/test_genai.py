"""One model call's telemetry (``_genai``): span, log line, metrics, secrets and errors."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.trace import StatusCode

import rag_instrument as ri
from rag_instrument import _runtime
from rag_instrument._genai import current_call, error_summary, numeric_params, start_call
from rag_instrument.testing import Capture, capture


def _everything(cap: Capture) -> str:
    text = repr(cap.logs)
    for span in cap.spans:
        text += repr(dict(span.attributes or {})) + repr(span.status.description)
        text += repr([(e.name, dict(e.attributes or {})) for e in span.events])
    return text


class ProviderError(Exception):
    def __init__(self, message: str, status_code: int, code: Any = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code


def _call(**kwargs: Any) -> Any:
    return start_call(
        _runtime.get_runtime(),
        **{"operation": "chat", "system": "acme", "model": "m", **kwargs},
    )


def test_error_summary_skips_codes_that_are_not_short_identifiers() -> None:
    class Anthropicish(Exception):
        status_code = 529
        body = {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}

    assert error_summary(Anthropicish("busy")) == "Anthropicish (HTTP 529, code overloaded_error)"
    assert error_summary(ProviderError("x", 400, "a" * 80)) == "ProviderError (HTTP 400)"
    assert error_summary(ProviderError("x", 400, 17)) == "ProviderError (HTTP 400)"
    key = "0123456789abcdef0123456789abcdef"
    assert error_summary(ProviderError("x", 401, key), (key,)) == "ProviderError (HTTP 401)"
    assert error_summary(TimeoutError("slow")) == "TimeoutError"


def test_prompt_is_built_only_when_content_is_captured() -> None:
    built = 0

    def prompt() -> str:
        nonlocal built
        built += 1
        return "the prompt"

    for capture_content, expected in ((False, 0), (True, 1)):
        with capture(capture_content=capture_content) as cap:
            call = start_call(
                _runtime.get_runtime(), operation="embeddings", system="s", model="m", prompt=prompt
            )
            call.finish(None)
        assert built == expected
        attrs = dict(cap.span("embeddings m").attributes or {})
        assert ("gen_ai.input.messages" in attrs) is capture_content


def test_secrets_are_scrubbed_literally_from_every_recorded_text() -> None:
    key = "3f9a0c1e5b7d4a2f8e6c0b9d1a3e5f7c"  # an Azure-style hex key: no sk- shape
    with capture(capture_content=True) as cap:
        call = start_call(
            _runtime.get_runtime(), operation="chat", system="azure", model="m",
            prompt=f"my key is {key}", secrets=(key, "short"),
        )
        call.finish(ValueError(f"Incorrect API key provided: {key}"))
    assert key not in _everything(cap)
    assert "my key is" in cap.span("chat m").attributes["gen_ai.input.messages"]


def test_a_placeholder_key_is_not_masked_in_every_later_line() -> None:
    # Local servers take any key ("not-needed", "lm-studio"): plain words, not credentials.
    # Scrubbed from the call's own texts, but not turned into a mask for every line.
    with capture(capture_content=True) as cap:
        call = start_call(
            _runtime.get_runtime(), operation="chat", system="openai", model="m",
            prompt="hello", secrets=("not-needed", "lm-studio-local"),
        )
        call.finish(None)
        ri.get_logger("app").info("the lm-studio-local server says a key is not-needed here")
    (line,) = cap.find_logs("the lm-studio-local server says a key is not-needed here")
    assert line["event"] == "the lm-studio-local server says a key is not-needed here"


@given(
    st.dictionaries(
        st.sampled_from(["temperature", "top_p", "max_tokens", "seed", "n", "stop", "user"]),
        st.one_of(st.integers(-5, 5), st.floats(0, 2), st.booleans(), st.text(max_size=5)),
    )
)
def test_only_known_numeric_parameters_are_recorded(params: dict[str, Any]) -> None:
    recorded = numeric_params(params)
    for key, value in recorded.items():
        assert key.startswith("gen_ai.request.")
        assert type(value) in (int, float)  # never text, never a bool
    kept = {k for k, v in params.items() if k not in ("stop", "user") and type(v) in (int, float)}
    assert len(recorded) == len(kept)
    if "n" in kept:
        assert recorded["gen_ai.request.choice.count"] == params["n"]


def test_a_call_is_finished_once() -> None:
    with capture() as cap:
        call = _call(params={"temperature": 0.2, "stop": ["secret"]})
        call.finish(None, input_tokens=12, output_tokens=3, response_model="m-2024")
        call.finish(ValueError("late"))  # a second end (a stream closed after exhaustion)
    (span,) = cap.spans
    assert span.name == "chat m"
    assert span.kind is trace.SpanKind.CLIENT
    assert span.status.status_code is not StatusCode.ERROR
    attrs = dict(span.attributes or {})
    assert attrs["gen_ai.request.temperature"] == 0.2
    assert "gen_ai.request.stop" not in attrs
    assert attrs["gen_ai.usage.input_tokens"] == 12
    assert attrs["gen_ai.response.model"] == "m-2024"
    (line,) = cap.logs
    assert line["event"] == "llm call completed"
    assert (line["input_tokens"], line["output_tokens"]) == (12, 3)
    assert cap.find_logs("llm call failed") == []


def test_cancellation_is_a_warning_not_an_error() -> None:
    with capture() as cap:
        _call().finish(asyncio.CancelledError())
    span = cap.span("chat m")
    assert span.attributes["rag.cancelled"] is True
    assert span.status.status_code is not StatusCode.ERROR
    assert not [e for e in span.events if e.name == "exception"]
    (line,) = cap.find_logs("llm call cancelled")
    assert line["level"] == "warning"
    assert line["error_type"] == "CancelledError"


def test_a_cache_hit_reports_no_tokens_and_no_provider_time() -> None:
    with capture() as cap, ri.stage("generation"):
        call = _call()
        call.cache_hit = True
        call.finish(None, input_tokens=500, output_tokens=80)
    attrs = dict(cap.span("chat m").attributes or {})
    assert attrs["rag.cache.hit"] is True
    assert attrs["gen_ai.usage.input_tokens"] == 0
    assert "gen_ai.client.token.usage" not in cap.metrics()
    (stage_line,) = cap.find_logs("generation completed")
    assert "llm" not in stage_line.get("breakdown", {})


def test_attach_makes_the_call_current_and_detach_is_idempotent() -> None:
    with capture() as cap:
        call = _call()
        call.attach()
        assert current_call() is call
        with ri.traced("tool"):
            pass
        call.detach()
        call.detach()
        assert current_call() is None
        call.finish(None)
    assert cap.span("tool").parent.span_id == cap.span("chat m").context.span_id


def _failing_vendor_call(shelf: dict[str, str]) -> str:
    return shelf["missing"]


@pytest.mark.parametrize("capture_content", [False, True])
def test_stack_traces_hold_frames_but_no_source_text(capture_content: bool) -> None:
    with capture(capture_content=capture_content) as cap:
        call = _call()
        try:
            try:
                _failing_vendor_call(
                    {"passport": "opal-harbour-7"},  # a literal on the failing call's lines
                )
            except KeyError as exc:
                raise ProviderError("upstream said no", 400) from exc
        except ProviderError as exc:
            call.finish(exc)
    (event,) = [e for e in cap.span("chat m").events if e.name == "exception"]
    stack = str((event.attributes or {})["exception.stacktrace"])
    assert "opal-harbour-7" not in stack
    assert not [line for line in stack.splitlines() if line.startswith("    ")]
    assert "in test_stack_traces_hold_frames_but_no_source_text\n" in stack
    # The chained cause (and the SDK's message) only with content capture.
    assert ("in _failing_vendor_call\n" in stack) is capture_content
    assert ("upstream said no" in stack) is capture_content


def _finished_line(**finish: Any) -> None:
    with ri.request_context(request_id="r-1"), ri.stage("generation"):
        call = _call(params={"temperature": 0.0})
        call.cache_hit = False
        call.attempts, call.backoff_ms, call.ttft_ms = 2, 1.5, 3.25
        call.finish(None, **finish)


def test_a_completed_line_in_a_file_has_the_keys_and_values_of_the_general_path(
    tmp_path: Any,
) -> None:
    # Completed lines to a file are assembled from a part rendered once per model; a
    # capture sink builds them field by field. Same keys, same order, same values.
    import json

    finish: dict[str, Any] = {
        "response_model": "m-2024",
        "input_tokens": 12,
        "output_tokens": 3,
        "finish_reasons": ["stop"],
    }
    path = tmp_path / "lines.jsonl"
    ri.configure(exporter=None, log_file=str(path), capture_logging=False)
    try:
        _finished_line(**finish)
    finally:
        ri.shutdown()
    written = [json.loads(line) for line in path.read_text().splitlines()]
    written = [line for line in written if line["event"] == "llm call completed"]
    with capture() as cap:
        _finished_line(**finish)
    (captured,) = cap.find_logs("llm call completed")
    (line,) = written
    varying = ("timestamp", "trace_id", "span_id", "execution_time_ms")
    assert [k for k in line if k not in varying] == [k for k in captured if k not in varying]
    assert {k: v for k, v in line.items() if k not in varying} == {
        k: v for k, v in captured.items() if k not in varying
    }
    assert list(line) == [  # the order emit() has always written them in
        "timestamp", "level", "event", "logger", "trace_id", "span_id", "context", "stage",
        "execution_time_ms", "operation", "provider", "model", "response_model",
        "input_tokens", "output_tokens", "retry_attempts", "retry_backoff_ms", "cache_hit",
        "time_to_first_token_ms",
    ]  # fmt: skip
    assert line["stage"] == "generation"
    assert line["context"] == {"request_id": "r-1"}
    assert (line["retry_attempts"], line["cache_hit"], line["response_model"]) == (2, False, "m-2024")


def test_a_secret_in_the_response_model_is_redacted_every_time() -> None:
    with capture() as cap:
        for _ in range(2):
            call = _call()
            call.finish(None, response_model="m sk-proj-abcdefghijklmnopqrstuvwxyz012345")
    lines = cap.find_logs("llm call completed")
    assert len(lines) == 2
    for line in lines:
        assert "abcdefghijklmnopqrstuvwxyz" not in line["response_model"]


# --- the span as exported: masked at the source, or by export, never neither ---------------

_KEY = "sk-proj-abcdefghijklmnopqrstuvwxyz012345"


def _exported_span(cap: Capture) -> Any:
    (span,) = cap.spans
    return span


def test_secrets_from_the_provider_are_masked_on_the_exported_span() -> None:
    with capture() as cap:
        call = _call(model="gpt-4o-mini")
        call.finish(None, response_model=f"m {_KEY}", finish_reasons=[f"stop {_KEY}"])
    span = _exported_span(cap)
    assert "abcdefghijklmnopqrstuvwxyz" not in _everything(cap)
    assert span.attributes["gen_ai.response.model"].startswith("m ")
    assert span.attributes["gen_ai.response.finish_reasons"][0].startswith("stop ")


def test_a_secret_in_the_model_name_is_masked_on_the_exported_span() -> None:
    with capture() as cap:
        _call(model=f"gpt {_KEY}").finish(None, response_model="gpt", input_tokens=3)
    span = _exported_span(cap)
    assert "abcdefghijklmnopqrstuvwxyz" not in span.name + _everything(cap)
    assert span.attributes["gen_ai.usage.input_tokens"] == 3


@given(
    st.sampled_from(["gpt-4o-mini", f"gpt {_KEY}", "m" * 250]),
    st.text(min_size=1, max_size=60) | st.just(f"x {_KEY}"),
    st.lists(st.text(max_size=30) | st.just(f"password={_KEY}"), max_size=3),
    st.booleans(),
)
def test_the_exported_span_is_what_exports_redaction_makes_of_the_call(
    model: str, response_model: str, reasons: list[str], failed: bool
) -> None:
    from rag_instrument._sanitize import exported_name, redact_text

    with capture() as cap:
        call = _call(model=model)
        call.finish(
            ValueError("boom") if failed else None,
            response_model=response_model,
            finish_reasons=reasons,
        )
    span = _exported_span(cap)
    assert span.name == exported_name(f"chat {model}")
    assert span.attributes["gen_ai.request.model"] == redact_text(model)
    assert span.attributes["gen_ai.response.model"] == redact_text(response_model)
    if reasons:
        assert span.attributes["gen_ai.response.finish_reasons"] == tuple(
            map(redact_text, reasons)
        )
