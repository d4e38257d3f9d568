"""instrument_openai against the real openai SDK pointed at the local fake server."""

from __future__ import annotations

import gc
import inspect
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from opentelemetry.trace import StatusCode

import rag_instrument as ri
from rag_instrument.integrations.openai import instrument_openai, uninstrument_openai
from rag_instrument.retry import retry
from rag_instrument.testing import Capture, capture
from support.fake_llm import FakeLLMServer

API_KEY = "sk-rag-test-0123456789abcdefSECRET"
MESSAGES = [{"role": "user", "content": "Which drawer holds the passports?"}]


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as fake:
        yield fake


def _client(server: FakeLLMServer, **kw: Any) -> openai.OpenAI:
    kw.setdefault("max_retries", 0)
    return openai.OpenAI(api_key=API_KEY, base_url=server.openai_base_url, **kw)


def _aclient(server: FakeLLMServer, **kw: Any) -> openai.AsyncOpenAI:
    kw.setdefault("max_retries", 0)
    return openai.AsyncOpenAI(api_key=API_KEY, base_url=server.openai_base_url, **kw)


def _no_secret(cap: Capture, *extra: str) -> None:
    everything = repr(cap.logs)
    for span in cap.spans:
        everything += repr(dict(span.attributes or {})) + repr(span.status.description)
        everything += repr([(e.name, dict(e.attributes or {})) for e in span.events])
    for needle in (API_KEY, "0123456789abcdefSECRET", *extra):
        assert needle not in everything


def test_chat_completion_span_usage_and_result_unchanged(server: FakeLLMServer) -> None:
    client = instrument_openai(_client(server))
    with capture() as cap:
        with ri.stage("generation"):
            reply = client.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, temperature=0.2
            )
    assert isinstance(reply, openai.types.chat.ChatCompletion)
    assert reply.choices[0].message.content == server.reply_text
    span = cap.span("chat gpt-4o-mini")
    attrs = dict(span.attributes or {})
    assert attrs["gen_ai.provider.name"] == "openai"
    assert attrs["gen_ai.usage.input_tokens"] == reply.usage.prompt_tokens  # type: ignore[union-attr]
    assert attrs["gen_ai.usage.output_tokens"] == reply.usage.completion_tokens  # type: ignore[union-attr]
    assert tuple(attrs["gen_ai.response.finish_reasons"]) == ("stop",)
    assert attrs["gen_ai.request.temperature"] == 0.2
    (line,) = cap.find_logs("generation completed")
    assert line["breakdown"]["llm"]["count"] == 1
    assert cap.find_logs("llm call completed")
    _no_secret(cap, "passports")


def test_embeddings_reported_as_embedding(server: FakeLLMServer) -> None:
    client = instrument_openai(_client(server))
    with capture() as cap:
        with ri.stage("embedding"):
            result = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(result.data) == 2
    span = cap.span("embeddings text-embedding-3-small")
    assert span.attributes["openinference.span.kind"] == "EMBEDDING"
    assert span.attributes["gen_ai.usage.input_tokens"] == result.usage.prompt_tokens
    (line,) = cap.find_logs("embedding completed")
    assert line["breakdown"]["embedding"]["count"] == 1
    assert "llm" not in line["breakdown"]


def test_stream_is_the_sdks_own_object_and_span_lasts_until_exhausted(
    server: FakeLLMServer,
) -> None:
    server.chunk_delay_s = 0.02
    client = instrument_openai(_client(server))
    with capture() as cap:
        stream = client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True,
            stream_options={"include_usage": True},
        )
        assert isinstance(stream, openai.Stream)
        assert stream.response.status_code == 200
        assert not cap.spans  # still open
        with stream as same:
            assert same is stream
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        metrics = cap.metrics()
    assert text == server.reply_text
    span = cap.span("chat gpt-4o-mini")
    attrs = dict(span.attributes or {})
    assert attrs["rag.llm.time_to_first_token_ms"] > 0
    assert attrs["rag.llm.stream.chunks"] >= 3
    assert attrs["gen_ai.usage.output_tokens"] > 0
    assert attrs["rag.stream.completed"] is True
    assert metrics["gen_ai.client.operation.time_to_first_chunk"][0].count == 1
    _no_secret(cap, "passports", server.reply_text)


