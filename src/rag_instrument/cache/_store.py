"""One cache's machinery: lookup, single flight, statistics and metrics.

Concurrent identical calls make one underlying call (for threads and for asyncio tasks);
if the leading call fails, the calls waiting on it get its exception too (the failure is
not kept for later callers); if it is cancelled, one waiter takes over instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import hashlib
import math
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, Final, NamedTuple, cast

from cachetools import Cache
from opentelemetry.metrics import CallbackOptions, Observation

from rag_instrument import _breakdown
from rag_instrument._pools import CACHE_IO, worker_pool
from rag_instrument._steps import Plan, arun, run
from rag_instrument._utils import internal_error, renew_after_fork, warn_once
from rag_instrument.attributes import (
    METRIC_CACHE_COALESCED,
    METRIC_CACHE_HITS,
    METRIC_CACHE_MISSES,
    METRIC_CACHE_TOKENS_SAVED,
)
from rag_instrument.cache import _keys
from rag_instrument.cache._backends import CacheBackend, MappingCache, MemoryCache
from rag_instrument.cache._keys import NOT_KEPT, UncacheableError, encode_value, keepable
from rag_instrument.cache._values import ValueTypes
from rag_instrument.llm import LLMResult

if TYPE_CHECKING:
    from rag_instrument._runtime import Runtime

__all__ = [
    "COALESCED",
    "HIT",
    "MISS",
    "CacheInfo",
    "Store",
    "check_cache_settings",
    "make_backend",
    "single_flight",
]

MISS: Final = 0
HIT: Final = 1
COALESCED: Final = 2

#: Name prefix of the worker threads that talk to an out-of-process backend (Redis).
CACHE_THREAD_PREFIX: Final = CACHE_IO.thread_name_prefix


class CacheInfo(NamedTuple):
    """Statistics of a cache, as ``functools.lru_cache``'s ``cache_info()`` gives them."""

    hits: int
    misses: int
    coalesced: int
    maxsize: int | None
    currsize: int | None


class _Flight:
    """One underlying call in progress, and how it ended (for the calls waiting on it).

    Its end is a ``concurrent.futures.Future``, so that calls waiting in other threads and
    on other event loops (a worker thread's ``asyncio.run``) share it too; it is marked
    running at once, so that no waiter can cancel it.
    """

    __slots__ = ("answered", "data", "done", "error", "loop", "value")

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self.loop = loop  # the leader's loop, or None for a thread's call
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        done.set_running_or_notify_cancel()
        self.done = done
        self.answered = False  # the leader's call returned (stored or not)
        self.data: bytes | None = None  # the result's JSON, if it was stored
        self.value: Any = NOT_KEPT  # the result itself, if immutable
        self.error: Exception | None = None  # the leader's failure (not a cancellation)

    def settle(self, value: Any, data: bytes | None) -> None:
        self.answered = True
        self.data = data
        if data is not None and keepable(value):
            self.value = value

    def wait(self) -> None:
        """Block until the leader finished."""
        self.done.result()

    async def await_done(self) -> None:
        """Wait until the leader finished, in any thread or loop; never cancels the leader.

        A leader on another event loop makes progress only while that loop runs: if it
        stops (a worker's loop between ``run_until_complete`` calls, a loop closed with
        the task still pending), the wait ends and the caller takes over the call.
        """
        waiter = asyncio.wrap_future(self.done)
        leader = self.loop
        if leader is None or leader is asyncio.get_running_loop():
            await asyncio.shield(waiter)
            return
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=_FOREIGN_POLL_S)
            if done or not _progressing(leader):
                return

    def stalled(self) -> bool:
        """Whether the leader can no longer finish (its event loop stopped or closed)."""
        return self.loop is not None and not _progressing(self.loop)

    def finish(self) -> None:
        """Wake the calls waiting on this flight."""
        if not self.done.done():
            self.done.set_result(None)

    def outcome(self, types: ValueTypes) -> tuple[bool, Any]:
        """What a waiter gets: ``(True, value)``, or the leader's exception raised.

        ``(False, None)`` when the leader was cancelled (a waiter takes over) or its result
        was not stored (:attr:`answered`: each waiter makes its own call).
        """
        if self.error is not None:
            raise self.error
        if self.value is not NOT_KEPT:
            return True, self.value
        if self.data is not None:
            return True, _keys.decode_value(self.data, types)
        return False, None


