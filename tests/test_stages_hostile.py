"""Stages under hostile names, attribute values and exceptions: nothing leaks, nothing raises.

Regression tests for issue 11, items 2, 4, 5, 7, 9 and 10.
"""

from __future__ import annotations

import collections
import json
import logging
import time
from typing import Any

import pytest
from opentelemetry import trace

import rag_instrument as ri
from rag_instrument.testing import Capture, capture

KEY = "sk-proj-Zx81Qw3Er5Ty7Ui9Op1As3Df5Gh7Jk9L"


def _everything(cap: Capture) -> str:
    text = json.dumps(cap.logs)
    for span in cap.spans:
        text += span.name + repr(dict(span.attributes or {})) + repr(span.status.description)
        text += repr([(e.name, dict(e.attributes or {})) for e in span.events])
    return text


# --- item 2: keyword attributes by key; attributes overwritten later -------------------------


def test_stage_and_traced_keyword_attributes_are_redacted_by_key(rag_capture: Capture) -> None:
    with ri.stage("retrieval", api_key="plain-value-1", password="hunter2", top_k=5):
        pass

    @ri.traced("fetch", client_secret="plain-value-2", db_password="hunter3")
    def fetch() -> int:
        return 1

    assert fetch() == 1
    attrs = dict(rag_capture.span("retrieval").attributes or {})
    assert attrs["api_key"] == attrs["password"] == "[REDACTED]"
    assert attrs["top_k"] == 5
    assert dict(rag_capture.span("fetch").attributes or {})["client_secret"] == "[REDACTED]"
    for secret in ("plain-value-1", "plain-value-2", "hunter2", "hunter3"):
        assert secret not in _everything(rag_capture)


def test_attribute_overwritten_later_with_a_secret_is_masked_at_export(
    rag_capture: Capture,
) -> None:
    with ri.request_context(note="ok"):
        with ri.stage("retrieval", query="what is rag") as span:
            span.set_attribute("query", f"Authorization: Bearer {KEY}")  # same key, new value
            span.set_attribute("note", f"token={KEY}")  # a bound key overwritten

        @ri.stage("generation", model="m")
        def generate() -> None:
            trace.get_current_span().set_attribute("model", KEY)

        generate()
    assert KEY not in _everything(rag_capture)
    assert rag_capture.span("retrieval").attributes["query"] == "Authorization: Bearer [REDACTED]"
    assert rag_capture.span("generation").attributes["model"] == "[REDACTED]"


def test_status_and_name_set_by_the_application_are_masked_at_export(
    rag_capture: Capture,
) -> None:
    with ri.stage("retrieval") as span:
        span.set_status(trace.Status(trace.StatusCode.ERROR, f"denied for {KEY}"))
    with ri.stage("reranking") as span:
        span.update_name(f"rerank {KEY}")
    assert KEY not in _everything(rag_capture)


# --- item 4: exceptions quoting content or a key on the enclosing stage ----------------------

PROMPT = "Which drawer holds the passports of the Lindqvist family?"


class Refusing(ri.LLMProvider):
    system = "test"
    model = "m"

    async def _generate(self, prompt: str, **params: Any) -> str:
        raise ValueError(f"model refused the prompt {prompt!r}")


class Answering(ri.LLMProvider):
    system = "test"
    model = "m"

    async def _generate(self, prompt: str, **params: Any) -> str:
        return "The passports are in the second drawer of the oak desk."


@pytest.mark.asyncio
async def test_exception_quoting_the_prompt_is_hidden_on_the_stage(rag_capture: Capture) -> None:
    @ri.stage("generation")
    async def answer() -> str:
        return await Refusing().generate(PROMPT)

    with pytest.raises(ValueError, match="Lindqvist"):  # the caller's exception is intact
        await answer()
    assert "Lindqvist" not in _everything(rag_capture)
    (line,) = rag_capture.find_logs("generation failed")
    assert line["error_message"].startswith("ValueError")


