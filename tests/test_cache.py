"""CacheMixin, ri.cached and RedisCache: keys, JSON values, single flight, Redis."""

from __future__ import annotations

import asyncio
import functools
import os
import pickle
import threading
import time
import uuid
from typing import Any

import pytest
from cachetools import TTLCache
from hypothesis import given, settings
from hypothesis import strategies as st

import rag_instrument as ri
from rag_instrument.cache import MemoryCache, RedisCache, _backends, _store, cached, make_key
from rag_instrument.testing import capture

REDIS_URL = "redis://127.0.0.1:6379/15"


class Counting(ri.CacheMixin, ri.LLMProvider):
    system, model = "acme", "cached-1"
    delay = 0.0

    def __init__(self) -> None:
        self.calls = 0
        self.in_flight = self.peak = 0

    async def _generate(self, prompt: str, **params: Any) -> ri.LLMResult:
        self.calls += 1
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        if self.delay:
            await asyncio.sleep(self.delay)
        self.in_flight -= 1
        return ri.LLMResult(f"re: {prompt}", input_tokens=5, output_tokens=3, model="cached-1")


@pytest.fixture
def provider() -> Any:
    class Fresh(Counting):  # a class per test: each class has its own cache
        pass

    return Fresh()


# --- keys ---------------------------------------------------------------------------------

_variation = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["m1", "m2", "m1 "]),
        "temperature": st.sampled_from([0, 0.0001, 0.5, 1]),
        "top_p": st.sampled_from([None, 0.9, 1.0]),
        "tools": st.sampled_from([None, [], [{"name": "search"}], [{"name": "Search"}]]),
        "system": st.sampled_from(["", "You are terse.", "You are terse"]),
        "response_format": st.sampled_from([None, {"type": "json_object"}, {"type": "text"}]),
        "tenant": st.sampled_from([None, "a", "b"]),
        "user": st.sampled_from([None, "u1", "u2"]),
    }
)


_KEYED = Counting()


def _key(v: dict[str, Any]) -> str:
    # Through the provider's own cache_key, as a call computes it.
    params = {k: v[k] for k in ("temperature", "top_p", "tools", "system", "response_format", "user")}
    _KEYED.model = v["model"]  # type: ignore[misc]
    return _KEYED.cache_key("p", params, v["tenant"])


@settings(max_examples=200, deadline=None)
@given(a=_variation, b=_variation)
def test_every_variation_gives_a_distinct_key(a: dict[str, Any], b: dict[str, Any]) -> None:
    if a == b:
        assert _key(a) == _key(b)
    else:
        assert _key(a) != _key(b)


def test_key_is_sha256_of_canonical_json_independent_of_order() -> None:
    import hashlib

    assert make_key({"b": 1, "a": [1, "x"]}) == hashlib.sha256(b'{"a":[1,"x"],"b":1}').hexdigest()
    assert make_key({"a": 1, "b": 2}) == make_key({"b": 2, "a": 1})
    with pytest.raises(TypeError):
        make_key({"f": object()})
    with pytest.raises(TypeError):
        make_key({1: "non-str key"})


# --- CacheMixin --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_hit_returns_equal_result_without_calling_and_is_visible(provider: Any) -> None:
    with capture() as cap:
        async with ri.stage("generation"):
            first = await provider.generate("q", temperature=0)
            second = await provider.generate("q", temperature=0)
        metrics = cap.metrics()
    assert first == second
    assert isinstance(second, ri.LLMResult)
    assert provider.calls == 1
    spans = [s for s in cap.spans if s.name == "chat cached-1"]
    assert [s.attributes["rag.cache.hit"] for s in spans] == [False, True]
    assert spans[1].attributes["gen_ai.usage.input_tokens"] == 0  # no provider tokens on a hit
    (line,) = cap.find_logs("generation completed")
    assert line["breakdown"]["cache"] == {"hits": 1, "misses": 1}
    assert line["breakdown"]["llm"]["count"] == 1
    assert sum(p.value for p in metrics["rag.cache.hits"]) == 1
    assert sum(p.value for p in metrics["rag.cache.misses"]) == 1
    assert sum(p.value for p in metrics["rag.cache.tokens_saved"]) == 8
    assert type(provider).cache_info().hits == 1


