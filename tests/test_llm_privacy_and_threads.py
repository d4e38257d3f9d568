"""LLMProvider review fixes: error text without content capture, lazy prompts, sync pool."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from typing import Any

import pytest
from opentelemetry.trace import StatusCode

import rag_instrument as ri
from rag_instrument import _runtime, llm
from rag_instrument._genai import start_call
from rag_instrument.testing import Capture, capture

PROMPT = "secret line one\nsecret line two"


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


class Echoing(ri.LLMProvider):
    """Fails with an error that echoes the prompt in another form (``repr``)."""

    system, model = "acme", "echo"
    error: Any = None

    async def _generate(self, prompt: str, **params: Any) -> str:
        raise self.error(prompt)


def _exception_event(cap: Capture, name: str) -> dict[str, Any]:
    (event,) = [e for e in cap.span(name).events if e.name == "exception"]
    return dict(event.attributes or {})


@pytest.mark.asyncio
async def test_repr_echoed_prompt_never_recorded_without_capture() -> None:
    class P(Echoing):
        error = staticmethod(lambda p: ValueError(f"bad request body: {{'prompt': {p!r}}}"))

    with capture() as cap:
        with pytest.raises(ValueError) as info:
            await P().generate(PROMPT)
    assert "secret line one" in str(info.value)  # the caller's exception is untouched
    assert "secret line" not in _everything(cap)
    span = cap.span("chat echo")
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "ValueError"
    event = _exception_event(cap, "chat echo")
    assert event["exception.message"] == "ValueError"
    assert event["exception.type"] == "ValueError"
    assert "test_llm_privacy_and_threads.py" in event["exception.stacktrace"]  # frames kept
    (line,) = cap.find_logs("llm call failed")
    assert line["error_message"] == "ValueError"


@pytest.mark.asyncio
async def test_only_type_status_and_short_code_without_capture() -> None:
    class P(Echoing):
        error = staticmethod(
            lambda p: ProviderError(f"rejected {p.upper()}", 400, "context_length_exceeded")
        )

    class Q(Echoing):
        model = "echo-q"
        error = staticmethod(lambda p: ProviderError("rejected", 422, f"not an id: {p}"))

    with capture() as cap:
        with pytest.raises(ProviderError):
            await P().generate(PROMPT)
        with pytest.raises(ProviderError):
            await Q().generate(PROMPT)
    assert "SECRET LINE" not in _everything(cap)
    assert "secret line" not in _everything(cap)
    expected = "ProviderError (HTTP 400, code context_length_exceeded)"
    assert cap.span("chat echo").status.description == expected
    assert _exception_event(cap, "chat echo")["exception.message"] == expected
    assert cap.span("chat echo-q").status.description == "ProviderError (HTTP 422)"
    messages = [line["error_message"] for line in cap.find_logs("llm call failed")]
    assert messages == [expected, "ProviderError (HTTP 422)"]


@pytest.mark.asyncio
async def test_chained_exception_texts_are_not_in_the_stacktrace() -> None:
    class P(ri.LLMProvider):
        system, model = "acme", "chain"

        async def _generate(self, prompt: str, **params: Any) -> str:
            try:
                {}[prompt]
            except KeyError as exc:
                raise RuntimeError(f"wrapped {len(prompt)} chars") from exc
            return ""

    with capture() as cap:
        with pytest.raises(RuntimeError):
            await P().generate(PROMPT)
    assert "secret line" not in _everything(cap)
    assert f"wrapped {len(PROMPT)} chars" not in _everything(cap)  # not even our own text


@pytest.mark.asyncio
async def test_with_capture_the_message_is_kept_and_redacted() -> None:
    class P(Echoing):
        error = staticmethod(lambda p: ValueError(f"refused {p!r} key sk-abcdefghijklmnopqrstuvwx"))

    with capture(capture_content=True) as cap:
        with pytest.raises(ValueError):
            await P().generate(PROMPT)
    span = cap.span("chat echo")
    assert span.status.description.startswith("ValueError: refused 'secret line one")
    (line,) = cap.find_logs("llm call failed")
    assert "secret line one" in line["error_message"]
    assert "sk-abcdefghijklmnopqrstuvwx" not in _everything(cap)


def test_error_summary_skips_codes_that_are_not_short_identifiers() -> None:
    from rag_instrument._genai import error_summary

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
            _runtime.get_runtime(),
            operation="chat",
            system="azure",
            model="m",
            prompt=f"my key is {key}",
            secrets=(key, "short"),
        )
        call.finish(ValueError(f"Incorrect API key provided: {key}"))
    assert key not in _everything(cap)
    assert "my key is" in cap.span("chat m").attributes["gen_ai.input.messages"]


# --- synchronous _generate: the library's own pool ------------------------------------------


@pytest.mark.asyncio
async def test_sync_generate_runs_on_the_library_pool_with_the_callers_context() -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    seen: dict[str, Any] = {}

    class Blocking(ri.LLMProvider):
        system, model, timeout = "vendor", "sync", 5.0

        def _generate(self, prompt: str, **params: Any) -> str:  # type: ignore[override]
            seen["thread"] = threading.current_thread().name
            seen["var"] = var.get()
            return "done"

    var.set("from-caller")
    with capture():
        assert await Blocking().generate("x") == "done"
    assert seen["thread"].startswith("rag_instrument-llm")
    assert seen["var"] == "from-caller"


@pytest.mark.asyncio
async def test_sync_timeout_starts_when_the_work_runs_not_while_queued() -> None:
    gate = threading.Event()
    ran_after_release: list[bool] = []

    class Hung(ri.LLMProvider):
        system, model, timeout = "vendor", "hung", 0.05

        def _generate(self, prompt: str, **params: Any) -> str:  # type: ignore[override]
            gate.wait(10)
            return prompt

    class Fast(ri.LLMProvider):
        system, model, timeout = "vendor", "fast", 0.3

        def _generate(self, prompt: str, **params: Any) -> str:  # type: ignore[override]
            ran_after_release.append(gate.is_set())
            return prompt

    workers = llm.llm_executor()._max_workers
    with capture(enabled=False):
        # Every worker busy with an abandoned attempt (each has already timed out) ...
        hung = await asyncio.gather(
            *(Hung().generate(str(i)) for i in range(workers)), return_exceptions=True
        )
        assert all(isinstance(r, TimeoutError) for r in hung)
        # ... so this call waits for a thread until the gate opens, well past its own 0.3 s
        # timeout, and still succeeds: its clock starts when it runs, not while queued.
        asyncio.get_running_loop().call_later(0.8, gate.set)
        assert await Fast().generate("y") == "y"
    assert ran_after_release == [True]


@pytest.mark.asyncio
async def test_sync_call_cancelled_while_queued_never_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    import concurrent.futures

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    monkeypatch.setattr(llm, "llm_executor", lambda: pool)
    ran: list[str] = []

    class Blocking(ri.LLMProvider):
        system, model, timeout = "vendor", "b", 1.0

        def _generate(self, prompt: str, **params: Any) -> str:  # type: ignore[override]
            ran.append(prompt)
            time.sleep(0.2)
            return prompt

    with capture(enabled=False):
        first = asyncio.create_task(Blocking().generate("first"))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(Blocking().generate("second"))
        await asyncio.sleep(0.05)
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        assert await first == "first"
    pool.shutdown(wait=True)
    assert ran == ["first"]