@pytest.mark.asyncio
async def test_application_exception_quoting_prompt_or_completion_is_hidden(
    rag_capture: Capture,
) -> None:
    @ri.stage("generation")
    async def answer() -> str:
        text = await Answering().generate(PROMPT)
        raise RuntimeError(f"could not parse {text!r} for {PROMPT[:40]}...")

    with pytest.raises(RuntimeError):
        await answer()
    everything = _everything(rag_capture)
    assert "oak desk" not in everything
    assert "Lindqvist" not in everything
    (line,) = rag_capture.find_logs("generation failed")
    assert line["error_message"].startswith("could not parse '[content hidden]' for [content")


@pytest.mark.asyncio
async def test_content_seen_by_an_ended_stage_is_hidden_in_its_siblings_and_parents(
    rag_capture: Capture,
) -> None:
    # The answer was generated in a stage that has ended; a later sibling (parsing it) and
    # the enclosing stage quote it in their exceptions: hidden in both.
    @ri.stage("generation")
    async def generate() -> str:
        return await Answering().generate(PROMPT)

    @ri.stage("parsing")
    async def parse(text: str) -> None:
        raise RuntimeError(f"could not parse {text!r}")

    @ri.stage("search")
    async def search() -> None:
        text = await generate()
        try:
            await parse(text)
        except RuntimeError:
            raise LookupError(f"no answer in {text!r}") from None

    with pytest.raises(LookupError, match="oak desk"):  # the caller's exception is intact
        await search()
    assert "oak desk" not in _everything(rag_capture)
    (parsing,) = rag_capture.find_logs("parsing failed")
    assert parsing["error_message"] == "could not parse '[content hidden]'"
    (outer,) = rag_capture.find_logs("search failed")
    assert outer["error_message"] == "no answer in '[content hidden]'"


@pytest.mark.asyncio
async def test_the_latest_contents_of_a_long_request_are_hidden(rag_capture: Capture) -> None:
    # A request that made many model calls: the ones before the failure are remembered.
    @ri.stage("batch")
    async def batch() -> None:
        answers = [await Answering().generate(f"{PROMPT} #{n}") for n in range(100)]
        raise RuntimeError(f"bad answer {answers[-1]!r} to {PROMPT} #99")

    with pytest.raises(RuntimeError):
        await batch()
    (line,) = rag_capture.find_logs("batch failed")
    assert "oak desk" not in line["error_message"]
    assert "Lindqvist" not in line["error_message"]


def test_with_capture_on_a_key_echoed_by_the_provider_is_masked_on_the_stage() -> None:
    hex_key = "3f9a0c1e5b7d4a2f8e6c0b9d1a3e5f7c"  # no known shape: only the literal finds it

    with capture(capture_content=True) as cap:
        from rag_instrument import _genai
        from rag_instrument._runtime import get_runtime

        rt = get_runtime()

        @ri.stage("generation")
        def call() -> None:
            llm = _genai.start_call(
                rt, operation="chat", system="test", model="m", secrets=(hex_key,)
            )
            exc = PermissionError(f"Incorrect API key provided: {hex_key}")
            llm.finish(exc)
            raise exc

        with pytest.raises(PermissionError):
            call()
    assert hex_key not in _everything(cap)
    (line,) = cap.find_logs("generation failed")
    assert line["error_message"] == "Incorrect API key provided: [REDACTED]"


# --- item 5: redact first, then cut ------------------------------------------------------------


def test_cut_never_splits_a_secret_from_its_name() -> None:
    secret = "Qv7Rt9Wx2Yz4Ab6Cd8Ef"
    with capture(max_content_chars=30) as cap:
        # The cut at 30 lands inside the value: a cut first would leave "Qv7Rt9..." behind.
        with ri.stage("retrieval", note=f"config: DB_PASSWORD={secret} and more text"):
            pass
        ri.get_logger().info("x", detail=f"settings DB_PASSWORD={secret} trailing")
        with pytest.raises(ValueError):
            with ri.stage("generation"):
                raise ValueError(f"bad cfg SMTP_PASSWORD={secret} trailing text here")
    everything = _everything(cap)
    assert secret[:4] not in everything


