"""The settings of an instrumented SDK client's response cache: :class:`CacheSpec`."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from rag_instrument._utils import user_code_error
from rag_instrument.cache._backends import CacheBackend
from rag_instrument.cache._keys import UncacheableError
from rag_instrument.cache._store import (
    KEEPERS,
    CacheInfo,
    Store,
    check_cache_settings,
    make_backend,
)

__all__ = ["CacheSpec", "sdk_store"]


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
        check_cache_settings("CacheSpec", ttl, maxsize, "", backend)
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
        self._store: Store | None = None
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

    def store(self) -> Store:
        """The store of this spec's entries (made on first use)."""
        store = self._store
        if store is None:
            with self._lock:
                if self._store is None:
                    backend = make_backend(self.backend, self.maxsize, self.ttl)
                    scope = "rag_instrument.CacheSpec"  # SDK clients' entries, apart
                    if isinstance(self.namespace, str):
                        scope += f":{self.namespace}"
                    self._store = Store(backend, self.ttl, tokens=self._tokens, scope=scope)
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


def sdk_store(
    spec: CacheSpec,
    result_type: type,
    tokens: Callable[[Any], int],
    keep: Callable[[Any], bool] | None = None,
) -> Store:
    """The store of ``spec``, allowed to rebuild ``result_type`` (an SDK response model).

    ``keep(value)``: whether a response may be stored (``False`` for a tool call).
    """
    store = spec.store()
    store.types.allow(result_type)
    _TOKEN_COUNTERS.setdefault(result_type, tokens)
    if keep is not None:
        KEEPERS.setdefault(result_type, keep)
    return store
