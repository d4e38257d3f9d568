"""The SDK integrations' shared machinery (``integrations/_streams``), on a stand-in SDK.

The stand-in has what the OpenAI and Anthropic SDKs have: resource objects with methods,
``copy``/``with_options`` on the client, and stream objects iterating a private
``_iterator`` with a ``close`` method. No SDK needs to be installed.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import pytest
from opentelemetry.trace import StatusCode

from rag_instrument._genai import GenAICall
from rag_instrument.integrations._streams import (
    StreamState,
    client_secrets,
    instrument_methods,
    instrumented,
    text_of,
    uninstrument_methods,
)
from rag_instrument.testing import capture

KEY = "sk-proj-0123456789abcdefghijklmnop"


class Chunk:
    def __init__(self, text: str, finish: str | None = None) -> None:
        self.text = text
        self.finish = finish


class Stream:
    def __init__(self, chunks: list[Chunk], error: BaseException | None = None) -> None:
        self.closed = False
        self.response = "the HTTP response"
        self._iterator = self._produce(chunks, error)

    @staticmethod
    def _produce(chunks: list[Chunk], error: BaseException | None) -> Iterator[Chunk]:
        yield from chunks
        if error is not None:
            raise error

    def __iter__(self) -> Iterator[Chunk]:
        yield from self._iterator

    def close(self) -> None:
        self.closed = True


class AsyncStream:
    def __init__(self, chunks: list[Chunk]) -> None:
        self.closed = False
        self._iterator = self._produce(chunks)

    @staticmethod
    async def _produce(chunks: list[Chunk]) -> AsyncIterator[Chunk]:
        for chunk in chunks:
            await asyncio.sleep(0)
            yield chunk

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        async for item in self._iterator:
            yield item

    async def close(self) -> None:
        self.closed = True


CHUNKS = [Chunk("Hel"), Chunk("lo"), Chunk("", finish="stop")]


class Completions:
    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error
        self.stream_error: BaseException | None = None

    def create(self, **kwargs: Any) -> Any:
        if self.error is not None:
            raise self.error
        if kwargs.get("stream"):
            return Stream(list(CHUNKS), self.stream_error)
        return {"text": "Hello", "tokens": (3, 2)}

    async def acreate(self, **kwargs: Any) -> Any:
        await asyncio.sleep(0)
        return AsyncStream(list(CHUNKS)) if kwargs.get("stream") else {"text": "Hi", "tokens": (1, 1)}


class Client:
    def __init__(self, api_key: str = KEY) -> None:
        self.api_key = api_key
        self.chat = Completions()

    def copy(self, **changes: Any) -> Client:
        return Client(changes.get("api_key", self.api_key))

    with_options = copy


class State(StreamState):
    def read(self, item: Any) -> bool:
        if self.text is not None:
            self.text.append(item.text)
        if item.finish:
            self.finish_reasons.append(item.finish)
        return bool(item.text)  # a chunk with text: the first one is the first token


def describe(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "operation": "chat",
        "model": kwargs.get("model", "m"),
        "params": kwargs,
        "prompt": lambda: text_of(kwargs.get("messages")),
    }


def on_result(call: GenAICall, result: Any) -> None:
    input_tokens, output_tokens = result["tokens"]
    call.finish(None, input_tokens=input_tokens, output_tokens=output_tokens,
                output_text=result["text"])


def instrument(client: Client) -> bool:
    def wrap(original: Any, is_async: bool = False) -> Any:
        return instrumented(
            original, system="acme", describe=describe, on_result=on_result,
            stream_types=(Stream, AsyncStream), make_state=State, is_async=is_async,
            secrets=client_secrets(client),
        )

    return instrument_methods(
        client,
        [
            (client.chat, "create", wrap),
            (client.chat, "acreate", lambda original: wrap(original, is_async=True)),
        ],
        instrument=instrument,
    )


def test_a_response_is_one_span_and_passes_through_unchanged() -> None:
    client = Client()
    instrument(client)
    with capture() as cap:
        result = client.chat.create(model="m", temperature=0.5)
    assert result == {"text": "Hello", "tokens": (3, 2)}
    attrs = dict(cap.span("chat m").attributes or {})
    assert attrs["gen_ai.provider.name"] == "acme"
    assert attrs["gen_ai.request.temperature"] == 0.5
    assert attrs["gen_ai.usage.output_tokens"] == 2
    assert "rag.llm.stream.chunks" not in attrs


def test_a_stream_is_the_sdks_own_object_and_its_span_ends_when_exhausted() -> None:
    client = Client()
    instrument(client)
    with capture(capture_content=True) as cap:
        stream = client.chat.create(model="m", stream=True)
        assert type(stream) is Stream
        assert stream.response == "the HTTP response"
        assert cap.spans == []  # open until the stream is read
        assert [c.text for c in stream] == ["Hel", "lo", ""]
        span = cap.span("chat m")
    attrs = dict(span.attributes or {})
    assert attrs["rag.llm.stream.chunks"] == 3
    assert attrs["rag.stream.completed"] is True
    assert attrs["rag.llm.time_to_first_token_ms"] >= 0
    assert attrs["gen_ai.response.finish_reasons"] == ("stop",)
    assert "Hello" in attrs["gen_ai.output.messages"]
    (line,) = cap.find_logs("llm call completed")
    assert "time_to_first_token_ms" in line


def test_closing_a_stream_early_ends_its_span_once_and_closes_the_stream() -> None:
    client = Client()
    instrument(client)
    with capture() as cap:
        stream = client.chat.create(model="m", stream=True)
        first = next(iter(stream))
        assert first.text == "Hel"
        stream.close()
        stream.close()
    assert stream.closed
    (span,) = cap.spans
    assert span.attributes["rag.stream.completed"] is False
    assert span.status.status_code is not StatusCode.ERROR
    assert len(cap.find_logs("llm call completed")) == 1


def test_a_dropped_stream_ends_its_span() -> None:
    client = Client()
    instrument(client)
    with capture() as cap:
        stream = client.chat.create(model="m", stream=True)
        del stream
        gc.collect()
        (span,) = cap.spans
    assert span.attributes["rag.stream.completed"] is False
    assert span.attributes["rag.llm.stream.chunks"] == 0


def test_a_failing_stream_raises_the_same_exception_and_records_it() -> None:
    client = Client()
    client.chat.stream_error = ConnectionResetError("peer went away")
    instrument(client)
    with capture() as cap:
        stream = client.chat.create(model="m", stream=True)
        with pytest.raises(ConnectionResetError) as info:
            list(stream)
    assert info.value is client.chat.stream_error
    span = cap.span("chat m")
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "ConnectionResetError"
    assert span.attributes["rag.llm.stream.chunks"] == 3


def test_a_failing_call_raises_the_same_exception_and_never_records_the_key() -> None:
    client = Client()
    client.chat.error = PermissionError(f"Incorrect API key provided: {KEY}")
    instrument(client)
    with capture(capture_content=True) as cap:
        with pytest.raises(PermissionError) as info:
            client.chat.create(model="m")
    assert info.value is client.chat.error
    assert KEY in str(info.value)  # the application's exception is untouched
    span = cap.span("chat m")
    assert span.status.status_code is StatusCode.ERROR
    assert KEY not in repr(cap.logs) + repr([dict(e.attributes or {}) for e in span.events])


@pytest.mark.asyncio
async def test_async_streams_end_their_span_when_exhausted_or_closed() -> None:
    client = Client()
    instrument(client)
    with capture() as cap:
        stream = await client.chat.acreate(model="a", stream=True)
        assert type(stream) is AsyncStream
        assert [c.text async for c in stream] == ["Hel", "lo", ""]
        early = await client.chat.acreate(model="b", stream=True)
        await early.close()
    assert early.closed
    assert cap.span("chat a").attributes["rag.stream.completed"] is True
    assert cap.span("chat b").attributes["rag.stream.completed"] is False


def test_instrumenting_is_per_client_idempotent_and_reversible() -> None:
    client, other = Client(), Client()
    assert instrument(client) is True
    assert instrument(client) is False  # never wrapped twice
    with capture() as cap:
        client.chat.create(model="m")
        other.chat.create(model="m")  # the class is untouched
    assert len(cap.spans) == 1
    assert uninstrument_methods(client) is True
    assert uninstrument_methods(client) is False
    with capture() as cap:
        client.chat.create(model="m")
    assert cap.spans == []


def test_copies_of_an_instrumented_client_are_instrumented_with_their_own_key() -> None:
    client = Client()
    instrument(client)
    other_key = "sk-proj-zyxwvutsrqponmlkjihgfedcba98"
    copy = client.with_options(api_key=other_key)
    copy.chat.error = PermissionError(f"bad key {other_key}")
    with capture(capture_content=True) as cap:
        with pytest.raises(PermissionError):
            copy.chat.create(model="copy")
    assert cap.span("chat copy").status.status_code is StatusCode.ERROR
    assert other_key not in repr(cap.logs)


def test_text_of_reads_strings_parts_and_message_lists() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "image"}]},
        {"role": "assistant", "content": None},
    ]
    assert text_of(messages) == "Be brief.\nHi"
    assert text_of("plain") == "plain"
    assert text_of(42) == ""


def test_time_to_first_token_waits_for_a_token_not_the_opening_chunk() -> None:
    # Both SDKs open a stream with a chunk that holds no output (OpenAI's role-only delta,
    # Anthropic's message_start): the first token comes after it.
    import anthropic
    import openai

    from rag_instrument.integrations.anthropic import instrument_anthropic
    from rag_instrument.integrations.openai import instrument_openai
    from support.fake_llm import FakeLLMServer

    messages = [{"role": "user", "content": "hi"}]
    with FakeLLMServer(chunk_delay_s=0.3) as server, capture() as cap:
        oa = instrument_openai(
            openai.OpenAI(api_key="sk-x", base_url=server.openai_base_url, max_retries=0)
        )
        for _ in oa.chat.completions.create(model="o", messages=messages, stream=True):
            pass
        an = instrument_anthropic(
            anthropic.Anthropic(api_key="sk-x", base_url=server.anthropic_base_url, max_retries=0)
        )
        for _ in an.messages.create(model="a", max_tokens=9, messages=messages, stream=True):
            pass
        oa.close()
        an.close()
    for name in ("chat o", "chat a"):
        # The server waits 0.3 s before the first text chunk (after the opening ones).
        assert cap.span(name).attributes["rag.llm.time_to_first_token_ms"] >= 280.0, name
