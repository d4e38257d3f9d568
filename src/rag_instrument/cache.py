"""Response caching: :class:`CacheMixin`, :func:`cached` and :class:`RedisCache`.

Keys are the SHA-256 of canonical JSON (sorted keys, no whitespace) of everything that can
change an answer: for a provider the system, model, prompt, every parameter and the cache
namespace (e.g. a tenant id, so tenants never share entries). Python's ``hash()`` is never
used, and a parameter that has no canonical JSON form makes the call uncached rather than
risking two different requests sharing a key.

Values are stored as JSON (an :class:`~rag_instrument.llm.LLMResult` round-trips); nothing
is pickled or unpickled, so a poisoned shared cache cannot execute code. Exceptions are
never cached. Concurrent identical calls make one underlying call (single flight, for
threads and for asyncio tasks); if the leading call fails, the calls waiting on it get its
exception too (the failure is not kept for later callers); if it is cancelled, one waiter
takes over instead of failing with it.

Telemetry: ``rag.cache.hit`` on the provider span (for :func:`cached`, on the span current
at the call); counters ``rag.cache.hits`` (calls
answered without an underlying call, coalesced ones included), ``rag.cache.misses``,
``rag.cache.coalesced`` (served by another call's in-flight result) and
``rag.cache.tokens_saved``; ``cache`` hits and misses in the stage's breakdown.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import math
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final, NamedTuple, Protocol, TypeVar, overload

import orjson
from cachetools import TTLCache
from opentelemetry import trace as trace_api
from opentelemetry.metrics import CallbackOptions, Observation

from rag_instrument import _breakdown, _config
from rag_instrument._sanitize import redact_text
from rag_instrument._utils import (
    FunctionKind,
    function_kind,
    internal_error,
    user_code_error,
    warn_once,
)
from rag_instrument._values import RefusedValue, ValueTypes, is_object, type_name
from rag_instrument.attributes import (
    METRIC_CACHE_COALESCED,
    METRIC_CACHE_HITS,
    METRIC_CACHE_MISSES,
    METRIC_CACHE_TOKENS_SAVED,
    RAG_CACHE_HIT,
)
from rag_instrument.llm import LLMResult

if TYPE_CHECKING:
    from rag_instrument._config import Runtime
    from rag_instrument.llm import LLMRequest

__all__ = [
    "CacheBackend",
    "CacheInfo",
    "CacheMixin",
    "CacheSpec",
    "MemoryCache",
    "RedisCache",
    "UncacheableError",
    "cached",
    "make_key",
    "sdk_store",
]

F = TypeVar("F", bound=Callable[..., Any])


_MISS: Final = 0
_HIT: Final = 1
_COALESCED: Final = 2

#: Name prefix of the worker threads that talk to an out-of-process backend (Redis).
CACHE_THREAD_PREFIX: Final = "rag_instrument-cache"

_io_executor: concurrent.futures.ThreadPoolExecutor | None = None
_io_lock = threading.Lock()


def _cache_executor() -> concurrent.futures.ThreadPoolExecutor:
    """The small thread pool of out-of-process backends' I/O.

    A pool of its own, so that a slow Redis cannot starve model calls (nor the
    application's ``to_thread`` work).
    """
    global _io_executor
    executor = _io_executor
    if executor is None:
        with _io_lock:
            if _io_executor is None:
                _io_executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=8, thread_name_prefix=CACHE_THREAD_PREFIX
                )
            executor = _io_executor
    return executor


class UncacheableError(TypeError):
    """A key part or a value has no canonical JSON form, so the call is not cached."""


def _reject(value: Any) -> Any:
    raise UncacheableError(f"{type(value).__qualname__} has no canonical JSON form")


_KEY_OPTIONS: Final = (
    orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME
)


def make_key(payload: Any) -> str:
    """SHA-256 (hex) of the canonical JSON of ``payload``.

    Raises:
        UncacheableError: ``payload`` holds a value JSON cannot represent exactly
            (an object, a class, bytes, a non-str dict key, a NaN, ...).
    """
    return _make_key(payload, payload)


def _make_key(payload: Any, variable: Any) -> str:
    """:func:`make_key`, checking only ``variable`` (a part of ``payload``) for NaN."""
    try:
        data = orjson.dumps(payload, default=_reject, option=_KEY_OPTIONS)
    except orjson.JSONEncodeError as exc:
        raise UncacheableError(str(exc)) from None
    if _has_non_finite(variable):  # orjson writes NaN and inf as null: two keys in one
        raise UncacheableError("a NaN or infinite float has no canonical JSON form")
    return hashlib.sha256(data).hexdigest()


_LEAVES: Final = frozenset({str, int, bool, type(None)})
_SEQUENCES: Final = (list, tuple)


def _has_non_finite(value: Any) -> bool:
    """Whether ``value`` holds a NaN or infinite float (one call: no recursion)."""
    leaves = _LEAVES
    if type(value) in leaves:
        return False
    stack = [value]
    while stack:
        node = stack.pop()
        kind = type(node)
        if kind is tuple or kind is list:
            items: Iterable[Any] = node
        elif kind is dict or isinstance(node, dict):
            items = node.values()
        elif isinstance(node, _SEQUENCES):
            items = node
        else:
            if isinstance(node, float) and not math.isfinite(node):
                return True
            continue
        for item in items:
            if type(item) not in leaves:
                stack.append(item)  # noqa: PERF401 - a loop is faster for 1-3 items
    return False


def encode_value(value: Any, types: ValueTypes | None = None) -> bytes:
    """The JSON stored for ``value``.

    An ``LLMResult``, a plain JSON value, or (with ``types``) a pydantic model or a
    dataclass, stored with its class's name.

    Raises:
        UncacheableError: the value is none of these (the message names its type).
    """
    if type(value) is LLMResult:
        envelope: dict[str, Any] = {"t": "llm", "v": value.to_dict()}
    elif types is not None and is_object(value):
        try:
            envelope = types.envelope(value)
        except RefusedValue as exc:
            raise UncacheableError(str(exc)) from None
    else:
        envelope = {"t": "json", "v": value}
    try:
        return orjson.dumps(envelope, default=_reject, option=orjson.OPT_PASSTHROUGH_DATACLASS)
    except orjson.JSONEncodeError:
        kind = type_name(type(value))
        raise UncacheableError(
            f"{kind} is neither JSON, a dataclass nor a pydantic model"
            if types is not None and envelope["t"] == "json"
            else f"{kind} holds a value that is not JSON"
        ) from None


#: Values a cache hit may hand out as the very object stored: immutable, and equal to what
#: decoding their JSON would give. Mutable JSON (dict, list) is decoded afresh every time.
_IMMUTABLE: Final = frozenset({LLMResult, str, int, bool, type(None)})


def _keepable(value: Any) -> bool:
    kind = type(value)
    return kind in _IMMUTABLE or (kind is float and math.isfinite(value))


_NOT_KEPT: Final = object()


def decode_value(data: bytes | str, types: ValueTypes | None = None) -> Any:
    """Inverse of :func:`encode_value`.

    Raises:
        ValueError: ``data`` is not an entry this module wrote.
    """
    envelope = orjson.loads(data)  # never pickle: a foreign blob is a JSON error here
    if type(envelope) is not dict:
        raise ValueError("not a rag_instrument cache entry")
    kind = envelope.get("t")
    if kind == "json":
        return envelope.get("v")
    if kind == "obj" and types is not None:
        return types.rebuild(envelope)
    if kind == "llm" and isinstance(envelope.get("v"), dict):
        try:
            return LLMResult.from_dict(envelope["v"])
        except TypeError as exc:
            raise ValueError(str(exc)) from None
    raise ValueError("not a rag_instrument cache entry")


# --- backends ---------------------------------------------------------------------------------


class CacheBackend(Protocol):
    """Where entries live: JSON bytes under string keys, with a time to live."""

    def get(self, key: str) -> bytes | None:
        """The stored bytes, or ``None`` (also when the backend is unreachable)."""

    def set(self, key: str, value: bytes, ttl: float | None) -> None:
        """Store ``value`` for ``ttl`` seconds (``None``: the backend's default)."""

    def clear(self) -> None:
        """Drop every entry this backend holds."""


class MemoryCache:
    """The in-process backend: a cachetools ``TTLCache`` behind a lock (thread-safe).

    Args:
        maxsize: the most entries kept (least recently used evicted first).
        ttl: seconds an entry lives.
    """

    def __init__(self, maxsize: int = 1024, ttl: float = 3600.0) -> None:
        # Each entry is (bytes, the decoded value or _NOT_KEPT): see lookup().
        self._cache: TTLCache[str, tuple[bytes, Any]] = TTLCache(maxsize=maxsize, ttl=ttl)
        self._lock = threading.Lock()
        self.maxsize = maxsize

    def get(self, key: str) -> bytes | None:
        """The stored bytes, or ``None``."""
        with self._lock:
            try:
                return self._cache[key][0]  # one expiry check, where .get() makes two
            except KeyError:
                return None

    def entry(self, key: str) -> tuple[bytes, Any] | None:
        """The stored bytes and, for an immutable value, the value itself (or ``_NOT_KEPT``)."""
        with self._lock:
            try:
                return self._cache[key]
            except KeyError:
                return None

    def set(self, key: str, value: bytes, ttl: float | None) -> None:
        """Store ``value`` (entries share the cache's TTL)."""
        with self._lock:
            self._cache[key] = (value, _NOT_KEPT)

    def set_value(self, key: str, data: bytes, value: Any) -> None:
        """Store ``data``, the JSON of ``value``, keeping ``value`` if it is immutable."""
        kept = value if _keepable(value) else _NOT_KEPT
        with self._lock:
            self._cache[key] = (data, kept)

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._cache.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._cache)


class RedisCache:
    """A Redis backend shared by processes and hosts (extra ``redis``).

    Entries expire on the server (``SET ... PX``). An unreachable or failing Redis turns
    into cache misses and a warning at most once per 20 s: never a failed call. After an
    error or a timeout the backend is skipped for ``cooldown_s`` (every lookup a miss,
    every store dropped), so that a stalled server does not cost each call its timeout;
    then it is tried again.

    Args:
        url: ``redis://host:port/db``.
        prefix: prepended to every key, to share a database safely.
        timeout_s: connect and command timeout, seconds.
        cooldown_s: seconds the backend is skipped after a failure.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        prefix: str = "rag:",
        *,
        timeout_s: float = 0.5,
        cooldown_s: float = 5.0,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.cooldown_s = cooldown_s
        self._client: Any = None
        self._lock = threading.Lock()
        self._down_until = 0.0

    def __repr__(self) -> str:
        return f"RedisCache({redact_text(self.url)!r}, prefix={self.prefix!r})"

    def _redis(self) -> Any:
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    try:
                        import redis
                    except ImportError:
                        raise ImportError(
                            "RedisCache needs 'redis': pip install 'rag_instrument[redis]'"
                        ) from None
                    self._client = redis.Redis.from_url(
                        self.url,
                        socket_timeout=self.timeout_s,
                        socket_connect_timeout=self.timeout_s,
                    )
                client = self._client
        return client

    def _cooling_down(self) -> bool:
        return self._down_until > 0.0 and time.monotonic() < self._down_until

    def _unavailable(self, exc: Exception) -> None:
        self._down_until = time.monotonic() + self.cooldown_s
        warn_once.warning(
            f"rag_instrument: Redis cache at {redact_text(self.url)} unavailable "
            f"({type(exc).__name__}); serving without the cache"
        )

    def get(self, key: str) -> bytes | None:
        """The stored bytes, or ``None`` (missing, or Redis unavailable)."""
        if self._cooling_down():
            return None
        client = self._redis()
        try:
            value = client.get(self.prefix + key)
        except Exception as exc:
            self._unavailable(exc)
            return None
        return value if isinstance(value, bytes) else None

    def set(self, key: str, value: bytes, ttl: float | None) -> None:
        """Store ``value`` with a server-side expiry of ``ttl`` seconds."""
        if self._cooling_down():
            return
        client = self._redis()
        try:
            if ttl is not None and ttl > 0:
                client.set(self.prefix + key, value, px=max(int(ttl * 1000), 1))
            else:
                client.set(self.prefix + key, value)
        except Exception as exc:
            self._unavailable(exc)

    def clear(self) -> None:
        """Delete every key under ``prefix``."""
        client = self._redis()
        try:
            keys = list(client.scan_iter(match=self.prefix + "*", count=500))
            if keys:
                client.delete(*keys)
        except Exception as exc:
            self._unavailable(exc)

    def close(self) -> None:
        """Close the connection pool."""
        client, self._client = self._client, None
        if client is not None:
            client.close()


class CacheInfo(NamedTuple):
    """Statistics of a cache, as ``functools.lru_cache``'s ``cache_info()`` gives them."""

    hits: int
    misses: int
    coalesced: int
    maxsize: int | None
    currsize: int | None


# --- the store: lookup, single flight, statistics ---------------------------------------------


class _Flight:
    """One underlying call in progress, and how it ended (for the calls waiting on it)."""

    __slots__ = ("data", "done", "error", "loop", "value")

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self.loop = loop
        self.done: threading.Event | asyncio.Future[None] = (
            threading.Event() if loop is None else loop.create_future()
        )
        self.data: bytes | None = None  # the result's JSON, if it was stored
        self.value: Any = _NOT_KEPT  # the result itself, if immutable
        self.error: Exception | None = None  # the leader's failure (not a cancellation)

    def settle(self, value: Any, data: bytes | None) -> None:
        self.data = data
        if data is not None and _keepable(value):
            self.value = value

    def outcome(self, types: ValueTypes) -> tuple[bool, Any]:
        """What a waiter gets: ``(True, value)``, or the leader's exception raised.

        ``(False, None)`` when the leader was cancelled or its result could not be stored:
        the waiter takes over.
        """
        if self.error is not None:
            raise self.error
        if self.value is not _NOT_KEPT:
            return True, self.value
        if self.data is not None:
            return True, decode_value(self.data, types)
        return False, None


class _Store:
    """One cache: a backend plus the in-flight calls and counts (shared by all callers)."""

    def __init__(
        self,
        backend: CacheBackend,
        ttl: float | None,
        types: ValueTypes | None = None,
        tokens: Callable[[Any], int] | None = None,
    ) -> None:
        self.backend = backend
        self.ttl = ttl
        self.types = types if types is not None else ValueTypes()
        self.tokens = tokens  # the tokens a stored response cost (saved on a hit)
        self.memory: MemoryCache | None = backend if type(backend) is MemoryCache else None
        self.local = self.memory is not None
        self.lock = threading.Lock()
        self.flights: dict[str, _Flight] = {}
        self.hits = self.misses = self.coalesced = 0

    def info(self) -> CacheInfo:
        currsize = len(self.backend) if isinstance(self.backend, MemoryCache) else None
        maxsize = self.backend.maxsize if isinstance(self.backend, MemoryCache) else None
        return CacheInfo(self.hits, self.misses, self.coalesced, maxsize, currsize)

    def clear(self) -> None:
        self.backend.clear()
        self.hits = self.misses = self.coalesced = 0

    def lookup(self, key: str) -> tuple[bool, Any]:
        memory = self.memory
        if memory is not None:
            entry = memory.entry(key)
            if entry is None:
                return False, None
            if entry[1] is not _NOT_KEPT:
                return True, entry[1]  # immutable: no need to decode it again
            data: bytes | None = entry[0]
        else:
            data = self.backend.get(key)
            if data is None:
                return False, None
        try:
            return True, decode_value(data, self.types)  # type: ignore[arg-type]
        except ValueError as exc:
            warn_once.warning(f"rag_instrument: ignored a cache entry that is not ours ({exc})")
            return False, None

    def save(self, key: str, value: Any) -> bytes | None:
        kind = type(value)
        if kind in self.types.refused:
            return None  # said once already
        try:
            data = encode_value(value, self.types)
        except UncacheableError as exc:
            self.types.refused.add(kind)
            warn_once.warning(
                f"rag_instrument: results of type {kind.__qualname__} not cached: {exc}"
            )
            return None
        if self.memory is not None:
            self.memory.set_value(key, data, value)
        else:
            self.backend.set(key, data, self.ttl)
        return data

    async def alookup(self, key: str) -> tuple[bool, Any]:
        if self.local:
            return self.lookup(key)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(_cache_executor(), self.lookup, key)

    async def asave(self, key: str, value: Any) -> bytes | None:
        if self.local:
            return self.save(key, value)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(_cache_executor(), self.save, key, value)

    def call(self, key: str, fn: Callable[[], Any]) -> tuple[Any, int]:
        """Answer from the cache, from an identical call in flight, or by calling ``fn``.

        Raises:
            Exception: what ``fn`` raised, in the leader and in the calls waiting on it.
        """
        coalesced = False
        while True:
            found, value = self.lookup(key)
            if found:
                return value, _COALESCED if coalesced else _HIT
            with self.lock:
                flight = self.flights.get(key)
                if flight is None or flight.loop is not None:
                    mine = self.flights[key] = _Flight(None)
                    break
            done = flight.done
            assert isinstance(done, threading.Event)
            done.wait()
            coalesced = True
            found, value = flight.outcome(self.types)  # raises the leader's exception
            if found:
                return value, _COALESCED
            # The leader was interrupted (or its result not stored): go round, one takes over.
        try:
            if self.local:  # a leader may have finished just before we led (cheap here only)
                found, value = self.lookup(key)
                if found:
                    return value, _COALESCED
            value = fn()
            mine.settle(value, self.save(key, value))
            return value, _MISS
        except Exception as exc:
            mine.error = exc
            raise
        finally:
            with self.lock:
                if self.flights.get(key) is mine:
                    del self.flights[key]
            mine.done.set()  # type: ignore[union-attr]

    async def acall(self, key: str, fn: Callable[[], Awaitable[Any]]) -> tuple[Any, int]:
        """The asyncio version of :meth:`call` (waiters never cancel the leader)."""
        loop = asyncio.get_running_loop()
        coalesced = False
        while True:
            found, value = await self.alookup(key)
            if found:
                return value, _COALESCED if coalesced else _HIT
            with self.lock:
                flight = self.flights.get(key)
                if flight is None or flight.loop is not loop:
                    mine = self.flights[key] = _Flight(loop)
                    break
            done = flight.done
            assert isinstance(done, asyncio.Future)
            await asyncio.shield(done)
            coalesced = True
            found, value = flight.outcome(self.types)  # raises the leader's exception
            if found:
                return value, _COALESCED
            # The leader was cancelled: go round, one waiter takes over.
        try:
            if self.local:
                found, value = self.lookup(key)
                if found:
                    return value, _COALESCED
            value = await fn()
            mine.settle(value, await self.asave(key, value))
            return value, _MISS
        except Exception as exc:
            mine.error = exc
            raise
        finally:
            with self.lock:
                if self.flights.get(key) is mine:
                    del self.flights[key]
            future = mine.done
            assert isinstance(future, asyncio.Future)
            if not future.done():
                future.set_result(None)

    @staticmethod
    def key(payload: Mapping[str, Any]) -> str:
        """The key of an SDK request (``payload["params"]`` holds the request's parameters).

        Raises:
            UncacheableError: a parameter has no canonical JSON form.
        """
        return _make_key(payload, payload.get("params"))

    @staticmethod
    def is_hit(outcome: int) -> bool:
        """Whether ``outcome`` (from :meth:`call` / :meth:`acall`) answered without a call."""
        return outcome != _MISS

    def count(self, outcome: int, value: Any, rt: Runtime) -> None:
        """Update statistics and telemetry for one answered call."""
        if outcome == _MISS:
            self.misses += 1
        else:
            self.hits += 1
            if outcome == _COALESCED:
                self.coalesced += 1
        if not rt.enabled:
            return
        try:
            hit = outcome != _MISS
            _breakdown.record_cache(hit)
            saved = 0
            if hit and type(value) is LLMResult:
                saved = (value.input_tokens or 0) + (value.output_tokens or 0)
            elif hit and self.tokens is not None:
                saved = self.tokens(value)
            if _OBSERVED_KEY not in rt._instruments:
                _observe(rt)  # first: the baseline must not include this call
            _TOTALS.add(outcome, saved)
        except Exception as exc:
            internal_error("counting a cache outcome", exc)


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
            if outcome == _MISS:
                values["misses"] += 1
                return
            values["hits"] += 1
            if outcome == _COALESCED:
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
    """Register the cache counters on ``rt``'s meter, counting from now."""
    with _STORES_LOCK:
        if _OBSERVED_KEY in rt._instruments:
            return
        rt._instruments[_OBSERVED_KEY] = True
        baseline = _TOTALS.snapshot()
    for field, name, unit, description in _METRICS:

        def callback(_options: CallbackOptions, field: str = field) -> Iterable[Observation]:
            return [Observation(_TOTALS.snapshot()[field] - baseline[field])]

        rt.meter.create_observable_counter(
            name, callbacks=[callback], unit=unit, description=description
        )


def _check_cache_settings(owner: str, ttl: Any, maxsize: Any, prefix: str) -> None:
    """Reject a TTL or size that would silently cache nothing (configuration time)."""
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


def _make_backend(backend: CacheBackend | None, maxsize: int, ttl: float | None) -> CacheBackend:
    if backend is not None:
        return backend
    return MemoryCache(maxsize=maxsize, ttl=ttl if ttl is not None else float("inf"))


# --- CacheMixin -------------------------------------------------------------------------------

_STORES_LOCK = threading.Lock()


class CacheMixin:
    """A response cache for an :class:`~rag_instrument.llm.LLMProvider`; list it first.

    Class attributes:
        cache_ttl: seconds an entry lives (default 3600).
        cache_maxsize: entries kept in the in-process cache (default 1024).
        cache_backend: ``None`` (in-process) or a :class:`RedisCache`.
        cache_namespace: keeps entries apart, e.g. per tenant (``generate(...,
            cache_namespace=...)`` overrides it per call).
        cache_nondeterministic: also cache calls with ``temperature > 0`` (default off:
            a sampled answer is not a fact to repeat).

    Streams (``stream=True``) are never cached; ``generate(..., cache=False)`` bypasses
    the cache for one call. The cache is shared by every instance of the class.
    """

    cache_ttl: float | None = 3600.0
    cache_maxsize: int = 1024
    cache_backend: CacheBackend | None = None
    cache_namespace: str | None = None
    cache_nondeterministic: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _check_cache_settings(cls.__qualname__, cls.cache_ttl, cls.cache_maxsize, "cache_")

    @classmethod
    def _rag_store(cls) -> _Store:
        store: _Store | None = cls.__dict__.get("_rag_cache_store")
        if store is None:
            with _STORES_LOCK:
                store = cls.__dict__.get("_rag_cache_store")
                if store is None:
                    backend = _make_backend(cls.cache_backend, cls.cache_maxsize, cls.cache_ttl)
                    store = _Store(backend, cls.cache_ttl)
                    cls._rag_cache_store = store  # type: ignore[attr-defined]
        return store

    @classmethod
    def cache_info(cls) -> CacheInfo:
        """Hits, misses, coalesced calls and size of this class's cache."""
        return cls._rag_store().info()

    @classmethod
    def cache_clear(cls) -> None:
        """Empty this class's cache and reset its statistics."""
        cls._rag_store().clear()

    def cache_key(self, prompt: str, params: Mapping[str, Any], namespace: str | None) -> str:
        """The cache key of one call (override to change what is part of it).

        Besides the call, the key holds the provider class's qualified name, so that two
        classes sharing a backend (a :class:`RedisCache`) never share entries.

        Raises:
            UncacheableError: a parameter has no canonical JSON form.
        """
        cls = type(self)
        payload = {
            "class": f"{cls.__module__}.{cls.__qualname__}",
            "system": getattr(self, "system", None),
            "model": getattr(self, "model", None),
            "prompt": prompt,
            "params": params,
            "namespace": namespace,
        }
        return _make_key(payload, params if type(prompt) is str else payload)

    def is_cacheable(self, params: Mapping[str, Any]) -> bool:
        """Whether a call with ``params`` may be answered from the cache."""
        if params.get("stream"):
            return False
        temperature = params.get("temperature")
        return not (
            isinstance(temperature, int | float)
            and temperature > 0
            and not self.cache_nondeterministic
        )

    async def _invoke(self, request: LLMRequest) -> Any:
        invoke = super()._invoke  # type: ignore[misc]
        if not request.cache or not self.is_cacheable(request.params):
            return await invoke(request)
        namespace = request.cache_namespace
        if namespace is None:
            namespace = self.cache_namespace
        try:
            key = self.cache_key(request.prompt, request.params, namespace)
        except UncacheableError as exc:
            warn_once.warning(f"rag_instrument: call not cached: {exc}")
            return await invoke(request)
        store = self._rag_store()
        value, outcome = await store.acall(key, lambda: invoke(request))
        if request.call is not None:
            request.call.cache_hit = outcome != _MISS
        store.count(outcome, value, _config._RUNTIME)
        return value


# --- CacheSpec: the cache of instrumented SDK clients ---------------------------------------------


class CacheSpec:
    """The response cache of an instrumented SDK client (``instrument_openai(client, cache=...)``).

    The same settings as :class:`CacheMixin`'s class attributes. Every client instrumented
    with one spec shares its entries (keys hold the client's base URL, so two deployments
    never share an answer), and so do the copies ``client.with_options(...)`` makes.

    Args:
        ttl: seconds an entry lives (``None``: until evicted).
        maxsize: entries kept by the in-process cache.
        backend: ``None`` (in-process) or a :class:`RedisCache`.
        namespace: keeps entries apart, e.g. per tenant: a string, or a function called at
            each call (returning a string or ``None``), e.g. one reading the current tenant
            from a context variable.
        nondeterministic: also cache calls with ``temperature > 0``.

    Raises:
        ValueError: a TTL or size that would cache nothing, or a namespace that is neither
            a string nor a function.
    """

    __slots__ = ("_lock", "_store", "backend", "maxsize", "namespace", "nondeterministic", "ttl")

    def __init__(
        self,
        ttl: float | None = 3600.0,
        maxsize: int = 1024,
        backend: CacheBackend | None = None,
        namespace: str | Callable[[], str | None] | None = None,
        nondeterministic: bool = False,
    ) -> None:
        _check_cache_settings("CacheSpec", ttl, maxsize, "")
        if namespace is not None and not isinstance(namespace, str) and not callable(namespace):
            raise ValueError(
                f"CacheSpec: namespace must be a string, a function or None, got {namespace!r}"
            )
        if not isinstance(nondeterministic, bool):
            raise ValueError(  # noqa: TRY004 - configuration errors are ValueErrors here
                f"CacheSpec: nondeterministic must be a bool, got {nondeterministic!r}"
            )
        self.ttl = ttl
        self.maxsize = maxsize
        self.backend = backend
        self.namespace = namespace
        self.nondeterministic = nondeterministic
        self._store: _Store | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"CacheSpec(ttl={self.ttl!r}, maxsize={self.maxsize!r}, backend={self.backend!r}, "
            f"namespace={self.namespace!r}, nondeterministic={self.nondeterministic!r})"
        )

    def current_namespace(self) -> str | None:
        """The namespace of a call made now (a function namespace is called)."""
        namespace = self.namespace
        if namespace is None or isinstance(namespace, str):
            return namespace
        try:
            value = namespace()
        except Exception as exc:
            user_code_error("the CacheSpec namespace function", exc)
            raise UncacheableError("the namespace function failed") from None
        if value is not None and not isinstance(value, str):
            raise UncacheableError(f"the namespace function returned {type(value).__name__}")
        return value

    def store(self) -> _Store:
        """The store of this spec's entries (made on first use)."""
        store = self._store
        if store is None:
            with self._lock:
                if self._store is None:
                    backend = _make_backend(self.backend, self.maxsize, self.ttl)
                    self._store = _Store(backend, self.ttl, tokens=self._tokens)
                store = self._store
        return store

    def _tokens(self, value: Any) -> int:
        counter = _TOKEN_COUNTERS.get(type(value))
        return counter(value) if counter is not None else 0

    def cache_info(self) -> CacheInfo:
        """Hits, misses, coalesced calls and size of this spec's cache."""
        return self.store().info()

    def cache_clear(self) -> None:
        """Empty this spec's cache and reset its statistics."""
        self.store().clear()