#: How often a call waiting on a leader in another event loop checks that loop still runs.
_FOREIGN_POLL_S: Final = 0.25


def _progressing(loop: asyncio.AbstractEventLoop) -> bool:
    return not loop.is_closed() and loop.is_running()


def _scope_tag(scope: str) -> str:
    """The prefix of a store's keys: a short hash of its owner's name (stable everywhere)."""
    return hashlib.sha256(scope.encode("utf-8", "surrogatepass")).hexdigest()[:16] + ":"


def _backend_failed(backend: object, method: str, exc: Exception) -> None:
    """Say (at most every 20 s) that a cache backend failed; the call goes on without it."""
    warn_once.warning(
        f"rag_instrument: cache backend {type(backend).__qualname__}.{method}() failed "
        f"({type(exc).__name__}); serving without the cache"
    )


#: Types refused for what one value holds (a NaN, a tuple inside), not for being that type:
#: the next value of the type may be stored.
_REFUSED_FOR_THEIR_VALUE: Final = frozenset({dict, list, float})


class Store:
    """One cache: a backend plus the in-flight calls and counts (shared by all callers)."""

    def __init__(
        self,
        backend: CacheBackend,
        ttl: float | None,
        types: ValueTypes | None = None,
        tokens: Callable[[Any], int] | None = None,
        scope: str | None = None,
    ) -> None:
        self.backend = backend
        # Entries of this store are kept under ``<scope>:`` in a shared backend (a Redis
        # of several classes and functions), so that clearing it clears them alone.
        self.scope = "" if scope is None else _scope_tag(scope)
        self.ttl = ttl
        self.types = types if types is not None else ValueTypes()
        self.tokens = tokens  # the tokens a stored response cost (saved on a hit)
        self.memory: MemoryCache | None = backend if type(backend) is MemoryCache else None
        # In-process backends are asked on the caller's thread (no pool hop on a hit).
        self.local = self.memory is not None or type(backend) is MappingCache
        self.lock = threading.Lock()
        self.flights: dict[str, _Flight] = {}
        # In a forked child the leaders of the calls in flight are gone (only the forking
        # thread is copied): their waiters would wait for ever, and the lock may be held.
        renew_after_fork(self, Store._forked)
        self.hits = self.misses = self.coalesced = 0

    def info(self) -> CacheInfo:
        currsize = len(self.backend) if isinstance(self.backend, MemoryCache) else None
        maxsize = self.backend.maxsize if isinstance(self.backend, MemoryCache) else None
        return CacheInfo(self.hits, self.misses, self.coalesced, maxsize, currsize)

    def clear(self) -> None:
        """Drop this store's entries (only them, in a backend that can tell) and its counts."""
        clear_prefix = getattr(self.backend, "clear_prefix", None)
        clear = getattr(self.backend, "clear", None)
        if self.scope and callable(clear_prefix):
            clear_prefix(self.scope)
        elif callable(clear):
            clear()
        else:  # a backend of the application's with get and set only
            warn_once.warning(
                f"rag_instrument: cache backend {type(self.backend).__name__} has no clear(): "
                "its entries stay (the statistics are reset)"
            )
        self.hits = self.misses = self.coalesced = 0

    def lookup(self, key: str) -> tuple[bool, Any]:
        memory = self.memory
        if memory is not None:
            entry = memory.entry(key)
            if entry is None:
                return False, None
            if entry[1] is not NOT_KEPT:
                return True, entry[1]  # immutable: no need to decode it again
            data: bytes | None = entry[0]
        else:
            try:
                data = self.backend.get(key)
            except Exception as exc:  # a backend of the application's own: a miss
                _backend_failed(self.backend, "get", exc)
                return False, None
            if data is None:
                return False, None
        try:
            return True, _keys.decode_value(data, self.types)  # type: ignore[arg-type]
        except ValueError as exc:
            warn_once.warning(f"rag_instrument: ignored a cache entry that is not ours ({exc})")
            return False, None

    def save(self, key: str, value: Any) -> bytes | None:
        kind = type(value)
        if kind in self.types.refused:
            return None  # said once already
        keep = KEEPERS.get(kind)
        if keep is not None:
            try:
                kept = keep(value)
            except Exception:  # an odd value (a finish reason that is a list): not stored
                kept = False
            if not kept:
                return None  # an answer of a kind never cached (a tool call)
        try:
            data = encode_value(value, self.types)
        except UncacheableError as exc:
            if kind not in _REFUSED_FOR_THEIR_VALUE:
                self.types.refused.add(kind)
            warn_once.warning(
                f"rag_instrument: results of type {kind.__qualname__} not cached: {exc}"
            )
            return None
        if self.memory is not None:
            self.memory.set_value(key, data, value)
            return data
        try:
            self.backend.set(key, data, self.ttl)
        except Exception as exc:  # a backend of the application's own: not stored
            _backend_failed(self.backend, "set", exc)
            return None
        return data

    async def alookup(self, key: str) -> tuple[bool, Any]:
        if self.local:
            return self.lookup(key)
        loop = asyncio.get_running_loop()
        # In the caller's context: a warning the backend writes (Redis down) names the
        # caller's stage, request id and trace, as it would on the caller's thread.
        in_context = contextvars.copy_context().run
        return await loop.run_in_executor(worker_pool(CACHE_IO), in_context, self.lookup, key)

    async def asave(self, key: str, value: Any) -> bytes | None:
        if self.local:
            return self.save(key, value)
        loop = asyncio.get_running_loop()
        in_context = contextvars.copy_context().run
        return await loop.run_in_executor(
            worker_pool(CACHE_IO), in_context, self.save, key, value
        )

    # --- single flight: one decision core, a sync and an async loop around it ---------------
    #
    # ``_plan`` decides; ``_steps.run`` / ``_steps.arun`` only carry out what it yields (look
    # up, wait for a flight, call, save). Each entry point makes the first lookup itself: a
    # hit, the common case, costs one lookup.

    def _plan(
        self,
        key: str,
        loop: asyncio.AbstractEventLoop | None,
        lookup: Callable[[str], Any],
        wait: Callable[[_Flight], Any],
        fn: Callable[[], Any],
        save: Callable[[str, Any], Any],
    ) -> Plan[tuple[Any, int]]:
        """After a missed lookup: wait for an identical call in flight, or lead one.

        Returns ``(value, outcome)``; raises what ``fn`` raised (leader and waiters).
        """
        coalesced = False
        while True:
            with self.lock:
                flight = self.flights.get(key)
                # A thread's call never blocks on a flight led on an event loop (which may
                # be this thread's own); a task waits on any flight without blocking.
                if (
                    flight is None
                    or (loop is None and flight.loop is not None)
                    or (flight.loop is not loop and flight.stalled())
                ):
                    mine = self.flights[key] = _Flight(loop)
                    break
            yield wait, (flight,)
            coalesced = True
            found, value = flight.outcome(self.types)  # raises the leader's exception
            if found:
                return value, COALESCED
            if flight.answered:
                # An answer never stored (a tool call, a type the cache refuses): each call
                # is made as if uncached, all at once, not one after another.
                value = yield fn, ()
                return value, MISS
            # The leader was interrupted: one waiter takes over.
            found, value = yield lookup, (key,)
            if found:
                return value, COALESCED if coalesced else HIT
        try:
            if self.local:  # a leader may have finished just before we led (cheap here only)
                found, value = self.lookup(key)
                if found:
                    return value, COALESCED
            value = yield fn, ()
            mine.settle(value, (yield save, (key, value)))
            return value, MISS
        except Exception as exc:
            mine.error = exc
            raise
        finally:
            with self.lock:
                if self.flights.get(key) is mine:
                    del self.flights[key]
            mine.finish()

    def _forked(self) -> None:
        self.lock = threading.Lock()
        self.flights = {}

    def call(self, key: str, fn: Callable[[], Any]) -> tuple[Any, int]:
        """Answer from the cache, from an identical call in flight, or by calling ``fn``.

        Raises:
            Exception: what ``fn`` raised, in the leader and in the calls waiting on it.
        """
        key = self.scope + key
        found, value = self.lookup(key)
        if found:
            return value, HIT
        return run(self._plan(key, None, self.lookup, _Flight.wait, fn, self.save))

    async def acall(self, key: str, fn: Callable[[], Awaitable[Any]]) -> tuple[Any, int]:
        """The asyncio version of :meth:`call` (waiters never cancel the leader)."""
        key = self.scope + key
        found, value = await self.alookup(key)
        if found:
            return value, HIT
        loop = asyncio.get_running_loop()
        plan = self._plan(key, loop, self.alookup, _Flight.await_done, fn, self.asave)
        return await arun(plan)

    @staticmethod
    def key(payload: Mapping[str, Any]) -> str:
        """The key of an SDK request (``payload["params"]`` holds the request's parameters).

        Raises:
            UncacheableError: a parameter has no canonical JSON form.
        """
        return _keys.key_with_variable(payload, payload.get("params"))

    @staticmethod
    def is_hit(outcome: int) -> bool:
        """Whether ``outcome`` (from :meth:`call` / :meth:`acall`) answered without a call."""
        return outcome != MISS

    def count(self, outcome: int, value: Any, rt: Runtime) -> None:
        """Update statistics and telemetry for one answered call."""
        if outcome == MISS:
            self.misses += 1
        else:
            self.hits += 1
            if outcome == COALESCED:
                self.coalesced += 1
        if not rt.enabled:
            return
        try:
            hit = outcome != MISS
            _breakdown.record_cache(hit)
            saved = 0
            if hit and type(value) is LLMResult:
                saved = (value.input_tokens or 0) + (value.output_tokens or 0)
            elif hit and self.tokens is not None:
                saved = self.tokens(value)
            if rt.claim(_OBSERVED_KEY):
                _observe(rt)  # first: the baseline must not include this call
            _TOTALS.add(outcome, saved)
        except Exception as exc:
            internal_error("counting a cache outcome", exc)


