"""instrument_anthropic against the real anthropic SDK pointed at the local fake server."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest
from opentelemetry.trace import StatusCode

import rag_instrument as ri
from rag_instrument.integrations.anthropic import instrument_anthropic, uninstrument_anthropic
from rag_instrument.retry import retry
from rag_instrument.testing import Capture, capture
from support.fake_llm import FakeLLMServer

API_KEY = "sk-ant-rag-test-0123456789SECRET"
MESSAGES = [{"role": "user", "content": "Where did I park the blue van?"}]


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as fake:
        yield fake


def _client(server: FakeLLMServer, **kw: Any) -> anthropic.Anthropic:
    kw.setdefault("max_retries", 0)
    return anthropic.Anthropic(api_key=API_KEY, base_url=server.anthropic_base_url, **kw)


def _no_secret(cap: Capture, *extra: str) -> None:
    everything = repr(cap.logs)
    for span in cap.spans:
        everything += repr(dict(span.attributes or {})) + repr(span.status.description)
        everything += repr([(e.name, dict(e.attributes or {})) for e in span.events])
    for needle in (API_KEY, "0123456789SECRET", *extra):
        assert needle not in everything


def test_message_span_and_usage(server: FakeLLMServer) -> None:
    client = instrument_anthropic(_client(server))
    with capture() as cap:
        with ri.stage("generation"):
            message = client.messages.create(
                model="claude-x", max_tokens=100, messages=MESSAGES, system="Be brief."
            )
    assert message.content[0].text == server.reply_text  # type: ignore[union-attr]
    span = cap.span("chat claude-x")
    attrs = dict(span.attributes or {})
    assert attrs["gen_ai.provider.name"] == "anthropic"
    assert attrs["gen_ai.request.max_tokens"] == 100
    assert attrs["gen_ai.usage.input_tokens"] == message.usage.input_tokens
    assert attrs["gen_ai.usage.output_tokens"] == message.usage.output_tokens
    assert tuple(attrs["gen_ai.response.finish_reasons"]) == ("end_turn",)
    (line,) = cap.find_logs("generation completed")
    assert line["breakdown"]["llm"]["count"] == 1
    assert server.requests[0].headers["authorization"].endswith(API_KEY)  # the SDK sent it...
    _no_secret(cap, "blue van", "Be brief")  # ...and we recorded neither it nor the prompt


def test_stream_keeps_the_sdk_object_and_records_usage(server: FakeLLMServer) -> None:
    client = instrument_anthropic(_client(server))
    with capture() as cap:
        stream = client.messages.create(
            model="claude-x", max_tokens=100, messages=MESSAGES, stream=True
        )
        assert isinstance(stream, anthropic.Stream)
        with stream:
            events = list(stream)
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")  # type: ignore[union-attr]
    assert text == server.reply_text
    attrs = dict(cap.span("chat claude-x").attributes or {})
    assert attrs["rag.llm.stream.chunks"] == len(events)
    assert attrs["gen_ai.usage.input_tokens"] > 0
    assert attrs["gen_ai.usage.output_tokens"] > 0
    assert attrs["rag.llm.time_to_first_token_ms"] > 0
    assert tuple(attrs["gen_ai.response.finish_reasons"]) == ("end_turn",)
    _no_secret(cap, "blue van", server.reply_text)


# Dropping a stream without closing it leaves its HTTP connection to the garbage collector,
# which rightly warns about the unclosed socket: that is what these tests do on purpose.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_dropped_stream_ends_its_span(server: FakeLLMServer) -> None:
    client = instrument_anthropic(_client(server))
    with capture() as cap:
        stream = client.messages.create(model="c", max_tokens=10, messages=MESSAGES, stream=True)
        next(iter(stream))
        del stream
        for _ in range(20):  # the SDK's response objects may need more than one pass
            gc.collect()
            if any(s.name == "chat c" for s in cap.spans):
                break
        gc.collect()  # the dropped connection too, while its warning is expected
        span = cap.span("chat c")
    assert span.attributes["rag.stream.completed"] is False


@pytest.mark.asyncio
async def test_async_client_and_stream(server: FakeLLMServer) -> None:
    client = instrument_anthropic(
        anthropic.AsyncAnthropic(api_key=API_KEY, base_url=server.anthropic_base_url, max_retries=0)
    )
    with capture() as cap:
        message = await client.messages.create(model="a", max_tokens=10, messages=MESSAGES)
        stream = await client.messages.create(
            model="s", max_tokens=10, messages=MESSAGES, stream=True
        )
        assert isinstance(stream, anthropic.AsyncStream)
        async with stream:
            events = [e async for e in stream]
    assert message.usage.output_tokens > 0
    assert cap.span("chat a").attributes["gen_ai.usage.output_tokens"] == message.usage.output_tokens
    assert cap.span("chat s").attributes["rag.llm.stream.chunks"] == len(events)
    await client.close()


def test_429_then_success_500_hang_and_malformed(server: FakeLLMServer) -> None:
    server.enqueue(429, headers={"retry-after": "0.05"})
    client = instrument_anthropic(_client(server, timeout=0.3))

    @retry(attempts=2, wait_min=0, wait_max=1)
    def ask() -> Any:
        return client.messages.create(model="m", max_tokens=10, messages=MESSAGES)

    with capture() as cap:
        assert ask().content[0].text == server.reply_text
        server.enqueue(500)
        with pytest.raises(anthropic.InternalServerError):
            client.messages.create(model="m", max_tokens=10, messages=MESSAGES)
        server.enqueue(hang_s=3)
        with pytest.raises(anthropic.APITimeoutError):
            client.messages.create(model="m", max_tokens=10, messages=MESSAGES)
        server.enqueue(malformed=True)
        with pytest.raises(Exception):  # the SDK's own decoding error
            client.messages.create(model="m", max_tokens=10, messages=MESSAGES)
    statuses = [s.status.status_code for s in cap.spans if s.name == "chat m"]
    assert statuses == [StatusCode.ERROR, StatusCode.UNSET, StatusCode.ERROR, StatusCode.ERROR,
                        StatusCode.ERROR]
    assert len(cap.find_logs("retrying")) == 1
    assert len(cap.find_logs("llm call failed")) == 4
    _no_secret(cap, "blue van")


def test_idempotent_and_reversible(server: FakeLLMServer) -> None:
    client = _client(server)
    instrument_anthropic(client)
    instrument_anthropic(client)
    with capture() as cap:
        client.messages.create(model="m", max_tokens=10, messages=MESSAGES)
    # (anthropic>=2 also emits its own span, "anthropic.messages.create": count ours)
    assert [s.name for s in cap.spans if s.instrumentation_scope.name == "rag_instrument"] == [
        "chat m"
    ]
    uninstrument_anthropic(client)
    with capture() as cap:
        client.messages.create(model="m", max_tokens=10, messages=MESSAGES)
    assert not [s for s in cap.spans if s.instrumentation_scope.name == "rag_instrument"]


# --- review fixes: the client's own key, copies ----------------------------------------------

HEX_KEY = "9c2e4a6b8d0f1e3a5c7b9d2f4a6c8e0b"  # no sk- shape: only literal scrubbing finds it


def _echo_key(server: FakeLLMServer, key: str) -> None:
    server.enqueue(401, body={"type": "error", "error": {
        "type": "authentication_error", "message": f"invalid x-api-key: {key}"}})


def test_key_echoed_by_the_server_is_never_recorded(server: FakeLLMServer) -> None:
    _echo_key(server, API_KEY)
    client = instrument_anthropic(_client(server))
    with capture() as cap:
        with pytest.raises(anthropic.AuthenticationError) as info:
            client.messages.create(model="m", max_tokens=10, messages=MESSAGES)
    assert API_KEY in str(info.value)  # the server did echo it: the check below is real
    _no_secret(cap, "blue van")
    (line,) = cap.find_logs("llm call failed")
    assert line["error_message"] == "AuthenticationError (HTTP 401, code authentication_error)"


@pytest.mark.parametrize("capture_content", [False, True])
def test_non_sk_client_key_is_scrubbed_with_and_without_capture(
    server: FakeLLMServer, capture_content: bool
) -> None:
    _echo_key(server, HEX_KEY)
    client = instrument_anthropic(
        anthropic.Anthropic(api_key=HEX_KEY, base_url=server.anthropic_base_url, max_retries=0)
    )
    with capture(capture_content=capture_content) as cap:
        with pytest.raises(anthropic.AuthenticationError) as info:
            client.messages.create(model="m", max_tokens=10, messages=MESSAGES)
        client.messages.create(
            model="ok", max_tokens=10, system=f"key {HEX_KEY}",
            messages=[{"role": "user", "content": f"my key: {HEX_KEY}"}],
        )
    assert HEX_KEY in str(info.value)
    _no_secret(cap, HEX_KEY)
    if capture_content:
        assert "invalid x-api-key" in cap.span("chat m").status.description
        assert "my key:" in cap.span("chat ok").attributes["gen_ai.input.messages"]


@pytest.mark.parametrize("method", ["with_options", "copy"])
def test_copies_of_an_instrumented_client_are_instrumented(
    server: FakeLLMServer, method: str
) -> None:
    client = instrument_anthropic(_client(server))
    with capture() as cap:
        getattr(client, method)(timeout=5).messages.create(
            model="copy", max_tokens=10, messages=MESSAGES
        )
    assert [s.name for s in cap.spans if s.instrumentation_scope.name == "rag_instrument"] == [
        "chat copy"
    ]
    uninstrument_anthropic(client)
    with capture() as cap:
        client.with_options(timeout=5).messages.create(model="m", max_tokens=10, messages=MESSAGES)
    assert not [s for s in cap.spans if s.instrumentation_scope.name == "rag_instrument"]


def test_stream_helper_span_ttft_and_usage(server: FakeLLMServer) -> None:
    from anthropic.lib.streaming import MessageStream, MessageStreamManager

    client = instrument_anthropic(_client(server))
    with capture() as cap:
        with ri.stage("generation"):
            manager = client.messages.stream(model="claude-x", max_tokens=64, messages=MESSAGES)
            assert isinstance(manager, MessageStreamManager)
            assert not cap.spans  # nothing is sent before the manager is entered
            with manager as stream:
                assert isinstance(stream, MessageStream)
                final = stream.get_final_message()
    assert final.content[0].text == server.reply_text  # type: ignore[union-attr]
    span = cap.span("chat claude-x")
    attrs = dict(span.attributes or {})
    assert attrs["gen_ai.usage.input_tokens"] == final.usage.input_tokens
    assert attrs["gen_ai.usage.output_tokens"] == final.usage.output_tokens
    assert tuple(attrs["gen_ai.response.finish_reasons"]) == ("end_turn",)
    assert attrs["rag.llm.time_to_first_token_ms"] > 0
    assert attrs["rag.stream.completed"] is True
    assert span.parent is not None
    assert span.parent.span_id == cap.span("generation").context.span_id
    (line,) = cap.find_logs("llm call completed")
    assert line["time_to_first_token_ms"] > 0
    (stage,) = cap.find_logs("generation completed")
    assert stage["breakdown"]["llm"]["count"] == 1
    _no_secret(cap, "blue van")


def test_stream_helper_left_early_and_failing(server: FakeLLMServer) -> None:
    client = instrument_anthropic(_client(server))
    with capture() as cap:
        with client.messages.stream(model="early", max_tokens=64, messages=MESSAGES) as stream:
            next(iter(stream))
        server.enqueue(400)
        with pytest.raises(anthropic.BadRequestError):
            with client.messages.stream(model="bad", max_tokens=64, messages=MESSAGES):
                pass
    early = cap.span("chat early")
    assert early.attributes["rag.stream.completed"] is False
    assert early.end_time is not None
    bad = cap.span("chat bad")
    assert bad.status.status_code is StatusCode.ERROR
    assert cap.find_logs("llm call failed")[0]["error_type"] == "BadRequestError"


@pytest.mark.asyncio
async def test_async_stream_helper(server: FakeLLMServer) -> None:
    from anthropic.lib.streaming import AsyncMessageStreamManager

    client = instrument_anthropic(
        anthropic.AsyncAnthropic(api_key=API_KEY, base_url=server.anthropic_base_url, max_retries=0)
    )
    with capture() as cap:
        manager = client.messages.stream(model="claude-a", max_tokens=64, messages=MESSAGES)
        assert isinstance(manager, AsyncMessageStreamManager)
        async with manager as stream:
            text = "".join([t async for t in stream.text_stream])
    assert text == server.reply_text
    span = cap.span("chat claude-a")
    assert span.attributes["gen_ai.usage.output_tokens"] > 0
    assert span.attributes["rag.llm.time_to_first_token_ms"] > 0
    await client.close()


def test_stream_helper_uninstrumented_is_untouched(server: FakeLLMServer) -> None:
    client = _client(server)
    instrument_anthropic(client)
    uninstrument_anthropic(client)
    with capture() as cap:
        with client.messages.stream(model="plain", max_tokens=8, messages=MESSAGES) as stream:
            stream.until_done()
    assert not [s for s in cap.spans if s.name == "chat plain"]


def test_with_raw_response_has_token_usage(server: FakeLLMServer) -> None:
    client = instrument_anthropic(_client(server))
    with capture() as cap:
        raw = client.messages.with_raw_response.create(
            model="claude-raw", max_tokens=64, messages=MESSAGES
        )
    message = raw.parse()
    attrs = cap.span("chat claude-raw").attributes
    assert attrs["gen_ai.usage.input_tokens"] == message.usage.input_tokens
    assert attrs["gen_ai.usage.output_tokens"] == message.usage.output_tokens
    assert attrs["gen_ai.response.model"] == "claude-raw"
    assert tuple(attrs["gen_ai.response.finish_reasons"]) == ("end_turn",)


@pytest.mark.asyncio
async def test_async_with_raw_response_has_token_usage(server: FakeLLMServer) -> None:
    client = instrument_anthropic(
        anthropic.AsyncAnthropic(api_key=API_KEY, base_url=server.anthropic_base_url, max_retries=0)
    )
    with capture() as cap:
        raw = await client.messages.with_raw_response.create(
            model="claude-raw", max_tokens=64, messages=MESSAGES
        )
    message = await raw.parse()
    assert cap.span("chat claude-raw").attributes["gen_ai.usage.output_tokens"] == (
        message.usage.output_tokens
    )
    await client.close()


def test_input_tokens_count_the_prompt_cache_too(server: FakeLLMServer) -> None:
    # The GenAI conventions: gen_ai.usage.input_tokens includes cached input tokens.
    usage = {"input_tokens": 10, "cache_read_input_tokens": 1000, "output_tokens": 7}
    server.enqueue(usage={**usage, "cache_creation_input_tokens": 50})
    server.enqueue(usage=usage)
    client = instrument_anthropic(_client(server))
    with capture() as cap:
        client.messages.create(model="claude-x", max_tokens=100, messages=MESSAGES)
        with client.messages.stream(model="claude-s", max_tokens=100, messages=MESSAGES) as s:
            s.until_done()
    attrs = dict(cap.span("chat claude-x").attributes or {})
    assert attrs["gen_ai.usage.input_tokens"] == 1060
    assert attrs["gen_ai.usage.output_tokens"] == 7
    streamed = dict(cap.span("chat claude-s").attributes or {})
    assert streamed["gen_ai.usage.input_tokens"] == 1010
    assert streamed["gen_ai.usage.output_tokens"] == 7


def test_structured_output_parse_is_traced_like_create(server: FakeLLMServer) -> None:
    from pydantic import BaseModel

    class Van(BaseModel):
        level: int

    server.reply_text = '{"level": 3}'
    client = instrument_anthropic(_client(server))
    with capture() as cap, ri.stage("generation"):
        reply = client.messages.parse(
            model="claude-x", max_tokens=50, messages=MESSAGES, output_format=Van
        )
    assert reply.parsed_output == Van(level=3)  # the SDK's own parsed message
    span = cap.span("chat claude-x")
    assert span.attributes["gen_ai.provider.name"] == "anthropic"
    (line,) = cap.find_logs("generation completed")
    assert line["breakdown"]["llm"]["count"] == 1


def test_captured_messages_keep_the_system_prompt_and_roles(server: FakeLLMServer) -> None:
    import json

    client = instrument_anthropic(_client(server))
    with capture(capture_content=True) as cap:
        client.messages.create(
            model="claude-x",
            max_tokens=20,
            system="Be brief.",
            messages=[
                {"role": "user", "content": "Where is the van?"},
                {"role": "assistant", "content": "Level 3."},
                {"role": "user", "content": [{"type": "text", "text": "Which bay?"}]},
            ],
        )
    recorded = json.loads(cap.span("chat claude-x").attributes["gen_ai.input.messages"])
    assert [(m["role"], m["parts"][0]["content"]) for m in recorded] == [
        ("system", "Be brief."),
        ("user", "Where is the van?"),
        ("assistant", "Level 3."),
        ("user", "Which bay?"),
    ]