@pytest.mark.asyncio
async def test_bypass_streams_and_nondeterministic_calls(provider: Any) -> None:
    await provider.generate("q")
    await provider.generate("q", cache=False)
    assert provider.calls == 2
    await provider.generate("q", temperature=0.7)
    await provider.generate("q", temperature=0.7)
    assert provider.calls == 4
    await provider.generate("q", stream=True)
    await provider.generate("q", stream=True)
    assert provider.calls == 6

    class Opted(Counting):
        cache_nondeterministic = True

    opted = Opted()
    await opted.generate("q", temperature=0.7)
    await opted.generate("q", temperature=0.7)
    assert opted.calls == 1


@pytest.mark.asyncio
async def test_tenants_never_share_entries(provider: Any) -> None:
    a = await provider.generate("same prompt", cache_namespace="tenant-a")
    b = await provider.generate("same prompt", cache_namespace="tenant-b")
    assert provider.calls == 2
    await provider.generate("same prompt", cache_namespace="tenant-a")
    assert provider.calls == 2
    assert a == b  # the fake answers the same; what matters is that B made its own call

    class TenantC(Counting):
        cache_namespace = "tenant-c"

    tenant_c = TenantC()
    await tenant_c.generate("same prompt")
    assert tenant_c.calls == 1


@pytest.mark.asyncio
async def test_exceptions_are_not_cached() -> None:
    class Once(ri.CacheMixin, ri.LLMProvider):
        system, model = "acme", "once"
        calls = 0

        async def _generate(self, prompt: str, **params: Any) -> str:
            Once.calls += 1
            if Once.calls == 1:
                raise ValueError("boom")
            return "ok"

    with pytest.raises(ValueError):
        await Once().generate("q")
    assert await Once().generate("q") == "ok"
    assert await Once().generate("q") == "ok"
    assert Once.calls == 2


@pytest.mark.asyncio
async def test_single_flight_for_100_tasks_and_overlap_for_distinct_keys(provider: Any) -> None:
    type(provider).delay = 0.05
    with capture() as cap:
        results = await asyncio.gather(*(provider.generate("cold") for _ in range(100)))
        metrics = cap.metrics()
    assert provider.calls == 1
    assert all(r == results[0] for r in results)
    assert sum(p.value for p in metrics["rag.cache.coalesced"]) == 99
    provider.peak = 0
    await asyncio.gather(*(provider.generate(f"k{i}") for i in range(100)))
    assert provider.calls == 101
    assert provider.peak == 100  # distinct keys overlap: all 100 calls were in flight at once


