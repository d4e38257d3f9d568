"""Cache review fixes: shared failures, stalled Redis, decoded hits, keys, span attribute."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import threading
import time
import types
from collections.abc import Iterator
from typing import Any

import pytest

import rag_instrument as ri
from rag_instrument.cache import (
    MemoryCache,
    RedisCache,
    UncacheableError,
    _backends,
    _store,
    cached,
    make_key,
)
from rag_instrument.cache import _keys as cache_module
from rag_instrument.testing import capture

# --- single flight: a failing leader fails its waiters --------------------------------------


class Waiters:
    """Counts the calls waiting on another call's flight (threads and tasks)."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = threading.Condition()
        self._tasks_waiting: list[tuple[int, asyncio.Event]] = []

    def arrived(self) -> None:
        with self._changed:
            self.count += 1
            self._changed.notify_all()
            for n, reached in self._tasks_waiting:  # tasks arrive in the loop's own thread
                if self.count >= n:
                    reached.set()

    def wait_for(self, n: int) -> bool:
        """Block this thread until ``n`` calls wait (30 s at most)."""
        with self._changed:
            return self._changed.wait_for(lambda: self.count >= n, timeout=30)

    async def until(self, n: int) -> None:
        """Wait in this task until ``n`` calls wait."""
        reached = asyncio.Event()
        self._tasks_waiting.append((n, reached))
        if self.count >= n:
            reached.set()
        await reached.wait()


@pytest.fixture
def waiters(monkeypatch: pytest.MonkeyPatch) -> Waiters:
    counted = Waiters()
    wait, await_done = _store._Flight.wait, _store._Flight.await_done

    def counting_wait(flight: Any) -> None:
        counted.arrived()
        wait(flight)

    async def counting_await_done(flight: Any) -> None:
        counted.arrived()
        await await_done(flight)

    monkeypatch.setattr(_store._Flight, "wait", counting_wait)
    monkeypatch.setattr(_store._Flight, "await_done", counting_await_done)
    return counted



@pytest.mark.asyncio
async def test_waiters_share_the_leaders_failure_async(waiters: Waiters) -> None:
    class Down(ri.CacheMixin, ri.LLMProvider):
        system, model = "acme", "down"
        calls = 0

        async def _generate(self, prompt: str, **params: Any) -> str:
            Down.calls += 1
            if Down.calls == 1:
                await waiters.until(19)  # fails once the other 19 callers wait on it
            raise ConnectionError("503")

    provider = Down()
    with capture() as cap:
        results = await asyncio.gather(
            *(provider.generate("q") for _ in range(20)), return_exceptions=True
        )
    assert Down.calls == 1  # one call for twenty callers, not twenty one after another
    assert all(isinstance(r, ConnectionError) for r in results)
    assert len(cap.find_logs("llm call failed")) == 20
    with pytest.raises(ConnectionError):  # the failure is not kept for later callers
        await provider.generate("q")
    assert Down.calls == 2


def test_waiters_share_the_leaders_failure_threads(waiters: Waiters) -> None:
    calls = 0
    lock = threading.Lock()

    @cached
    def down(x: int) -> str:
        nonlocal calls
        with lock:
            calls += 1
        assert waiters.wait_for(19)  # fails once the other 19 callers wait on it
        raise ConnectionError("503")

    barrier = threading.Barrier(20)
    outcomes: list[BaseException | str] = []

    def worker() -> None:
        barrier.wait()
        try:
            outcomes.append(down(1))
        except ConnectionError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == 1  # one call for twenty callers, not twenty one after another
    assert len(outcomes) == 20
    assert all(isinstance(o, ConnectionError) for o in outcomes)
    with pytest.raises(ConnectionError):
        down(1)
    assert calls == 2


@pytest.mark.asyncio
async def test_a_cancelled_leader_still_hands_over_to_one_waiter(waiters: Waiters) -> None:
    class Slow(ri.CacheMixin, ri.LLMProvider):
        system, model = "acme", "slow"
        calls = 0

        async def _generate(self, prompt: str, **params: Any) -> str:
            Slow.calls += 1
            if Slow.calls == 1:
                leading.set()
                await asyncio.Event().wait()  # the first leader hangs until cancelled
            return "ok"

    leading = asyncio.Event()
    leader = asyncio.create_task(Slow().generate("q"))
    await leading.wait()
    tasks = [asyncio.create_task(Slow().generate("q")) for _ in range(5)]
    await waiters.until(5)
    leader.cancel()
    assert await asyncio.gather(*tasks) == ["ok"] * 5
    assert Slow.calls == 2


