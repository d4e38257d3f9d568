"""OTLP/protobuf encoding of finished spans, written out by hand, and the exporter using it.

A private part of :mod:`rag_instrument.exporters` (only it imports this module). The OTLP
exporter's own encoder builds one protobuf message object per span, attribute and value
before serialising them: about 40 to 110 microseconds per span on the export thread,
which shares the interpreter lock with the application. :func:`encode_request` writes the
same bytes directly (the protobuf wire format of ``ExportTraceServiceRequest``), remembering
the encoding of resources, scopes and attribute pairs that repeat.

It must produce exactly what the SDK's encoder produces, or not be used:

* it encodes only what it knows (strings, booleans, 64-bit integers, floats, bytes, lists
  and tuples of them, dicts, ``None``); anything else (a value the SDK's encoder would
  log and skip, an id out of range, a string that is not valid UTF-8) raises
  :class:`Unsupported`, and the caller encodes that batch with the SDK's encoder;
* :func:`fast_exporter` checks, once per process, that both encoders agree, byte
  for byte, on a sample of spans covering every field (events, links, status, trace
  state, remote parents, every value type): an SDK version that encodes differently
  keeps its own encoder.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

from opentelemetry import trace as trace_api
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace import Span as SDKSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util import BoundedList
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from rag_instrument._leaf import StageSpan

__all__ = [
    "FastOTLPSpanExporter",
    "Unsupported",
    "agrees_with_sdk",
    "encode_request",
    "fast_exporter",
    "sample_spans",
]


class Unsupported(Exception):
    """A span holds something this encoder does not encode: use the SDK's encoder."""


_Q: Final = struct.Struct("<Q").pack
_D: Final = struct.Struct("<d").pack
_I: Final = struct.Struct("<I").pack
_MAX_INT64: Final = 2**63 - 1
_MIN_INT64: Final = -(2**63)
_MAX_UINT32: Final = 2**32 - 1
# The varints of 0..16383 (one or two bytes): lengths and counts are looked up.
_SMALL: Final = tuple(
    bytes([n]) if n < 128 else bytes([(n & 0x7F) | 0x80, n >> 7]) for n in range(16384)
)
_KIND: Final = {
    trace_api.SpanKind.INTERNAL: b"\x30\x01",
    trace_api.SpanKind.SERVER: b"\x30\x02",
    trace_api.SpanKind.CLIENT: b"\x30\x03",
    trace_api.SpanKind.PRODUCER: b"\x30\x04",
    trace_api.SpanKind.CONSUMER: b"\x30\x05",
}
_LOCAL_FLAGS: Final = b"\x85\x01" + _I(0x100)  # SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_REMOTE_FLAGS: Final = b"\x85\x01" + _I(0x300)  # ... | SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK
_LINK_LOCAL_FLAGS: Final = b"\x35" + _I(0x100)
_LINK_REMOTE_FLAGS: Final = b"\x35" + _I(0x300)
_UNSET_STATUS: Final = b"\x7a\x00"
_UNSET: Final = StageSpan._status  # the shared "unset" status of stage spans