#: The finish reasons of a model answer that asks for a tool: the answer depends on what
#: the tools will return, so it is never cached (RELIABILITY 38).
TOOL_CALL_REASONS: Final = frozenset({"tool_calls", "function_call", "tool_use"})


def _not_a_tool_call(value: LLMResult) -> bool:
    reason = value.finish_reason  # anything but None or a text: not stored either
    return reason is None or (type(reason) is str and reason not in TOOL_CALL_REASONS)


#: Per result type, whether a value may be stored (SDK response types register theirs).
KEEPERS: dict[type, Callable[[Any], bool]] = {LLMResult: _not_a_tool_call}


def single_flight(
    fn: Callable[..., Any],
    store: Store,
    key_of: Callable[[tuple[Any, ...], dict[str, Any]], str | None],
    record: Callable[[Any, int], None],
    *,
    is_async: bool,
) -> Callable[..., Any]:
    """``fn`` answered through ``store``: the call shape of every cached function.

    ``key_of(args, kwargs)`` gives the call's key, or ``None`` for a call that is not
    cached (``fn`` is called as it is); a cached call is answered by :meth:`Store.call`
    (or :meth:`Store.acall` when ``is_async``), then ``record(value, outcome)`` is called
    with what answered it. ``fn``'s result and exceptions pass unchanged. Shared by
    :func:`~rag_instrument.cache.cached` and the instrumented SDK clients' cache.
    """
    if is_async:

        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            key = key_of(args, kwargs)
            if key is None:
                return await fn(*args, **kwargs)
            value, outcome = await store.acall(key, lambda: fn(*args, **kwargs))
            record(value, outcome)
            return value

        return async_wrapper

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        key = key_of(args, kwargs)
        if key is None:
            return fn(*args, **kwargs)
        value, outcome = store.call(key, lambda: fn(*args, **kwargs))
        record(value, outcome)
        return value

    return wrapper