# --- out-of-process backends: one lookup, and a cool-down after a failure -------------------


class CountingBackend:
    """A backend that is not in-process (so the store treats it like Redis)."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.gets = 0

    def get(self, key: str) -> bytes | None:
        self.gets += 1
        return self.data.get(key)

    def set(self, key: str, value: bytes, ttl: float | None) -> None:
        self.data[key] = value

    def clear(self) -> None:
        self.data.clear()


@pytest.mark.asyncio
async def test_a_miss_makes_one_lookup_on_an_out_of_process_backend() -> None:
    backend = CountingBackend()

    class P(ri.CacheMixin, ri.LLMProvider):
        system, model = "acme", "m"
        cache_backend = backend

        async def _generate(self, prompt: str, **params: Any) -> str:
            return "ok"

    await P().generate("q")
    assert backend.gets == 1
    await P().generate("q")
    assert backend.gets == 2

    @cached(backend=backend)
    def f() -> int:
        return 1

    backend.gets = 0
    f()
    assert backend.gets == 1


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A TCP server that accepts connections and never answers (a stalled Redis)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(100)
    held: list[Any] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.05)
        while not stop.is_set():
            try:
                held.append(server.accept())
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn, _ in held:
        conn.close()
    server.close()


@pytest.mark.asyncio
async def test_stalled_redis_is_skipped_for_a_cool_down(
    black_hole: int, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    offset = [0.0]  # the cool-down's clock, moved forward by the test
    monkeypatch.setattr(
        _backends, "time", types.SimpleNamespace(monotonic=lambda: time.monotonic() + offset[0])
    )
    backend = RedisCache(f"redis://127.0.0.1:{black_hole}/0", timeout_s=1.0, cooldown_s=30.0)

    class P(ri.CacheMixin, ri.LLMProvider):
        system, model = "acme", "m"
        cache_backend = backend

        async def _generate(self, prompt: str, **params: Any) -> str:
            return "ok"

    provider = P()
    durations = []
    with caplog.at_level("WARNING", logger="rag_instrument.internal"):
        for i in range(3):
            start = time.perf_counter()
            assert await provider.generate(f"q{i}") == "ok"
            durations.append(time.perf_counter() - start)
        offset[0] += 31.0  # the cool-down is over: Redis is tried again
        start = time.perf_counter()
        assert await provider.generate("again") == "ok"
        retried = time.perf_counter() - start
    backend.close()
    # Margins are wide on purpose (shared CI machines): one 1 s timeout, not one per lookup
    # and store (2 s or more); then no Redis at all during the cool-down (each call under
    # the 1 s a single try costs); then Redis again.
    assert 0.9 < durations[0] < 1.9
    assert durations[1] < 0.9
    assert durations[2] < 0.9
    assert retried > 0.9


# --- decoded values kept for immutable results ----------------------------------------------


def test_llm_result_is_immutable() -> None:
    result = ri.LLMResult("t")
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.text = "u"  # type: ignore[misc]


@pytest.mark.asyncio
async def test_hits_on_immutable_values_are_not_decoded_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class P(ri.CacheMixin, ri.LLMProvider):
        system, model = "acme", "m"

        async def _generate(self, prompt: str, **params: Any) -> ri.LLMResult:
            return ri.LLMResult(f"re: {prompt}", 1, 2)

    decoded = 0
    real = cache_module.decode_value

    def counting(data: bytes | str, *rest: Any) -> Any:
        nonlocal decoded
        decoded += 1
        return real(data, *rest)

    monkeypatch.setattr(cache_module, "decode_value", counting)
    first = await P().generate("q")
    assert await P().generate("q") is first
    assert decoded == 0

    @cached
    def text(x: int) -> str:
        return f"t{x}"

    @cached
    def mapping(x: int) -> dict[str, list[int]]:
        return {"a": [x]}

    assert text(1) == text(1) == "t1"
    assert decoded == 0
    one, two = mapping(1), mapping(1)
    assert one == two == {"a": [1]}
    assert one is not two  # mutable JSON: a fresh copy every hit
    assert decoded == 1


def test_memory_cache_get_still_returns_the_stored_bytes() -> None:
    cache = MemoryCache()
    cache.set("k", b'{"t":"json","v":1}', None)
    assert cache.get("k") == b'{"t":"json","v":1}'
    assert cache.get("missing") is None


# --- keys ----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_two_classes_sharing_a_backend_never_share_entries() -> None:
    shared = MemoryCache()

    class A(ri.CacheMixin, ri.LLMProvider):
        system, model = "acme", "m"
        cache_backend = shared

        async def _generate(self, prompt: str, **params: Any) -> str:
            return "from A"

    class B(A):
        async def _generate(self, prompt: str, **params: Any) -> str:
            return "from B"

    assert await A().generate("q") == "from A"
    assert await B().generate("q") == "from B"
    assert len(shared) == 2


def test_nan_and_infinity_are_uncacheable_not_null() -> None:
    for bad in (float("nan"), float("inf"), [1.0, float("-inf")], {"t": {"x": float("nan")}}):
        with pytest.raises(UncacheableError):
            make_key({"params": bad})
    assert make_key({"a": None}) != make_key({"a": 1.0})


@pytest.mark.asyncio
async def test_a_nan_parameter_makes_the_call_uncached() -> None:
    class P(ri.CacheMixin, ri.LLMProvider):
        system, model = "acme", "m"
        calls = 0

        async def _generate(self, prompt: str, **params: Any) -> str:
            P.calls += 1
            return "ok"

    await P().generate("q", top_p=float("nan"))
    await P().generate("q", top_p=float("nan"))
    await P().generate("q", top_p=None)
    assert P.calls == 3


# --- telemetry -----------------------------------------------------------------------------


def test_cached_sets_rag_cache_hit_on_the_current_span() -> None:
    @cached
    def f(x: int) -> int:
        return x

    with capture() as cap:
        with ri.stage("first"):
            f(1)
        with ri.stage("second"):
            f(1)
    assert cap.span("first").attributes["rag.cache.hit"] is False
    assert cap.span("second").attributes["rag.cache.hit"] is True


def test_cache_settings_that_would_cache_nothing_fail_at_definition() -> None:
    with pytest.raises(ValueError, match=r"rag_instrument\.cached: ttl must be a positive"):
        cached(ttl=-1)
    with pytest.raises(ValueError, match="maxsize must be an int >= 1"):
        cached(maxsize=0)
    with pytest.raises(ValueError, match="Broken: cache_ttl must be a positive"):

        class Broken(ri.CacheMixin, ri.LLMProvider):
            system, model = "acme", "m"
            cache_ttl = 0

            async def _generate(self, prompt: str, **params: Any) -> str:
                return prompt


# --- single flight: answers never stored, other event loops, failing backends --------------


def test_identical_calls_whose_answer_is_not_stored_are_made_at_once(waiters: Waiters) -> None:
    # A tuple is refused by the cache: after the leader, the four calls that waited on it
    # each make their own call, together, not one after another (a barrier of four).
    together = threading.Barrier(4, timeout=30)
    calls: list[str] = []
    lock = threading.Lock()

    @cached(ttl=60)
    def lookup(query: str) -> tuple[str, int]:
        with lock:
            first = not calls
            calls.append(query)
        if first:
            assert waiters.wait_for(4)
        else:
            together.wait()  # broken (after 30 s) if the calls run one at a time
        return (query, 1)

    results: list[object] = []
    threads = [threading.Thread(target=lambda: results.append(lookup("q"))) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == [("q", 1)] * 5
    assert len(calls) == 5


def test_tool_call_answers_waited_on_are_asked_for_at_once(waiters: Waiters) -> None:
    together = threading.Barrier(3, timeout=30)
    calls: list[int] = []
    lock = threading.Lock()

    class Tools(ri.CacheMixin, ri.LLMProvider):
        system, model = "acme", "tool-model"

        async def _generate(self, prompt: str, **params: Any) -> ri.LLMResult:
            with lock:
                first = not calls
                calls.append(1)
            if first:
                assert await asyncio.to_thread(waiters.wait_for, 3)
            else:
                await asyncio.to_thread(together.wait)
            return ri.LLMResult("call search()", finish_reason="tool_calls")

    async def main() -> list[ri.LLMResult]:
        provider = Tools()
        return list(await asyncio.gather(*(provider.generate("q") for _ in range(4))))

    results = asyncio.run(main())
    assert [r.finish_reason for r in results] == ["tool_calls"] * 4
    assert len(calls) == 4


def test_single_flight_spans_event_loops_in_other_threads(waiters: Waiters) -> None:
    # Eight threads, each with its own loop (asyncio.run in a worker): one underlying call.
    calls: list[int] = []

    @cached(ttl=60)
    async def answer(query: str) -> str:
        calls.append(1)
        if len(calls) == 1:
            assert await asyncio.to_thread(waiters.wait_for, 7)
        return query.upper()

    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(asyncio.run(answer("q"))))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == ["Q"] * 8
    assert len(calls) == 1
    assert answer.cache_info().hits == 7  # type: ignore[attr-defined]


class _FailingBackend:
    def __init__(self, *, get: bool, set: bool) -> None:
        self.fail_get, self.fail_set = get, set

    def get(self, key: str) -> bytes | None:
        if self.fail_get:
            raise ConnectionError("backend down")
        return None

    def set(self, key: str, value: bytes, ttl: float | None) -> None:
        if self.fail_set:
            raise ConnectionError("backend down")

    def clear(self) -> None:
        pass


@pytest.mark.parametrize(("fail_get", "fail_set"), [(True, False), (False, True), (True, True)])
def test_a_failing_backend_of_the_apps_own_never_fails_the_call(
    fail_get: bool, fail_set: bool, caplog: pytest.LogCaptureFixture
) -> None:
    backend = _FailingBackend(get=fail_get, set=fail_set)
    made: list[str] = []

    class Model(ri.CacheMixin, ri.LLMProvider):
        system, model = "acme", "m"
        cache_backend = backend

        async def _generate(self, prompt: str, **params: Any) -> str:
            made.append(prompt)
            return "answer"

    @cached(backend=backend)
    def double(x: int) -> int:
        return x * 2

    with caplog.at_level("WARNING", logger="rag_instrument"):
        assert asyncio.run(Model().generate("q")) == "answer"
        assert double(2) == 4
    assert made == ["q"]  # the answer paid for is returned, not lost
    assert "_FailingBackend" in caplog.text
    assert "serving without the cache" in caplog.text


def test_a_call_never_waits_on_a_leader_whose_event_loop_stopped() -> None:
    # The leading call's task is left pending on a loop that stops running (a worker's loop
    # between run_until_complete calls): identical calls on other loops take over.
    started = threading.Event()
    release = threading.Event()
    calls: list[str] = []

    @cached(ttl=60)
    async def answer(x: int) -> int:
        calls.append(threading.current_thread().name)
        started.set()
        await asyncio.to_thread(release.wait, 30)
        return x * 2

    idle = asyncio.new_event_loop()
    try:
        leader = idle.create_task(answer(1))

        async def until_started() -> None:
            await asyncio.to_thread(started.wait, 30)

        idle.run_until_complete(until_started())  # then the loop stops, the task pending
        release.set()  # the leader would finish at once, if its loop ran

        async def waiter() -> int:
            return await asyncio.wait_for(answer(1), 30)

        assert asyncio.run(waiter()) == 2
        assert asyncio.run(waiter()) == 2  # and the stale flight does not hold later calls
        assert len(calls) == 2
    finally:
        leader.cancel()
        idle.run_until_complete(asyncio.gather(leader, return_exceptions=True))
        idle.close()


def test_a_redis_outage_warning_names_the_callers_stage_request_and_trace() -> None:
    # API 2: the library's lines inside a stage name it; bound values are in every line.
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    class Down(ri.CacheMixin, ri.LLMProvider):
        system, model = "stand-in", "m"
        cache_backend = ri.RedisCache(f"redis://127.0.0.1:{port}/0", prefix="down:")

        async def _generate(self, prompt: str, **params: Any) -> str:
            return "answer"

    async def main() -> str:
        with ri.request_context(request_id="r-7"), ri.stage("generation") as span:
            assert await Down().generate("q") == "answer"
            return format(span.get_span_context().trace_id, "032x")

    with capture() as cap:
        trace_id = asyncio.run(main())
    (line,) = [x for x in cap.logs if "unavailable" in x["event"]]
    assert line["stage"] == "generation"
    assert line["context"] == {"request_id": "r-7"}
    assert line["trace_id"] == trace_id
