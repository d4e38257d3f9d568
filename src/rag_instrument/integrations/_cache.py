"""The response cache of instrumented SDK clients (``instrument_openai(client, cache=...)``).

A cached SDK method answers from the same machinery as
:class:`~rag_instrument.cache.CacheMixin`: a SHA-256 key of the canonical JSON of the
request, tenant namespaces, single flight, in-process or Redis backends. The response
model is stored as JSON (``model_dump(mode="json")``) and rebuilt on a hit with the SDK
class's ``model_validate``: the caller gets the type the SDK returns, never an unpickled
object, and a fresh copy on every hit (an SDK model is mutable).

Never answered from the cache: streams, ``with_raw_response`` / ``with_streaming_response``
calls (the caller expects the HTTP response), calls with ``temperature > 0`` unless the
spec says ``nondeterministic=True``, and calls with a parameter that has no canonical JSON
form (a warning says which, once).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, Final

from rag_instrument._genai import current_call
from rag_instrument._runtime import get_runtime
from rag_instrument._utils import internal_error, warn_once
from rag_instrument.cache import CacheSpec, UncacheableError, sdk_store, single_flight

__all__ = ["cache_spec", "cached_method"]

#: Request options that change how a request is sent, never what it answers.
_TRANSPORT_OPTIONS: Final = frozenset({"timeout"})
_RAW_HEADER: Final = "x-stainless-raw-response"


#: ``CacheMixin``'s class attributes, and the ``CacheSpec`` argument each one sets.
_MIXIN_SETTINGS: Final = (
    ("cache_ttl", "ttl"),
    ("cache_maxsize", "maxsize"),
    ("cache_backend", "backend"),
    ("cache_namespace", "namespace"),
    ("cache_nondeterministic", "nondeterministic"),
)


def cache_spec(cache: object) -> CacheSpec | None:
    """The spec for ``instrument_*(client, cache=...)``.

    ``cache``: a :class:`CacheSpec`, ``True`` (the defaults), ``None`` or ``False`` (no
    cache), or a class or object with :class:`~rag_instrument.cache.CacheMixin`'s class
    attributes (``cache_ttl``, ``cache_maxsize``, ``cache_backend``, ``cache_namespace``,
    ``cache_nondeterministic``; a ``CacheMixin`` provider class, say): the same settings,
    those it does not set at ``CacheMixin``'s defaults (the same settings, not the same
    entries: the client's cache is its own).

    Raises:
        ValueError: ``cache`` is none of these, or one of its settings is not valid.
    """
    if cache is None or cache is False:
        return None
    if cache is True:
        return CacheSpec()
    if isinstance(cache, CacheSpec):
        return cache
    if any(hasattr(cache, name) for name, _ in _MIXIN_SETTINGS):
        settings = {
            arg: getattr(cache, name) for name, arg in _MIXIN_SETTINGS if hasattr(cache, name)
        }
        try:
            return CacheSpec(**settings)
        except ValueError as exc:
            raise ValueError(f"cache={cache!r:.200}: {exc}") from None
    raise ValueError(
        "cache must be a rag_instrument.CacheSpec, a bool, or a class or object with "
        f"CacheMixin's cache_* attributes, got {cache!r:.200}"
    )


def _is_omitted(value: Any) -> bool:
    return type(value).__name__ in ("NotGiven", "Omit")


def _is_raw(kwargs: Mapping[str, Any]) -> bool:
    headers = kwargs.get("extra_headers")
    if not isinstance(headers, Mapping):
        return False
    return any(str(name).lower() == _RAW_HEADER for name in headers)


def cached_method(
    original: Callable[..., Any],
    *,
    spec: CacheSpec,
    is_async: bool,
    scope: Mapping[str, Any],
    result_type: type,
    tokens: Callable[[Any], int],
    keep: Callable[[Any], bool] | None = None,
) -> Callable[..., Any]:
    """Wrap one SDK method with the response cache.

    Args:
        original: the SDK's bound method.
        spec: the cache's settings (and its store).
        is_async: whether ``original`` returns an awaitable.
        scope: what, besides the request, tells answers apart: the SDK, the operation and
            the client's base URL (two deployments may answer the same model name
            differently).
        result_type: the SDK's response model class (the only type rebuilt from entries).
        tokens: the tokens a response cost (counted as saved on a hit).
        keep: whether a response may be stored (a tool call's is not).
    """
    store = sdk_store(spec, result_type, tokens, keep)

    def key_of(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str | None:
        if args or kwargs.get("stream") or _is_raw(kwargs):
            return None
        temperature = kwargs.get("temperature")
        if (
            isinstance(temperature, int | float)
            and temperature > 0
            and not spec.nondeterministic
        ):
            return None
        params = {
            name: value
            for name, value in kwargs.items()
            if name not in _TRANSPORT_OPTIONS and not _is_omitted(value)
        }
        try:
            return store.key({**scope, "params": params, "namespace": spec.current_namespace()})
        except UncacheableError as exc:
            warn_once.warning(f"rag_instrument: {scope.get('operation')} call not cached: {exc}")
            return None
        except Exception as exc:
            internal_error("building an SDK cache key", exc)
            return None

    def record(value: Any, outcome: int) -> None:
        try:
            call = current_call()
            if call is not None:
                call.cache_hit = store.is_hit(outcome)
            store.count(outcome, value, get_runtime())
        except Exception as exc:
            internal_error("recording an SDK cache outcome", exc)

    method = single_flight(original, store, key_of, record, is_async=is_async)
    return functools.wraps(original)(method)