#: How many tokens a response of each SDK type cost (registered by the integrations).
_TOKEN_COUNTERS: dict[type, Callable[[Any], int]] = {}


def sdk_store(spec: CacheSpec, result_type: type, tokens: Callable[[Any], int]) -> _Store:
    """The store of ``spec``, allowed to rebuild ``result_type`` (an SDK response model)."""
    store = spec.store()
    store.types.allow(result_type)
    _TOKEN_COUNTERS.setdefault(result_type, tokens)
    return store


# --- cached() ---------------------------------------------------------------------------------


def _default_key(*args: Any, **kwargs: Any) -> Any:
    return (args, kwargs)


def _wrap(
    fn: Callable[..., Any],
    store: _Store,
    key: Callable[..., Any],
    prefix: str,
) -> Callable[..., Any]:
    kind = function_kind(fn)

    def record(value: Any, outcome: int) -> None:
        rt = _config._RUNTIME
        store.count(outcome, value, rt)
        if rt.enabled:
            try:
                span = trace_api.get_current_span()
                if span.is_recording():
                    span.set_attribute(RAG_CACHE_HIT, outcome != _MISS)
            except Exception as exc:
                internal_error("recording a cache outcome on the span", exc)

    def key_of(args: Any, kwargs: Any) -> str | None:
        try:
            part = key(*args, **kwargs)
            return _make_key([prefix, part], part)
        except UncacheableError as exc:
            warn_once.warning(f"rag_instrument: {prefix} call not cached: {exc}")
            return None

    if kind is FunctionKind.ASYNC:

        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            k = key_of(args, kwargs)
            if k is None:
                return await fn(*args, **kwargs)
            value, outcome = await store.acall(k, lambda: fn(*args, **kwargs))
            record(value, outcome)
            return value

        return async_wrapper

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        k = key_of(args, kwargs)
        if k is None:
            return fn(*args, **kwargs)
        value, outcome = store.call(k, lambda: fn(*args, **kwargs))
        record(value, outcome)
        return value

    return wrapper


