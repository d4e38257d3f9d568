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

from rag_instrument._utils import internal_error

__all__ = ["extract_context", "inject_headers"]

H = TypeVar("H", bound=MutableMapping[str, str])

_MAX_HEADER_CHARS = 8192


@overload
def inject_headers(headers: None = None) -> dict[str, str]: ...


@overload
def inject_headers(headers: H) -> H: ...


def inject_headers(headers: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Add the current trace context (``traceparent``, ``tracestate``, ``baggage``) to headers.

    Args:
        headers: a mutable mapping of outgoing headers (a ``dict``, ``httpx.Headers``,
            ``requests``' ``CaseInsensitiveDict`` ...), changed in place; a new ``dict``
            when omitted.

    Returns:
        ``headers`` itself (or the new dict), so it can be passed on inline. Outside any
        span nothing is added.

    Example:
        >>> import rag_instrument as ri
        >>> ri.inject_headers({"accept": "application/json"})
        {'accept': 'application/json'}
    """
    carrier: MutableMapping[str, str] = {} if headers is None else headers
    try:
        propagate.inject(carrier)
    except Exception as exc:
        internal_error("inject_headers", exc)
    return carrier


def _normalise(headers: Any) -> dict[str, str]:
    items: Iterable[Any]
    if isinstance(headers, Mapping) or (hasattr(headers, "items") and callable(headers.items)):
        items = headers.items()
    else:
        items = headers  # ASGI-style raw pairs: [(b"traceparent", b"00-..."), ...]
    out: dict[str, str] = {}
    for item in items:
        try:
            key, value = item
            key = key.decode("latin-1") if isinstance(key, bytes | bytearray) else str(key)
            if isinstance(value, bytes | bytearray):
                value = value.decode("latin-1")
            elif not isinstance(value, str):
                continue
            if len(value) <= _MAX_HEADER_CHARS:
                out[key.lower()] = value
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