class _Totals:
    """Process-wide cache outcome counts, observed by the metric callbacks.

    A cache hit must cost next to nothing, and an OpenTelemetry ``Counter.add`` costs
    microseconds; so the hot path bumps integers and the counters are observable ones,
    read when metrics are collected.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.values = {"hits": 0, "misses": 0, "coalesced": 0, "tokens_saved": 0}

    def add(self, outcome: int, saved: int) -> None:
        with self._lock:
            values = self.values
            if outcome == MISS:
                values["misses"] += 1
                return
            values["hits"] += 1
            if outcome == COALESCED:
                values["coalesced"] += 1
            values["tokens_saved"] += saved

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.values)


_TOTALS = _Totals()
_OBSERVED_KEY: Final = ("observable", "rag.cache")
_METRICS: Final = (
    ("hits", METRIC_CACHE_HITS, "{call}", "Calls answered without an underlying call."),
    ("misses", METRIC_CACHE_MISSES, "{call}", "Calls the cache could not answer."),
    ("coalesced", METRIC_CACHE_COALESCED, "{call}", "Calls served by an identical call in flight."),
    ("tokens_saved", METRIC_CACHE_TOKENS_SAVED, "{token}", "Tokens not spent thanks to the cache."),
)


def _observe(rt: Runtime) -> None:
    """Register the cache counters on ``rt``'s meter, counting from now (once per runtime)."""
    baseline = _TOTALS.snapshot()
    for field, name, unit, description in _METRICS:

        def callback(_options: CallbackOptions, field: str = field) -> Iterable[Observation]:
            return [Observation(_TOTALS.snapshot()[field] - baseline[field])]

        rt.meter.create_observable_counter(
            name, callbacks=[callback], unit=unit, description=description
        )


