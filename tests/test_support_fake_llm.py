"""Self-check of the fake LLM server against the real openai and anthropic SDK clients."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import anthropic
import httpx2
import openai
import pytest

from support.fake_llm import FakeLLMServer

MESSAGES = [{"role": "user", "content": "Say hello please"}]
REPLY = "Hello from the fake model."


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as srv:
        yield srv
    assert srv.errors == []


def oai(server: FakeLLMServer, **kw: object) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=server.openai_base_url, api_key="sk-test-key", max_retries=0, **kw
    )


def aoai(server: FakeLLMServer, **kw: object) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=server.openai_base_url, api_key="sk-test-key", max_retries=0, **kw
    )


def anth(server: FakeLLMServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=server.anthropic_base_url, api_key="sk-ant-test", max_retries=0
    )


def aanth(server: FakeLLMServer) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        base_url=server.anthropic_base_url, api_key="sk-ant-test", max_retries=0
    )


def test_openai_chat_completion(server: FakeLLMServer) -> None:
    with oai(server) as client:
        resp = client.chat.completions.create(model="gpt-x", messages=MESSAGES)
    assert resp.choices[0].message.content == REPLY
    assert resp.choices[0].finish_reason == "stop"
    assert resp.model == "gpt-x"
    assert resp.id.startswith("chatcmpl-")
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (3, 5)
    assert resp.usage.total_tokens == 8
    (req,) = server.requests
    assert (req.method, req.path) == ("POST", "/v1/chat/completions")
    assert req.headers["authorization"] == "Bearer sk-test-key"
    assert req.json["messages"] == MESSAGES
    assert "sk-test-key" not in req.body.decode()


def test_openai_stream_with_usage(server: FakeLLMServer) -> None:
    server.chunk_delay_s = 0.01
    with oai(server) as client:
        stream = client.chat.completions.create(
            model="gpt-x",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == 5
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5


def test_openai_embeddings_base64_and_float(server: FakeLLMServer) -> None:
    with oai(server) as client:
        default = client.embeddings.create(model="emb", input=["a b", "c"])
        floats = client.embeddings.create(model="emb", input="a b", encoding_format="float")
        sized = client.embeddings.create(model="emb", input="x", dimensions=3)
    assert server.requests[0].json["encoding_format"] == "base64"  # the SDK's default
    assert [d.index for d in default.data] == [0, 1]
    assert len(default.data[0].embedding) == 8
    assert default.data[0].embedding == floats.data[0].embedding  # deterministic, same decode
    assert default.data[0].embedding != default.data[1].embedding
    assert all(-1.0 <= v < 1.0 for v in floats.data[0].embedding)
    assert len(sized.data[0].embedding) == 3
    assert default.usage.prompt_tokens == 3


@pytest.mark.asyncio
async def test_async_openai_chat_and_stream(server: FakeLLMServer) -> None:
    async with aoai(server) as client:
        resp = await client.chat.completions.create(model="m", messages=MESSAGES)
        stream = await client.chat.completions.create(
            model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert resp.choices[0].message.content == REPLY
    assert "".join(parts) == REPLY


def test_anthropic_messages(server: FakeLLMServer) -> None:
    server.reply_text = "Bonjour le monde"
    with anth(server) as client:
        msg = client.messages.create(
            model="claude-x", max_tokens=64, system="Be nice", messages=MESSAGES
        )
    assert msg.content[0].type == "text"
    assert msg.content[0].text == "Bonjour le monde"
    assert (msg.role, msg.model, msg.stop_reason) == ("assistant", "claude-x", "end_turn")
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (5, 3)
    (req,) = server.requests
    assert req.path == "/v1/messages"
    # anthropic 2.x sends the key as a Bearer token; older SDKs used x-api-key.
    auth = req.headers.get("x-api-key") or req.headers["authorization"].removeprefix("Bearer ")
    assert auth == "sk-ant-test"
    assert "sk-ant-test" not in req.body.decode()


def test_anthropic_stream_helper_and_raw_stream(server: FakeLLMServer) -> None:
    with anth(server) as client:
        with client.messages.stream(model="c", max_tokens=64, messages=MESSAGES) as stream:
            pieces = list(stream.text_stream)
            final = stream.get_final_message()
        raw = client.messages.create(model="c", max_tokens=64, messages=MESSAGES, stream=True)
        events = list(raw)
    assert "".join(pieces) == REPLY
    assert len(pieces) == 5
    assert final.content[0].type == "text"
    assert final.content[0].text == REPLY
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 5
    assert [e.type for e in events] == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 5,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]


@pytest.mark.asyncio
async def test_async_anthropic(server: FakeLLMServer) -> None:
    async with aanth(server) as client:
        msg = await client.messages.create(model="c", max_tokens=64, messages=MESSAGES)
        async with client.messages.stream(model="c", max_tokens=64, messages=MESSAGES) as s:
            pieces = [p async for p in s.text_stream]
        raw = await client.messages.create(model="c", max_tokens=64, messages=MESSAGES, stream=True)
        events = [e.type async for e in raw]
    assert events[0] == "message_start"
    assert events[-1] == "message_stop"
    assert msg.content[0].type == "text"
    assert msg.content[0].text == REPLY
    assert "".join(pieces) == REPLY


def test_rate_limit_then_fifo_recovery(server: FakeLLMServer) -> None:
    server.enqueue(status=429, headers={"Retry-After": "0"})
    server.enqueue(status=500)
    with oai(server) as client:
        with pytest.raises(openai.RateLimitError) as rate:
            client.chat.completions.create(model="m", messages=MESSAGES)
        with pytest.raises(openai.InternalServerError) as internal:
            client.chat.completions.create(model="m", messages=MESSAGES)
        ok = client.chat.completions.create(model="m", messages=MESSAGES)
    assert rate.value.response.headers["retry-after"] == "0"
    assert isinstance(rate.value.body, dict)
    assert rate.value.body["type"] == "rate_limit_error"
    assert internal.value.status_code == 500
    assert ok.choices[0].message.content == REPLY
    assert server.pending == 0


def test_anthropic_error_shapes(server: FakeLLMServer) -> None:
    server.enqueue(status=429, headers={"Retry-After": "0"})
    server.enqueue(status=503)
    server.enqueue(status=400, body={"type": "error", "error": {"type": "x", "message": "m"}})
    with anth(server) as client:
        with pytest.raises(anthropic.RateLimitError) as rate:
            client.messages.create(model="c", max_tokens=8, messages=MESSAGES)
        with pytest.raises(anthropic.InternalServerError):
            client.messages.create(model="c", max_tokens=8, messages=MESSAGES)
        with pytest.raises(anthropic.BadRequestError) as bad:
            client.messages.create(model="c", max_tokens=8, messages=MESSAGES)
    assert rate.value.body == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "Fake error 429: Too Many Requests"},
    }
    assert bad.value.body == {"type": "error", "error": {"type": "x", "message": "m"}}


def test_retries_consume_the_queue(server: FakeLLMServer) -> None:
    server.enqueue(status=503, headers={"retry-after-ms": "10"}, times=2)  # fast retries
    with openai.OpenAI(base_url=server.openai_base_url, api_key="k", max_retries=2) as client:
        resp = client.chat.completions.create(model="m", messages=MESSAGES)
    assert resp.choices[0].message.content == REPLY
    assert len(server.requests) == 3


def test_hang_trips_client_timeout_and_stop_is_prompt() -> None:
    with FakeLLMServer() as server:
        server.enqueue(hang_s=60.0)
        with oai(server, timeout=0.5) as client:
            started = time.monotonic()
            with pytest.raises(openai.APITimeoutError):
                client.chat.completions.create(model="m", messages=MESSAGES)
            assert time.monotonic() - started < 20.0  # the client's timeout, not the 60 s hang
        server.enqueue(hang_s=60.0)
        with oai(server, timeout=0.3) as client, pytest.raises(openai.APITimeoutError):
            client.chat.completions.create(model="m", messages=MESSAGES)
        stop_started = time.monotonic()
    assert time.monotonic() - stop_started < 20.0  # hanging handlers wake on stop, not in 60 s
    assert server.errors == []


def test_malformed_json(server: FakeLLMServer) -> None:
    server.enqueue(malformed=True, times=4)
    with oai(server) as client:
        with pytest.raises(ValueError):  # json.JSONDecodeError, not wrapped by the SDK
            client.chat.completions.create(model="m", messages=MESSAGES)
        stream = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        with pytest.raises(ValueError):
            list(stream)
    with anth(server) as aclient:
        with pytest.raises(ValueError):
            aclient.messages.create(model="c", max_tokens=8, messages=MESSAGES)
        raw = aclient.messages.create(model="c", max_tokens=8, messages=MESSAGES, stream=True)
        with pytest.raises(ValueError):
            list(raw)


def test_stream_error_after(server: FakeLLMServer) -> None:
    server.enqueue(stream_error_after=2, times=2)
    got: list[str] = []

    def consume_openai() -> None:
        for c in client.chat.completions.create(model="m", messages=MESSAGES, stream=True):
            got.append(c.choices[0].delta.content or "")

    with oai(server) as client, pytest.raises(openai.APIConnectionError):
        consume_openai()
    assert "".join(got) == "Hello from "
    pieces: list[str] = []

    def consume_anthropic() -> None:
        with aclient.messages.stream(model="c", max_tokens=8, messages=MESSAGES) as s:
            pieces.extend(s.text_stream)

    # anthropic 2.x lets the transport error through unwrapped
    with anth(server) as aclient, pytest.raises((anthropic.APIConnectionError, httpx2.HTTPError)):
        consume_anthropic()
    assert pieces == ["Hello ", "from "]


def test_client_disconnect_mid_stream_is_quiet(
    server: FakeLLMServer, capfd: pytest.CaptureFixture[str]
) -> None:
    server.chunk_delay_s = 0.05
    with oai(server) as client:
        stream = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        next(iter(stream))
        stream.close()
    # The handler writes its next chunks into the closed connection, then gives up quietly.
    assert server.wait_idle()
    # Standard error of the whole process: gRPC's C core (a Milvus client of an earlier
    # test) may log there from its own threads at any time; none of that is the server's.
    err = capfd.readouterr().err.splitlines()
    assert [line for line in err if not _from_grpc(line)] == []
    assert server.errors == []


def _from_grpc(line: str) -> bool:
    return any(mark in line for mark in ("grpc", "chttp2", "GOAWAY", "too_many_pings"))


def test_unknown_route_is_404(server: FakeLLMServer) -> None:
    with oai(server) as client, pytest.raises(openai.NotFoundError):
        client.models.list()
    assert server.requests[0].method == "GET"


def test_reset_and_lifecycle() -> None:
    before = threading.active_count()
    with FakeLLMServer(reply_text="x y") as server:
        server.enqueue(status=500)
        server.reset()
        assert (server.pending, server.requests) == (0, [])
        port = server.port
        with oai(server) as client:
            resp = client.chat.completions.create(model="m", messages=MESSAGES)
        assert resp.choices[0].message.content == "x y"
    assert threading.active_count() == before
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
