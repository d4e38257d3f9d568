"""instrument_openai / instrument_anthropic(client, cache=...): the SDK response cache.

Real SDK clients against the local fake server; a hit is a call that never reached it.
"""

from __future__ import annotations

import asyncio
import contextvars
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anthropic
import openai
import pytest
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion

import rag_instrument as ri
from rag_instrument.integrations.anthropic import instrument_anthropic
from rag_instrument.integrations.openai import instrument_openai, uninstrument_openai
from rag_instrument.testing import Capture, capture
from support.fake_llm import FakeLLMServer

KEY = "sk-rag-cache-0123456789abcdef"
MESSAGES = [{"role": "user", "content": "What is the capital of Peru?"}]


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


def _openai(server: FakeLLMServer, cache: Any = True, **kw: Any) -> openai.OpenAI:
    client = openai.OpenAI(api_key=KEY, base_url=server.openai_base_url, max_retries=0, **kw)
    _OPEN.append(client)
    return instrument_openai(client, cache=cache)


def _hits(cap: Capture, name: str) -> list[Any]:
    return [s.attributes.get("rag.cache.hit") for s in cap.spans if s.name == name]


def _counter(cap: Capture, name: str) -> int:
    return sum(p.value for p in cap.metrics().get(name, []))


def _ask(client: Any, **kw: Any) -> Any:
    return client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, **kw)


def test_hit_returns_the_sdk_type_without_a_request(server: FakeLLMServer) -> None:
    spec = ri.CacheSpec(ttl=60)
    client = _openai(server, cache=spec)
    with capture() as cap:
        with ri.stage("generation"):
            first = _ask(client, temperature=0)
            second = _ask(client, temperature=0)
    assert len(server.requests) == 1
    assert type(second) is ChatCompletion
    assert second == first
    assert second is not first  # a fresh object: mutating one never changes the cache
    assert _hits(cap, "chat gpt-4o-mini") == [False, True]
    hit = next(s for s in cap.spans if s.attributes.get("rag.cache.hit"))
    assert hit.attributes["gen_ai.usage.input_tokens"] == 0  # nothing asked of the model
    saved = first.usage.total_tokens  # type: ignore[union-attr]
    assert _counter(cap, "rag.cache.tokens_saved") == saved
    assert _counter(cap, "rag.cache.hits") == 1
    (stage,) = cap.find_logs("generation completed")
    assert stage["breakdown"]["llm"]["count"] == 1  # the hit cost no model time
    assert stage["breakdown"]["cache"] == {"hits": 1, "misses": 1}
    lines = cap.find_logs("llm call completed")
    assert [line["cache_hit"] for line in lines] == [False, True]
    second.choices[0].message.content = "changed"
    assert _ask(client, temperature=0).choices[0].message.content == server.reply_text
    info = spec.cache_info()
    assert (info.hits, info.misses) == (2, 1)


def test_misses_different_requests_and_what_is_never_cached(server: FakeLLMServer) -> None:
    client = _openai(server)
    _ask(client)
    _ask(client, max_tokens=5)  # another parameter: another key
    assert len(server.requests) == 2
    _ask(client, temperature=0.7)
    _ask(client, temperature=0.7)  # sampled answers are not facts to repeat
    assert len(server.requests) == 4
    for _ in range(2):
        stream = _ask(client, stream=True)
        assert isinstance(stream, openai.Stream)
        assert "".join(c.choices[0].delta.content or "" for c in stream) == server.reply_text
    assert len(server.requests) == 6
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES
        )
        assert raw.parse().choices[0].message.content == server.reply_text
    assert len(server.requests) == 8
    server.enqueue(400)
    with pytest.raises(openai.BadRequestError):
        _ask(client, seed=1)
    _ask(client, seed=1)  # an error is never cached
    assert len(server.requests) == 10


def test_nondeterministic_opt_in(server: FakeLLMServer) -> None:
    client = _openai(server, cache=ri.CacheSpec(nondeterministic=True))
    _ask(client, temperature=0.9)
    _ask(client, temperature=0.9)
    assert len(server.requests) == 1