def check_cache_settings(
    owner: str, ttl: Any, maxsize: Any, prefix: str, backend: Any = None
) -> None:
    """Reject a TTL, size or backend that would cache nothing or fail every call."""
    if backend is not None and (
        isinstance(backend, type)  # ri.RedisCache, not ri.RedisCache(url)
        or not (_is_backend(backend) or isinstance(backend, Cache))
    ):
        hint = (
            f" (for a Redis URL: ri.RedisCache({backend!r}))"
            if isinstance(backend, str) and backend.startswith(("redis://", "rediss://", "unix://"))
            else ""
        )
        raise ValueError(
            f"{owner}: {prefix}backend must be None (in-process), a cachetools cache "
            f"instance, ri.RedisCache(url) or an object with get(key) and set(key, value, ttl), "
            f"got {backend!r}{hint}"
        )
    if ttl is not None and (
        isinstance(ttl, bool)
        or not isinstance(ttl, int | float)
        or not math.isfinite(ttl)
        or ttl <= 0
    ):
        raise ValueError(
            f"{owner}: {prefix}ttl must be a positive number of seconds or None, got {ttl!r}"
        )
    if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
        raise ValueError(f"{owner}: {prefix}maxsize must be an int >= 1, got {maxsize!r}")


def _is_backend(backend: Any) -> bool:
    """Whether ``backend`` has a backend's own ``get`` and ``set`` (a mapping has no set)."""
    return callable(getattr(backend, "get", None)) and callable(getattr(backend, "set", None))


def make_backend(
    backend: CacheBackend | MutableMapping[str, Any] | None, maxsize: int, ttl: float | None
) -> CacheBackend:
    if backend is None:
        return MemoryCache(maxsize=maxsize, ttl=ttl if ttl is not None else float("inf"))
    if not _is_backend(backend) and isinstance(backend, Cache):
        return MappingCache(backend)
    return cast("CacheBackend", backend)
