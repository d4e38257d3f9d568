"""LLMProvider: error text without content capture, chained errors, the synchronous pool."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from typing import Any

import pytest
from opentelemetry.trace import StatusCode

import rag_instrument as ri
from rag_instrument import llm
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
        system, model, timeout = "vendor", "fast", 1.0

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
        # ... so this call waits for a thread until the gate opens, well past its own 1 s
        # timeout, and still succeeds: its clock starts when it runs, not while queued.
        asyncio.get_running_loop().call_later(2.0, gate.set)
        assert await Fast().generate("y") == "y"
    assert ran_after_release == [True]


@pytest.mark.asyncio
async def test_sync_call_cancelled_while_queued_never_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    import concurrent.futures

    submitted = asyncio.Event()
    submissions = 0

    class Pool(concurrent.futures.ThreadPoolExecutor):
        def submit(self, *args: Any, **kwargs: Any) -> Any:
            nonlocal submissions
            submissions += 1
            if submissions == 2:
                submitted.set()  # the second call is queued behind the first
            return super().submit(*args, **kwargs)

    pool = Pool(max_workers=1)
    monkeypatch.setattr(llm, "llm_executor", lambda: pool)
    ran: list[str] = []
    release = threading.Event()

    class Blocking(ri.LLMProvider):
        system, model, timeout = "vendor", "b", 30.0

        def _generate(self, prompt: str, **params: Any) -> str:  # type: ignore[override]
            ran.append(prompt)
            release.wait(30)  # holds the only worker until the second call is cancelled
            return prompt

    with capture(enabled=False):
        first = asyncio.create_task(Blocking().generate("first"))
        second = asyncio.create_task(Blocking().generate("second"))
        await submitted.wait()
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        release.set()
        assert await first == "first"
    pool.shutdown(wait=True)
    assert ran == ["first"]


def test_an_instrumented_clients_key_is_masked_in_every_log_line() -> None:
    # The application logs an SDK error quoting the key ("Incorrect API key provided:
    # <key>") through the standard library: the key, whatever its shape, is masked.
    import logging

    import openai

    key = "plainlowercaseclientkeyvalue"
    client = openai.OpenAI(api_key=key, base_url="http://127.0.0.1:9/v1", max_retries=0)
    ri.instrument_openai(client)
    with capture() as cap:
        with pytest.raises(openai.APIConnectionError):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "q"}])
        logging.getLogger("app.std").error("llm failed: Incorrect API key provided: %s", key)
        ri.get_logger("app").warning("retrying with", api=key)
    lines = [str(line) for line in cap.logs]
    assert lines
    assert not [line for line in lines if key in line]
    assert any("Incorrect API key provided: [REDACTED]" in line for line in lines)
