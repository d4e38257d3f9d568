"""The SDKs' own retries, made visible: each HTTP attempt of an instrumented call is recorded.

Real openai / anthropic clients with their default retry behaviour (``max_retries``),
pointed at the local fake server, which scripts the failures.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest
from opentelemetry.trace import StatusCode

import rag_instrument as ri
from rag_instrument.integrations.anthropic import instrument_anthropic
from rag_instrument.integrations.openai import instrument_openai
from rag_instrument.testing import Capture, capture
from support.fake_llm import FakeLLMServer

OPENAI_KEY = "sk-rag-retries-0123456789abcdef"
ANTHROPIC_KEY = "sk-ant-rag-retries-0123456789"
MESSAGES = [{"role": "user", "content": "Where is the spare key?"}]
FAST = {"retry-after-ms": "10"}  # the SDKs honour it: retries without the default 0.5 s+


_OPEN: list[Any] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()  # sync clients: no socket left for the garbage collector


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as fake:
        yield fake


def _openai(server: FakeLLMServer, **kw: Any) -> openai.OpenAI:
    client = openai.OpenAI(api_key=OPENAI_KEY, base_url=server.openai_base_url, **kw)
    _OPEN.append(client)
    return instrument_openai(client)


def _aopenai(server: FakeLLMServer, **kw: Any) -> openai.AsyncOpenAI:
    client = openai.AsyncOpenAI(api_key=OPENAI_KEY, base_url=server.openai_base_url, **kw)
    return instrument_openai(client)


def _anthropic(server: FakeLLMServer, **kw: Any) -> anthropic.Anthropic:
    client = anthropic.Anthropic(api_key=ANTHROPIC_KEY, base_url=server.anthropic_base_url, **kw)
    _OPEN.append(client)
    return instrument_anthropic(client)


def _retry_events(cap: Capture, name: str) -> list[dict[str, Any]]:
    span = cap.span(name)
    return [dict(e.attributes or {}) for e in span.events if e.name == "retry"]


def _levels(cap: Capture) -> list[tuple[str, str]]:
    mine = [line for line in cap.logs if line.get("logger", "").startswith("rag_instrument")]
    return [(line["level"], line["event"]) for line in mine]


def _counter(cap: Capture, name: str) -> list[tuple[dict[str, Any], int]]:
    return [(dict(p.attributes), p.value) for p in cap.metrics().get(name, [])]


def test_429_with_retry_after_then_success(server: FakeLLMServer) -> None:
    server.enqueue(429, headers={"Retry-After": "0.2"})
    client = _openai(server)
    with capture() as cap:
        reply = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert reply.choices[0].message.content == server.reply_text
    assert len(server.requests) == 2
    span = cap.span("chat gpt-4o-mini")
    assert span.status.status_code is StatusCode.UNSET
    assert span.attributes["rag.retry.attempts"] == 2
    assert span.attributes["rag.retry.backoff_ms"] >= 190  # the server's Retry-After
    (event,) = _retry_events(cap, "chat gpt-4o-mini")
    assert event["attempt"] == 1
    assert event["error_type"] == "RateLimitError"
    assert event["http.response.status_code"] == 429
    assert 0.19 <= event["wait_s"] < 5
    (line,) = cap.find_logs("retrying")
    assert line["level"] == "warning"
    assert line["target"] == "openai.chat"
    assert (line["attempt"], line["error_type"], line["http_status"]) == (1, "RateLimitError", 429)
    assert line["wait_s"] == event["wait_s"]
    assert line["span_id"] == format(span.context.span_id, "016x")
    assert ("error", "llm call failed") not in _levels(cap)
    assert cap.find_logs("llm call completed")[0]["retry_attempts"] == 2
    ((attrs, count),) = _counter(cap, "rag.llm.retries")
    assert count == 1
    assert attrs["error.type"] == "RateLimitError"
    assert attrs["http.response.status_code"] == 429
    assert attrs["gen_ai.provider.name"] == "openai"
    assert [c for _, c in _counter(cap, "rag.retry.count")] == [1]


def test_503_twice_then_success_writes_no_error_line(server: FakeLLMServer) -> None:
    server.enqueue(503, headers=FAST, times=2)
    client = _openai(server)
    with capture() as cap:
        with ri.stage("generation"):
            client.chat.completions.create(model="m", messages=MESSAGES)
    assert len(server.requests) == 3
    assert not [line for line in cap.logs if line["level"] in ("error", "critical")]
    retrying = cap.find_logs("retrying")
    assert [(r["attempt"], r["http_status"], r["level"]) for r in retrying] == [
        (1, 503, "warning"),
        (2, 503, "warning"),
    ]
    span = cap.span("chat m")
    assert span.attributes["rag.retry.attempts"] == 3
    assert [e["error_type"] for e in _retry_events(cap, "chat m")] == ["InternalServerError"] * 2
    assert sum(c for _, c in _counter(cap, "rag.llm.retries")) == 2
    (stage,) = cap.find_logs("generation completed")
    assert stage["breakdown"]["llm"]["count"] == 1  # one call, however many attempts


def test_final_failure_logs_one_error_after_the_retries(server: FakeLLMServer) -> None:
    server.enqueue(503, headers=FAST, times=3)
    client = _openai(server, max_retries=2)
    with capture() as cap:
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model="m", messages=MESSAGES)
    assert info.value.status_code == 503
    assert len(server.requests) == 3
    levels = _levels(cap)
    assert levels.count(("warning", "retrying")) == 2
    assert levels.count(("error", "llm call failed")) == 1
    assert levels.index(("error", "llm call failed")) > levels.index(("warning", "retrying"))
    span = cap.span("chat m")
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["rag.retry.attempts"] == 3
    assert len(_retry_events(cap, "chat m")) == 2


def test_timeout_then_success_is_a_retried_timeout(server: FakeLLMServer) -> None:
    server.enqueue(hang_s=3)
    client = _openai(server, timeout=0.3, max_retries=1)
    with capture() as cap:
        client.chat.completions.create(model="m", messages=MESSAGES)
    (event,) = _retry_events(cap, "chat m")
    assert event["error_type"] == "APITimeoutError"
    assert "http.response.status_code" not in event
    (line,) = cap.find_logs("retrying")
    assert "http_status" not in line
    assert cap.span("chat m").attributes["rag.retry.attempts"] == 2


def test_connection_refused_is_a_retried_connection_error() -> None:
    with FakeLLMServer() as dead:
        url = dead.openai_base_url
    client = instrument_openai(openai.OpenAI(api_key=OPENAI_KEY, base_url=url, max_retries=1))
    with capture() as cap:
        with pytest.raises(openai.APIConnectionError):
            client.with_options(timeout=2.0).chat.completions.create(model="m", messages=MESSAGES)
    (event,) = _retry_events(cap, "chat m")
    assert event["error_type"] == "APIConnectionError"
    assert cap.span("chat m").attributes["rag.retry.attempts"] == 2
    assert len(cap.find_logs("llm call failed")) == 1


@pytest.mark.asyncio
async def test_async_client_retries_are_recorded(server: FakeLLMServer) -> None:
    server.enqueue(503, headers=FAST)
    server.enqueue(429, headers=FAST)
    client = _aopenai(server)
    with capture() as cap:
        reply = await client.chat.completions.create(model="m", messages=MESSAGES)
        await client.embeddings.create(model="e", input="x")
    assert reply.choices[0].message.content == server.reply_text
    events = _retry_events(cap, "chat m")
    assert [(e["attempt"], e["http.response.status_code"]) for e in events] == [(1, 503), (2, 429)]
    assert cap.span("embeddings e").attributes["rag.retry.attempts"] == 1
    assert not [e for e in cap.span("embeddings e").events if e.name == "retry"]
    await client.close()


def test_stream_retried_before_the_first_chunk(server: FakeLLMServer) -> None:
    server.enqueue(503, headers=FAST)
    client = _openai(server)
    with capture() as cap:
        stream = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == server.reply_text
    span = cap.span("chat m")
    assert span.attributes["rag.retry.attempts"] == 2
    assert span.attributes["rag.llm.time_to_first_token_ms"] > 0


def test_other_requests_through_a_shared_http_client_are_not_counted(
    server: FakeLLMServer,
) -> None:
    import httpx2

    http = httpx2.Client()
    _openai(server, http_client=http)  # wraps the shared httpx client's send
    plain = openai.OpenAI(api_key=OPENAI_KEY, base_url=server.openai_base_url, http_client=http)
    _OPEN.append(plain)
    server.enqueue(503, headers=FAST)
    with capture() as cap:
        plain.chat.completions.create(model="m", messages=MESSAGES)
    assert len(server.requests) == 2
    assert not cap.find_logs("retrying")
    assert not cap.spans
    http.close()


def test_anthropic_529_then_success(server: FakeLLMServer) -> None:
    server.enqueue(529, headers=FAST)
    client = _anthropic(server)
    with capture() as cap:
        message = client.messages.create(model="claude-x", max_tokens=64, messages=MESSAGES)
    assert message.content[0].text == server.reply_text  # type: ignore[union-attr]
    (event,) = _retry_events(cap, "chat claude-x")
    assert event["error_type"] == "OverloadedError"
    assert event["http.response.status_code"] == 529
    (line,) = cap.find_logs("retrying")
    assert line["target"] == "anthropic.chat"
    assert ("error", "llm call failed") not in _levels(cap)


def test_anthropic_final_failure(server: FakeLLMServer) -> None:
    server.enqueue(429, headers=FAST, times=2)
    client = _anthropic(server, max_retries=1)
    with capture() as cap:
        with pytest.raises(anthropic.RateLimitError):
            client.messages.create(model="claude-x", max_tokens=64, messages=MESSAGES)
    assert _levels(cap).count(("warning", "retrying")) == 1
    assert _levels(cap).count(("error", "llm call failed")) == 1
    assert cap.span("chat claude-x").attributes["rag.retry.attempts"] == 2


def test_anthropic_stream_helper_retried(server: FakeLLMServer) -> None:
    server.enqueue(503, headers=FAST)
    client = _anthropic(server)
    with capture() as cap:
        with client.messages.stream(model="claude-x", max_tokens=64, messages=MESSAGES) as stream:
            assert "".join(stream.text_stream) == server.reply_text
    span = cap.span("chat claude-x")
    assert span.attributes["rag.retry.attempts"] == 2
    (event,) = _retry_events(cap, "chat claude-x")
    assert event["http.response.status_code"] == 503


def test_disabled_records_nothing_and_still_retries(server: FakeLLMServer) -> None:
    server.enqueue(503, headers=FAST)
    client = _openai(server)
    with capture(enabled=False) as cap:
        reply = client.chat.completions.create(model="m", messages=MESSAGES)
    assert reply.choices[0].message.content == server.reply_text
    assert len(server.requests) == 2
    assert not cap.find_logs("retrying")


def test_ri_retry_around_a_client_logs_retried_attempts_as_warnings(
    server: FakeLLMServer,
) -> None:
    server.enqueue(503, times=2)
    client = _openai(server, max_retries=0)

    @ri.retry(attempts=3, wait_min=0, wait_max=0.01)
    def ask() -> Any:
        return client.chat.completions.create(model="m", messages=MESSAGES)

    with capture() as cap:
        ask()
    assert len(server.requests) == 3
    assert not [line for line in cap.logs if line["level"] in ("error", "critical")]
    failed = cap.find_logs("llm call failed")
    assert [(f["level"], f["will_retry"]) for f in failed] == [("warning", True)] * 2
    assert len(cap.find_logs("retrying")) == 2


def test_ri_retry_out_of_attempts_logs_the_last_failure_as_an_error(
    server: FakeLLMServer,
) -> None:
    server.enqueue(503, times=2)
    client = _openai(server, max_retries=0)

    @ri.retry(attempts=2, wait_min=0, wait_max=0.01)
    def ask() -> Any:
        return client.chat.completions.create(model="m", messages=MESSAGES)

    with capture() as cap:
        with pytest.raises(openai.InternalServerError):
            ask()
    levels = [f["level"] for f in cap.find_logs("llm call failed")]
    assert levels == ["warning", "error"]


def test_a_non_retryable_failure_inside_ri_retry_is_an_error(server: FakeLLMServer) -> None:
    server.enqueue(400)
    client = _openai(server, max_retries=0)

    @ri.retry(attempts=3, wait_min=0, wait_max=0.01)
    def ask() -> Any:
        return client.chat.completions.create(model="m", messages=MESSAGES)

    with capture() as cap:
        with pytest.raises(openai.BadRequestError):
            ask()
    (line,) = cap.find_logs("llm call failed")
    assert line["level"] == "error"
    assert "will_retry" not in line


@pytest.mark.asyncio
async def test_retry_mixin_around_a_client_logs_retried_attempts_as_warnings(
    server: FakeLLMServer,
) -> None:
    server.enqueue(429, headers=FAST)
    client = _aopenai(server, max_retries=0)

    class Chat(ri.RetryMixin, ri.LLMProvider):
        system, model = "openai", "gpt-4o-mini"
        retry_wait_min, retry_wait_max = 0.0, 0.05

        async def _generate(self, prompt: str, **params: Any) -> str:
            reply = await client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": prompt}]
            )
            return reply.choices[0].message.content or ""

    with capture() as cap:
        assert await Chat().generate("hello") == server.reply_text
    assert not [line for line in cap.logs if line["level"] == "error"]
    (failed,) = cap.find_logs("llm call failed")
    assert failed["level"] == "warning"
    assert len(cap.find_logs("retrying")) == 1
    await client.close()


@pytest.mark.parametrize(
    ("module", "status", "name"),
    [
        (openai, 429, "RateLimitError"),
        (openai, 503, "InternalServerError"),
        (openai, 418, "APIStatusError"),
        (anthropic, 529, "OverloadedError"),
        (anthropic, 599, "InternalServerError"),
    ],
)
def test_status_error_names_follow_the_sdks_classes(module: Any, status: int, name: str) -> None:
    from rag_instrument.integrations._sdk import status_error_names

    assert status_error_names(module)(status) == name


def test_watching_ignores_an_object_without_an_http_client(
    server: FakeLLMServer,
) -> None:
    from rag_instrument.integrations._sdk import watch_http_client

    class Bare:
        pass

    watch_http_client(Bare(), is_async=False)  # nothing to wrap: no error, nothing done
    server.enqueue(503, headers=FAST)
    client = _openai(server)
    with capture() as cap:
        client.chat.completions.create(model="m", messages=MESSAGES)
    assert cap.span("chat m").attributes["rag.retry.attempts"] == 2