# Dropping a stream without closing it leaves its HTTP connection to the garbage collector,
# which rightly warns about the unclosed socket: that is what these tests do on purpose.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_stream_closed_early_or_dropped_ends_the_span(server: FakeLLMServer) -> None:
    client = instrument_openai(_client(server))
    with capture() as cap:
        stream = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        next(iter(stream))
        stream.close()
        assert stream.response.is_closed
        (span,) = cap.spans
        assert span.attributes["rag.stream.completed"] is False
        assert span.attributes["rag.llm.stream.chunks"] == 1

        client.chat.completions.create(model="dropped", messages=MESSAGES, stream=True)
        gc.collect()
        assert cap.span("chat dropped")


def test_stream_cut_mid_way_records_the_error(server: FakeLLMServer) -> None:
    server.enqueue(stream_error_after=1)
    client = instrument_openai(_client(server))
    with capture() as cap:
        stream = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        with pytest.raises(openai.APIError):
            for _ in stream:
                pass
    span = cap.span("chat m")
    assert span.status.status_code is StatusCode.ERROR


@pytest.mark.asyncio
async def test_async_client_chat_and_stream(server: FakeLLMServer) -> None:
    client = instrument_openai(_aclient(server))
    assert inspect.iscoroutinefunction(client.chat.completions.create)
    with capture() as cap:
        reply = await client.chat.completions.create(model="m", messages=MESSAGES)
        assert reply.choices[0].message.content == server.reply_text
        stream = await client.chat.completions.create(model="s", messages=MESSAGES, stream=True)
        assert isinstance(stream, openai.AsyncStream)
        async with stream:
            chunks = [c async for c in stream]
    assert chunks
    assert cap.span("chat m").attributes["gen_ai.usage.output_tokens"] > 0
    assert cap.span("chat s").attributes["rag.llm.stream.chunks"] == len(chunks)
    await client.close()


def test_429_with_retry_after_then_success_through_ri_retry(server: FakeLLMServer) -> None:
    server.enqueue(429, headers={"retry-after-ms": "30"})
    client = instrument_openai(_client(server))

    @retry(attempts=3, wait_min=0, wait_max=1.0)
    def ask() -> Any:
        return client.chat.completions.create(model="m", messages=MESSAGES)

    with capture() as cap:
        with ri.stage("generation"):
            reply = ask()
    assert reply.choices[0].message.content == server.reply_text
    assert len(server.requests) == 2
    stage = cap.span("generation")
    (event,) = [e for e in stage.events if e.name == "retry"]
    assert event.attributes["error_type"] == "RateLimitError"
    assert event.attributes["wait_s"] == pytest.approx(0.03)
    assert stage.attributes["rag.retry.attempts"] == 2
    spans = [s for s in cap.spans if s.name == "chat m"]
    assert [s.status.status_code for s in spans] == [StatusCode.ERROR, StatusCode.UNSET]
    _no_secret(cap, "passports")


@pytest.mark.asyncio
async def test_429_then_success_through_retry_mixin(server: FakeLLMServer) -> None:
    server.enqueue(429, headers={"Retry-After": "0"})
    client = instrument_openai(_aclient(server))

    class Chat(ri.RetryMixin, ri.LLMProvider):
        system, model = "openai", "gpt-4o-mini"
        retry_wait_min = 0.0

        async def _generate(self, prompt: str, **params: Any) -> ri.LLMResult:
            reply = await client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": prompt}], **params
            )
            usage = reply.usage
            return ri.LLMResult(
                reply.choices[0].message.content or "",
                usage.prompt_tokens if usage else None,
                usage.completion_tokens if usage else None,
                reply.choices[0].finish_reason,
                reply.model,
            )

    with capture() as cap:
        result = await Chat().generate("hello")
    assert isinstance(result, ri.LLMResult)
    assert result.text == server.reply_text
    provider_span = next(s for s in cap.spans if s.name == "chat gpt-4o-mini" and
                         s.parent is None)
    assert provider_span.attributes["rag.retry.attempts"] == 2
    sdk_spans = [s for s in cap.spans if s.parent and s.parent.span_id ==
                 provider_span.context.span_id]
    assert len(sdk_spans) == 2  # each attempt's SDK span nests under the provider span
    await client.close()


