"""A local OTLP/HTTP receiver for the load benchmarks, in a process of its own.

A collector runs beside the service, not inside the process that measures it: this one
is a child process that parses each export (``ExportTraceServiceRequest`` or
``ExportMetricsServiceRequest``, protobuf, as a collector would), counts the spans and
answers ``200``. It keeps nothing else, so its memory stays flat over a long run.
``GET /count`` returns the number of spans received so far.

Before, ``run.py`` ran the tests' ``OTLPReceiver`` in the load generator's own process:
decoding every span into Python values there took the interpreter lock from the client's
event loop while the instrumented server was being driven, so part of what the
instrumented row's latency showed was the measuring, not the instrumentation.

    with ChildSink() as sink:
        ... RAG_INSTRUMENT_OTLP_ENDPOINT=sink.endpoint ...
        sink.span_count()
"""

from __future__ import annotations

import subprocess
import sys
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def serve() -> None:
    """The child: listen on 127.0.0.1 (a free port), print the endpoint, serve until EOF."""
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
        ExportMetricsServiceRequest,
        ExportMetricsServiceResponse,
    )
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
        ExportTraceServiceResponse,
    )

    lock = threading.Lock()
    spans = [0]
    trace_ok = ExportTraceServiceResponse().SerializeToString()
    metrics_ok = ExportMetricsServiceResponse().SerializeToString()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _reply(self, status: int, body: bytes, kind: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            with lock:
                count = spans[0]
            self._reply(200, str(count).encode(), "text/plain")

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.path.endswith("/v1/traces"):
                request = ExportTraceServiceRequest.FromString(body)
                found = sum(
                    len(scope.spans)
                    for resource in request.resource_spans
                    for scope in resource.scope_spans
                )
                with lock:
                    spans[0] += found
                self._reply(200, trace_ok, "application/x-protobuf")
            elif self.path.endswith("/v1/metrics"):
                ExportMetricsServiceRequest.FromString(body)
                self._reply(200, metrics_ok, "application/x-protobuf")
            else:
                self._reply(404, b"", "text/plain")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"http://127.0.0.1:{server.server_address[1]}", flush=True)
    sys.stdin.read()  # the parent closes stdin to stop us
    server.shutdown()


class ChildSink:
    """:func:`serve` in a child process; ``endpoint`` is its base URL."""

    endpoint: str

    def __enter__(self) -> ChildSink:
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        self.endpoint = self.process.stdout.readline().strip()
        if not self.endpoint:
            self.process.kill()
            raise RuntimeError("the OTLP sink did not start")
        return self

    def span_count(self) -> int:
        with urllib.request.urlopen(self.endpoint + "/count", timeout=10) as response:
            return int(response.read())

    def __exit__(self, *exc: object) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


if __name__ == "__main__":
    serve()
