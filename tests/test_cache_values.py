"""ri.cached on what functions really return: pydantic models, dataclasses, SDK responses."""

from __future__ import annotations

import dataclasses
import datetime
import json
from typing import Any

import openai
import orjson
import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletion

import rag_instrument as ri
from rag_instrument import cache as cache_module
from rag_instrument.cache._values import ValueTypes, type_name
from rag_instrument.integrations.openai import instrument_openai
from support.fake_llm import FakeLLMServer


class Answer(pydantic.BaseModel):
    text: str
    sources: list[str]
    score: float | None = None


@dataclasses.dataclass(frozen=True)
class Passage:
    doc_id: str
    rank: int


@dataclasses.dataclass
class Retrieved:
    query: str
    passages: tuple[Passage, ...]
    answer: Answer | None = None
    by_doc: dict[str, Passage] = dataclasses.field(default_factory=dict)


def test_pydantic_model_is_rebuilt_as_its_type() -> None:
    calls = 0

    @ri.cached
    def answer(question: str) -> Answer:
        nonlocal calls
        calls += 1
        return Answer(text=f"re {question}", sources=["a", "b"], score=0.5)

    first = answer("q")
    second = answer("q")
    assert calls == 1
    assert type(second) is Answer
    assert second == first
    assert second is not first
    second.sources.append("mutated")
    assert answer("q").sources == ["a", "b"]  # each hit is a fresh object


def test_nested_dataclasses_and_models_are_rebuilt() -> None:
    calls = 0

    @ri.cached
    def retrieve(query: str) -> Retrieved:
        nonlocal calls
        calls += 1
        passages = (Passage("d1", 1), Passage("d2", 2))
        return Retrieved(
            query, passages, Answer(text="x", sources=["d1"]), {"d1": passages[0]}
        )

    first = retrieve("q")
    second = retrieve("q")
    assert calls == 1
    assert second == first
    assert type(second.passages) is tuple
    assert type(second.passages[0]) is Passage
    assert type(second.answer) is Answer
    assert type(second.by_doc["d1"]) is Passage


@pytest.mark.asyncio
async def test_sdk_response_from_a_real_client_is_cached() -> None:
    with FakeLLMServer() as server:
        client = openai.AsyncOpenAI(api_key="sk-x-0123456789", base_url=server.openai_base_url)

        @ri.cached(ttl=60)
        async def ask(question: str) -> ChatCompletion:
            return await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": question}]
            )

        first = await ask("hello")
        second = await ask("hello")
        assert len(server.requests) == 1
        assert type(second) is ChatCompletion
        assert second == first
        await client.close()


def test_anything_else_is_refused_once_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    class Handle:
        pass

    calls = 0

    @ri.cached
    def make() -> Handle:
        nonlocal calls
        calls += 1
        return Handle()

    with caplog.at_level("WARNING", logger="rag_instrument.internal"):
        results = [make() for _ in range(3)]
    assert calls == 3  # not cached, and never an exception into the application
    assert all(type(r) is Handle for r in results)
    warnings = [r.getMessage() for r in caplog.records if "not cached" in r.getMessage()]
    assert len(warnings) == 1
    assert "Handle" in warnings[0]
    assert "neither JSON, a dataclass nor a pydantic model" in warnings[0]


def test_dataclass_that_does_not_round_trip_is_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    @dataclasses.dataclass
    class Stamped:
        at: datetime.date  # JSON turns it into a string: a hit would not be equal

    calls = 0

    @ri.cached
    def stamp() -> Stamped:
        nonlocal calls
        calls += 1
        return Stamped(datetime.date(2026, 1, 2))

    with caplog.at_level("WARNING", logger="rag_instrument.internal"):
        assert stamp() == stamp()
    assert calls == 2
    (message,) = [r.getMessage() for r in caplog.records if "not cached" in r.getMessage()]
    assert "Stamped" in message


class Aliased(pydantic.BaseModel):
    doc_id: str = pydantic.Field(alias="docId")
    is_async: bool = pydantic.Field(alias="async", default=False)


