"""A tiny in-process OTLP/HTTP (protobuf) receiver for tests.

Usage::

    with OTLPReceiver() as receiver:
        exporter = OTLPSpanExporter(endpoint=receiver.traces_endpoint)
        ...
        assert receiver.wait_for_spans(2)
        assert receiver.span_names() == ["child", "parent"]

It listens on ``127.0.0.1`` on a free port, in a daemon thread, and accepts
``POST /v1/traces`` and ``POST /v1/metrics`` with
``Content-Type: application/x-protobuf`` (optionally ``Content-Encoding: gzip``
or ``deflate``). Set :attr:`OTLPReceiver.status_code` to e.g. ``503`` to make it
refuse exports; refused requests are counted but their payloads are not stored.
"""

from __future__ import annotations

import gzip
import threading
import zlib
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import TypeAlias, TypedDict, cast

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

__all__ = ["AttributeValue", "OTLPReceiver", "ReceivedSpan"]

TRACES_PATH = "/v1/traces"
METRICS_PATH = "/v1/metrics"
PROTOBUF_CONTENT_TYPE = "application/x-protobuf"

AttributeValue: TypeAlias = (
    "str | bool | int | float | bytes | list[AttributeValue] | dict[str, AttributeValue] | None"
)


class ReceivedSpan(TypedDict):
    """One span as received, flattened into plain Python values."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str | None
    kind: int
    start_time_unix_nano: int
    end_time_unix_nano: int
    attributes: dict[str, AttributeValue]
    resource: dict[str, AttributeValue]
    service_name: str | None
    scope_name: str
    status_code: int
    status_message: str
    events: list[str]


def _any_value(value: AnyValue) -> AttributeValue:
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "int_value":
        return value.int_value
    if kind == "double_value":
        return value.double_value
    if kind == "bytes_value":
        return value.bytes_value
    if kind == "array_value":
        return [_any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return None


def _attributes(pairs: Iterable[KeyValue]) -> dict[str, AttributeValue]:
    return {kv.key: _any_value(kv.value) for kv in pairs}


def _decode_body(body: bytes, encoding: str) -> bytes:
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    raise ValueError(f"unsupported Content-Encoding: {encoding}")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, receiver: OTLPReceiver) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.receiver = receiver

    def handle_error(self, request: object, client_address: object) -> None:
        # Stay quiet: a client dropping its connection is not a test failure.
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _reply(self, code: int, body: bytes = b"", content_type: str = "text/plain") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is not None:
            return self.rfile.read(int(length))
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip(), 16)
                if size == 0:
                    # Skip trailers up to the blank line.
                    while self.rfile.readline().strip():
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return b""

    def do_POST(self) -> None:
        receiver = cast(_Server, self.server).receiver
        path = self.path.split("?", 1)[0]
        try:
            body = self._read_body()
        except (ValueError, OSError):
            self._reply(400, b"bad request body")
            return
        if path not in (TRACES_PATH, METRICS_PATH):
            self._reply(404, b"not found")
            return
        content_type = self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if content_type != PROTOBUF_CONTENT_TYPE:
            self._reply(415, b"only application/x-protobuf is supported")
            return
        status = receiver.status_code
        receiver._count_request(path, status)
        if not 200 <= status < 300:
            self._reply(status, b"refused by test receiver")
            return
        try:
            payload = _decode_body(body, self.headers.get("Content-Encoding", ""))
            if path == TRACES_PATH:
                traces = ExportTraceServiceRequest()
                traces.ParseFromString(payload)
                receiver._store_traces(traces)
                answer = ExportTraceServiceResponse().SerializeToString()
            else:
                metrics = ExportMetricsServiceRequest()
                metrics.ParseFromString(payload)
                receiver._store_metrics(metrics)
                answer = ExportMetricsServiceResponse().SerializeToString()
        except Exception as exc:  # bad compression or protobuf (google.protobuf DecodeError)
            self._reply(400, f"cannot decode body: {exc}".encode())
            return
        self._reply(status, answer, PROTOBUF_CONTENT_TYPE)


class OTLPReceiver:
    """OTLP/HTTP protobuf receiver on 127.0.0.1 (free port), usable as a context manager."""

    def __init__(self, status_code: int = 200) -> None:
        #: HTTP status answered to every well-formed export; anything but 2xx refuses it.
        self.status_code = status_code
        self.trace_requests: list[ExportTraceServiceRequest] = []
        self.metrics_requests: list[ExportMetricsServiceRequest] = []
        #: (path, status answered) of every well-formed export request, in order.
        self.requests: list[tuple[str, int]] = []
        self._cond = threading.Condition()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> OTLPReceiver:
        if self._server is None:
            self._server = _Server(self)
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"otlp-receiver-{self.port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server, self._thread = None, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5.0)

    def __enter__(self) -> OTLPReceiver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- addresses -----------------------------------------------------------
    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("OTLPReceiver is not running")
        return int(self._server.server_address[1])

    @property
    def endpoint(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:PORT`` (for OTEL_EXPORTER_OTLP_ENDPOINT)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def traces_endpoint(self) -> str:
        return self.endpoint + TRACES_PATH

    @property
    def metrics_endpoint(self) -> str:
        return self.endpoint + METRICS_PATH

    # -- recording (called from handler threads) -----------------------------
    def _count_request(self, path: str, status: int) -> None:
        with self._cond:
            self.requests.append((path, status))
            self._cond.notify_all()

    def _store_traces(self, request: ExportTraceServiceRequest) -> None:
        with self._cond:
            self.trace_requests.append(request)
            self._cond.notify_all()

    def _store_metrics(self, request: ExportMetricsServiceRequest) -> None:
        with self._cond:
            self.metrics_requests.append(request)
            self._cond.notify_all()

    # -- queries -------------------------------------------------------------
    def clear(self) -> None:
        with self._cond:
            self.trace_requests.clear()
            self.metrics_requests.clear()
            self.requests.clear()

    def spans(self) -> list[ReceivedSpan]:
        with self._cond:
            requests = list(self.trace_requests)
        out: list[ReceivedSpan] = []
        for request in requests:
            for resource_spans in request.resource_spans:
                resource = _attributes(resource_spans.resource.attributes)
                service = resource.get("service.name")
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        out.append(
                            ReceivedSpan(
                                name=span.name,
                                trace_id=span.trace_id.hex(),
                                span_id=span.span_id.hex(),
                                parent_span_id=span.parent_span_id.hex() or None,
                                kind=int(span.kind),
                                start_time_unix_nano=span.start_time_unix_nano,
                                end_time_unix_nano=span.end_time_unix_nano,
                                attributes=_attributes(span.attributes),
                                resource=resource,
                                service_name=service if isinstance(service, str) else None,
                                scope_name=scope_spans.scope.name,
                                status_code=int(span.status.code),
                                status_message=span.status.message,
                                events=[event.name for event in span.events],
                            )
                        )
        return out

    def span_names(self) -> list[str]:
        return [span["name"] for span in self.spans()]

    def span_count(self) -> int:
        with self._cond:
            return self._span_count_locked()

    def _span_count_locked(self) -> int:
        return sum(
            len(scope_spans.spans)
            for request in self.trace_requests
            for resource_spans in request.resource_spans
            for scope_spans in resource_spans.scope_spans
        )

    def metric_names(self) -> set[str]:
        with self._cond:
            return self._metric_names_locked()

    def _metric_names_locked(self) -> set[str]:
        return {
            metric.name
            for request in self.metrics_requests
            for resource_metrics in request.resource_metrics
            for scope_metrics in resource_metrics.scope_metrics
            for metric in scope_metrics.metrics
        }

    def wait_for_spans(self, n: int, timeout: float = 5.0) -> bool:
        """Block until at least ``n`` spans were stored; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._span_count_locked() >= n, timeout)

    def wait_for_metrics(self, names: Iterable[str], timeout: float = 5.0) -> bool:
        """Block until every metric in ``names`` was received; False on timeout."""
        wanted = set(names)
        with self._cond:
            return self._cond.wait_for(lambda: wanted <= self._metric_names_locked(), timeout)

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> bool:
        """Block until at least ``n`` export requests arrived (accepted or refused)."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self.requests) >= n, timeout)
