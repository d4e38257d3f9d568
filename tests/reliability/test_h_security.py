"""H. Security and redaction (RELIABILITY.md H43-H46), across every integration."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, text
from sqlalchemy.pool import StaticPool

import rag_instrument as ri
from rag_instrument._sanitize import REDACTED, redact_text
from rag_instrument.logs import render_console, render_json
from rag_instrument.testing import Capture, capture
from support.fake_llm import FakeLLMServer

OPENAI_KEY = "sk-proj-Qz7Wx2Ec4Rv6Tb8Yn1Um3Ik5Ol9Pa0Sd"
ANTHROPIC_KEY = "sk-ant-api03-Hj4Kl6Zx8Cv0Bn2Mq4We6Rt8Yu0Io2Pa4Sd6Fg8"
PROMPT = "Which drawer holds the passports of the Lindqvist family?"
REPLY = "The passports are in the second drawer of the oak desk."
SQL_VALUE = "alice.lindqvist@example.org"
PASSWORD = "correct-horse-battery-9"


def _dump(cap: Capture) -> str:
    out = json.dumps(cap.logs)
    for span in cap.spans:
        out += span.name + repr(dict(span.attributes or {})) + repr(span.status.description)
        out += repr([(e.name, dict(e.attributes or {})) for e in span.events])
    for points in cap.metrics().values():
        out += "".join(repr(dict(point.attributes or {})) for point in points)
    return out


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(reply_text=REPLY) as fake:
        yield fake


def test_h43_secrets_in_attributes_logs_and_exceptions(rag_capture: Capture) -> None:
    class Client:
        def __init__(self) -> None:
            self.api_key = OPENAI_KEY

        def __repr__(self) -> str:
            return f"Client(api_key={self.api_key!r})"

    dsn = f"postgresql://app:{PASSWORD}@db:5432/prod"

    @ri.traced("call", api_key=OPENAI_KEY, client=Client(), dsn=dsn)
    def call(**kwargs: Any) -> None:
        ri.get_logger().info(
            "headers",
            headers={"Authorization": f"Bearer {OPENAI_KEY}", "x-api-key": "abc123456789"},
            client=Client(),
            note=f"using {OPENAI_KEY} on {dsn}",
        )
        raise PermissionError(f"Authorization: Bearer {OPENAI_KEY} refused for {dsn}")

    with pytest.raises(PermissionError):
        call(api_key=OPENAI_KEY)
    everything = _dump(rag_capture)
    for secret in (OPENAI_KEY, PASSWORD, "abc123456789"):
        assert secret not in everything
    assert REDACTED in everything
    for fragment in ("Qz7Wx2", "horse-battery"):  # no part of a match is echoed
        assert fragment not in everything


def test_h44_exception_logs_carry_no_local_variables(rag_capture: Capture) -> None:
    def handler() -> None:
        api_key = "ghp_" + "A1b2C3d4E5f6G7h8J9k0L1m2N3p4Q5r6S7t8"  # noqa: F841 - a local
        raise RuntimeError("failed")

    try:
        handler()
    except RuntimeError:
        ri.get_logger().exception("handler failed")
    (line,) = rag_capture.find_logs("handler failed")
    assert "locals" not in json.dumps(line["exception"])
    assert "A1b2C3d4" not in json.dumps(line)


def _sdk_calls(server: FakeLLMServer, oa: Any, an: Any, messages: list[dict[str, str]]) -> None:
    import openai

    with ri.stage("generation"):
        oa.chat.completions.create(model="m", messages=messages)
        for _ in oa.chat.completions.create(model="m", messages=messages, stream=True):
            pass
        oa.embeddings.create(model="e", input=[PROMPT])
        an.messages.create(model="c", max_tokens=10, messages=messages)
        with an.messages.stream(model="c", max_tokens=10, messages=messages) as stream:
            for _ in stream.text_stream:
                pass
    echo = {"error": {"message": f"Bad request for {PROMPT} with key {OPENAI_KEY}",
                      "type": "invalid_request_error", "code": "bad"}}  # fmt: skip
    server.enqueue(400, body=echo)
    with pytest.raises(openai.BadRequestError), ri.stage("generation"):
        oa.chat.completions.create(model="m", messages=messages)


def _every_integration(server: FakeLLMServer) -> None:
    """Run each integration with its defaults, on success, stream, embedding and error paths."""
    import anthropic
    import openai

    from rag_instrument.integrations.anthropic import instrument_anthropic
    from rag_instrument.integrations.openai import instrument_openai

    messages = [{"role": "user", "content": PROMPT}]
    oa = instrument_openai(
        openai.OpenAI(api_key=OPENAI_KEY, base_url=server.openai_base_url, max_retries=0)
    )
    an = instrument_anthropic(
        anthropic.Anthropic(
            api_key=ANTHROPIC_KEY, base_url=server.anthropic_base_url, max_retries=0
        )
    )
    try:
        _sdk_calls(server, oa, an, messages)
    finally:
        oa.close()
        an.close()

    class Provider(ri.CacheMixin, ri.RetryMixin, ri.LLMProvider):
        system, model = "acme", "m"
        retry_wait_min = retry_wait_max = 0.0

        async def _generate(self, prompt: str, **params: Any) -> str:
            if "fail" in params:
                raise ValueError(f"cannot answer {prompt!r}")
            return REPLY

    async def providers() -> None:
        provider = Provider()
        await provider.generate(PROMPT)
        await provider.generate(PROMPT)  # a cache hit
        with pytest.raises(ValueError):
            async with ri.stage("generation"):
                await provider.generate(PROMPT, fail=True)

    asyncio.run(providers())

    engine = create_engine("sqlite://", poolclass=StaticPool)
    handle = ri.instrument_sqlalchemy(engine, slow_query_ms=0)
    try:
        with ri.stage("retrieval"), engine.begin() as conn:
            conn.execute(text("CREATE TABLE users (email TEXT UNIQUE, password TEXT)"))
            conn.execute(text("INSERT INTO users VALUES (:e, :p)"), {"e": SQL_VALUE, "p": PASSWORD})
            conn.execute(text("SELECT * FROM users WHERE email = :e"), {"e": SQL_VALUE})
        with pytest.raises(Exception), ri.stage("ingestion"), engine.begin() as conn:
            conn.execute(text("INSERT INTO users VALUES (:e, :p)"), {"e": SQL_VALUE, "p": PASSWORD})
    finally:
        handle.uninstrument()
        engine.dispose()

    @ri.cached
    def lookup(q: str) -> str:
        return REPLY

    with ri.stage("reranking", query_len=len(PROMPT)):
        lookup(PROMPT)
        lookup(PROMPT)


def test_h45_with_defaults_no_content_or_secret_anywhere(server: FakeLLMServer) -> None:
    with capture() as cap:
        _every_integration(server)
        everything = _dump(cap)
        assert cap.metrics()  # metric attributes are part of the check
    assert len(cap.spans) > 10
    forbidden = {
        "prompt": "Lindqvist",
        "completion": "oak desk",
        "sql parameter": SQL_VALUE,
        "password": PASSWORD,
        "openai key": OPENAI_KEY,
        "anthropic key": ANTHROPIC_KEY,
        "openai key fragment": "Qz7Wx2Ec4",
        "authorization header": "Bearer ",
    }
    leaks = [what for what, needle in forbidden.items() if needle in everything]
    assert leaks == []


def test_h45_span_only_captures_content_truncated_and_redacted(
    server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import openai

    from rag_instrument.integrations.openai import instrument_openai

    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "SPAN_ONLY")
    settings_in_force = ri.configure(exporter="memory", max_content_chars=60)
    assert settings_in_force.capture_content is True
    with capture(capture_content=True, max_content_chars=60) as cap:
        oa = instrument_openai(
            openai.OpenAI(api_key=OPENAI_KEY, base_url=server.openai_base_url, max_retries=0)
        )
        long_prompt = f"my key is {OPENAI_KEY}; " + PROMPT * 5
        oa.chat.completions.create(model="m", messages=[{"role": "user", "content": long_prompt}])
    (span,) = [s for s in cap.spans if s.name == "chat m"]
    captured = span.attributes["gen_ai.input.messages"]
    assert "my key is [REDACTED]" in captured
    assert "truncated" in captured
    assert OPENAI_KEY not in _dump(cap)


HOSTILE = [
    '\n{"level":"info","event":"admin_login"}',
    "line\rreturn",
    "\x1b[31mred\x1b[0m",
    "a=1 b=2",
    "sep\u2028arator\u0085",
]


@pytest.mark.parametrize("value", HOSTILE)
def test_h46_injected_lines_stay_one_line(value: str, rag_capture: Capture) -> None:
    ri.get_logger().info(value, prompt=value)
    (line,) = rag_capture.find_logs(value)
    assert line["prompt"] == value
    for render in (render_json, render_console):
        out = render({"event": value, "prompt": value, "context": {"k": value}}).decode()
        assert len(out.splitlines()) == 1
        assert "\x1b" not in out
    console = render_console({"event": "e", "field": "a=1 b=2", "context": {}}).decode()
    assert 'field="a=1 b=2"' in console


@settings(max_examples=200, deadline=None)
@given(
    st.text(max_size=60), st.sampled_from([OPENAI_KEY, ANTHROPIC_KEY, f"DB_PASSWORD={PASSWORD}"])
)
def test_h_property_secrets_never_survive_any_surrounding_text(prefix: str, secret: str) -> None:
    out = redact_text(f"{prefix} {secret} trailing")
    assert PASSWORD not in out
    assert OPENAI_KEY not in out
    assert ANTHROPIC_KEY not in out


def test_h45_an_embedding_error_quoting_its_texts_shows_none_of_them(rag_capture: Capture) -> None:
    # Without content capture, an embedding provider's error that echoes the texts (as an
    # LLM error may echo the prompt) is shown by its type only, here and on the stage.
    secret = "PATIENT-7 has condition X"

    def embed_batch(texts: list[str]) -> list[list[float]]:
        raise ValueError(f"cannot embed {texts}")

    async def aembed_batch(texts: list[str]) -> list[list[float]]:
        raise ValueError(f"cannot embed {texts}")

    with ri.stage("ingestion"), pytest.raises(ri.EmbeddingBatchError):
        ri.embed_in_batches([secret], embed_batch)
    with pytest.raises(ri.EmbeddingBatchError):
        asyncio.run(ri.aembed_in_batches([secret], aembed_batch))
    everything = repr(rag_capture.logs)
    for span in rag_capture.spans:
        everything += repr(dict(span.attributes or {})) + repr(span.status.description)
        everything += repr([dict(e.attributes or {}) for e in span.events])
    assert "PATIENT-7" not in everything
    failed = [s for s in rag_capture.spans if s.name == "embedding batch"]
    assert len(failed) == 2
    assert all(s.events[0].attributes["exception.type"] == "ValueError" for s in failed)
