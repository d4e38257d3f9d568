"""Self-check of the test OTLP receiver against the real OTLP/HTTP exporters of the SDK."""

from __future__ import annotations

import gzip
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import cast

import pytest
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import StatusCode

from support.otlp_receiver import OTLPReceiver


@pytest.fixture
def receiver() -> Iterator[OTLPReceiver]:
    with OTLPReceiver() as rcv:
        yield rcv


def _provider(exporter: OTLPSpanExporter) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": "otlp-receiver-test"}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


@pytest.mark.parametrize("compression", [Compression.NoCompression, Compression.Gzip])
def test_receives_spans_from_batch_span_processor(
    receiver: OTLPReceiver, compression: Compression
) -> None:
    assert receiver.endpoint.startswith("http://127.0.0.1:")
    assert receiver.traces_endpoint == receiver.endpoint + "/v1/traces"
    provider = _provider(
        OTLPSpanExporter(endpoint=receiver.traces_endpoint, compression=compression)
    )
    tracer = provider.get_tracer("receiver-check")
    try:
        with tracer.start_as_current_span("parent", attributes={"rag.k": 3}) as parent:
            with tracer.start_as_current_span(
                "child", attributes={"db.system": "postgresql", "flags": [True, False]}
            ) as child:
                child.set_status(StatusCode.ERROR, "boom")
                child.add_event("retry")
        assert provider.force_flush()
    finally:
        provider.shutdown()

    assert receiver.wait_for_spans(2)
    assert sorted(receiver.span_names()) == ["child", "parent"]
    spans = {s["name"]: s for s in receiver.spans()}
    parent_ctx = parent.get_span_context()
    assert spans["parent"]["trace_id"] == f"{parent_ctx.trace_id:032x}"
    assert spans["parent"]["span_id"] == f"{parent_ctx.span_id:016x}"
    assert spans["parent"]["parent_span_id"] is None
    assert spans["child"]["trace_id"] == spans["parent"]["trace_id"]
    assert spans["child"]["parent_span_id"] == spans["parent"]["span_id"]
    assert spans["parent"]["attributes"] == {"rag.k": 3}
    assert spans["child"]["attributes"] == {"db.system": "postgresql", "flags": [True, False]}
    assert spans["child"]["status_code"] == 2  # STATUS_CODE_ERROR
    assert spans["child"]["status_message"] == "boom"
    assert spans["child"]["events"] == ["retry"]
    assert spans["parent"]["status_code"] == 0  # STATUS_CODE_UNSET
    assert spans["child"]["service_name"] == "otlp-receiver-test"
    assert spans["child"]["resource"]["service.name"] == "otlp-receiver-test"
    assert spans["child"]["scope_name"] == "receiver-check"
    assert receiver.requests
    assert all(code == 200 for _, code in receiver.requests)


def test_receives_metrics(receiver: OTLPReceiver) -> None:
    reader = PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=receiver.metrics_endpoint),
        export_interval_millis=60_000,
    )
    provider = MeterProvider(metric_readers=[reader])
    try:
        counter = provider.get_meter("receiver-check").create_counter("rag.requests")
        counter.add(2)
        provider.force_flush()
    finally:
        provider.shutdown()
    assert receiver.wait_for_metrics({"rag.requests"})
    assert "rag.requests" in receiver.metric_names()


def _export_once(receiver: OTLPReceiver, batch: list[ReadableSpan]) -> SpanExportResult:
    # Typed as the SDK base class: OTLPSpanExporter.shutdown itself carries no annotations.
    exporter: SpanExporter = OTLPSpanExporter(endpoint=receiver.traces_endpoint, timeout=1)
    try:
        return exporter.export(batch)
    finally:
        exporter.shutdown()


def test_status_code_knob_refuses_exports(receiver: OTLPReceiver) -> None:
    provider = TracerProvider()
    with provider.get_tracer("t").start_as_current_span("lost") as span:
        pass
    batch = [cast(ReadableSpan, span)]

    receiver.status_code = 400  # not retryable: one request, immediate failure
    assert _export_once(receiver, batch) is SpanExportResult.FAILURE
    assert receiver.requests == [("/v1/traces", 400)]

    receiver.status_code = 503  # retryable: the exporter retries until its 1 s timeout
    assert _export_once(receiver, batch) is SpanExportResult.FAILURE
    assert ("/v1/traces", 503) in receiver.requests
    assert receiver.spans() == []

    receiver.status_code = 200
    assert _export_once(receiver, batch) is SpanExportResult.SUCCESS
    assert receiver.span_names() == ["lost"]


def test_rejects_wrong_path_and_content_type(receiver: OTLPReceiver) -> None:
    def post(path: str, content_type: str, body: bytes = b"") -> int:
        req = urllib.request.Request(
            receiver.endpoint + path,
            data=body,
            headers={"Content-Type": content_type},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    assert post("/v1/logs", "application/x-protobuf") == 404
    assert post("/v1/traces", "application/json", b"{}") == 415
    assert post("/v1/traces", "application/x-protobuf", b"\xff\xff") == 400
    # An empty (valid) gzip-compressed export request is accepted.
    req = urllib.request.Request(
        receiver.traces_endpoint,
        data=gzip.compress(b""),
        headers={"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200
    assert receiver.spans() == []
