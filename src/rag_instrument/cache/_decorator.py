""":func:`cached`: the response cache as a decorator for any ``def`` or ``async def``."""

from __future__ import annotations

import functools
import threading
import uuid
import weakref
from collections.abc import Callable
from typing import Any, TypeVar, overload

from opentelemetry import trace as trace_api

from rag_instrument._runtime import get_runtime
from rag_instrument._utils import FunctionKind, function_kind, internal_error, warn_once
from rag_instrument.attributes import RAG_CACHE_HIT
from rag_instrument.cache._backends import CacheBackend
from rag_instrument.cache._keys import UncacheableError, key_with_variable
from rag_instrument.cache._store import (
    MISS,
    Store,
    check_cache_settings,
    make_backend,
    single_flight,
)
from rag_instrument.cache._values import ValueTypes, returned_classes

__all__ = ["cached"]

F = TypeVar("F", bound=Callable[..., Any])


def _default_key(*args: Any, **kwargs: Any) -> Any:
    return (args, kwargs)


# A token per live instance whose methods are cached: entries are the instance's own, as
# functools.lru_cache's are. By identity, weakly: an id reused after the instance is gone
# gets a new token, never the old one's entries.
_TOKENS: dict[int, tuple[weakref.ref[Any], str]] = {}
_TOKENS_LOCK = threading.Lock()


def _instance_token(owner: Any) -> str:
    if isinstance(owner, type):  # a class method: the class, by name (the same everywhere)
        return f"class {owner.__module__}.{owner.__qualname__}"
    ident = id(owner)
    with _TOKENS_LOCK:
        found = _TOKENS.get(ident)
        if found is not None and found[0]() is owner:
            return found[1]
        try:
            ref = weakref.ref(owner, functools.partial(_forget, ident))
        except TypeError:
            raise UncacheableError(
                f"{type(owner).__name__} instances take no weak reference: "
                "pass key= to cache this method"
            ) from None
        token = f"instance {uuid.uuid4().hex}"
        _TOKENS[ident] = (ref, token)
        return token


def _forget(ident: int, ref: weakref.ref[Any]) -> None:
    # No lock: the collector may run this in a thread that holds _TOKENS_LOCK (it frees
    # objects wherever it runs). Dictionary steps are atomic; at worst a new instance at a
    # reused address loses its fresh token, and takes another at its next call.
    found = _TOKENS.get(ident)
    if found is not None and found[0] is ref:
        _TOKENS.pop(ident, None)


def _method_key(owner: Any, /, *args: Any, **kwargs: Any) -> Any:
    return (_instance_token(owner), args, kwargs)


def _is_method(func: Callable[..., Any]) -> bool:
    """Whether ``func`` is defined in a class body with ``self`` or ``cls`` first."""
    owner, _, _ = getattr(func, "__qualname__", "").rpartition(".")
    if not owner or owner.endswith("<locals>"):
        return False
    code = getattr(func, "__code__", None)
    if code is None or code.co_argcount < 1:
        return False
    return code.co_varnames[0] in ("self", "cls")


def _wrap(
    fn: Callable[..., Any],
    store: Store,
    key: Callable[..., Any],
    prefix: str,
) -> Callable[..., Any]:
    kind = function_kind(fn)

    def record(value: Any, outcome: int) -> None:
        rt = get_runtime()
        store.count(outcome, value, rt)
        if rt.enabled:
            try:
                span = trace_api.get_current_span()
                if span.is_recording():
                    span.set_attribute(RAG_CACHE_HIT, outcome != MISS)
            except Exception as exc:
                internal_error("recording a cache outcome on the span", exc)

    def key_of(args: Any, kwargs: Any) -> str | None:
        try:
            part = key(*args, **kwargs)
            return key_with_variable([prefix, part], part)
        except UncacheableError as exc:
            warn_once.warning(f"rag_instrument: {prefix} call not cached: {exc}")
            return None

    return single_flight(fn, store, key_of, record, is_async=kind is FunctionKind.ASYNC)


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
        key: builds the key part from the call's arguments (default: all of them; a
            method's ``self`` by identity, so that each instance has its own entries, and
            a class method's ``cls`` by name); its result is hashed as canonical JSON
            together with the function's qualified name (``Class.method`` for a method).
        namespace: keeps this function's entries apart from others with the same name.

    Returns:
        The decorated function, or a decorator.

    Raises:
        TypeError: the function is a generator (streams are not cached).
    """
    check_cache_settings("rag_instrument.cached", ttl, maxsize, "", backend)
    if key is not None and not callable(key):
        raise ValueError(
            f"rag_instrument.cached: key must be a function of the call's arguments or None, "
            f"got {key!r}"
        )

    def decorate(func: F) -> F:
        if function_kind(func) in (FunctionKind.GENERATOR, FunctionKind.ASYNC_GENERATOR):
            raise TypeError("rag_instrument.cached: generators (streams) are not cached")
        name = f"{getattr(func, '__module__', '')}.{getattr(func, '__qualname__', repr(func))}"
        prefix = name if namespace is None else f"{namespace}:{name}"
        # The classes its return annotation names are rebuilt from entries that another
        # process (sharing a Redis backend) stored before this one stored any.
        types = ValueTypes(declared=functools.partial(returned_classes, func))
        store = Store(make_backend(backend, maxsize, ttl), ttl, types, scope=prefix)
        # A method's instance has no JSON form: its entries are its own (a token per live
        # instance; a class method's, its class's). key= without self shares them between
        # instances (and processes, through Redis): key=lambda self, q: q.
        default = _method_key if _is_method(func) else _default_key
        wrapper = _wrap(func, store, key or default, prefix)
        functools.update_wrapper(wrapper, func)
        wrapper.cache_info = store.info  # type: ignore[attr-defined]
        wrapper.cache_clear = store.clear  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    if fn is not None:
        return decorate(fn)
    return decorate