def test_500_is_recorded_and_reraised_unchanged(server: FakeLLMServer) -> None:
    server.enqueue(500)
    client = instrument_openai(_client(server))
    with capture() as cap:
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model="m", messages=MESSAGES)
    assert info.value.status_code == 500
    span = cap.span("chat m")
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "InternalServerError"
    (line,) = cap.find_logs("llm call failed")
    assert line["error_type"] == "InternalServerError"
    _no_secret(cap, "passports")


def test_hang_past_the_timeout(server: FakeLLMServer) -> None:
    server.enqueue(hang_s=3)
    client = instrument_openai(_client(server, timeout=0.3))
    with capture() as cap:
        with pytest.raises(openai.APITimeoutError):
            client.chat.completions.create(model="m", messages=MESSAGES)
    assert cap.span("chat m").attributes["error.type"] == "APITimeoutError"
    _no_secret(cap)


def test_malformed_json(server: FakeLLMServer) -> None:
    server.enqueue(malformed=True)
    client = instrument_openai(_client(server))
    with capture() as cap:
        with pytest.raises(Exception) as info:
            client.chat.completions.create(model="m", messages=MESSAGES)
    span = cap.span("chat m")
    assert span.attributes["error.type"] == type(info.value).__qualname__
    _no_secret(cap)


def test_content_capture_opt_in_is_redacted(server: FakeLLMServer) -> None:
    client = instrument_openai(_client(server))
    with capture(capture_content=True) as cap:
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": f"my key is {API_KEY}"}]
        )
    attrs = dict(cap.span("chat m").attributes or {})
    assert "my key is" in attrs["gen_ai.input.messages"]
    assert server.reply_text in attrs["gen_ai.output.messages"]
    _no_secret(cap)


def test_idempotent_and_reversible(server: FakeLLMServer) -> None:
    client = _client(server)
    original = client.chat.completions.create
    assert instrument_openai(client) is client
    patched = client.chat.completions.create
    instrument_openai(client)
    assert client.chat.completions.create is patched
    with capture() as cap:
        client.chat.completions.create(model="m", messages=MESSAGES)
    assert len(cap.spans) == 1
    uninstrument_openai(client)
    assert client.chat.completions.create == original
    with capture() as cap:
        client.chat.completions.create(model="m", messages=MESSAGES)
    assert cap.spans == []
    uninstrument_openai(client)  # a second undo is harmless
    with pytest.raises(TypeError):
        instrument_openai(object())


def test_disabled_passes_through(server: FakeLLMServer) -> None:
    client = instrument_openai(_client(server))
    with capture(enabled=False) as cap:
        stream = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        assert list(stream)
    assert cap.spans == []


# --- review fixes: error text, the client's own key, copies -------------------------------

AZURE_KEY = "3f9a0c1e5b7d4a2f8e6c0b9d1a3e5f7c"  # hex, no sk- shape: only literal scrubbing finds it