def test_embeddings_cached_as_their_type(server: FakeLLMServer) -> None:
    client = _openai(server)
    with capture() as cap:
        with ri.stage("embed"):
            first = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
            second = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(server.requests) == 1
    assert type(second) is CreateEmbeddingResponse
    assert [d.embedding for d in second.data] == [d.embedding for d in first.data]
    assert _hits(cap, "embeddings text-embedding-3-small") == [False, True]
    (stage,) = cap.find_logs("embed completed")
    assert stage["breakdown"]["embedding"]["count"] == 1


def test_tenant_namespaces_never_share(server: FakeLLMServer) -> None:
    tenant: contextvars.ContextVar[str | None] = contextvars.ContextVar("tenant", default=None)
    client = _openai(server, cache=ri.CacheSpec(namespace=tenant.get))
    for name in ("acme", "globex", "acme", "globex"):
        token = tenant.set(name)
        _ask(client)
        tenant.reset(token)
    assert len(server.requests) == 2
    fixed_a = _openai(server, cache=ri.CacheSpec(namespace="a"))
    _ask(fixed_a)
    _ask(fixed_a)
    assert len(server.requests) == 3


def test_base_urls_never_share_a_spec(server: FakeLLMServer) -> None:
    spec = ri.CacheSpec()
    with FakeLLMServer() as other:
        _ask(_openai(server, cache=spec))
        _ask(_openai(other, cache=spec))
        _ask(_openai(other, cache=spec))
        assert len(other.requests) == 1
    assert len(server.requests) == 1


def test_copies_share_the_cache_and_uninstrument_stops_it(server: FakeLLMServer) -> None:
    client = _openai(server)
    _ask(client)
    _ask(client.with_options(timeout=30))  # the timeout is not part of the key
    assert len(server.requests) == 1
    uninstrument_openai(client)
    _ask(client)
    assert len(server.requests) == 2


def test_single_flight_threads(server: FakeLLMServer) -> None:
    server.enqueue(hang_s=1.0)  # the leader's request is slow; the others wait for it
    client = _openai(server)
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: _ask(client), range(8)))
    assert len(server.requests) == 1
    assert all(r.choices[0].message.content == server.reply_text for r in replies)


@pytest.mark.asyncio
async def test_single_flight_async_and_coalesced_count(server: FakeLLMServer) -> None:
    server.enqueue(hang_s=1.0)
    client = instrument_openai(
        openai.AsyncOpenAI(api_key=KEY, base_url=server.openai_base_url, max_retries=0),
        cache=True,
    )
    with capture() as cap:
        replies = await asyncio.gather(
            *(client.chat.completions.create(model="m", messages=MESSAGES) for _ in range(10))
        )
    assert len(server.requests) == 1
    assert all(type(r) is ChatCompletion for r in replies)
    assert _hits(cap, "chat m").count(True) == 9
    assert _counter(cap, "rag.cache.coalesced") == 9
    await client.close()


def test_anthropic_messages_cached(server: FakeLLMServer) -> None:
    client = instrument_anthropic(
        anthropic.Anthropic(api_key=KEY, base_url=server.anthropic_base_url, max_retries=0),
        cache=ri.CacheSpec(ttl=30),
    )
    _OPEN.append(client)
    with capture() as cap:
        first = client.messages.create(model="claude-x", max_tokens=32, messages=MESSAGES)
        second = client.messages.create(model="claude-x", max_tokens=32, messages=MESSAGES)
        with client.messages.stream(model="claude-x", max_tokens=32, messages=MESSAGES) as s:
            s.until_done()
    assert type(second) is anthropic.types.Message
    assert second == first
    assert len(server.requests) == 2  # the stream helper is never cached
    assert _hits(cap, "chat claude-x") == [False, True, None]
    usage = first.usage
    assert _counter(cap, "rag.cache.tokens_saved") == usage.input_tokens + usage.output_tokens


@pytest.mark.asyncio
async def test_anthropic_async_cached(server: FakeLLMServer) -> None:
    client = instrument_anthropic(
        anthropic.AsyncAnthropic(api_key=KEY, base_url=server.anthropic_base_url, max_retries=0),
        cache=True,
    )
    first = await client.messages.create(model="c", max_tokens=8, messages=MESSAGES)
    second = await client.messages.create(model="c", max_tokens=8, messages=MESSAGES)
    assert second == first
    assert len(server.requests) == 1
    await client.close()


