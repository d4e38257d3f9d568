"""rag_instrument's OTLP span encoder writes exactly what the SDK's encoder writes.

Every comparison is made twice: the bytes, and the messages decoded with
``opentelemetry-proto`` (so that a difference names the field). Spans come from the
encoder's own sample (every field and value type), from real pipelines (stage spans,
statement spans, the request middleware's span, SDK spans with events, links and an
exception) and from generated attribute values. What the encoder does not handle goes
to the SDK's encoder, so the collector receives the same thing either way.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry import trace as trace_api
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode

import rag_instrument as ri
from rag_instrument import _otlp, _runtime
from support.otlp_receiver import OTLPReceiver


def _decoded(data: bytes) -> ExportTraceServiceRequest:
    message = ExportTraceServiceRequest()
    message.ParseFromString(data)
    return message


def assert_same_encoding(spans: Sequence[ReadableSpan]) -> None:
    ours = _otlp.encode_request(spans)
    theirs = encode_spans(spans)
    assert _decoded(ours) == theirs
    assert ours == theirs.SerializePartialToString()


def test_the_sample_covers_every_field_and_encodes_as_the_sdk_does() -> None:
    spans = _otlp.sample_spans()
    decoded = _decoded(_otlp.encode_request(spans))
    fields = {
        name
        for resource in decoded.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
        for name in (d.name for d, _ in span.ListFields())
    }
    assert {
        "trace_state",
        "parent_span_id",
        "events",
        "links",
        "status",
        "flags",
        "dropped_attributes_count",
        "dropped_events_count",
        "dropped_links_count",
    } <= fields
    kinds = {
        value.WhichOneof("value")
        for resource in decoded.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
        for kv in span.attributes
        for value in [kv.value]
    }
    assert kinds >= {
        "string_value",
        "bool_value",
        "int_value",
        "double_value",
        "bytes_value",
        "array_value",
        "kvlist_value",
        None,
    }
    assert len(decoded.resource_spans) == 2  # equal resources grouped, as the SDK does
    assert_same_encoding(spans)
    for span in spans:
        assert_same_encoding([span])
    assert_same_encoding(spans[::-1])


class _Keep(SpanExporter):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS


def _fail() -> None:
    raise ValueError("bad")


def _raised() -> Exception:
    """An exception with a traceback (the exception event's stack trace is not empty)."""
    try:
        _fail()
    except ValueError as caught:
        return caught
    raise AssertionError("not raised")


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    with ri.stage("search", top_k=3):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def test_spans_of_a_real_pipeline_encode_as_the_sdk_does(sqlite_engine: Any) -> None:
    import asyncio

    import httpx
    from sqlalchemy import text

    keep = _Keep()
    ri.configure(exporter=keep, service_name="encoding")
    engine = sqlite_engine()
    ri.instrument_sqlalchemy(engine)
    with ri.stage("retrieval", query="why"), engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    tracer = trace_api.get_tracer("someone.else", "2.1")
    with tracer.start_as_current_span("theirs", links=[Link(SpanContext(1, 2, True))]) as span:
        span.add_event("seen", {"n": 1, "tags": ("a", "b")})
        span.set_attribute("ratio", 0.25)
        span.record_exception(_raised())
        span.set_status(Status(StatusCode.ERROR, "bad"))

    async def call() -> None:
        transport = httpx.ASGITransport(app=ri.RequestMiddleware(_app))
        async with httpx.AsyncClient(transport=transport, base_url="http://h") as client:
            response = await client.get(
                "/x?q=1",
                headers={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
            )
            assert response.status_code == 200

    asyncio.run(call())
    assert ri.force_flush(timeout=5.0)
    names = sorted(span.name for span in keep.spans)
    assert names == ["GET", "SELECT", "retrieval", "search", "theirs"]
    assert_same_encoding(keep.spans)


_leaf_values = (
    st.text(max_size=40)
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=True)
    | st.binary(max_size=20)
    | st.none()
)
_values = st.recursive(
    _leaf_values,
    lambda inner: st.lists(inner, max_size=4)
    | st.lists(inner, max_size=4).map(tuple)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    attributes=st.dictionaries(st.text(max_size=20), _values, max_size=8),
    event_attributes=st.dictionaries(st.text(max_size=10), _values, max_size=3),
    name=st.text(max_size=30),
    description=st.none() | st.text(max_size=20),
    times=st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
    remote=st.booleans(),
)
def test_generated_spans_encode_as_the_sdk_does(
    attributes: dict[str, Any],
    event_attributes: dict[str, Any],
    name: str,
    description: str | None,
    times: tuple[int, int],
    remote: bool,
) -> None:
    from opentelemetry.sdk.trace import Event

    parent = SpanContext(3, 4, is_remote=remote)
    span = ReadableSpan(
        name=name,
        context=SpanContext(3, 5, is_remote=False),
        parent=parent,
        resource=Resource({"service.name": name}),
        attributes=attributes,
        events=[Event(name, event_attributes, timestamp=times[0])],
        links=[Link(parent, event_attributes)],
        kind=SpanKind.CLIENT,
        status=Status(StatusCode.ERROR, description),
        start_time=times[0],
        end_time=times[1],
        instrumentation_scope=InstrumentationScope(name, None, None, event_attributes),
    )
    try:
        assert_same_encoding([span])
    except _otlp.Unsupported:
        # Only strings that are not valid UTF-8 (lone surrogates) are left to the SDK here.
        with pytest.raises(UnicodeEncodeError):
            repr((attributes, event_attributes, name, description)).encode("utf-8")


class _Color(enum.IntEnum):
    RED = 1


class _Opaque:
    pass


@pytest.mark.parametrize(
    "value",
    [2**63, -(2**63) - 1, "\ud800", bytearray(b"x"), _Color.RED, _Opaque(), [1, _Opaque()]],
    ids=["int64 over", "int64 under", "lone surrogate", "bytearray", "int enum", "object", "nested"],
)
def test_values_left_to_the_sdk_reach_the_collector_as_the_sdk_sends_them(value: Any) -> None:
    span = ReadableSpan(
        name="odd",
        context=SpanContext(3, 5, is_remote=False),
        resource=Resource({"service.name": "s"}),
        attributes={"odd": value, "fine": "yes"},
        start_time=1,
        end_time=2,
    )
    with pytest.raises(_otlp.Unsupported):
        _otlp.encode_request([span])
    with OTLPReceiver() as receiver:
        fast = _otlp.fast_exporter(OTLPSpanExporter, endpoint=receiver.traces_endpoint, timeout=5)
        assert isinstance(fast, _otlp.FastOTLPSpanExporter)
        plain = OTLPSpanExporter(endpoint=receiver.traces_endpoint, timeout=5)
        assert fast.export([span]) == plain.export([span])
        fast.shutdown()
        plain.shutdown()
        assert len(receiver.trace_requests) in (0, 2)
        if receiver.trace_requests:
            first, second = receiver.trace_requests
            assert first == second


def test_configure_otlp_sends_with_the_fast_encoder_and_the_collector_gets_every_field() -> None:
    with OTLPReceiver() as receiver:
        ri.configure(exporter="otlp", otlp_endpoint=receiver.endpoint, service_name="fast")
        pipelines = _runtime.get_runtime().pipelines
        assert pipelines is not None
        inner = pipelines.processors[0].span_exporter.inner  # type: ignore[attr-defined]
        assert isinstance(inner, _otlp.FastOTLPSpanExporter)
        with ri.stage("search", query="q"):
            trace_api.get_current_span().add_event("note", {"k": "v"})
        assert ri.force_flush(timeout=5.0)
        assert receiver.wait_for_spans(1)
        (span,) = receiver.spans()
        assert span["name"] == "search"
        assert span["service_name"] == "fast"
        assert span["attributes"]["rag.stage"] == "search"
        assert span["events"] == ["note"]
        assert ri.shutdown(timeout=5.0)


def test_an_sdk_that_encodes_differently_keeps_its_own_encoder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_otlp, "_AGREES", [None])
    monkeypatch.setattr(_otlp, "agrees_with_sdk", lambda: False)
    exporter = _otlp.fast_exporter(OTLPSpanExporter, endpoint="http://127.0.0.1:9/v1/traces")
    assert type(exporter) is OTLPSpanExporter
    exporter.shutdown()


