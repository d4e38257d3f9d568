""":class:`CacheMixin`: a response cache for an ``LLMProvider``."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from rag_instrument._runtime import get_runtime
from rag_instrument._utils import warn_once
from rag_instrument.cache._backends import CacheBackend
from rag_instrument.cache._keys import UncacheableError, key_with_variable
from rag_instrument.cache._store import MISS, CacheInfo, Store, check_cache_settings, make_backend

if TYPE_CHECKING:
    from rag_instrument.llm import LLMRequest

__all__ = ["CacheMixin"]

_STORES_LOCK = threading.Lock()
#: Cache settings an instance may set for itself (its own store, see _rag_call_store).
_INSTANCE_SETTINGS: frozenset[str] = frozenset({"cache_backend", "cache_ttl", "cache_maxsize"})


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
    the cache for one call. The cache is shared by every instance of the class, but for an
    instance that sets ``cache_backend``, ``cache_ttl`` or ``cache_maxsize`` itself: it gets
    a store of its own.
    """

    cache_ttl: float | None = 3600.0
    cache_maxsize: int = 1024
    cache_backend: CacheBackend | None = None
    cache_namespace: str | None = None
    cache_nondeterministic: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        check_cache_settings(
            cls.__qualname__, cls.cache_ttl, cls.cache_maxsize, "cache_", cls.cache_backend
        )

    @classmethod
    def _rag_store(cls) -> Store:
        store: Store | None = cls.__dict__.get("_rag_cache_store")
        if store is None:
            with _STORES_LOCK:
                store = cls.__dict__.get("_rag_cache_store")
                if store is None:
                    # Checked again: the class's attributes may have changed since.
                    check_cache_settings(
                        cls.__qualname__,
                        cls.cache_ttl,
                        cls.cache_maxsize,
                        "cache_",
                        cls.cache_backend,
                    )
                    backend = make_backend(cls.cache_backend, cls.cache_maxsize, cls.cache_ttl)
                    store = Store(
                        backend, cls.cache_ttl, scope=f"{cls.__module__}.{cls.__qualname__}"
                    )
                    cls._rag_cache_store = store  # type: ignore[attr-defined]
        return store

    def _rag_call_store(self) -> Store:
        """The store of this instance's calls.

        The class's, or its own when the instance sets ``cache_backend``, ``cache_ttl`` or
        ``cache_maxsize`` itself (read at its first cached call; a bad value raises
        ``ValueError`` naming it there).
        """
        own = getattr(self, "__dict__", None)
        if not own or _INSTANCE_SETTINGS.isdisjoint(own):
            return type(self)._rag_store()
        store: Store | None = own.get("_rag_cache_store")
        if store is None:
            with _STORES_LOCK:
                store = own.get("_rag_cache_store")
                if store is None:
                    cls = type(self)
                    check_cache_settings(
                        f"{cls.__qualname__} instance",
                        self.cache_ttl,
                        self.cache_maxsize,
                        "cache_",
                        self.cache_backend,
                    )
                    backend = make_backend(self.cache_backend, self.cache_maxsize, self.cache_ttl)
                    store = Store(
                        backend, self.cache_ttl, scope=f"{cls.__module__}.{cls.__qualname__}"
                    )
                    own["_rag_cache_store"] = store
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
        return key_with_variable(payload, params if type(prompt) is str else payload)

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
        store = self._rag_call_store()
        value, outcome = await store.acall(key, lambda: invoke(request))
        if request.call is not None:
            request.call.cache_hit = outcome != MISS
        store.count(outcome, value, get_runtime())
        return value