@pytest.mark.redis
def test_redis_backend_shared_across_clients(server: FakeLLMServer) -> None:
    prefix = f"rag-test-sdk-{uuid.uuid4().hex}:"
    backends = [ri.RedisCache("redis://127.0.0.1:6379/0", prefix=prefix) for _ in range(2)]
    try:
        # two specs, two clients: as two processes would be, sharing only Redis
        first = _ask(_openai(server, cache=ri.CacheSpec(backend=backends[0])))
        with capture() as cap:
            second = _ask(_openai(server, cache=ri.CacheSpec(backend=backends[1])))
        assert len(server.requests) == 1
        assert type(second) is ChatCompletion
        assert second == first
        assert _hits(cap, "chat gpt-4o-mini") == [True]
    finally:
        backends[0].clear()
        for backend in backends:
            backend.close()


def test_unkeyable_parameter_is_a_call_not_a_failure(
    server: FakeLLMServer, caplog: pytest.LogCaptureFixture
) -> None:
    import pydantic

    class Tags(pydantic.BaseModel):  # the SDK sends it as JSON; a key has no canonical form
        team: str

    client = _openai(server)
    with caplog.at_level("WARNING", logger="rag_instrument.internal"):
        _ask(client, metadata=Tags(team="a"))
        _ask(client, metadata=Tags(team="a"))
    assert len(server.requests) == 2
    assert any("not cached" in r.getMessage() for r in caplog.records)


def test_bad_cache_settings_are_value_errors(server: FakeLLMServer) -> None:
    with pytest.raises(ValueError, match="ttl"):
        ri.CacheSpec(ttl=0)
    with pytest.raises(ValueError, match="maxsize"):
        ri.CacheSpec(maxsize=0)
    with pytest.raises(ValueError, match="namespace"):
        ri.CacheSpec(namespace=42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cache"):
        _openai(server, cache="yes")


def test_cache_settings_as_cache_mixins_class_attributes(server: FakeLLMServer) -> None:
    class Settings:  # CacheMixin's attributes, as a provider class would set them
        cache_ttl = 120.0
        cache_namespace = "tenant-a"

    client = _openai(server, cache=Settings)
    other = _openai(server, cache=ri.CacheSpec(namespace="tenant-b"))
    _ask(client, temperature=0)
    assert type(_ask(client, temperature=0)) is ChatCompletion
    _ask(other, temperature=0)  # another namespace: its own entry
    assert len(server.requests) == 2

    class Provider(ri.CacheMixin, ri.LLMProvider):  # a provider class's settings, as is
        system, model = "acme", "m"
        cache_nondeterministic = True

        async def _generate(self, prompt: str, **params: Any) -> ri.LLMResult:
            return ri.LLMResult(text=prompt)

    mixin = _openai(server, cache=Provider)
    _ask(mixin, temperature=0.7)
    _ask(mixin, temperature=0.7)  # nondeterministic calls cached, as the class says
    assert len(server.requests) == 3
    with pytest.raises(ValueError, match="maxsize"):
        _openai(server, cache=type("Bad", (), {"cache_maxsize": 0}))


def test_asking_an_instrumented_client_for_a_cache_it_lacks_is_an_error(
    server: FakeLLMServer,
) -> None:
    client = _openai(server, cache=None)
    assert instrument_openai(client) is client  # twice: nothing more
    with pytest.raises(ValueError, match="already instrumented without a response cache"):
        instrument_openai(client, cache=ri.CacheSpec())
    uninstrument_openai(client)
    spec = ri.CacheSpec()
    instrument_openai(client, cache=spec)
    # A client with a cache keeps it: instrumenting it again (on every request, say, with
    # a new but equal spec) does nothing.
    for again in (spec, True, None, ri.CacheSpec(), ri.CacheSpec(ttl=5)):
        assert instrument_openai(client, cache=again) is client
    _ask(client, temperature=0)
    _ask(client, temperature=0)
    assert len(server.requests) == 1  # the first spec's cache
    copy = client.with_options(timeout=30)  # instrumented with the same cache
    assert instrument_openai(copy, cache=ri.CacheSpec()) is copy
    aclient = anthropic.Anthropic(api_key=KEY, base_url=server.anthropic_base_url, max_retries=0)
    _OPEN.append(aclient)
    instrument_anthropic(aclient)
    with pytest.raises(ValueError, match=r"ri\.uninstrument_anthropic"):
        instrument_anthropic(aclient, cache=True)


_TOOL_CALL_COMPLETION = {
    "id": "chatcmpl-tool",
    "object": "chat.completion",
    "created": 0,
    "model": "gpt-x",
    "choices": [
        {
            "index": 0,
            "finish_reason": "tool_calls",
            "message": {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "lookup", "arguments": '{"city": "Lima"}'},
                    }
                ],
            },
        }
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10},
}
_TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]