def test_an_encoder_that_disagrees_is_noticed(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _otlp.agrees_with_sdk()
    monkeypatch.setattr(_otlp, "_LOCAL_FLAGS", b"\x85\x01\x00\x02\x00\x00")
    assert not _otlp.agrees_with_sdk()


def test_a_refused_export_fails_and_counts_as_the_sdk_path_does() -> None:
    with OTLPReceiver(status_code=400) as receiver:
        ri.configure(exporter="otlp", otlp_endpoint=receiver.endpoint)
        with ri.stage("search"):
            pass
        assert ri.force_flush(timeout=5.0) is False
        assert receiver.requests
        assert receiver.requests[0][1] == 400


def test_a_batch_over_the_size_limit_is_dropped_by_the_sdk_exporter_saying_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with OTLPReceiver() as receiver:
        inner = OTLPSpanExporter(endpoint=receiver.traces_endpoint, max_request_size=50)
        fast = _otlp.FastOTLPSpanExporter(inner)
        (span,) = [s for s in _otlp.sample_spans() if s.name == "all fields"]
        assert fast.export([span]) is SpanExportResult.FAILURE
        assert "exceeds max_request_size" in caplog.text
        assert receiver.trace_requests == []
        fast.shutdown()


def test_a_batch_too_large_for_one_request_is_sent_in_several_counting_only_the_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The size is measured on the encoding; a batch over the limit is cut, and when one of
    # its requests fails only that request's spans count as dropped.
    from rag_instrument import exporters

    spans = _otlp.sample_spans()[:3]
    with OTLPReceiver() as receiver:
        inner = OTLPSpanExporter(endpoint=receiver.traces_endpoint)
        fast = _otlp.FastOTLPSpanExporter(
            inner, max_bytes=1, split=lambda batch, _limit: [[span] for span in batch]
        )
        sent: list[int] = []
        outcomes = iter([SpanExportResult.SUCCESS, SpanExportResult.FAILURE])

        def send(batch: Sequence[ReadableSpan], data: bytes) -> SpanExportResult:
            sent.append(len(batch))
            return next(outcomes, SpanExportResult.SUCCESS)

        monkeypatch.setattr(fast, "_send", send)
        drops = exporters._Drops()
        safe = exporters.SafeSpanExporter(fast, drops)
        assert safe.export(spans) is SpanExportResult.FAILURE
        assert sent == [1, 1, 1]  # three requests of one span each
        assert fast.failed == 1
        assert drops.count == 1  # the one span of the failed request, not the batch
        assert fast.export(spans[:1]) is SpanExportResult.SUCCESS  # under the limit: as is
        assert fast.failed == 0
        fast.shutdown()