# --- item 7: names ---------------------------------------------------------------------------


def test_stage_names_are_redacted_and_length_limited(rag_capture: Capture) -> None:
    long_name = "x" * 10_000
    with ri.stage(long_name):
        pass
    with ri.stage(f"tenant {KEY}"):
        pass

    @ri.traced(f"op token={KEY}")
    def op() -> None:
        pass

    op()
    for span in rag_capture.spans:
        assert len(span.name) <= 200
    for line in rag_capture.logs:
        assert len(json.dumps(line)) < 2_000
    assert KEY not in _everything(rag_capture)


# --- item 9: hostile __len__ / __repr__ ---------------------------------------------------------


class RaisingLen(list[int]):
    def __len__(self) -> int:
        raise RuntimeError("len exploded")


class RaisingRepr:
    def __repr__(self) -> str:
        raise RuntimeError("repr exploded")


class HostileName(str):
    __slots__ = ()

    def __repr__(self) -> str:
        raise RuntimeError("repr exploded")

    def strip(self, chars: str | None = None) -> str:
        raise RuntimeError("strip exploded")


class Sized:
    def __len__(self) -> int:
        raise RuntimeError("len exploded")


@pytest.mark.parametrize("value", [RaisingLen([1, 2]), RaisingRepr(), Sized()])
def test_hostile_attribute_values_never_reach_the_caller(
    rag_capture: Capture, value: object
) -> None:
    with ri.stage("retrieval", thing=value):
        pass

    @ri.stage("reranking", thing=value)
    def rerank() -> str:
        return "ok"

    assert rerank() == "ok"
    ri.get_logger().info("event", thing=value)
    with ri.request_context(thing=value):
        with ri.stage("generation"):
            pass
    assert {s.name for s in rag_capture.spans} == {"retrieval", "reranking", "generation"}


def test_stage_name_objects_whose_repr_raises(rag_capture: Capture) -> None:
    with ri.stage(HostileName("retrieval")):  # a str: used as its text
        pass
    with pytest.raises(TypeError, match="unrepresentable"):  # a clear error, not its own

        @ri.stage(RaisingRepr())  # type: ignore[arg-type]
        def f() -> None:
            pass

    with ri.stage(RaisingRepr()):  # type: ignore[arg-type]  # run time: not traced, no raise
        pass
    assert [s.name for s in rag_capture.spans] == ["retrieval"]


# --- item 10: bounded rendering ----------------------------------------------------------------


class SlowRepr:
    calls = 0

    def __repr__(self) -> str:
        SlowRepr.calls += 1
        time.sleep(0.05)
        return "slow"


def test_rendering_cost_is_bounded(rag_capture: Capture) -> None:
    huge = collections.deque(range(3_000_000))
    log = ri.get_logger()
    log.info("huge", value=huge)
    (line,) = rag_capture.find_logs("huge")
    assert line["value"] == "<deque len=3000000>"  # described, never rendered
    SlowRepr.calls = 0
    for _ in range(20):
        log.info("slow", value=SlowRepr())
    assert SlowRepr.calls == 1  # over budget once: never asked again
    assert rag_capture.find_logs("slow")[-1]["value"] == "<SlowRepr: repr skipped>"