@pytest.mark.asyncio
async def test_cancelled_leader_hands_over_to_a_waiter(
    provider: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    leading, waiting = asyncio.Event(), asyncio.Event()

    class Hanging(type(provider)):  # type: ignore[misc]
        async def _generate(self, prompt: str, **params: Any) -> ri.LLMResult:
            if self.calls == 0:
                self.calls += 1
                leading.set()
                await asyncio.Event().wait()  # the first leader hangs until cancelled
            return await super()._generate(prompt, **params)

    original = _store._Flight.await_done

    async def await_done(flight: Any) -> None:
        waiting.set()
        await original(flight)

    monkeypatch.setattr(_store._Flight, "await_done", await_done)
    provider = Hanging()
    leader = asyncio.create_task(provider.generate("q"))
    await leading.wait()
    waiter = asyncio.create_task(provider.generate("q"))
    await waiting.wait()  # the second call waits on the leader's flight
    leader.cancel()
    result = await waiter
    assert result.text == "re: q"
    assert provider.calls == 2
    with pytest.raises(asyncio.CancelledError):
        await leader


def test_cached_sync_single_flight_across_100_threads() -> None:
    calls = 0
    lock = threading.Lock()

    @cached
    def slow(x: int) -> dict[str, int]:
        nonlocal calls
        with lock:
            calls += 1
        time.sleep(0.05)
        return {"x": x}

    barrier = threading.Barrier(100)
    results: list[Any] = []

    def worker() -> None:
        barrier.wait()
        results.append(slow(1))

    threads = [threading.Thread(target=worker) for _ in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == 1
    assert results == [{"x": 1}] * 100
    info = slow.cache_info()  # type: ignore[attr-defined]
    assert (info.hits, info.misses) == (99, 1)
    slow.cache_clear()  # type: ignore[attr-defined]
    slow(1)
    assert calls == 2


@pytest.mark.asyncio
async def test_cached_async_returns_value_twice_and_keeps_coroutine_function() -> None:
    import inspect

    calls = 0

    @cached(ttl=60, key=lambda q, **_: q.lower())
    async def answer(q: str, *, verbose: bool = False) -> str:
        nonlocal calls
        calls += 1
        return q.upper()

    assert inspect.iscoroutinefunction(answer)
    assert await answer("Hi") == "HI"
    assert await answer("hi", verbose=True) == "HI"  # the key function ignores case and flags
    assert calls == 1


def test_cached_rejects_generators_and_skips_unkeyable_arguments() -> None:
    with pytest.raises(TypeError):
        @cached
        def gen() -> Any:
            yield 1

    calls = 0

    @cached
    def f(obj: object) -> int:
        nonlocal calls
        calls += 1
        return 1

    f(object())
    f(object())
    assert calls == 2  # no canonical JSON for the argument: called, not cached, no crash


@pytest.mark.asyncio
async def test_cached_methods_keep_entries_per_instance() -> None:
    """As functools.lru_cache: an instance never gets another's result."""

    class Service:
        calls = 0

        def __init__(self, index: str) -> None:
            self.index = index

        @cached(ttl=60)
        def lookup(self, q: str) -> str:
            Service.calls += 1
            return f"{self.index}:{q}"

        @cached(ttl=60)
        async def alookup(self, q: str) -> str:
            Service.calls += 1
            return f"{self.index}:{q}".upper()

        @classmethod
        @cached(ttl=60)
        def build(cls, q: str) -> str:
            Service.calls += 1
            return q * 2

        @cached(ttl=60, key=lambda self, q: q)  # shared between instances, by choice
        def shared(self, q: str) -> str:
            Service.calls += 1
            return f"{self.index}:{q}"

    wiki, legal = Service("wiki"), Service("legal")
    assert wiki.lookup("x") == wiki.lookup("x") == "wiki:x"
    assert legal.lookup("x") == "legal:x"  # not wiki's entry
    assert await wiki.alookup("y") == await wiki.alookup("y") == "WIKI:Y"
    assert Service.build("c") == Service.build("c") == "cc"
    assert Service.calls == 4
    assert Service.lookup.cache_info().hits == 1  # type: ignore[attr-defined]
    assert wiki.shared("z") == legal.shared("z") == "wiki:z"
    assert Service.calls == 5


def test_values_are_json_not_shared_objects() -> None:
    @cached
    def make() -> dict[str, list[int]]:
        return {"a": [1]}

    first = make()
    first["a"].append(2)  # mutating a returned value does not poison the cache
    assert make() == {"a": [1]}


def test_ttl_expires_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(_backends, "TTLCache", functools.partial(TTLCache, timer=lambda: now[0]))
    calls = 0

    @cached(ttl=0.05)
    def f() -> int:
        nonlocal calls
        calls += 1
        return calls

    assert f() == 1
    now[0] += 0.049
    assert f() == 1
    now[0] += 0.002
    assert f() == 2


def test_memory_cache_is_thread_safe_under_mixed_load() -> None:
    for cache in (MemoryCache(maxsize=64, ttl=0.01), MemoryCache(maxsize=64, ttl=60)):
        errors: list[BaseException] = []

        def work(seed: int, cache: MemoryCache = cache, errors: list[BaseException] = errors) -> None:
            try:
                for i in range(10_000 // 32):
                    key = f"k{(seed * 31 + i) % 200}"
                    cache.set(key, b"1", None)
                    cache.get(key)
                    if i % 50 == 0:
                        cache.clear()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert len(cache) <= 64


# --- Redis ----------------------------------------------------------------------------------


def _redis_or_skip() -> None:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5).ping()
    except redis.exceptions.ConnectionError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("Redis is not reachable at 127.0.0.1:6379 (start it to run this test)")


@pytest.fixture
def redis_cache() -> Any:
    _redis_or_skip()
    cache = RedisCache(REDIS_URL, prefix=f"test:{uuid.uuid4().hex}:")
    yield cache
    cache.clear()
    cache.close()


@pytest.mark.redis
@pytest.mark.asyncio
async def test_redis_shared_between_instances_with_server_ttl(redis_cache: RedisCache) -> None:
    import redis

    def define(backend: RedisCache) -> type[Counting]:
        class Shared(Counting):  # same qualified name every time, as in another process
            cache_backend = backend
            cache_ttl = 30.0

        return Shared

    Shared = define(redis_cache)
    # a second class object with its own connection stands for another process or host
    OtherProcess = define(RedisCache(REDIS_URL, prefix=redis_cache.prefix))

    first = Shared()
    assert (await first.generate("q")).text == "re: q"
    other = OtherProcess()
    result = await other.generate("q")
    assert isinstance(result, ri.LLMResult)
    assert result.text == "re: q"
    assert other.calls == 0
    client = redis.Redis.from_url(REDIS_URL)
    (key,) = client.keys(redis_cache.prefix + "*")
    assert 0 < client.pttl(key) <= 30_000
    assert client.get(key).startswith(b"{")  # JSON
    client.close()
    OtherProcess.cache_backend.close()  # type: ignore[union-attr]


@pytest.mark.redis
def test_redis_planted_pickle_is_never_unpickled(
    redis_cache: RedisCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis

    calls = 0

    @cached(backend=redis_cache)
    def f(x: int) -> str:
        nonlocal calls
        calls += 1
        return "fresh"

    assert f(1) == "fresh"
    client = redis.Redis.from_url(REDIS_URL)
    (key,) = client.keys(redis_cache.prefix + "*")
    client.set(key, pickle.dumps({"t": "json", "v": "poisoned"}))
    client.close()

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pickle.loads must never be called")

    monkeypatch.setattr(pickle, "loads", fail)
    assert f(1) == "fresh"
    assert calls == 2


@pytest.mark.redis
@pytest.mark.asyncio
async def test_redis_outage_is_a_miss_and_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    class Down(Counting):
        cache_backend = RedisCache("redis://127.0.0.1:1/0", timeout_s=0.2)

    provider = Down()
    with caplog.at_level("WARNING", logger="rag_instrument.internal"):
        for _ in range(3):
            assert (await provider.generate("q")).text == "re: q"
    assert provider.calls == 3
    warnings = [r for r in caplog.records if "Redis cache" in r.getMessage()]
    assert len(warnings) == 1


@pytest.mark.parametrize(
    "backend",
    ["redis://127.0.0.1:6379/0", 42, object(), {}, ri.RedisCache, MemoryCache],
)
def test_a_backend_that_is_not_one_is_refused_where_it_is_set(backend: Any) -> None:
    # It was accepted, then every call failed (AttributeError from the store).
    with pytest.raises(ValueError, match="backend"):
        ri.cached(backend=backend)
    with pytest.raises(ValueError, match="backend"):
        ri.CacheSpec(backend=backend)
    with pytest.raises(ValueError, match="cache_backend"):

        class Provider(ri.CacheMixin, ri.LLMProvider):
            system, model = "acme", "m"
            cache_backend = backend

            async def _generate(self, prompt: str, **params: Any) -> str:
                return "answer"


def test_a_redis_url_given_as_a_backend_says_how_to_fix_it() -> None:
    with pytest.raises(ValueError, match=r"ri\.RedisCache\('redis://127.0.0.1:6379/0'\)"):
        ri.cached(backend="redis://127.0.0.1:6379/0")


def test_a_key_that_is_not_a_function_is_refused() -> None:
    with pytest.raises(ValueError, match="key"):
        ri.cached(key="question")  # type: ignore[arg-type]


def test_a_cachetools_cache_of_the_applications_own_is_a_backend() -> None:
    mine: TTLCache[str, Any] = TTLCache(maxsize=8, ttl=60)
    calls: list[str] = []

    @ri.cached(backend=mine)
    def answer(question: str) -> str:
        calls.append(question)
        return question.upper()

    assert answer("a") == answer("a") == "A"
    assert calls == ["a"]
    assert len(mine) == 1  # the entry lives in the application's cache
    mine.clear()
    assert answer("a") == "A"
    assert calls == ["a", "a"]


def test_a_backend_of_ones_own_is_used_even_when_it_is_a_mapping() -> None:
    class Store(dict):  # type: ignore[type-arg]
        def __init__(self) -> None:
            super().__init__()
            self.ttls: list[float | None] = []

        def set(self, key: str, value: bytes, ttl: float | None) -> None:
            self.ttls.append(ttl)
            self[key] = value

    mine = Store()

    @ri.cached(ttl=5, backend=mine)
    def answer(question: str) -> str:
        return question.upper()

    assert answer("a") == answer("a") == "A"
    assert mine.ttls == [5]


def test_an_odd_finish_reason_is_not_an_error() -> None:
    class Odd(ri.CacheMixin, ri.LLMProvider):
        system, model = "acme", "m"

        async def _generate(self, prompt: str, **params: Any) -> ri.LLMResult:
            return ri.LLMResult(text="hi", finish_reason=["stop"])  # type: ignore[arg-type]

    result = asyncio.run(Odd().generate("q"))
    assert isinstance(result, ri.LLMResult)
    assert result.text == "hi"


def test_a_tool_call_reason_in_an_odd_shape_is_not_stored() -> None:
    calls: list[str] = []

    class Odd(ri.CacheMixin, ri.LLMProvider):
        system, model = "acme", "m"

        async def _generate(self, prompt: str, **params: Any) -> ri.LLMResult:
            calls.append(prompt)
            return ri.LLMResult(text="", finish_reason=["tool_calls"])  # type: ignore[arg-type]

    async def main() -> None:
        provider = Odd()
        for _ in range(2):
            await provider.generate("q")

    asyncio.run(main())
    assert calls == ["q", "q"]


def test_an_application_cache_answers_async_hits() -> None:
    mine: TTLCache[str, Any] = TTLCache(maxsize=8, ttl=60)
    calls: list[str] = []

    @ri.cached(backend=mine)
    async def answer(question: str) -> str:
        calls.append(question)
        return question.upper()

    async def main() -> list[str]:
        return [await answer("a") for _ in range(3)]

    assert asyncio.run(main()) == ["A", "A", "A"]
    assert calls == ["a"]


def _sharing(backend: Any) -> tuple[Any, Any, Any, dict[str, int]]:
    calls = {"A": 0, "B": 0, "f": 0}

    class A(ri.CacheMixin, ri.LLMProvider):
        system, model = "acme", "m"
        cache_backend = backend

        async def _generate(self, prompt: str, **params: Any) -> str:
            calls["A"] += 1
            return "a"

    class B(ri.CacheMixin, ri.LLMProvider):
        system, model = "acme", "m"
        cache_backend = backend

        async def _generate(self, prompt: str, **params: Any) -> str:
            calls["B"] += 1
            return "b"

    @ri.cached(backend=backend)
    def f(x: int) -> int:
        calls["f"] += 1
        return x

    return A, B, f, calls


def _clear_one_of_three(backend: Any) -> dict[str, int]:
    a_class, b_class, f, calls = _sharing(backend)

    async def main() -> None:
        await a_class().generate("q")
        await b_class().generate("q")
        f(1)
        a_class.cache_clear()  # this class's entries only
        await a_class().generate("q")
        await b_class().generate("q")
        f(1)

    asyncio.run(main())
    return calls


@pytest.mark.redis
def test_cache_clear_of_one_class_keeps_the_others_in_a_shared_redis(redis_cache: Any) -> None:
    assert _clear_one_of_three(redis_cache) == {"A": 2, "B": 1, "f": 1}


def test_cache_clear_of_one_class_keeps_the_others_in_a_shared_cachetools_cache() -> None:
    from cachetools import LRUCache

    assert _clear_one_of_three(LRUCache(maxsize=100)) == {"A": 2, "B": 1, "f": 1}


class _DictBackend:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    def set(self, key: str, value: bytes, ttl: float | None) -> None:
        self.data[key] = value


def test_an_instance_that_sets_its_own_cache_settings_gets_its_own_store() -> None:
    class Answers(ri.CacheMixin, ri.LLMProvider):
        system, model = "stand-in", "m"

        def __init__(self, backend: Any = None, ttl: Any = None) -> None:
            self.calls = 0
            if backend is not None:
                self.cache_backend = backend
            if ttl is not None:
                self.cache_ttl = ttl

        async def _generate(self, prompt: str, **params: Any) -> str:
            self.calls += 1
            return f"answer {self.calls}"

    async def main() -> None:
        shared = _DictBackend()
        own = Answers(shared)
        assert await own.generate("q") == "answer 1"
        assert await own.generate("q") == "answer 1"  # from its own backend
        assert own.calls == 1
        assert len(shared.data) == 1
        other = Answers(shared)  # another instance on the same backend: a hit there too
        assert await other.generate("q") == "answer 1"
        assert other.calls == 0
        plain = Answers()  # the class's own in-process store, not the backend
        assert await plain.generate("q") == "answer 1"
        assert plain.calls == 1
        assert len(shared.data) == 1
        # One instance per request with the same settings: one store, shared.
        first, second = Answers(ttl=60.0), Answers(ttl=60.0)
        assert await first.generate("r") == "answer 1"
        assert await second.generate("r") == "answer 1"
        assert second.calls == 0
        assert second.cache_info().hits == 1  # the store of its settings
        second.cache_clear()
        assert second.cache_info().hits == 0
        assert await Answers(ttl=60.0).generate("r") == "answer 1"  # cleared: called again
        assert Answers.cache_info().misses == 1  # the class's own store: plain's call
        Answers.cache_clear()  # on the class: every store of the class
        assert Answers.cache_info().misses == 0
        with pytest.raises(ValueError, match="Answers instance: cache_ttl must be"):
            await Answers(ttl=-1.0).generate("q")

    with capture():
        asyncio.run(main())


def test_class_settings_changed_before_the_first_call_are_checked() -> None:
    class Answers(ri.CacheMixin, ri.LLMProvider):
        system, model = "stand-in", "m"

        async def _generate(self, prompt: str, **params: Any) -> str:
            return "a"

    Answers.cache_backend = "redis://127.0.0.1:6379/0"  # type: ignore[assignment]
    with capture(), pytest.raises(ValueError, match=r"ri.RedisCache\('redis://"):
        asyncio.run(Answers().generate("q"))


@pytest.mark.parametrize("mixin", [ri.RetryMixin, ri.CacheMixin])
def test_a_mixin_listed_after_llmprovider_is_refused_where_the_class_is_written(
    mixin: type,
) -> None:
    with pytest.raises(TypeError, match=f"list {mixin.__name__} before LLMProvider"):
        type("Late", (ri.LLMProvider, mixin), {"system": "s", "model": "m"})
    type("Early", (mixin, ri.LLMProvider), {"system": "s", "model": "m"})  # the right order


@given(st.integers(min_value=-(2**53), max_value=2**53))
def test_equal_numbers_make_one_key(number: int) -> None:
    # Canonical JSON writes 1.0 as 1 and -0.0 as 0: temperature=0 and 0.0 are one entry.
    as_float = float(number)
    assert make_key({"temperature": as_float, "nested": [as_float]}) == make_key(
        {"temperature": number, "nested": [number]}
    )
    assert make_key({"t": -0.0}) == make_key({"t": 0})
    assert make_key({"t": 0.5}) != make_key({"t": 0})


def test_cache_settings_of_the_wrong_type_are_value_errors_naming_them() -> None:
    with pytest.raises(ValueError, match="prefix"):
        ri.RedisCache("redis://127.0.0.1:6379/0", prefix=5)  # type: ignore[arg-type]
    for name, value in (("cache_namespace", 5), ("cache_nondeterministic", "yes")):
        with pytest.raises(ValueError, match=name):
            type("Bad", (ri.CacheMixin, ri.LLMProvider), {"model": "m", name: value})


def test_the_collectors_callback_for_a_cached_methods_instance_takes_no_lock() -> None:
    """The collector may free an instance in a thread holding the tokens' lock."""
    import threading
    import weakref

    from rag_instrument.cache import _decorator

    class Owner:
        pass

    owner = Owner()
    _decorator._instance_token(owner)
    ref = _decorator._TOKENS[id(owner)][0]
    done = threading.Event()

    def forget() -> None:
        _decorator._forget(id(owner), ref)
        done.set()

    with _decorator._TOKENS_LOCK:  # as if the collector ran inside the locked section
        thread = threading.Thread(target=forget)
        thread.start()
        finished = done.wait(10)
    thread.join()
    assert finished
    assert id(owner) not in _decorator._TOKENS
    assert isinstance(ref, weakref.ref)
