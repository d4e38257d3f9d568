"""F. Cache (RELIABILITY.md F32-F38), with properties over cache keys."""

from __future__ import annotations

import asyncio
import json
import pickle
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rag_instrument as ri
from conftest import missing
from rag_instrument.cache import MemoryCache
from rag_instrument.testing import Capture


class Model(ri.CacheMixin, ri.LLMProvider):
    system, model = "acme", "m1"

    def __init__(self) -> None:
        self.calls = 0

    async def _generate(self, prompt: str, **params: Any) -> ri.LLMResult:
        self.calls += 1
        await asyncio.sleep(0)
        return ri.LLMResult(f"answer to {prompt}", input_tokens=3, output_tokens=5)


VARIANTS = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["m1", "m2", "gpt-x"]),
        "temperature": st.sampled_from([0, 0.0001, 0.5]),
        "top_p": st.sampled_from([None, 0.9, 1.0]),
        "tools": st.sampled_from([None, [], [{"name": "search"}], [{"name": "calc"}]]),
        "system_prompt": st.sampled_from([None, "be brief", "be thorough"]),
        "response_format": st.sampled_from([None, {"type": "json_object"}]),
        "tenant": st.sampled_from([None, "a", "b"]),
        "user": st.sampled_from([None, "u1", "u2"]),
    }
)


@settings(max_examples=200, deadline=None)
@given(VARIANTS, VARIANTS)
def test_f32_every_variation_gives_a_distinct_sha256_key(
    a: dict[str, Any], b: dict[str, Any]
) -> None:
    provider = Model()

    def key(v: dict[str, Any]) -> str:
        params = {k: v[k] for k in ("temperature", "top_p", "tools", "response_format", "user")}
        params["system"] = v["system_prompt"]
        params["model_override"] = v["model"]
        return provider.cache_key("the prompt", params, v["tenant"])

    ka, kb = key(a), key(b)
    assert len(ka) == 64
    int(ka, 16)  # hex SHA-256
    assert (ka == kb) == (a == b)
    assert key(a) == ka  # stable: never hash()-based


@pytest.mark.asyncio
async def test_f33_tenants_never_share_entries() -> None:
    provider = Model()
    first = await provider.generate("same prompt", cache_namespace="tenant-a")
    second = await provider.generate("same prompt", cache_namespace="tenant-b")
    again = await provider.generate("same prompt", cache_namespace="tenant-a")
    assert provider.calls == 2
    assert again == first
    assert second is not first


def test_f34_cold_key_stampede_is_one_call_and_distinct_keys_overlap() -> None:
    calls = 0
    inside = 0
    peak = 0
    lock = threading.Lock()
    gate = threading.Event()

    @ri.cached
    def lookup(key: int) -> int:
        nonlocal calls, inside, peak
        with lock:
            calls += 1
            inside += 1
            peak = max(peak, inside)
        gate.wait(10)
        with lock:
            inside -= 1
        return key * 2

    with ThreadPoolExecutor(max_workers=100) as pool:
        same = [pool.submit(lookup, 7) for _ in range(100)]
        gate.set()
        assert {f.result() for f in same} == {14}
    assert calls == 1
    gate.clear()
    calls = peak = 0
    with ThreadPoolExecutor(max_workers=20) as pool:
        distinct = [pool.submit(lookup, k) for k in range(100, 120)]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # wait until two calls are inside at once
            with lock:
                if inside >= 2:
                    break
            time.sleep(0.001)
        gate.set()
        assert sorted(f.result() for f in distinct) == [k * 2 for k in range(100, 120)]
    assert calls == 20
    assert peak >= 2


@pytest.mark.asyncio
async def test_f34_tasks_share_one_call() -> None:
    provider = Model()
    results = await asyncio.gather(*(provider.generate("cold") for _ in range(100)))
    assert provider.calls == 1
    assert len({r.text for r in results}) == 1