def test_tool_call_answers_are_not_cached(server: FakeLLMServer) -> None:
    # RELIABILITY 38: what a tool call leads to depends on what the tool returns.
    server.enqueue(body=_TOOL_CALL_COMPLETION, times=2)
    client = _openai(server)
    for _ in range(2):
        result = client.chat.completions.create(
            model="gpt-x", messages=MESSAGES, tools=_TOOLS, temperature=0  # type: ignore[arg-type]
        )
        assert result.choices[0].finish_reason == "tool_calls"
    assert len(server.requests) == 2
    # Plain answers still are.
    for _ in range(2):
        client.chat.completions.create(model="gpt-x", messages=MESSAGES, temperature=0)
    assert len(server.requests) == 3


def test_anthropic_tool_use_answers_are_not_cached(server: FakeLLMServer) -> None:
    message = {
        "id": "msg_tool",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [{"type": "tool_use", "id": "tu_1", "name": "lookup", "input": {"c": 1}}],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {"input_tokens": 5, "output_tokens": 5},
    }
    server.enqueue(body=message, times=2)
    client = anthropic.Anthropic(
        api_key=KEY, base_url=server.anthropic_base_url, max_retries=0
    )
    _OPEN.append(client)
    instrument_anthropic(client, cache=True)
    for _ in range(2):
        result = client.messages.create(model="claude-x", max_tokens=50, messages=MESSAGES)
        assert result.stop_reason == "tool_use"
    assert len(server.requests) == 2


def test_cache_mixin_does_not_keep_tool_calls() -> None:
    calls: list[str] = []

    class Agent(ri.CacheMixin, ri.LLMProvider):
        system, model = "acme", "m"

        async def _generate(self, prompt: str, **params: Any) -> ri.LLMResult:
            calls.append(prompt)
            reason = "tool_calls" if prompt.startswith("tool") else "stop"
            return ri.LLMResult(text="", finish_reason=reason)

    async def main() -> None:
        agent = Agent()
        for _ in range(2):
            await agent.generate("tool please")
            await agent.generate("plain")

    asyncio.run(main())
    assert calls == ["tool please", "plain", "tool please"]


def test_a_hit_is_a_response_as_the_sdk_hands_it_out(server: FakeLLMServer) -> None:
    # Code reads completion._request_id (the SDKs' documentation shows it): a hit made no
    # request, so it is None, where it raised AttributeError.
    client = _openai(server)
    first = client.chat.completions.create(model="gpt-x", messages=MESSAGES, temperature=0)
    again = client.chat.completions.create(model="gpt-x", messages=MESSAGES, temperature=0)
    assert len(server.requests) == 1
    assert again == first
    assert again._request_id is None
    client.embeddings.create(model="emb", input="x")
    assert client.embeddings.create(model="emb", input="x")._request_id is None
    messages = anthropic.Anthropic(api_key=KEY, base_url=server.anthropic_base_url, max_retries=0)
    _OPEN.append(messages)
    instrument_anthropic(messages, cache=True)
    for _ in range(2):
        message = messages.messages.create(model="claude-x", max_tokens=50, messages=MESSAGES)
    assert message._request_id is None


def test_a_cached_function_returning_an_sdk_model_gives_it_a_request_id(
    server: FakeLLMServer,
) -> None:
    client = openai.OpenAI(api_key=KEY, base_url=server.openai_base_url, max_retries=0)
    _OPEN.append(client)

    @ri.cached
    def ask(question: str) -> ChatCompletion:
        return client.chat.completions.create(
            model="gpt-x", messages=[{"role": "user", "content": question}]
        )

    ask("q")
    assert ask("q")._request_id is None
    assert len(server.requests) == 1