def test_a_model_with_field_aliases_is_rebuilt_on_a_hit(caplog: pytest.LogCaptureFixture) -> None:
    calls = 0

    @ri.cached
    def fetch(n: int) -> Aliased:
        nonlocal calls
        calls += 1
        return Aliased(docId=f"d{n}", **{"async": True})

    with caplog.at_level("WARNING", logger="rag_instrument.internal"):
        first, second = fetch(1), fetch(1)
    assert calls == 1
    assert type(second) is Aliased
    assert second == first
    assert fetch.cache_info().hits == 1
    assert not [r for r in caplog.records if "cache entry" in r.getMessage()]


class SerializedAs(pydantic.BaseModel):  # an alias for the JSON it writes, not for reading
    doc_id: str = pydantic.Field(serialization_alias="docId")
    rank: int = 0


@dataclasses.dataclass
class Holding:
    inner: SerializedAs


def test_a_serialization_only_alias_is_stored_by_field_name() -> None:
    calls = 0

    @ri.cached
    def fetch(n: int) -> SerializedAs:
        nonlocal calls
        calls += 1
        return SerializedAs(doc_id=f"d{n}", rank=n)

    @ri.cached
    def hold(n: int) -> Holding:
        nonlocal calls
        calls += 1
        return Holding(SerializedAs(doc_id=f"d{n}"))

    assert fetch(1) == fetch(1) == SerializedAs(doc_id="d1", rank=1)
    assert hold(2) == hold(2)
    assert calls == 2
    assert (fetch.cache_info().hits, hold.cache_info().hits) == (1, 1)


def test_one_nan_does_not_stop_caching_floats() -> None:
    calls = 0

    @ri.cached
    def score(name: str) -> float:
        nonlocal calls
        calls += 1
        return float("nan") if name == "bad" else 0.25

    score("bad")
    assert [score("good") for _ in range(3)] == [0.25] * 3
    assert calls == 2


def test_a_tuple_is_refused_not_handed_back_as_a_list(caplog: pytest.LogCaptureFixture) -> None:
    calls = 0

    @ri.cached
    def pair() -> tuple[int, int]:
        nonlocal calls
        calls += 1
        return (1, 2)

    with caplog.at_level("WARNING", logger="rag_instrument.internal"):
        results = [pair() for _ in range(3)]
    assert results == [(1, 2)] * 3
    assert all(type(r) is tuple for r in results)
    assert calls == 3
    (message,) = [r.getMessage() for r in caplog.records if "not cached" in r.getMessage()]
    assert "tuple" in message


def test_a_dict_is_refused_for_what_it_holds_not_for_being_a_dict() -> None:
    calls = 0

    @ri.cached
    def scores(nan: bool) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        return {"score": float("nan") if nan else 0.5, "ids": [1, 2]}

    first = scores(True)
    assert first["score"] != first["score"]  # the NaN itself, not null from JSON
    assert scores(True)["score"] != scores(True)["score"]
    assert calls == 3  # never cached: a hit would have made the NaN null
    assert scores(False) == scores(False) == {"score": 0.5, "ids": [1, 2]}
    assert calls == 4  # other dicts still are


def test_entries_naming_a_class_not_allowed_are_misses() -> None:
    types = ValueTypes()
    forged = orjson.dumps({"t": "obj", "c": "os:system", "v": "echo pwned"})
    with pytest.raises(ValueError, match="not allowed"):
        cache_module.decode_value(forged, types)
    types.allow(Answer)
    entry = {"t": "obj", "c": type_name(Answer), "v": {"text": 1}}
    with pytest.raises(ValueError, match="does not fit"):
        cache_module.decode_value(orjson.dumps(entry), types)


def test_entries_are_plain_json_with_the_type_name() -> None:
    types = ValueTypes()
    data = cache_module.encode_value(Answer(text="t", sources=[]), types)
    envelope = json.loads(data)
    assert envelope == {
        "t": "obj",
        "c": f"{__name__}:Answer",
        "v": {"text": "t", "sources": [], "score": None},
    }