def test_a_failing_exporters_message_is_redacted_before_it_is_cut(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from rag_instrument._utils import user_code_error, warn_once

    secret = "Qv7Rt9Wx2Yz4Ab6Cd8Ef"
    warn_once.reset()
    with caplog.at_level(logging.WARNING, logger="rag_instrument.internal"):
        # The cut at 200 characters lands inside the value.
        user_code_error(
            "span exporter X.export", RuntimeError("x" * 180 + f" DB_PASSWORD={secret}")
        )
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "failed" in text
    assert secret[:3] not in text


def test_not_callable_with_a_hostile_repr_is_a_clear_type_error() -> None:
    with pytest.raises(TypeError, match="not callable"):
        ri.stage("retrieval")(RaisingRepr())  # type: ignore[arg-type]


def test_a_key_echoed_by_the_openai_sdk_is_masked_on_the_stage_with_capture_on() -> None:
    openai = pytest.importorskip("openai")
    from rag_instrument.integrations.openai import instrument_openai
    from support.fake_llm import FakeLLMServer

    hex_key = "3f9a0c1e5b7d4a2f8e6c0b9d1a3e5f7c"
    body = {
        "error": {
            "message": f"Incorrect API key provided: {hex_key}.",
            "type": "invalid_request_error",
            "code": "invalid_api_key",
        }
    }
    with FakeLLMServer() as server, capture(capture_content=True) as cap:
        server.enqueue(401, body=body)
        client = instrument_openai(
            openai.OpenAI(api_key=hex_key, base_url=server.openai_base_url, max_retries=0)
        )
        try:
            with pytest.raises(openai.AuthenticationError), ri.stage("generation"):
                client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "hi"}]
                )
        finally:
            client.close()
    assert hex_key not in _everything(cap)
    (line,) = cap.find_logs("generation failed")
    assert "Incorrect API key provided: [REDACTED]" in line["error_message"]


def test_a_bare_stage_decorator_fails_where_it_is_written() -> None:
    # @ri.stage without a name would replace the function by the stage object, and the
    # first call would raise into the application: refused at decoration instead.
    with pytest.raises(TypeError, match=r'@ri\.stage\("retrieval"\)'):

        @ri.stage  # type: ignore[arg-type]
        def retrieve() -> int:
            return 1


def test_too_many_attributes_keep_the_stages_own_and_the_bound_ones() -> None:
    # Spans keep 128 attributes and the SDK dropped the oldest beyond (the stage's own,
    # the request id), writing a warning for each one dropped.
    many = {f"k{i}": i for i in range(300)}
    with capture() as cap:
        with ri.request_context(request_id="r-1"):
            with ri.pipeline_stage_context("retrieval", **many):
                pass
        ri.bind_context(**{f"b{i}": "v" for i in range(300)})
        try:
            with ri.stage("generation"):
                pass
        finally:
            ri.unbind_context(*(f"b{i}" for i in range(300)))
    retrieval = dict(cap.span("retrieval").attributes or {})
    assert retrieval["rag.stage"] == "retrieval"
    assert retrieval["openinference.span.kind"] == "RETRIEVER"
    assert retrieval["request_id"] == "r-1"
    assert len(retrieval) <= 128
    generation = dict(cap.span("generation").attributes or {})
    assert generation["rag.stage"] == "generation"
    assert len(generation) <= 128
    assert not [line for line in cap.logs if "Attributes dict is full" in line["event"]]
    warnings = [line["event"] for line in cap.logs if line["level"] == "warning"]
    assert len(warnings) == 2, warnings  # one for each, not one per attribute dropped


def test_with_too_many_bound_values_the_request_id_bound_last_is_kept() -> None:
    ri.bind_context(**{f"app{i}": "v" for i in range(150)})
    try:
        with capture() as cap:
            with ri.request_context(request_id="r-9"), ri.stage("retrieval"):
                pass
    finally:
        ri.unbind_context(*(f"app{i}" for i in range(150)))
    attributes = cap.span("retrieval").attributes or {}
    assert attributes["request_id"] == "r-9"
    assert attributes["rag.stage"] == "retrieval"


def test_a_name_with_a_lone_surrogate_is_a_stage_all_the_same() -> None:
    with capture() as cap:

        @ri.stage("a\udcffb")
        def decorated() -> int:
            return 1

        assert decorated() == 1
        with ri.stage("c\udcffd"), ri.traced("t\udcff"):
            pass
    assert [s.name for s in cap.spans] == ["a\\udcffb", "t\\udcff", "c\\udcffd"]
    assert [line["event"] for line in cap.logs] == [
        "a\\udcffb completed",
        "t\\udcff completed",
        "c\\udcffd completed",
    ]
