""":class:`CacheMixin`: a response cache for an ``LLMProvider``."""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable, Mapping
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


class _class_or_instance:
    """A method called with the class and, on an instance, the instance too."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.__doc__ = fn.__doc__

    def __get__(self, instance: Any, owner: type | None = None) -> Callable[..., Any]:
        cls = owner if owner is not None else type(instance)
        return functools.partial(self.fn, cls, instance)


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
        namespace = inspect.getattr_static(cls, "cache_namespace", None)
        if (
            namespace is not None
            and not isinstance(namespace, str)
            and not hasattr(type(namespace), "__get__")  # a property: read per instance
        ):
            raise ValueError(
                f"{cls.__qualname__}: cache_namespace must be a string or None (a call's "
                f"cache_namespace= sets one per call), got {namespace!r}"
            )
        nondeterministic = inspect.getattr_static(cls, "cache_nondeterministic", False)
        if not isinstance(nondeterministic, bool) and not hasattr(
            type(nondeterministic), "__get__"
        ):
            raise ValueError(
                f"{cls.__qualname__}: cache_nondeterministic must be True or False, "
                f"got {nondeterministic!r}"
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

        The class's, or, when the instance sets ``cache_backend``, ``cache_ttl`` or
        ``cache_maxsize`` itself, the class's store for those settings: instances with the
        same settings (one per request, say) share it. Read at each cached call; a bad
        value raises ``ValueError`` naming it at the first call that uses it.
        """
        own = getattr(self, "__dict__", None)
        if not own or _INSTANCE_SETTINGS.isdisjoint(own):
            return type(self)._rag_store()
        cls = type(self)
        backend, ttl, maxsize = self.cache_backend, self.cache_ttl, self.cache_maxsize
        try:
            key: Any = (backend, ttl, maxsize)
            hash(key)
        except TypeError:  # an unhashable backend object: by identity
            key = (id(backend), ttl, maxsize)
        stores: dict[Any, Store] | None = cls.__dict__.get("_rag_setting_stores")
        store = stores.get(key) if stores is not None else None
        if store is None:
            with _STORES_LOCK:
                stores = cls.__dict__.get("_rag_setting_stores")
                if stores is None:
                    stores = {}
                    cls._rag_setting_stores = stores  # type: ignore[attr-defined]
                store = stores.get(key)
                if store is None:
                    check_cache_settings(
                        f"{cls.__qualname__} instance", ttl, maxsize, "cache_", backend
                    )
                    store = Store(
                        make_backend(backend, maxsize, ttl),
                        ttl,
                        scope=f"{cls.__module__}.{cls.__qualname__}",
                    )
                    stores[key] = store
        return store

    @_class_or_instance
    def cache_info(cls, self: Any = None) -> CacheInfo:
        """Hits, misses, coalesced calls and size of the cache.

        The class's; called on an instance with settings of its own, those settings' store.
        """
        store = self._rag_call_store() if self is not None else cls._rag_store()
        return store.info()

    @_class_or_instance
    def cache_clear(cls, self: Any = None) -> None:
        """Empty the cache and reset its statistics.

        Called on the class, every store of the class; on an instance with settings of its
        own, those settings' store.
        """
        if self is not None and _INSTANCE_SETTINGS.isdisjoint(getattr(self, "__dict__", ())):
            self = None
        if self is not None:
            self._rag_call_store().clear()
            return
        cls._rag_store().clear()
        for store in list((cls.__dict__.get("_rag_setting_stores") or {}).values()):
            store.clear()

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
