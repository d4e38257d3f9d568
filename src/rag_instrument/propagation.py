"""Trace context across services: :func:`inject_headers` and :func:`extract_context`.

The calling service puts the current trace into its outgoing request's headers::

    response = await client.post(url, json=body, headers=ri.inject_headers())

and the called service, when it is not behind :class:`~rag_instrument.RequestMiddleware`
(which does this itself), continues that trace::

    token = opentelemetry.context.attach(ri.extract_context(request.headers))

Both use the OpenTelemetry API's global propagator: W3C ``traceparent`` / ``tracestate``
and ``baggage`` unless the application installed another one (``OTEL_PROPAGATORS``).
Neither ever raises: a malformed header yields an empty context, as if there were none.

Work handed to threads and executors keeps the caller's trace, stage and bound values
with :func:`rag_instrument.wrap_context`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any, TypeVar, overload

from opentelemetry import propagate
from opentelemetry.context import Context

from rag_instrument._utils import internal_error, warn_once

__all__ = ["extract_context", "inject_headers"]

H = TypeVar("H", bound=MutableMapping[str, str])
L = TypeVar("L", bound=list[tuple[Any, Any]])

_MAX_HEADER_CHARS = 8192


@overload
def inject_headers(headers: None = None) -> dict[str, str]: ...


@overload
def inject_headers(headers: H) -> H: ...


@overload
def inject_headers(headers: L) -> L: ...


def inject_headers(
    headers: MutableMapping[str, str] | list[tuple[Any, Any]] | None = None,
) -> MutableMapping[str, str] | list[tuple[Any, Any]]:
    """Add the current trace context (``traceparent``, ``tracestate``, ``baggage``) to headers.

    Args:
        headers: a mutable mapping of outgoing headers (a ``dict``, ``httpx.Headers``,
            ``requests``' ``CaseInsensitiveDict`` ...) or a list of ``(name, value)``
            pairs (``str``, or ``bytes`` as ASGI's; pairs of the same names are replaced),
            changed in place; a new ``dict`` when omitted. Anything else (a list of
            anything but pairs included) is returned unchanged, with a warning.

    Returns:
        ``headers`` itself (or the new dict), so it can be passed on inline. Outside any
        span nothing is added.

    Example:
        >>> import rag_instrument as ri
        >>> ri.inject_headers({"accept": "application/json"})
        {'accept': 'application/json'}
    """
    if headers is None or isinstance(headers, MutableMapping) or not isinstance(headers, list):
        carrier: MutableMapping[str, str] = {} if headers is None else headers
        if not callable(getattr(carrier, "__setitem__", None)):
            _cannot_carry(carrier)
            return carrier
        try:
            propagate.inject(carrier)
        except Exception as exc:
            internal_error("inject_headers", exc)
        return carrier
    # A list of (name, value) pairs (ASGI-style bytes, or str): the pairs are replaced.
    if not all(isinstance(item, tuple | list) and len(item) == 2 for item in headers):
        _cannot_carry(headers)  # a list, but not of header pairs
        return headers
    try:
        found: dict[str, str] = {}
        propagate.inject(found)
        if found:
            # Bytes pairs (ASGI's; as tuples or lists, bytearray names too) get bytes; str
            # pairs, and an empty list, get str.
            as_bytes = any(
                isinstance(item, tuple | list)
                and len(item) == 2
                and isinstance(item[0], bytes | bytearray)
                for item in headers
            )
            names = {name.lower() for name in found}
            headers[:] = [item for item in headers if not _named(item, names)]
            for name, value in found.items():
                headers.append(
                    (name.encode("latin-1"), value.encode("latin-1")) if as_bytes else (name, value)
                )
    except Exception as exc:
        internal_error("inject_headers", exc)
    return headers


def _named(item: Any, names: set[str]) -> bool:
    """Whether the header pair ``item`` has one of ``names`` (lower case)."""
    try:
        name = item[0]
        if isinstance(name, bytes | bytearray):
            name = bytes(name).decode("latin-1")
        return isinstance(name, str) and name.lower() in names
    except Exception:
        return False


def _cannot_carry(headers: object) -> None:
    warn_once.warning(
        f"rag_instrument.inject_headers: headers of type {type(headers).__name__} cannot "
        "hold headers (pass a dict, a headers object or a list of pairs): nothing added"
    )


def _normalise(headers: Any) -> dict[str, str]:
    items: Iterable[Any]
    if isinstance(headers, Mapping) or (hasattr(headers, "items") and callable(headers.items)):
        items = headers.items()
    else:
        items = headers  # ASGI-style raw pairs: [(b"traceparent", b"00-..."), ...]
    out: dict[str, str] = {}
    try:
        items = iter(items)
    except TypeError:
        return out  # not headers at all (a number, None inside a list ...): no context
    for item in items:
        try:
            key, value = item
            key = key.decode("latin-1") if isinstance(key, bytes | bytearray) else str(key)
            if isinstance(value, bytes | bytearray):
                value = value.decode("latin-1")
            elif isinstance(value, list | tuple):
                # A multi-value headers API ({"traceparent": [tp]}): the values joined by
                # commas, as HTTP reads a repeated header.
                parts = [
                    v.decode("latin-1") if isinstance(v, bytes | bytearray) else v
                    for v in value[:16]
                ]
                if not parts or not all(isinstance(v, str) for v in parts):
                    continue
                value = ",".join(parts)
            elif not isinstance(value, str):
                continue
            if len(value) <= _MAX_HEADER_CHARS:
                key = key.lower()
                seen = out.get(key)
                out[key] = value if seen is None else f"{seen},{value}"  # repeated: joined
        except Exception:  # noqa: S112 - one malformed header must not hide the others
            continue
    return out


def extract_context(
    headers: Mapping[str, str] | Mapping[bytes, bytes] | Iterable[tuple[Any, Any]] | None,
) -> Context:
    """The trace context carried by incoming headers, as an OpenTelemetry ``Context``.

    Args:
        headers: a mapping of header names to values (any case; ``str`` or ``bytes``), a
            framework's headers object, or ASGI-style ``(name, value)`` byte pairs.

    Returns:
        A context whose current span is the remote parent (and whose baggage is the
        incoming baggage); an empty context when there is no valid ``traceparent``.
        Start spans under it with ``opentelemetry.context.attach(ctx)`` (then ``detach``),
        or pass it as ``context=`` to ``tracer.start_as_current_span``.

    Example:
        >>> import rag_instrument as ri
        >>> from opentelemetry import trace
        >>> ctx = ri.extract_context(
        ...     {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
        ... )
        >>> format(trace.get_current_span(ctx).get_span_context().trace_id, "032x")
        '0af7651916cd43dd8448eb211c80319c'
    """
    if headers is None:
        return Context()
    try:
        return propagate.extract(_normalise(headers))
    except Exception as exc:
        internal_error("extract_context", exc)
        return Context()
