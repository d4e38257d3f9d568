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

:class:`CacheSpec` configures the same cache for instrumented SDK clients
(``ri.instrument_openai(client, cache=ri.CacheSpec(...))``); :func:`cached` and the SDK
cache also store pydantic models and dataclasses (see ``_values``).

Telemetry: ``rag.cache.hit`` on the provider span (for :func:`cached`, on the span current
at the call); counters ``rag.cache.hits`` (calls
answered without an underlying call, coalesced ones included), ``rag.cache.misses``,
``rag.cache.coalesced`` (served by another call's in-flight result) and
``rag.cache.tokens_saved``; ``cache`` hits and misses in the stage's breakdown.
"""

from __future__ import annotations

from rag_instrument.cache._backends import CacheBackend, MemoryCache, RedisCache
from rag_instrument.cache._decorator import cached
from rag_instrument.cache._keys import UncacheableError, make_key
from rag_instrument.cache._keys import decode_value as decode_value  # the stored-value codec
from rag_instrument.cache._keys import encode_value as encode_value
from rag_instrument.cache._mixin import CacheMixin
from rag_instrument.cache._spec import CacheSpec
from rag_instrument.cache._spec import sdk_store as sdk_store  # for the SDK integrations
from rag_instrument.cache._store import TOOL_CALL_REASONS as TOOL_CALL_REASONS  # the SDKs' rule
from rag_instrument.cache._store import CacheInfo
from rag_instrument.cache._store import single_flight as single_flight  # cached() and the SDKs

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
]