def test_f35_threads_hammering_ttl_and_lru_caches() -> None:
    caches = [MemoryCache(maxsize=64, ttl=0.01), MemoryCache(maxsize=64, ttl=3600)]
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(10_000 // 32 * 4):
                cache = rng.choice(caches)
                key = f"k{rng.randrange(200)}"
                op = rng.random()
                if op < 0.5:
                    cache.set(key, b"v", None)
                elif op < 0.95:
                    cache.get(key)
                else:
                    cache.clear()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert all(len(c) <= c.maxsize for c in caches)


@pytest.mark.asyncio
async def test_f36_async_values_exceptions_and_a_cancelled_leader() -> None:
    calls = 0
    fail = True

    @ri.cached
    async def answer(q: str) -> str:
        nonlocal calls, fail
        calls += 1
        await asyncio.sleep(0)
        if fail:
            fail = False
            raise ConnectionError("first call fails")
        return q.upper()

    with pytest.raises(ConnectionError):
        await answer("x")  # not cached
    assert await answer("x") == "X"
    assert await answer("x") == "X"  # awaited twice: a value, not a spent coroutine
    assert calls == 2

    started = asyncio.Event()
    release = asyncio.Event()
    runs = 0

    @ri.cached
    async def slow(q: str) -> str:
        nonlocal runs
        runs += 1
        started.set()
        await release.wait()
        return q

    leader = asyncio.create_task(slow("k"))
    await started.wait()
    waiters = [asyncio.create_task(slow("k")) for _ in range(5)]
    await asyncio.sleep(0)
    leader.cancel()
    release.set()
    assert await asyncio.gather(*waiters) == ["k"] * 5  # they retried, not failed
    assert runs == 2


@pytest.mark.redis
def test_f37_a_planted_pickle_is_never_unpickled(monkeypatch: pytest.MonkeyPatch) -> None:
    redis = pytest.importorskip("redis")
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0", socket_connect_timeout=1)
    try:
        client.ping()
    except redis.exceptions.ConnectionError:
        missing("Redis at 127.0.0.1:6379 is unreachable")
    prefix = f"rel-{uuid.uuid4().hex[:8]}:"

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pickle.loads called")

    monkeypatch.setattr(pickle, "loads", forbidden)
    backend = ri.RedisCache("redis://127.0.0.1:6379/0", prefix=prefix)

    @ri.cached(backend=backend)
    def compute(x: int) -> dict[str, int]:
        return {"x": x}

    try:
        assert compute(1) == {"x": 1}
        keys = client.keys(prefix + "*")
        assert keys
        stored = client.get(keys[0])
        assert json.loads(stored) is not None  # JSON on the server, never pickle
        client.set(keys[0], pickle.dumps({"evil": True}))
        assert compute(1) == {"x": 1}  # unreadable entry: a miss, recomputed
    finally:
        for key in client.keys(prefix + "*"):
            client.delete(key)
        client.close()


@pytest.mark.asyncio
async def test_f38_what_is_not_cached_and_what_a_hit_records(rag_capture: Capture) -> None:
    provider = Model()
    await provider.generate("warm", temperature=0.7)
    await provider.generate("warm", temperature=0.7)
    assert provider.calls == 2  # temperature > 0: not cached by default
    await provider.generate("warm", stream=True)
    await provider.generate("warm", stream=True)
    assert provider.calls == 4  # streams are not cached
    await provider.generate("det")
    await provider.generate("det")
    assert provider.calls == 5
    hit = [s for s in rag_capture.spans if s.attributes.get("rag.cache.hit") is True]
    assert len(hit) == 1
    assert hit[0].attributes["gen_ai.usage.input_tokens"] == 0
    assert hit[0].attributes["gen_ai.usage.output_tokens"] == 0

    class Nondeterministic(Model):
        cache_nondeterministic = True

    opted = Nondeterministic()
    await opted.generate("warm", temperature=0.7)
    await opted.generate("warm", temperature=0.7)
    assert opted.calls == 1
