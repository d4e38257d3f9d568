"""configure(), shutdown() and the exporters against bad settings and unfriendly collectors.

Regression tests for issue 11, items 12 to 15, 17, 19 and 20.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

import rag_instrument as ri
from rag_instrument._settings import build_settings
from support.otlp_receiver import OTLPReceiver


class Collector:
    """An OTLP/HTTP endpoint answering a fixed status per path (traces-only backends)."""

    def __init__(self, statuses: dict[str, int]) -> None:
        self.statuses = statuses
        self.hits: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                outer.hits.append(self.path)
                status = outer.statuses.get(self.path, 200)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> Collector:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RAG_INSTRUMENT_", "OTEL_"))}
    clean.update(env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean,
        check=False,
    )


# --- 17: invalid settings rejected at configure() ----------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "env", "culprit"),
    [
        ({"otlp_endpoint": "http://"}, {}, "otlp_endpoint"),
        ({"otlp_endpoint": "https://:4318"}, {}, "otlp_endpoint"),
        ({"otlp_endpoint": "http://collector:notaport"}, {}, "otlp_endpoint"),
        ({"otlp_endpoint": "http://collector:99999"}, {}, "otlp_endpoint"),
        ({"budgets": {None: 5}}, {}, "budgets"),
        ({"budgets": {3: 5}}, {}, "budgets"),
        ({}, {"RAG_INSTRUMENT_SHUTDOWN_TIMEOUT": "soon"}, "shutdown_timeout"),
        ({}, {"RAG_INSTRUMENT_SHUTDOWN_TIMEOUT": "-1"}, "shutdown_timeout"),
        ({}, {"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
        ({}, {"OTEL_METRICS_EXPORTER": "prometheus"}, "OTEL_METRICS_EXPORTER"),
        ({}, {"OTEL_LOGS_EXPORTER": "otlp,console"}, "OTEL_LOGS_EXPORTER"),
        ({"metrics_exporter": "statsd"}, {}, "metrics_exporter"),
    ],
)
def test_bad_settings_fail_at_configure(
    kwargs: dict[str, Any], env: dict[str, str], culprit: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=culprit):
        ri.configure(**kwargs)


def test_a_good_endpoint_and_shutdown_timeout_are_accepted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RAG_INSTRUMENT_SHUTDOWN_TIMEOUT", "1.5")
    settings = ri.configure(otlp_endpoint=" https://collector.example:4318 ")
    assert settings.otlp_endpoint == "https://collector.example:4318"
    assert settings.shutdown_timeout == 1.5


# --- 20: OTEL_*_EXPORTER ----------------------------------------------------------------------


def test_otel_exporter_variables_are_honoured(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    monkeypatch.setenv("OTEL_LOGS_EXPORTER", "none")
    log = tmp_path / "rag.jsonl"
    settings = ri.configure(log_file=str(log))
    assert settings.exporter == "console"
    assert settings.metrics_exporter == "none"
    assert settings.logs_exporter == "none"
    ri.get_logger().warning("not written")
    ri.shutdown()
    assert log.read_text() == ""
    monkeypatch.setenv("RAG_INSTRUMENT_EXPORTER", "memory")  # ours wins over OTEL_*
    assert ri.configure().exporter == "memory"


def test_otel_logs_exporter_otlp_keeps_the_lines(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The specification's default, which operators and distros set: it failed configure(),
    # so the service did not start.
    monkeypatch.setenv("OTEL_LOGS_EXPORTER", "otlp")
    log = tmp_path / "rag.jsonl"
    assert ri.configure(log_file=str(log)).logs_exporter == "console"
    ri.get_logger().warning("written")
    ri.shutdown()
    assert "written" in log.read_text()


@pytest.mark.parametrize(
    "variable",
    [
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
    ],
)
def test_an_otlp_protocol_other_than_http_protobuf_fails_configure(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    # grpc was ignored: spans went over HTTP to a gRPC port, and nothing said why.
    monkeypatch.setenv(variable, "grpc")
    with pytest.raises(ValueError, match=variable):
        ri.configure(exporter="otlp")
    assert ri.configure(exporter="none", metrics_exporter="none").exporter == "none"
    monkeypatch.setenv(variable, "http/protobuf")
    assert ri.configure(exporter="otlp").exporter == "otlp"
    ri.shutdown(0.1)


# --- 15: traces-only backends -------------------------------------------------------------------


def test_a_collector_refusing_metrics_is_said_once_and_skipped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    with Collector({"/v1/metrics": 405}) as collector, caplog.at_level(logging.WARNING):
        ri.configure(exporter="otlp", otlp_endpoint=collector.endpoint)
        for _ in range(3):
            with ri.stage("retrieval"):
                pass
            ri.force_flush(timeout=10.0)
        ri.shutdown(timeout=10.0)
        metric_posts = [hit for hit in collector.hits if hit == "/v1/metrics"]
        trace_posts = [hit for hit in collector.hits if hit == "/v1/traces"]
    assert len(metric_posts) == 1  # asked once; not every 30 s for the life of the process
    assert trace_posts
    lines = [r.getMessage() for r in caplog.records if "metrics" in r.getMessage().lower()]
    assert len(lines) == 1, lines
    assert "does not accept metrics (HTTP 405)" in lines[0]
    assert "metrics_exporter='none'" in lines[0]


def test_metrics_exporter_none_sends_no_metrics() -> None:
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    with Collector({}) as collector:
        ri.configure(exporter="otlp", metrics_exporter="none", otlp_endpoint=collector.endpoint)
        with ri.stage("retrieval"):
            pass
        assert ri.shutdown(timeout=10.0) is True
        assert "/v1/metrics" not in collector.hits
        assert "/v1/traces" in collector.hits


# --- 14: shutdown() means "everything was exported" ------------------------------------------------


class Failing(SpanExporter):
    def export(self, spans: Any) -> SpanExportResult:
        return SpanExportResult.FAILURE


class Fine(SpanExporter):
    def export(self, spans: Any) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def test_shutdown_is_false_when_spans_were_lost() -> None:
    ri.configure(exporter=Failing())
    with ri.stage("retrieval"):
        pass
    assert ri.shutdown(timeout=5.0) is False  # finished in time, but nothing was exported
    ri.configure(exporter=Fine())
    with ri.stage("retrieval"):
        pass
    assert ri.shutdown(timeout=5.0) is True


# --- 13: export requests capped by size ------------------------------------------------------------


def test_export_requests_stay_under_four_mebibytes() -> None:
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    prompt = "retrieved passage " * 250  # 4,500 characters, as captured content can be
    with OTLPReceiver() as receiver:
        ri.configure(
            exporter="otlp",
            metrics_exporter="none",
            otlp_endpoint=receiver.endpoint,
            capture_content=True,
            max_content_chars=4_500,
        )
        for _ in range(2_000):
            with ri.stage("generation", prompt=prompt):
                pass
        assert ri.shutdown(timeout=30.0) is True
        assert receiver.wait_for_spans(2_000, timeout=30.0)
        sizes = [request.ByteSize() for request in receiver.trace_requests]
    assert max(sizes) < 4 * 1024 * 1024, sizes
    assert len(sizes) >= 3  # 9 MB of spans went out in several requests


def test_one_span_too_big_for_any_request_is_cut_to_fit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A dozen attributes of 200 retrieved chunks each: one span of 4.8 MB, alone in a
    # request a collector rejects whole (the span lost with it).
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    chunks = {f"chunks{i}": [f"{i}-{n}-" + "x" * 2000 for n in range(200)] for i in range(12)}
    with OTLPReceiver() as receiver:
        ri.configure(exporter="otlp", metrics_exporter="none", otlp_endpoint=receiver.endpoint)
        with caplog.at_level(logging.WARNING, logger="rag_instrument"):
            with ri.stage("retrieval", **chunks):
                pass
            assert ri.shutdown(timeout=30.0) is True
        assert receiver.wait_for_spans(1, timeout=30.0)
        sizes = [request.ByteSize() for request in receiver.trace_requests]
    assert max(sizes) < 4 * 1024 * 1024, sizes
    assert any("too big to export" in r.getMessage() for r in caplog.records)


# --- 20: export errors at a worker's exit go to the log ------------------------------------------


def test_export_errors_at_exit_go_to_the_log_not_raw_stderr(tmp_path: Path) -> None:
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    log = tmp_path / "worker.jsonl"
    with Collector({"/v1/traces": 400, "/v1/metrics": 400}) as collector:
        result = _run(
            f"""
            import rag_instrument as ri
            ri.configure(exporter="otlp", otlp_endpoint="{collector.endpoint}",
                         log_file={str(log)!r})
            with ri.stage("last-task"):
                pass
            # the worker simply exits: the flush runs at exit
            """,
            # A wide bound for the exit flush (a cold first export on a loaded machine).
            RAG_INSTRUMENT_SHUTDOWN_TIMEOUT="20",
        )
    assert result.returncode == 0, result.stderr
    assert "Failed to export" not in result.stderr
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert any("Failed to export" in str(line.get("event")) for line in lines), lines


def test_an_unreachable_collector_at_exit_writes_nothing_raw() -> None:
    # The metric exporter's thread, still retrying when the exit flush gave up, said
    # "Shutdown in progress, aborting retry." after the bridge to the log was gone.
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for _ in range(3):
        result = _run(
            f"""
            import rag_instrument as ri
            ri.configure(exporter="otlp", otlp_endpoint="http://127.0.0.1:{port}")
            """,
        )
        assert result.returncode == 0, result.stderr
        raw = [line for line in result.stderr.splitlines() if not line.startswith("{")]
        assert raw == [], result.stderr


# --- 19: the application's logging levels ----------------------------------------------------------


@pytest.fixture
def root_at_warning() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    saved_level, saved_handlers = root.level, list(root.handlers)
    root.setLevel(logging.WARNING)
    for handler in saved_handlers:
        root.removeHandler(handler)
    try:
        yield root
    finally:
        ri.shutdown()
        for handler in saved_handlers:
            root.addHandler(handler)
        root.setLevel(saved_level)


def test_configure_never_lowers_the_root_logger_by_itself(tmp_path: Path) -> None:
    # A fresh process, as a service starts: root at WARNING, no handlers anywhere.
    log = tmp_path / "rag.jsonl"
    result = _run(
        f"""
        import logging
        import rag_instrument as ri
        ri.configure(log_file={str(log)!r}, log_level="info")
        assert logging.getLogger().level == logging.WARNING, logging.getLogger().level
        logging.getLogger("httpx").info("HTTP Request: GET https://api/x 200 OK")
        logging.getLogger("app").warning("app warning")
        app = logging.getLogger("app.verbose")
        app.setLevel(logging.INFO)  # the application's own choice of level counts
        app.info("app info")
        ri.shutdown()
        """
    )
    assert result.returncode == 0, result.stderr
    events = [json.loads(line)["event"] for line in log.read_text().splitlines()]
    assert events == ["app warning", "app info"]


def test_capture_logging_level_bridges_more_and_is_undone(
    root_at_warning: logging.Logger, tmp_path: Path
) -> None:
    log = tmp_path / "rag.jsonl"
    ri.configure(log_file=str(log), log_level="info", capture_logging_level="info")
    assert root_at_warning.level == logging.INFO
    logging.getLogger("httpx").info("HTTP Request: GET https://api/x 200 OK")
    ri.shutdown()
    assert root_at_warning.level == logging.WARNING
    events = [json.loads(line)["event"] for line in log.read_text().splitlines()]
    assert events == ["HTTP Request: GET https://api/x 200 OK"]


# --- 12: RedisCache URLs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "localhost:6379",
        "redis://cache:notaport/0",
        "redis://cache:70000/0",
        "redis://:6379/0",
        "redis://cache:6379/zero",
        "http://cache:6379/0",
        "unix://",
        "redis://local host:6379",
        "rediss://cache:6380?ssl_cert_reqs=bogus",
        "redis://cache:6379?socket_timeout=abc",
    ],
)
def test_redis_cache_rejects_bad_urls_at_construction(url: str) -> None:
    with pytest.raises(ValueError, match="RedisCache"):
        ri.RedisCache(url)


def test_redis_cache_accepts_good_urls_and_never_echoes_the_password() -> None:
    for url in (
        "redis://127.0.0.1:6379/0",
        "rediss://u:pw@cache:6380/2",
        "unix:///tmp/r.sock",
        "redis://[::1]:6379",
        "rediss://cache.svc.cluster.local:6380?ssl_cert_reqs=required",
    ):
        ri.RedisCache(url)
    with pytest.raises(ValueError) as info:
        ri.RedisCache("redis://user:hunter22@cache:notaport/0")
    assert "hunter22" not in str(info.value)
    with pytest.raises(ValueError, match="timeout_s"):
        ri.RedisCache("redis://127.0.0.1:6379/0", timeout_s=0)


def test_printed_settings_do_not_show_the_collector_password() -> None:
    settings = ri.configure(exporter="memory", otlp_endpoint="http://user:s3cretPW99@collector:4318")
    shown = repr(settings)
    assert "s3cretPW99" not in shown
    assert "collector:4318" in shown
    assert settings.otlp_endpoint == "http://user:s3cretPW99@collector:4318"  # the value is kept


@pytest.mark.parametrize(
    "kwargs",
    [
        {"slow_query_ms": 10**400},
        {"sample_ratio": 10**400},
        {"budgets": {"retrieval": 10**400}},
        {"shutdown_timeout": -(10**400)},
    ],
)
def test_numbers_beyond_a_float_are_refused_by_name(kwargs: dict[str, Any]) -> None:
    (name,) = kwargs
    with pytest.raises(ValueError, match=name):
        ri.configure(**kwargs)


def test_a_budget_beyond_a_float_in_the_environment_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RAG_INSTRUMENT_BUDGETS", '{"retrieval": 1' + "0" * 400 + "}")
    with pytest.raises(ValueError, match="RAG_INSTRUMENT_BUDGETS"):
        ri.configure()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tracer_provider": 5},
        {"meter_provider": "provider"},
        {"metric_readers": 5},
        {"metric_readers": [object()]},
    ],
)
def test_provider_arguments_are_checked_and_keep_the_running_configuration(
    kwargs: dict[str, Any],
) -> None:
    from rag_instrument.testing import capture

    with capture() as cap:
        (name,) = kwargs
        with pytest.raises(ValueError, match=name):
            ri.configure(**kwargs)
        with ri.stage("retrieval"):
            pass
        assert cap.find_logs("retrieval completed")


# --- the OpenTelemetry SDK's precedence for endpoints and the service name ------------------------


def test_per_signal_endpoint_and_resource_service_name_as_the_sdk_reads_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    with OTLPReceiver() as receiver:
        # The base variable points nowhere: the traces' own variable must win over it.
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.endpoint + "/v1/traces")
        monkeypatch.setenv(
            "OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=prod,service.name=search%20api"
        )
        settings = ri.configure(exporter="otlp", metrics_exporter="none")
        assert settings.service_name == "search api"
        with ri.stage("retrieval"):
            pass
        assert ri.shutdown(timeout=10.0) is True
        assert receiver.wait_for_spans(1, timeout=10.0)
        (span,) = receiver.spans()
        assert span["service_name"] == "search api"


def test_endpoint_and_service_name_precedence() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://base:4318",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://metrics:4318/custom/metrics",
        "OTEL_RESOURCE_ATTRIBUTES": "service.name=from-resource",
    }
    settings = build_settings(env=env)
    assert settings.otlp_signal_endpoints == {"metrics": "http://metrics:4318/custom/metrics"}
    assert settings.service_name == "from-resource"
    # Ours, or an explicit argument, win over the standard variables.
    explicit = build_settings(env=env, otlp_endpoint="http://mine:4318", service_name="mine")
    assert explicit.otlp_signal_endpoints == {}
    assert explicit.service_name == "mine"
    ours = build_settings(env={**env, "RAG_INSTRUMENT_OTLP_ENDPOINT": "http://ours:4318"})
    assert ours.otlp_signal_endpoints == {}
    named = build_settings(env={**env, "OTEL_SERVICE_NAME": "from-variable"})
    assert named.service_name == "from-variable"
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        build_settings(env={"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "collector:4318"})


def test_a_metric_reader_passed_again_fails_configure_clearly() -> None:
    # An app factory called twice with a module-level reader: the SDK raised a bare
    # Exception ("registered already in other MeterProvider instance").
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    ri.configure(metric_readers=[reader], logs_exporter="none")
    with pytest.raises(ValueError, match="metric_readers"):
        ri.configure(metric_readers=[reader], logs_exporter="none")
    with ri.stage("retrieval"):  # the running configuration is kept, its reader too
        pass
    data = reader.get_metrics_data()
    assert data is not None
    names = {
        m.name for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
    }
    assert "rag.stage.duration" in names
    ri.configure(metric_readers=[InMemoryMetricReader()], logs_exporter="none")
    ri.shutdown()


def test_metric_readers_none_means_none_given() -> None:
    # As tracer_provider=None and meter_provider=None do; it raised ValueError.
    assert ri.configure(metric_readers=None, exporter="memory").exporter == "memory"
    ri.shutdown()


def test_the_protocol_in_force_for_each_signal_sent_is_the_one_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Per-signal variables override the general one, and a signal not sent over OTLP is
    # not checked at all.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "http/protobuf")
    assert ri.configure(exporter="otlp").exporter == "otlp"
    ri.shutdown(0.1)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL")
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        ri.configure(exporter="otlp")  # metrics go there too, by the general variable
    assert ri.configure(exporter="otlp", metrics_exporter="none").exporter == "otlp"
    ri.shutdown(0.1)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc")
    assert ri.configure(exporter="console", metrics_exporter="none").exporter == "console"