@overload
def cached(fn: F, /) -> F: ...


@overload
def cached(
    fn: None = None,
    /,
    *,
    ttl: float | None = 3600.0,
    maxsize: int = 1024,
    backend: CacheBackend | None = None,
    key: Callable[..., Any] | None = None,
    namespace: str | None = None,
) -> Callable[[F], F]: ...


def cached(
    fn: Any = None,
    /,
    *,
    ttl: float | None = 3600.0,
    maxsize: int = 1024,
    backend: CacheBackend | None = None,
    key: Callable[..., Any] | None = None,
    namespace: str | None = None,
) -> Any:
    """Cache a function's JSON results, with single flight, for ``def`` and ``async def``.

    Use as ``@ri.cached`` or ``@ri.cached(ttl=600, backend=ri.RedisCache(url))``. The
    wrapper has ``cache_info()`` and ``cache_clear()``. Each call sets ``rag.cache.hit``
    on the span current at the call (a stage's, for instance).

    Args:
        fn: the function, when used as ``@ri.cached`` without arguments.
        ttl: seconds an entry lives (``None``: until evicted).
        maxsize: entries kept by the in-process cache.
        backend: where entries live (default: in-process).
        key: builds the key part from the call's arguments (default: all of them); its
            result is hashed as canonical JSON together with the function's name.
        namespace: keeps this function's entries apart from others with the same name.

    Returns:
        The decorated function, or a decorator.

    Raises:
        TypeError: the function is a generator (streams are not cached).
    """
    _check_cache_settings("rag_instrument.cached", ttl, maxsize, "")

    def decorate(func: F) -> F:
        if function_kind(func) in (FunctionKind.GENERATOR, FunctionKind.ASYNC_GENERATOR):
            raise TypeError("rag_instrument.cached: generators (streams) are not cached")
        name = f"{getattr(func, '__module__', '')}.{getattr(func, '__qualname__', repr(func))}"
        prefix = name if namespace is None else f"{namespace}:{name}"
        store = _Store(_make_backend(backend, maxsize, ttl), ttl)
        wrapper = _wrap(func, store, key or _default_key, prefix)
        functools.update_wrapper(wrapper, func)
        wrapper.cache_info = store.info  # type: ignore[attr-defined]
        wrapper.cache_clear = store.clear  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    if fn is not None:
        return decorate(fn)
    return decorate
