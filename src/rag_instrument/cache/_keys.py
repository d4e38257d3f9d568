"""Cache keys and stored values: canonical JSON, SHA-256, never pickle.

A key is the SHA-256 of the canonical JSON (sorted keys, no whitespace) of everything that
can change an answer; a part with no canonical JSON form (an object, bytes, a NaN) makes
the call uncached (:class:`UncacheableError`) rather than risk two requests sharing a key.
A value is stored as a small JSON envelope (an ``LLMResult`` round-trips).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from typing import Any, Final

import orjson

from rag_instrument.cache._values import (
    OBJ_PREFIX,
    RefusedValue,
    ValueTypes,
    is_object,
    type_name,
)
from rag_instrument.llm import LLMResult

__all__ = [
    "NOT_KEPT",
    "UncacheableError",
    "decode_value",
    "encode_value",
    "keepable",
    "key_with_variable",
    "make_key",
]


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
    return key_with_variable(payload, payload)


def key_with_variable(payload: Any, variable: Any) -> str:
    """:func:`make_key`, checking only ``variable`` (a part of ``payload``) for NaN.

    Equal numbers give equal keys, as canonical JSON (RFC 8785) writes them: a float with
    an integral value is written as the integer (``1.0`` as ``1``, ``-0.0`` as ``0``), so
    ``temperature=0`` and ``temperature=0.0`` are one entry.
    """
    found = _floats(variable)
    if found is _NON_FINITE:  # orjson writes NaN and inf as null: two keys in one
        raise UncacheableError("a NaN or infinite float has no canonical JSON form")
    if found is _INTEGRAL:
        payload = _canonical_numbers(payload)
    try:
        data = orjson.dumps(payload, default=_reject, option=_KEY_OPTIONS)
    except orjson.JSONEncodeError as exc:
        raise UncacheableError(str(exc)) from None
    return hashlib.sha256(data).hexdigest()


_NON_FINITE: Final = "non-finite"
_INTEGRAL: Final = "integral"
#: Floats of integral value up to this are written as integers (exactly representable).
_EXACT_INT: Final = 2.0**53


def _canonical_numbers(value: Any) -> Any:
    """``value`` with each float of integral value (within 2**53) as the int it equals."""
    kind = type(value)
    if isinstance(value, float):
        return int(value) if value.is_integer() and abs(value) <= _EXACT_INT else value
    if kind is dict or isinstance(value, dict):
        return {key: _canonical_numbers(item) for key, item in value.items()}
    if kind is list or kind is tuple or isinstance(value, _SEQUENCES):
        return [_canonical_numbers(item) for item in value]
    return value


def _floats(value: Any) -> str | None:
    """What floats ``value`` holds (one walk, no recursion).

    ``_NON_FINITE`` for a NaN or an infinity, else ``_INTEGRAL`` for a float of integral
    value, else ``None``.
    """
    leaves = _LEAVES
    if type(value) in leaves:
        return None
    found: str | None = None
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
            if isinstance(node, float):
                if not math.isfinite(node):
                    return _NON_FINITE
                if node.is_integer() and abs(node) <= _EXACT_INT:
                    found = _INTEGRAL
            continue
        for item in items:
            if type(item) not in leaves:
                stack.append(item)  # noqa: PERF401 - a loop is faster for 1-3 items
    return found


_LEAVES: Final = frozenset({str, int, bool, type(None)})
_SEQUENCES: Final = (list, tuple)


def encode_value(value: Any, types: ValueTypes | None = None) -> bytes:
    """The JSON stored for ``value``.

    An ``LLMResult``, a plain JSON value, or (with ``types``) a pydantic model or a
    dataclass, stored with its class's name (see :mod:`rag_instrument.cache._values`).

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
        data = orjson.dumps(envelope, default=_reject, option=orjson.OPT_PASSTHROUGH_DATACLASS)
    except orjson.JSONEncodeError:
        kind = type_name(type(value))
        raise UncacheableError(
            f"{kind} is neither JSON, a dataclass nor a pydantic model"
            if types is not None and envelope["t"] == "json"
            else f"{kind} holds a value that is not JSON"
        ) from None
    # What a hit would hand out must equal what the call returned: a tuple comes back from
    # JSON as a list, a NaN or an infinity as null (the leaves always come back equal).
    # Checked on a store (after a real call), never on a hit.
    if envelope["t"] == "json" and type(value) not in _LEAVES and orjson.loads(data)["v"] != value:
        raise UncacheableError(
            f"{type_name(type(value))} does not come back equal from JSON "
            "(a tuple comes back as a list, NaN or an infinity as null)"
        )
    return data


#: Values a cache hit may hand out as the very object stored: immutable, and equal to what
#: decoding their JSON would give. Mutable JSON (dict, list) is decoded afresh every time.
_IMMUTABLE: Final = frozenset({LLMResult, str, int, bool, type(None)})


def keepable(value: Any) -> bool:
    kind = type(value)
    return kind in _IMMUTABLE or (kind is float and math.isfinite(value))


NOT_KEPT: Final = object()


def decode_value(data: bytes | str, types: ValueTypes | None = None) -> Any:
    """Inverse of :func:`encode_value`.

    Raises:
        ValueError: ``data`` is not an entry this module wrote.
    """
    if types is not None and type(data) is bytes and data.startswith(OBJ_PREFIX):
        return types.rebuild_entry(data)
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