def _varint(n: int) -> bytes:
    if n < 16384:
        return _SMALL[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _int64(n: int) -> bytes:
    if n < 0:
        if n < _MIN_INT64:
            raise Unsupported("int64 out of range")
        return _varint(n + 2**64)
    if n > _MAX_INT64:
        raise Unsupported("int64 out of range")
    return _varint(n)


def _field(tag: bytes, body: bytes) -> bytes:
    """A length-delimited field: tag, length, body."""
    size = len(body)
    return tag + (_SMALL[size] if size < 16384 else _varint(size)) + body


def _text(value: str) -> bytes:
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates: the SDK's encoder decides
        raise Unsupported("not UTF-8") from exc


def _any_value(value: Any) -> bytes:
    """The body of an ``AnyValue`` message (as the SDK's ``_encode_value`` fills it)."""
    kind = type(value)
    if kind is str:
        return _field(b"\x0a", _text(value))
    if kind is bool:
        return b"\x10\x01" if value else b"\x10\x00"
    if kind is int:
        return b"\x18" + _int64(value)
    if kind is float:
        return b"\x21" + _D(value)
    if value is None:
        return b""
    if kind is bytes:
        return _field(b"\x3a", value)
    if kind is tuple or kind is list:
        return _field(b"\x2a", b"".join([_field(b"\x0a", _any_value(v)) for v in value]))
    if kind is dict:
        return _field(
            b"\x32", b"".join([_field(b"\x0a", _key_value(k, v)) for k, v in value.items()])
        )
    raise Unsupported(f"attribute value of type {kind.__name__}")


def _key_value(key: Any, value: Any) -> bytes:
    """The body of a ``KeyValue`` message (``str(key)`` as the SDK's kvlist encoding does)."""
    key = key if type(key) is str else str(key)
    return (_field(b"\x0a", _text(key)) if key else b"") + _field(b"\x12", _any_value(value))


# Length-prefixed KeyValue bodies of (key, short string value) pairs seen before: stage
# names, operation names, model names repeat on every span.
_PAIRS: dict[tuple[str, str], bytes] = {}
_PAIRS_MAX: Final = 16384


# Encoded ``key`` fields of attribute keys seen before.
_KEYS: dict[str, bytes] = {}


def _attributes(tag: bytes, attributes: Any) -> bytes:
    """Repeated ``KeyValue`` fields ``tag`` for ``attributes`` (a mapping or ``None``)."""
    if not attributes:
        return b""
    plain = attributes._dict if type(attributes) is BoundedAttributes else attributes
    if type(plain) is not dict:
        plain = dict(plain.items())
    parts: list[bytes] = []
    pairs = _PAIRS
    keys = _KEYS
    small = _SMALL
    value: Any
    for key, value in plain.items():
        kind = type(value)
        if kind is str and len(value) <= 256:
            pair = (key, value)
            found = pairs.get(pair)
            if found is None:
                if type(key) is not str:
                    raise Unsupported("attribute key that is not a string")
                body = _key_value(key, value)
                found = small[len(body)] + body
                if len(pairs) >= _PAIRS_MAX:
                    pairs.clear()
                pairs[pair] = found
            parts.append(tag)
            parts.append(found)
            continue
        encoded_key = keys.get(key)
        if encoded_key is None:
            if type(key) is not str:
                raise Unsupported("attribute key that is not a string")
            encoded_key = _field(b"\x0a", _text(key)) if key else b""
            if len(keys) >= _PAIRS_MAX:
                keys.clear()
            keys[key] = encoded_key
        if kind is int:
            value_bytes = b"\x18" + _int64(value)
        elif kind is float:
            value_bytes = b"\x21" + _D(value)
        else:
            value_bytes = _any_value(value)
        body = encoded_key + _field(b"\x12", value_bytes)
        size = len(body)
        parts.append(tag)
        parts.append(small[size] if size < 16384 else _varint(size))
        parts.append(body)
    return b"".join(parts)


def _u32(tag: bytes, count: int) -> bytes:
    if not count:
        return b""
    if count < 0 or count > _MAX_UINT32:
        raise Unsupported("count out of range")
    return tag + _varint(count)


def _fixed64(tag: bytes, value: int | None) -> bytes:
    if not value:
        return b""
    if value < 0 or value > 2**64 - 1:
        raise Unsupported("timestamp out of range")
    return tag + _Q(value)


def _trace_state(state: Any) -> bytes:
    if state is None or not len(state):
        return b""
    text = ",".join([f"{key}={value}" for key, value in state.items()])
    return _field(b"\x1a", _text(text)) if text else b""


def _ids(trace_id: int, span_id: int) -> bytes:
    return (
        b"\x0a\x10"
        + trace_id.to_bytes(16, "big", signed=False)
        + b"\x12\x08"
        + span_id.to_bytes(8, "big", signed=False)
    )


def _events(events: Sequence[Event]) -> bytes:
    parts = []
    for event in events:
        name = event.name
        body = (
            _fixed64(b"\x09", event.timestamp)
            + (_field(b"\x12", _text(name)) if name else b"")
            + _attributes(b"\x1a", event.attributes)
            + _u32(b"\x20", event.dropped_attributes)
        )
        parts.append(_field(b"\x5a", body))
    return b"".join(parts)


def _links(links: Sequence[trace_api.Link]) -> bytes:
    parts = []
    for link in links:
        context = link.context
        body = (
            _ids(context.trace_id, context.span_id)
            + _attributes(b"\x22", link.attributes)
            + _u32(b"\x28", link.dropped_attributes)
            + (_LINK_REMOTE_FLAGS if context.is_remote else _LINK_LOCAL_FLAGS)
        )
        parts.append(_field(b"\x6a", body))
    return b"".join(parts)


def _status(status: Any) -> bytes:
    if status is None:
        return b""
    code = status.status_code.value
    description = status.description
    if not code and not description:
        return _UNSET_STATUS
    body = (_field(b"\x12", _text(description)) if description else b"") + (
        b"\x18" + _varint(code) if code else b""
    )
    return _field(b"\x7a", body)


# Span classes whose containers are read directly (their properties copy them).
_OWN: Final = frozenset({ReadableSpan, SDKSpan, StageSpan})


def _span(span: ReadableSpan) -> bytes:
    """The body of one ``Span`` message, as the SDK's ``_encode_span`` fills it."""
    if type(span) in _OWN:  # their containers, read directly: the properties copy them
        context = span._context
        parent = span._parent
        attributes = span._attributes
        dropped = attributes.dropped if type(attributes) is BoundedAttributes else 0
        events: Sequence[Event] = span._events
        links: Sequence[trace_api.Link] = span._links
        dropped_events = events.dropped if type(events) is BoundedList else 0
        dropped_links = links.dropped if type(links) is BoundedList else 0
        name, kind, status = span._name, span._kind, span._status
        start, end = span._start_time, span._end_time
    else:
        context = span.get_span_context()
        parent = span.parent
        attributes = span.attributes
        dropped = span.dropped_attributes
        events, links = span.events, span.links
        dropped_events, dropped_links = span.dropped_events, span.dropped_links
        name, kind, status = span.name, span.kind, span.status
        start, end = span.start_time, span.end_time
    if context is None:
        raise Unsupported("span without a context")
    parts = [
        _ids(context.trace_id, context.span_id),
        _trace_state(context.trace_state),
    ]
    if parent:
        parts.append(b"\x22\x08" + parent.span_id.to_bytes(8, "big", signed=False))
    if name:
        parts.append(_field(b"\x2a", _text(name)))
    parts.append(_KIND[kind])
    if start:
        parts.append(_fixed64(b"\x39", start))
    if end:
        parts.append(_fixed64(b"\x41", end))
    if attributes:
        parts.append(_attributes(b"\x4a", attributes))
    if dropped:
        parts.append(_u32(b"\x50", dropped))
    if events:
        parts.append(_events(events))
    if dropped_events:
        parts.append(_u32(b"\x60", dropped_events))
    if links:
        parts.append(_links(links))
    if dropped_links:
        parts.append(_u32(b"\x70", dropped_links))
    parts.append(_UNSET_STATUS if status is _UNSET else _status(status))
    parts.append(_REMOTE_FLAGS if parent is not None and parent.is_remote else _LOCAL_FLAGS)
    return b"".join(parts)


# Encoded resources and scopes, by identity (they are immutable; the objects are kept, so
# an id is never reused while it is a key).
_RESOURCES: dict[int, tuple[Resource, bytes]] = {}
_SCOPES: dict[int, tuple[InstrumentationScope | None, bytes]] = {}
_CACHE_MAX: Final = 64


def _resource_field(resource: Resource) -> bytes:
    found = _RESOURCES.get(id(resource))
    if found is None or found[0] is not resource:
        if len(_RESOURCES) >= _CACHE_MAX:
            _RESOURCES.clear()
        encoded = _field(b"\x0a", _attributes(b"\x0a", resource.attributes))
        found = _RESOURCES[id(resource)] = (resource, encoded)
    return found[1]


def _scope_field(scope: InstrumentationScope | None) -> bytes:
    found = _SCOPES.get(id(scope))
    if found is None or found[0] is not scope:
        if len(_SCOPES) >= _CACHE_MAX:
            _SCOPES.clear()
        if scope is None:
            encoded = b"\x0a\x00"
        else:
            name, version = scope.name, scope.version
            encoded = _field(
                b"\x0a",
                (_field(b"\x0a", _text(name)) if name else b"")
                + (_field(b"\x12", _text(version)) if version else b"")
                + _attributes(b"\x1a", scope.attributes),
            )
        found = _SCOPES[id(scope)] = (scope, encoded)
    return found[1]


def encode_request(spans: Sequence[ReadableSpan]) -> bytes:
    """``spans`` as a serialised ``ExportTraceServiceRequest``, exactly as the SDK's encoder.

    Spans are grouped by resource, then by instrumentation scope (equal ones together, in
    the order first seen), as ``encode_spans`` groups them.

    Raises:
        Unsupported: a span holds something only the SDK's encoder should decide about.
    """
    # [(resource, [(scope, [span bytes])])], looked up by identity first, then by equality
    # (the SDK groups by dictionary key: equal resources and scopes share a group).
    groups: list[tuple[Resource, list[tuple[InstrumentationScope | None, list[bytes]]]]] = []
    by_id: dict[tuple[int, int], list[bytes]] = {}
    for span in spans:
        resource = span.resource
        scope = span.instrumentation_scope or None
        key = (id(resource), id(scope))
        bucket = by_id.get(key)
        if bucket is None:
            bucket = _bucket(groups, resource, scope)
            by_id[key] = bucket
        bucket.append(_span(span))
    out: list[bytes] = []
    for resource, scopes in groups:
        if not isinstance(resource, Resource):
            raise Unsupported("span without an SDK resource")
        parts = [_resource_field(resource)]
        for scope, bodies in scopes:
            spans_bytes = b"".join([_field(b"\x12", body) for body in bodies])
            schema = scope.schema_url if scope else None
            parts.append(
                _field(
                    b"\x12",
                    _scope_field(scope)
                    + spans_bytes
                    + (_field(b"\x1a", _text(schema)) if schema else b""),
                )
            )
        schema_url = resource.schema_url
        if schema_url:
            parts.append(_field(b"\x1a", _text(schema_url)))
        out.append(_field(b"\x0a", b"".join(parts)))
    return b"".join(out)


def _bucket(
    groups: list[tuple[Resource, list[tuple[InstrumentationScope | None, list[bytes]]]]],
    resource: Resource,
    scope: InstrumentationScope | None,
) -> list[bytes]:
    scopes: list[tuple[InstrumentationScope | None, list[bytes]]] | None = None
    for known, known_scopes in groups:
        if known is resource or known == resource:
            scopes = known_scopes
            break
    if scopes is None:
        scopes = []
        groups.append((resource, scopes))
    for known_scope, bodies in scopes:
        if known_scope is scope or (
            known_scope is not None and scope is not None and known_scope == scope
        ):
            return bodies
    bodies = []
    scopes.append((scope, bodies))
    return bodies


# --- the exporter -----------------------------------------------------------------------------


def _dropping(attributes: dict[str, Any], dropped: int) -> BoundedAttributes:
    # Bounded attributes that lost some (set directly: dropping them logs a warning).
    bounded = BoundedAttributes(None, attributes, immutable=True)
    bounded.dropped = dropped
    return bounded


def sample_spans() -> list[ReadableSpan]:
    """Spans covering every field and value type the encoder writes (its self-check)."""
    from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceState

    resource = Resource.create({"service.name": "check", "n": 3}, "https://schema/1")
    other = Resource({"service.name": "other"})
    scope = InstrumentationScope("check", "1.0", "https://schema/s", {"a": "b", "k": 2})
    bare = InstrumentationScope("bare")
    remote = SpanContext(7, 9, is_remote=True, trace_state=TraceState([("v", "1"), ("w", "x")]))
    local = SpanContext(2**128 - 1, 2**64 - 1, is_remote=False)
    values: dict[str, Any] = {
        "s": "text é",
        "empty": "",
        "t": True,
        "f": False,
        "i": -(2**63),
        "big": 2**63 - 1,
        "zero": 0,
        "x": 1.5,
        "nan": float("nan"),
        "b": b"\x00\xff",
        "none": None,
        "list": ["a", "b"],
        "ints": (1, -2, 3),
        "mixed": [1, "a", None, 2.5, True],
        "nested": {"k": 1, "l": [1, 2], "d": {"z": None}},
        "": "no key",
        "long": "y" * 300,
    }
    few_events: BoundedList[Event] = BoundedList(1)
    few_events.extend([Event("kept", {"k": "v"}, timestamp=7), Event("dropped", timestamp=8)])
    few_links: BoundedList[Link] = BoundedList(1)
    few_links.extend([Link(local), Link(remote, {"x": 1})])
    return [
        ReadableSpan(
            name="dropped events and links",
            context=SpanContext(5, 12, is_remote=False),
            parent=None,
            resource=resource,
            attributes=_dropping({"a": "b", "c": "d"}, 1),
            events=few_events,
            links=few_links,
            start_time=9,
            end_time=10,
            instrumentation_scope=scope,
        ),
        ReadableSpan(
            name="all fields",
            context=SpanContext(5, 6, is_remote=False, trace_state=TraceState([("a", "b")])),
            parent=remote,
            resource=resource,
            attributes=values,
            events=(
                Event("first", {"e": 1, "s": "v"}, timestamp=1_700_000_000_000_000_000),
                Event("", None, timestamp=5),
                Event("bounded", _dropping({"a": 1, "b": 2}, 2), timestamp=6),
            ),
            links=(Link(local, {"l": "v"}), Link(remote)),
            kind=SpanKind.SERVER,
            status=Status(StatusCode.ERROR, "broke é"),
            start_time=1_700_000_000_000_000_000,
            end_time=1_700_000_000_500_000_000,
            instrumentation_scope=scope,
        ),
        ReadableSpan(
            name="",
            context=local,
            parent=None,
            resource=resource,
            attributes=_dropping({"a": 1, "b": "c", "d": 3}, 3),
            kind=SpanKind.CLIENT,
            status=Status(StatusCode.OK),
            start_time=0,
            end_time=None,
            instrumentation_scope=None,
        ),
        ReadableSpan(
            name="child",
            context=SpanContext(5, 8, is_remote=False),
            parent=local,
            resource=other,
            attributes={},
            kind=SpanKind.PRODUCER,
            status=Status(StatusCode.UNSET, None),
            start_time=1,
            end_time=2,
            instrumentation_scope=bare,
        ),
        ReadableSpan(
            name="same scope again",
            context=SpanContext(5, 10, is_remote=False),
            parent=local,
            resource=Resource.create({"service.name": "check", "n": 3}, "https://schema/1"),
            attributes={"s": "text é"},
            kind=SpanKind.CONSUMER,
            start_time=3,
            end_time=4,
            instrumentation_scope=InstrumentationScope(
                "check", "1.0", "https://schema/s", {"a": "b", "k": 2}
            ),
        ),
        ReadableSpan(
            name="internal",
            context=SpanContext(5, 11, is_remote=False),
            parent=local,
            resource=resource,
            kind=SpanKind.INTERNAL,
            start_time=3,
            end_time=4,
            instrumentation_scope=bare,
        ),
    ]


def _sdk_bytes(spans: Sequence[ReadableSpan]) -> bytes:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    data: bytes = encode_spans(spans).SerializePartialToString()
    return data


def agrees_with_sdk() -> bool:
    """Whether this encoder writes what the installed SDK's encoder writes, byte for byte."""
    try:
        spans = sample_spans()
        return encode_request(spans) == _sdk_bytes(spans) and all(
            encode_request([span]) == _sdk_bytes([span]) for span in spans
        )
    except Exception:
        return False


_AGREES: list[bool | None] = [None]


def fast_exporter(
    make: Any,
    *,
    max_bytes: int = 0,
    split: Split | None = None,
    fit: Fit | None = None,
    **kwargs: Any,
) -> Any:
    """An OTLP/HTTP span exporter (``make``, the SDK's class) that encodes with this module.

    The SDK's exporter is returned as it is when its layout is not the one the fast path
    knows (an HTTP client taking serialised bytes, its export metrics, its size limit) or
    when the encoders disagree on the sample spans. ``max_bytes``, ``split`` and ``fit``:
    see :class:`FastOTLPSpanExporter`.
    """
    exporter = make(**kwargs)
    if _AGREES[0] is None:
        _AGREES[0] = agrees_with_sdk()
    if not _AGREES[0] or not _knows_layout(exporter):
        return exporter
    return FastOTLPSpanExporter(exporter, max_bytes, split, fit)


def _knows_layout(exporter: Any) -> bool:
    client = getattr(exporter, "_client", None)
    metrics = getattr(exporter, "_metrics", None)
    return (
        callable(getattr(client, "export", None))
        and callable(getattr(metrics, "export_operation", None))
        and isinstance(getattr(exporter, "_max_request_size", None), int)
        and isinstance(getattr(exporter, "_shutdown", None), bool)
    )


#: ``split(spans, max_bytes)``: ``spans`` in chunks of at most about ``max_bytes`` each.
Split = Callable[[Sequence[ReadableSpan], int], Iterable[Sequence[ReadableSpan]]]
#: ``fit(span, max_bytes)``: the span, or a copy of it cut to about ``max_bytes``.
Fit = Callable[[ReadableSpan, int], ReadableSpan]


class FastOTLPSpanExporter(SpanExporter):
    """Wraps the SDK's OTLP/HTTP span exporter: the same sending, the bytes made here.

    A batch this module cannot encode goes to the SDK exporter's own ``export``. With
    ``max_bytes`` and ``split``, a request whose encoding is larger than ``max_bytes`` is
    sent as several, the batch cut by ``split``: the size is measured on the bytes made
    anyway, so a batch of the usual size costs no estimate. A single span larger than
    ``max_bytes`` is cut by ``fit`` (a request that large is rejected whole).
    """

    def __init__(
        self,
        inner: Any,
        max_bytes: int = 0,
        split: Split | None = None,
        fit: Fit | None = None,
    ) -> None:
        self.inner = inner
        self.max_bytes = max_bytes
        self.split = split
        self.fit = fit
        #: Whether callers may leave cutting batches by size to :meth:`export` (it does,
        #: from the encoding, when given a limit and a way to cut).
        self.splits_by_size = max_bytes > 0 and split is not None
        #: How many spans the last :meth:`export` did not deliver (a batch cut in several
        #: requests may lose some of them only): what its caller counts as dropped.
        self.failed = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Encode ``spans`` and send them with the wrapped exporter's HTTP client."""
        self.failed = 0
        return self._export(spans)

    def _export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        inner = self.inner
        if inner._shutdown:
            return self._counted(spans, inner.export(spans))  # it warns and fails
        try:
            data = encode_request(spans)
        except Exception:
            return self._counted(spans, inner.export(spans))
        split = self.split
        fit = self.fit
        if fit is not None and len(spans) == 1 and 0 < self.max_bytes < len(data):
            # One span bigger than any request may be: cut to fit, or it is lost whole.
            slim = fit(spans[0], self.max_bytes)
            if slim is not spans[0]:
                try:
                    spans, data = [slim], encode_request([slim])
                except Exception:
                    return self._counted(spans, inner.export([slim]))
        if split is not None and 0 < self.max_bytes < len(data) and len(spans) > 1:
            outcome = SpanExportResult.SUCCESS
            for chunk in split(spans, self.max_bytes):
                if len(chunk) == len(spans):  # the estimate keeps them together: as they are
                    return self._counted(spans, self._send(spans, data))
                if self._export(chunk) is not SpanExportResult.SUCCESS:
                    outcome = SpanExportResult.FAILURE
            return outcome
        return self._counted(spans, self._send(spans, data))

    def _counted(self, spans: Sequence[ReadableSpan], result: Any) -> SpanExportResult:
        if result is not SpanExportResult.SUCCESS:
            self.failed += len(spans)
        return result  # type: ignore[no-any-return]

    def _send(self, spans: Sequence[ReadableSpan], data: bytes) -> SpanExportResult:
        inner = self.inner
        if 0 < inner._max_request_size < len(data):
            return inner.export(spans)  # type: ignore[no-any-return]  # it drops it, saying why
        with inner._metrics.export_operation(len(spans)) as result:
            outcome = inner._client.export(data)
            if not outcome.success:
                result.error = outcome.error
                status = getattr(outcome, "status_code", None)
                result.error_attrs = (
                    {"http.response.status_code": status} if status is not None else None
                )
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Shut the wrapped exporter down."""
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Flush the wrapped exporter."""
        return bool(self.inner.force_flush(timeout_millis))