def _echo_key(server: FakeLLMServer, key: str) -> None:
    server.enqueue(401, body={"error": {
        "message": f"Incorrect API key provided: {key}. You can find your key at ...",
        "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}})


def test_key_echoed_by_the_server_is_never_recorded(server: FakeLLMServer) -> None:
    _echo_key(server, API_KEY)
    client = instrument_openai(_client(server))
    with capture() as cap:
        with pytest.raises(openai.AuthenticationError) as info:
            client.chat.completions.create(model="m", messages=MESSAGES)
    assert API_KEY in str(info.value)  # the server did echo it: the check below is real
    _no_secret(cap, "passports")
    (line,) = cap.find_logs("llm call failed")
    assert line["error_message"] == "AuthenticationError (HTTP 401, code invalid_api_key)"


@pytest.mark.parametrize("capture_content", [False, True])
def test_non_sk_client_key_is_scrubbed_with_and_without_capture(
    server: FakeLLMServer, capture_content: bool
) -> None:
    _echo_key(server, AZURE_KEY)
    client = instrument_openai(
        openai.OpenAI(api_key=AZURE_KEY, base_url=server.openai_base_url, max_retries=0)
    )
    with capture(capture_content=capture_content) as cap:
        with pytest.raises(openai.AuthenticationError) as info:
            client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": f"is {AZURE_KEY} valid?"}]
            )
        client.chat.completions.create(
            model="ok", messages=[{"role": "user", "content": f"my key: {AZURE_KEY}"}]
        )
    assert AZURE_KEY in str(info.value)
    _no_secret(cap, AZURE_KEY)
    if capture_content:
        assert "Incorrect API key provided" in cap.span("chat m").status.description
        assert "my key:" in cap.span("chat ok").attributes["gen_ai.input.messages"]


def test_one_message_of_several_echoed_in_an_error_is_not_recorded(
    server: FakeLLMServer,
) -> None:
    server.enqueue(400, body={"error": {
        "message": "Content rejected: 'Which drawer holds the passports?'",
        "type": "invalid_request_error", "param": None, "code": None}})
    client = instrument_openai(_client(server))
    with capture() as cap:
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(
                model="m", messages=[{"role": "system", "content": "You are helpful."}, *MESSAGES]
            )
    _no_secret(cap, "passports", "helpful")
    assert cap.span("chat m").status.description == (
        "BadRequestError (HTTP 400, code invalid_request_error)"
    )


def test_embedding_inputs_are_not_joined_without_capture(
    server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rag_instrument.integrations import openai as integration

    joined: list[Any] = []
    real = integration.text_of
    monkeypatch.setattr(integration, "text_of", lambda v: joined.append(v) or real(v))
    client = instrument_openai(_client(server))
    with capture():
        client.embeddings.create(model="e", input=["x" * 4096] * 1000)
    assert joined == []
    with capture(capture_content=True) as cap:
        client.embeddings.create(model="e", input=["a", "b"])
    assert len(joined) == 1
    assert "gen_ai.input.messages" in cap.span("embeddings e").attributes


@pytest.mark.asyncio
@pytest.mark.parametrize("method", ["with_options", "copy"])
async def test_copies_of_an_instrumented_client_are_instrumented(
    server: FakeLLMServer, method: str
) -> None:
    sync_client = instrument_openai(_client(server))
    async_client = instrument_openai(_aclient(server))
    with capture() as cap:
        getattr(sync_client, method)(timeout=5).chat.completions.create(
            model="sync-copy", messages=MESSAGES
        )
        copy = getattr(async_client, method)(timeout=5)
        await copy.chat.completions.create(model="async-copy", messages=MESSAGES)
        getattr(sync_client, method)().embeddings.create(model="e", input="a")
    assert cap.span("chat sync-copy")
    assert cap.span("chat async-copy")
    assert cap.span("embeddings e")
    uninstrument_openai(sync_client)
    assert "copy" not in vars(sync_client)
    assert "with_options" not in vars(sync_client)
    with capture() as cap:
        sync_client.with_options(timeout=5).chat.completions.create(model="m", messages=MESSAGES)
    assert cap.spans == []
    await copy.close()
    await async_client.close()


def test_with_raw_response_has_token_usage(server: FakeLLMServer) -> None:
    client = instrument_openai(_client(server))
    with capture() as cap:
        raw = client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
        emb = client.embeddings.with_raw_response.create(model="e", input=["a b c"])
    reply = raw.parse()
    attrs = cap.span("chat m").attributes
    assert attrs["gen_ai.usage.input_tokens"] == reply.usage.prompt_tokens  # type: ignore[union-attr]
    assert attrs["gen_ai.usage.output_tokens"] == reply.usage.completion_tokens  # type: ignore[union-attr]
    assert tuple(attrs["gen_ai.response.finish_reasons"]) == ("stop",)
    assert cap.span("embeddings e").attributes["gen_ai.usage.input_tokens"] == (
        emb.parse().usage.prompt_tokens
    )
    assert raw.parse() is reply  # the SDK's own parse cache is untouched


def test_with_streaming_response_body_is_left_to_the_caller(server: FakeLLMServer) -> None:
    client = instrument_openai(_client(server))
    with capture() as cap:
        with client.chat.completions.with_streaming_response.create(
            model="m", messages=MESSAGES
        ) as response:
            reply = response.parse()
    assert reply.choices[0].message.content == server.reply_text
    assert "gen_ai.usage.input_tokens" not in cap.span("chat m").attributes


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
def test_instrumenting_a_client_does_not_load_the_sdks_lazy_modules(sdk: str) -> None:
    # The SDKs keep whole API families (openai.beta, openai.types.beta: about two thousand
    # pydantic models) behind lazy proxies; reading the error classes once touched them,
    # and instrumenting a client took seconds. A fresh interpreter tells.
    import subprocess
    import sys

    code = f"""
import sys
import {sdk}
import rag_instrument as ri
ri.configure(exporter="memory", logs_exporter="none")
before = set(sys.modules)
client = {sdk}.{"OpenAI" if sdk == "openai" else "Anthropic"}(api_key="sk-x")
ri.instrument_{sdk}(client)
loaded = sorted(m for m in set(sys.modules) - before if m.startswith("{sdk}.types.beta"))
print(len(loaded), loaded[:3])
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.startswith("0 "), done.stdout + done.stderr


def test_a_raw_streamed_response_records_the_stream_it_parses_into(server: FakeLLMServer) -> None:
    client = instrument_openai(_client(server))
    with capture() as cap:
        raw = client.chat.completions.with_raw_response.create(
            model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        assert not cap.spans  # the body is not read yet: the call goes on
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert text == server.reply_text
    attrs = dict(cap.span("chat m").attributes or {})
    assert attrs["rag.llm.time_to_first_token_ms"] > 0
    assert attrs["rag.llm.stream.chunks"] >= 3
    assert attrs["gen_ai.usage.output_tokens"] > 0
    assert attrs["rag.stream.completed"] is True


@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_raw_streamed_response_never_parsed_ends_when_collected(server: FakeLLMServer) -> None:
    # In the context it was made in (not the one the collector runs in), and saying
    # nothing of a stream it never saw.
    client = instrument_openai(_client(server))
    with capture() as cap:
        with ri.request_context(request_id="req-A"), ri.stage("generation"):
            raw = client.chat.completions.with_raw_response.create(
                model="m", messages=MESSAGES, stream=True
            )
        with ri.request_context(request_id="req-B"), ri.stage("search"):
            del raw
            gc.collect()
    assert "rag.stream.completed" not in cap.span("chat m").attributes
    (line,) = cap.find_logs("llm call completed")
    assert (line["context"], line["stage"]) == ({"request_id": "req-A"}, "generation")
    assert "breakdown" not in cap.find_logs("search completed")[0]


def test_a_streaming_response_call_ends_when_it_returns(server: FakeLLMServer) -> None:
    # with_streaming_response(stream=True): the body is the caller's to read (iter_lines),
    # the span ends when the call returns, as documented.
    client = instrument_openai(_client(server))
    with capture() as cap:
        with client.chat.completions.with_streaming_response.create(
            model="m", messages=MESSAGES, stream=True
        ) as response:
            assert cap.spans  # ended already
            assert sum(1 for _ in response.iter_lines()) > 0


@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_stream_dropped_unfinished_ends_in_the_context_it_was_made_in(
    server: FakeLLMServer,
) -> None:
    # Collected later, from wherever the collector runs (another request's code): the
    # call's line keeps its own request's values and stage.
    client = instrument_openai(_client(server))
    with capture() as cap:
        with ri.request_context(request_id="req-42"), ri.stage("generation"):
            stream = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
            for _chunk in stream:
                break  # left without closing it
        with ri.request_context(request_id="req-43"), ri.stage("search"):
            del stream, _chunk
            gc.collect()
    (line,) = cap.find_logs("llm call completed")
    assert line["context"] == {"request_id": "req-42"}
    assert line["stage"] == "generation"


@pytest.mark.asyncio
async def test_a_stream_read_or_closed_after_its_blocks_ended_keeps_their_context(
    server: FakeLLMServer,
) -> None:
    # A handler returns the stream; the framework (StreamingResponse) reads it after the
    # handler's request_context() and stage blocks have ended.
    client = instrument_openai(_client(server))
    aclient = instrument_openai(_aclient(server))

    def handler(request_id: str) -> Any:
        with ri.request_context(request_id=request_id), ri.stage("generation"):
            return client.chat.completions.create(model="m", messages=MESSAGES, stream=True)

    with capture() as cap:
        assert list(handler("read-to-end"))
        closed = handler("closed-early")
        next(iter(closed))
        closed.close()
        async with ri.request_context(request_id="async-read"), ri.stage("generation"):
            astream = await aclient.chat.completions.create(
                model="m", messages=MESSAGES, stream=True
            )
        async for _chunk in astream:
            pass
    await aclient.close()
    client.close()
    lines = cap.find_logs("llm call completed")
    assert [line["context"] for line in lines] == [
        {"request_id": "read-to-end"},
        {"request_id": "closed-early"},
        {"request_id": "async-read"},
    ]
    assert all(line["stage"] == "generation" for line in lines)


def test_structured_output_parse_is_traced_like_create(server: FakeLLMServer) -> None:
    from pydantic import BaseModel

    class Drawer(BaseModel):
        drawer: str

    server.reply_text = '{"drawer": "top left"}'
    client = instrument_openai(_client(server))
    with capture() as cap, ri.stage("generation"):
        reply = client.chat.completions.parse(
            model="gpt-4o-mini", messages=MESSAGES, response_format=Drawer
        )
    assert reply.choices[0].message.parsed == Drawer(drawer="top left")  # the SDK's own
    span = cap.span("chat gpt-4o-mini")
    assert span.attributes["gen_ai.usage.output_tokens"] == reply.usage.completion_tokens  # type: ignore[union-attr]
    (line,) = cap.find_logs("generation completed")
    assert line["breakdown"]["llm"]["count"] == 1
    assert cap.find_logs("llm call completed")
    uninstrument_openai(client)
    with capture() as cap:
        client.chat.completions.parse(model="gpt-4o-mini", messages=MESSAGES, response_format=Drawer)
    assert cap.spans == []


@pytest.mark.asyncio
async def test_structured_output_parse_on_the_async_client(server: FakeLLMServer) -> None:
    from pydantic import BaseModel

    class Drawer(BaseModel):
        drawer: str

    server.reply_text = '{"drawer": "bottom"}'
    client = instrument_openai(_aclient(server))
    with capture() as cap:
        reply = await client.chat.completions.parse(
            model="gpt-4o-mini", messages=MESSAGES, response_format=Drawer
        )
    await client.close()
    assert reply.choices[0].message.parsed == Drawer(drawer="bottom")
    assert [s.name for s in cap.spans] == ["chat gpt-4o-mini"]


def test_captured_messages_keep_their_roles_and_a_generator_of_messages_is_sent_whole(
    server: FakeLLMServer,
) -> None:
    import json

    client = instrument_openai(_client(server))
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Which drawer?"},
        {"role": "assistant", "content": "The top one."},
        {"role": "user", "content": "And the key?"},
    ]
    with capture(capture_content=True) as cap:
        client.chat.completions.create(model="m", messages=(m for m in messages))
    sent = server.requests[-1].json["messages"]
    assert [m["content"] for m in sent] == [m["content"] for m in messages]  # all of it
    recorded = json.loads(cap.span("chat m").attributes["gen_ai.input.messages"])
    assert [(m["role"], m["parts"][0]["content"]) for m in recorded] == [
        (m["role"], m["content"]) for m in messages
    ]