def test_an_object_stored_by_another_process_is_rebuilt_once_the_type_is_known() -> None:
    writer, reader = ValueTypes(), ValueTypes()
    data = cache_module.encode_value(Passage("d", 1), writer)
    with pytest.raises(ValueError, match="not allowed"):
        cache_module.decode_value(data, reader)  # never stored nor declared here: a miss
    reader.allow(Passage)
    assert cache_module.decode_value(data, reader) == Passage("d", 1)


json_leaves = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20)


@dataclasses.dataclass
class Record:
    name: str
    values: list[Any]
    mapping: dict[str, Any]
    inner: Passage | None


@settings(max_examples=60, deadline=None)
@given(
    name=st.text(max_size=30),
    values=st.lists(json_leaves, max_size=5),
    mapping=st.dictionaries(st.text(max_size=8), json_leaves, max_size=4),
    inner=st.none() | st.builds(Passage, st.text(max_size=8), st.integers(0, 100)),
)
def test_dataclasses_round_trip_equal(
    name: str, values: list[Any], mapping: dict[str, Any], inner: Passage | None
) -> None:
    types = ValueTypes()
    record = Record(name, values, mapping, inner)
    assert cache_module.decode_value(cache_module.encode_value(record, types), types) == record


def test_instrumented_client_results_are_cacheable_too() -> None:
    with FakeLLMServer() as server:
        client = instrument_openai(
            openai.OpenAI(api_key="sk-x-0123456789", base_url=server.openai_base_url)
        )

        @ri.cached
        def ask() -> ChatCompletion:
            return client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}]
            )

        assert ask() == ask()
        assert len(server.requests) == 1
        client.close()


def _shared_cache_function(backend: Any, returns: Any) -> Any:
    """One cached function as each process of a service decorates it (a fresh store)."""
    calls: list[int] = []

    def answer(question: str) -> Any:
        calls.append(1)
        return Answer(text=question.upper(), sources=["d1"])

    answer.__annotations__["return"] = returns
    answer.__qualname__ = "answer"
    wrapped = ri.cached(backend=backend)(answer)
    wrapped.calls = calls
    return wrapped


@pytest.mark.parametrize("returns", [Answer, Answer | None, "Answer"])
def test_another_process_rebuilds_the_class_its_function_declares(returns: Any) -> None:
    shared = cache_module.MemoryCache(maxsize=16, ttl=60.0)  # as a Redis would be shared
    first = _shared_cache_function(shared, returns)
    second = _shared_cache_function(shared, returns)  # another process: stored nothing yet
    stored = first("where")
    assert second("where") == stored
    assert type(second("where")) is Answer
    assert (len(first.calls), len(second.calls)) == (1, 0)


def test_an_undeclared_class_stored_by_another_process_is_a_miss() -> None:
    shared = cache_module.MemoryCache(maxsize=16, ttl=60.0)
    first = _shared_cache_function(shared, Answer)
    second = _shared_cache_function(shared, dict)  # declares no class: nothing to rebuild
    first("where")
    second("where")
    assert len(second.calls) == 1  # the other process's entry was not rebuilt


def test_the_return_annotation_counts_even_if_a_parameter_does_not_resolve() -> None:
    shared = cache_module.MemoryCache(maxsize=16, ttl=60.0)

    def make() -> Any:
        calls: list[int] = []

        def answer(question: NotDefinedAnywhere) -> Answer:  # type: ignore[name-defined]  # noqa: F821
            calls.append(1)
            return Answer(text=str(question), sources=[])

        answer.__annotations__ = {"question": "NotDefinedAnywhere", "return": "Answer"}
        answer.__qualname__ = "annotated_answer"
        wrapped = ri.cached(backend=shared)(answer)
        wrapped.calls = calls
        return wrapped

    first, second = make(), make()
    first("q")
    assert second("q") == Answer(text="q", sources=[])
    assert len(second.calls) == 0
