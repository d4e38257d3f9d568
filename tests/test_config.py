"""configure(): precedence, validation, exporters, reconfiguration, shutdown bounds."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import rag_instrument as ri
from rag_instrument import _runtime
from rag_instrument._settings import build_settings
from support.otlp_receiver import OTLPReceiver


def _lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(raw) for raw in path.read_bytes().splitlines()]


def _memory_spans() -> list[Any]:
    pipelines = _runtime.get_runtime().pipelines
    assert pipelines is not None
    assert pipelines.memory_exporter is not None
    return list(pipelines.memory_exporter.get_finished_spans())


# --- precedence -----------------------------------------------------------------------------


def test_defaults() -> None:
    settings = build_settings(env={})
    assert settings.service_name == "rag-service"
    assert settings.exporter == "none"
    assert settings.log_format == "json"
    assert settings.log_level == "info"
    assert settings.enabled is True
    assert settings.capture_content is False
    assert settings.max_content_chars == 2000
    assert settings.slow_query_ms == 1000.0
    assert settings.n_plus_one_threshold == 5
    assert dict(settings.budgets) == {}
    assert settings.sample_ratio == 1.0
    assert settings.redact is True


def test_argument_beats_environment_beats_default() -> None:
    env = {
        "RAG_INSTRUMENT_SERVICE_NAME": "from-ours",
        "OTEL_SERVICE_NAME": "from-otel",
        "RAG_INSTRUMENT_SLOW_QUERY_MS": "250",
        "RAG_INSTRUMENT_BUDGETS": "retrieval=1500,search=2000",
        "RAG_INSTRUMENT_ENABLED": "false",
        "RAG_INSTRUMENT_LOG_LEVEL": "WARNING",
    }
    settings = build_settings(env=env)
    assert settings.service_name == "from-ours"
    assert settings.slow_query_ms == 250.0
    assert dict(settings.budgets) == {"retrieval": 1500.0, "search": 2000.0}
    assert settings.enabled is False
    assert settings.log_level == "warning"
    assert build_settings(env={"OTEL_SERVICE_NAME": "from-otel"}).service_name == "from-otel"
    explicit = build_settings(env=env, service_name="explicit", slow_query_ms=5, enabled=True)
    assert explicit.service_name == "explicit"
    assert explicit.slow_query_ms == 5.0
    assert explicit.enabled is True


def test_standard_otel_variables() -> None:
    settings = build_settings(
        env={
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.25",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
            "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "SPAN_ONLY",
        }
    )
    assert settings.sample_ratio == 0.25
    assert settings.otlp_endpoint == "http://collector:4318"
    assert settings.capture_content is True
    assert build_settings(env={"OTEL_TRACES_SAMPLER": "always_off"}).sample_ratio == 0.0
    assert build_settings(env={"OTEL_SDK_DISABLED": "true"}).enabled is False
    assert (
        build_settings(
            env={"OTEL_TRACES_SAMPLER": "always_off", "RAG_INSTRUMENT_SAMPLE_RATIO": "0.5"}
        ).sample_ratio
        == 0.5
    )


@pytest.mark.parametrize("value", ["jaeger_remote", "parentbased_jaeger_remote", "XRay"])
def test_a_known_but_unsupported_sampler_falls_back_with_one_warning(
    value: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The OTel SDK environment spec: warn about a value the SDK does not implement and use
    # the default sampler (parentbased_always_on) instead of failing the application.
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", value)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "endpoint=http://jaeger:14250")
    with caplog.at_level(logging.WARNING, logger="rag_instrument"):
        settings = ri.configure(exporter="memory")
    assert settings.sample_ratio == 1.0
    with ri.stage("retrieval"):
        pass
    assert [span.name for span in _memory_spans()] == ["retrieval"]  # sampled
    warnings = [r.getMessage() for r in caplog.records if "OTEL_TRACES_SAMPLER" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert f"OTEL_TRACES_SAMPLER={value!r}" in warnings[0]
    assert "parentbased_always_on" in warnings[0]


def test_an_explicit_ratio_wins_over_an_unsupported_sampler_without_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="rag_instrument"):
        settings = build_settings(
            env={"OTEL_TRACES_SAMPLER": "xray", "RAG_INSTRUMENT_SAMPLE_RATIO": "0.5"}
        )
    assert settings.sample_ratio == 0.5
    assert not [r for r in caplog.records if "OTEL_TRACES_SAMPLER" in r.getMessage()]


def test_budgets_accept_json_and_enum_keys() -> None:
    assert dict(build_settings(env={"RAG_INSTRUMENT_BUDGETS": '{"search": 2000}'}).budgets) == {
        "search": 2000.0
    }
    settings = build_settings(env={}, budgets={ri.PipelineStage.RETRIEVAL: 10})
    assert dict(settings.budgets) == {"retrieval": 10.0}


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "env", "pattern"),
    [
        (
            {"exporter": "zipkin"},
            {},
            r"exporter 'zipkin' \(from configure\(exporter=...\)\); expected one of 'none', 'console', 'otlp', 'memory'",
        ),
        (
            {},
            {"RAG_INSTRUMENT_EXPORTER": "jaeger"},
            r"exporter 'jaeger' \(from environment variable RAG_INSTRUMENT_EXPORTER\)",
        ),
        ({"exporter": object()}, {}, r"invalid exporter .*SpanExporter instance"),
        ({"slow_query_ms": -1}, {}, r"slow_query_ms -1 .*at least 0"),
        (
            {},
            {"RAG_INSTRUMENT_SLOW_QUERY_MS": "fast"},
            r"slow_query_ms 'fast' \(from environment variable RAG_INSTRUMENT_SLOW_QUERY_MS\)",
        ),
        ({"n_plus_one_threshold": 0}, {}, r"n_plus_one_threshold 0 .*an integer at least 2"),
        ({"n_plus_one_threshold": 2.5}, {}, r"n_plus_one_threshold 2.5 .*an integer"),
        ({"max_content_chars": 0}, {}, r"max_content_chars"),
        ({"max_content_chars": 10**400}, {}, r"max_content_chars"),
        ({"slow_query_ms": float("inf")}, {}, r"slow_query_ms inf"),
        ({"budgets": {"retrieval": 0}}, {}, r"budgets\['retrieval'\] 0 .*greater than 0"),
        ({"budgets": {"retrieval": -5}}, {}, r"budgets\['retrieval'\]"),
        ({"budgets": {"retrieval": "soon"}}, {}, r"budgets\['retrieval'\] 'soon'"),
        ({"budgets": {"retrieval": True}}, {}, r"budgets\['retrieval'\] True"),
        ({"budgets": [1, 2]}, {}, r"budgets .*mapping of stage name"),
        ({}, {"RAG_INSTRUMENT_BUDGETS": "retrieval"}, r"budgets 'retrieval' .*retrieval=1500"),
        ({"sample_ratio": 1.5}, {}, r"sample_ratio 1.5 .*between 0 and 1"),
        ({"sample_ratio": -0.1}, {}, r"sample_ratio"),
        ({"sample_ratio": float("nan")}, {}, r"sample_ratio nan"),
        ({}, {"OTEL_TRACES_SAMPLER": "sometimes"}, r"sampler 'sometimes' .*OTEL_TRACES_SAMPLER"),
        ({}, {"OTEL_TRACES_SAMPLER": "jaeger"}, r"sampler 'jaeger' .*OTEL_TRACES_SAMPLER"),
        (
            {},
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"},
            r"OTEL_TRACES_SAMPLER_ARG",
        ),
        ({"log_format": "xml"}, {}, r"log_format 'xml' .*'json', 'console'"),
        ({"log_level": "loud"}, {}, r"log_level 'loud'"),
        ({"enabled": "maybe"}, {}, r"enabled 'maybe' .*a boolean"),
        ({}, {"RAG_INSTRUMENT_CAPTURE_CONTENT": "perhaps"}, r"capture_content 'perhaps'"),
        (
            {"otlp_endpoint": "collector:4318"},
            {},
            r"otlp_endpoint 'collector:4318' .*http:// or https://",
        ),
        ({"service_name": "  "}, {}, r"service_name"),
    ],
)
def test_invalid_settings_name_the_culprit(
    kwargs: dict[str, Any], env: dict[str, str], pattern: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=pattern):
        ri.configure(**kwargs)


def test_log_file_folder_is_created_and_unwritable_path_rejected(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "rag.jsonl"
    ri.configure(log_file=str(target))
    with ri.stage("retrieval"):
        pass
    assert _lines(target)[0]["event"] == "retrieval completed"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match=r"invalid log_file .*file/rag.jsonl.*cannot write"):
        ri.configure(log_file=str(blocker / "rag.jsonl"))


def test_failed_configure_keeps_the_running_configuration(tmp_path: Path) -> None:
    log = tmp_path / "rag.jsonl"
    ri.configure(log_file=str(log), exporter="memory")
    with pytest.raises(ValueError, match="exporter"):
        ri.configure(exporter="bogus")
    with ri.stage("retrieval"):
        pass
    assert [line["event"] for line in _lines(log)] == ["retrieval completed"]
    assert [s.name for s in _memory_spans()] == ["retrieval"]


# --- reconfiguration ------------------------------------------------------------------------


def test_reconfigure_does_not_double_spans_or_lines(tmp_path: Path) -> None:
    log = tmp_path / "rag.jsonl"
    for _ in range(3):
        ri.configure(exporter="memory", log_file=str(log))
    with ri.stage("retrieval"):
        pass
    assert [s.name for s in _memory_spans()] == ["retrieval"]
    assert [line["event"] for line in _lines(log)] == ["retrieval completed"]
    import logging

    logging.getLogger("app").warning("one line only")
    assert [line["event"] for line in _lines(log)][-1] == "one line only"
    assert len(_lines(log)) == 2


def test_reconfigured_service_name_applies() -> None:
    ri.configure(exporter="memory", service_name="first")
    with ri.stage("a"):
        pass
    assert _memory_spans()[0].resource.attributes["service.name"] == "first"
    ri.configure(exporter="memory", service_name="second")
    with ri.stage("b"):
        pass
    assert _memory_spans()[0].resource.attributes["service.name"] == "second"


def test_sample_ratio_zero_exports_no_span_but_logs_with_ids(tmp_path: Path) -> None:
    log = tmp_path / "rag.jsonl"
    ri.configure(exporter="memory", sample_ratio=0.0, log_file=str(log))
    with ri.stage("retrieval"):
        pass
    assert _memory_spans() == []
    (line,) = _lines(log)
    assert len(line["trace_id"]) == 32
    ri.configure(exporter="memory", sample_ratio=1.0)
    with ri.stage("retrieval"):
        pass
    assert len(_memory_spans()) == 1


def test_explicit_tracer_provider_is_used_as_is() -> None:
    app_exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(app_exporter))
    ri.configure(exporter="memory", tracer_provider=provider)
    with ri.stage("retrieval"):
        pass
    ri.configure(exporter="memory", tracer_provider=provider)
    with ri.stage("generation"):
        pass
    # The application's own processor saw both; ours was added once, not twice.
    assert [s.name for s in app_exporter.get_finished_spans()] == ["retrieval", "generation"]
    assert [s.name for s in _memory_spans()] == ["generation"]


def test_an_applications_own_exporter_never_sees_a_secret_set_on_a_stage_by_hand() -> None:
    app_exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(app_exporter))
    ri.configure(exporter="memory", tracer_provider=provider)
    with ri.stage("retrieval", api_key="kw-secret-1") as span:
        span.set_attribute("api_key", "later-secret-2")
        span.set_attributes({"url": "postgresql://u:hunter2@db/x", "k": 3, "ok": True})
        span.add_event("called with token=abcdef123456", {"password": "pw-1", "n": 2})
    (seen,) = app_exporter.get_finished_spans()
    (event,) = seen.events
    assert event.name == "called with token=[REDACTED]"
    assert dict(event.attributes or {}) == {"password": "[REDACTED]", "n": 2}
    attributes = dict(seen.attributes or {})
    assert attributes["api_key"] == "[REDACTED]"
    assert attributes["url"] == "postgresql://u:[REDACTED]@db/x"
    assert (attributes["k"], attributes["ok"]) == (3, True)


def _run(code: str, timeout: float = 30, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RAG_INSTRUMENT_", "OTEL_"))}
    clean.update(env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean,
        check=False,
    )


def test_application_sdk_provider_is_kept_in_a_fresh_process() -> None:
    result = _run(
        """
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        import rag_instrument as ri
        from rag_instrument import _runtime

        app = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(app))
        trace.set_tracer_provider(provider)
        ri.configure(exporter="memory")
        ri.configure(exporter="memory")
        with ri.stage("retrieval"):
            pass
        ours = _runtime.get_runtime().pipelines.memory_exporter.get_finished_spans()
        assert trace.get_tracer_provider() is provider
        assert [s.name for s in app.get_finished_spans()] == ["retrieval"]
        assert [s.name for s in ours] == ["retrieval"]
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# --- exporters ------------------------------------------------------------------------------


def test_otlp_exporter_reaches_a_real_receiver() -> None:
    with OTLPReceiver() as receiver:
        ri.configure(exporter="otlp", otlp_endpoint=receiver.endpoint, service_name="svc-otlp")
        with ri.stage("search"), ri.stage("retrieval"):
            pass
        assert ri.force_flush(timeout=5.0) is True
        assert receiver.wait_for_spans(2)
        spans = {s["name"]: s for s in receiver.spans()}
        assert spans["retrieval"]["parent_span_id"] == spans["search"]["span_id"]
        assert spans["search"]["service_name"] == "svc-otlp"
        assert spans["retrieval"]["attributes"]["rag.stage"] == "retrieval"
        assert ri.shutdown(timeout=5.0) is True
        assert receiver.wait_for_metrics({"rag.stage.duration"})


def test_otel_metric_export_interval_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    # The library's own interval is 30 s; the standard variable overrides it, as the
    # OTEL_BSP_* variables override the span batch settings.
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "200")
    with OTLPReceiver() as receiver:
        ri.configure(exporter="otlp", otlp_endpoint=receiver.endpoint)
        try:
            with ri.stage("retrieval"):
                pass
            # No flush, no shutdown: only the periodic export can deliver it in time.
            assert receiver.wait_for_metrics({"rag.stage.duration"}, timeout=20.0)
        finally:
            ri.shutdown(timeout=5.0)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_BSP_SCHEDULE_DELAY", "1s"),
        ("OTEL_BSP_SCHEDULE_DELAY", "0"),
        ("OTEL_BSP_SCHEDULE_DELAY", "250.5"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "-1"),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "many"),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "100000"),  # larger than the span queue
        ("OTEL_BSP_EXPORT_TIMEOUT", "-5"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "30s"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "0"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "nan"),
        ("OTEL_METRIC_EXPORT_TIMEOUT", "soon"),
        ("OTEL_METRIC_EXPORT_TIMEOUT", "inf"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", str(10**30)),  # more than a queue can hold
        ("OTEL_BSP_SCHEDULE_DELAY", str(10**12)),  # longer than the SDK's timer can wait
    ],
)
def test_an_unusable_export_variable_fails_configure_naming_it(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    # The SDK would warn and keep its default (or fail naming no variable): a batch delay
    # or interval the operator believes is in force and is not.
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=variable) as raised:
        ri.configure(exporter="memory")
    assert repr(value) in str(raised.value)
    assert not ri.is_configured()  # refused before anything was installed


def test_a_span_queue_smaller_than_the_librarys_batch_is_honoured(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Once failed configure() in the SDK ("max_export_batch_size must be less than or equal
    # to max_queue_size"): the library's own batch of 1,024 now shrinks to the queue.
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "10")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "")  # empty: not set
    ri.configure(exporter="console")
    with ri.stage("retrieval"):
        pass
    ri.shutdown()
    assert '"name": "retrieval"' in capsys.readouterr().out


def test_usable_export_variables_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", " 200 ")
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "4096")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "4096")
    monkeypatch.setenv("OTEL_BSP_EXPORT_TIMEOUT", "0")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "inf")  # no periodic export
    monkeypatch.setenv("OTEL_METRIC_EXPORT_TIMEOUT", "2500.5")
    ri.configure(exporter="console", metrics_exporter="none")
    with ri.stage("retrieval"):
        pass
    ri.shutdown()


def test_console_exporter_writes_spans(capsys: pytest.CaptureFixture[str]) -> None:
    ri.configure(exporter="console")
    with ri.stage("retrieval"):
        pass
    ri.shutdown()
    assert '"name": "retrieval"' in capsys.readouterr().out


@pytest.fixture
def black_hole() -> Iterator[str]:
    """A TCP port that accepts connections and never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def test_shutdown_is_bounded_when_the_collector_black_holes(black_hole: str) -> None:
    ri.configure(exporter="otlp", otlp_endpoint=black_hole)
    for _ in range(20):
        with ri.stage("retrieval"):
            pass
    started = time.monotonic()
    assert ri.force_flush(timeout=0.5) is False
    assert ri.shutdown(timeout=1.0) is False
    # 1.5 s of timeouts; one unbounded export alone would wait the exporter's 5 s.
    assert time.monotonic() - started < 4.5
    assert ri.shutdown() is True  # a second call is a no-op


def test_process_exits_promptly_with_a_black_holed_collector(black_hole: str) -> None:
    started = time.monotonic()
    result = _run(
        f"""
        import rag_instrument as ri
        ri.configure(exporter="otlp", otlp_endpoint="{black_hole}")
        for _ in range(100):
            with ri.stage("retrieval"):
                pass
        print("done")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "done"
    # Interpreter start and at most 3 s of flushing; the exporter's own retries would run
    # past the 30 s the child is given.
    assert time.monotonic() - started < 20.0


def test_spans_after_shutdown_are_dropped_and_reinit_works(tmp_path: Path) -> None:
    ri.configure(exporter="memory")
    ri.shutdown()
    with ri.stage("retrieval"):
        pass  # runs, exports nowhere
    log = tmp_path / "x.jsonl"
    ri.configure(exporter="memory", log_file=str(log))
    with ri.stage("generation"):
        pass
    assert [s.name for s in _memory_spans()] == ["generation"]
    assert [line["event"] for line in _lines(log)] == ["generation completed"]


def test_an_application_exporter_can_be_passed_again_after_shutdown() -> None:
    """The instance is the application's: a module-level one serves every test."""
    exporter = InMemorySpanExporter()
    for round_no in range(3):
        ri.configure(exporter=exporter)
        with ri.stage(f"stage{round_no}"):
            pass
        if round_no == 1:
            ri.configure(exporter="memory")  # A -> memory -> A
        assert ri.shutdown() is True
        assert [s.name for s in exporter.get_finished_spans()] == [f"stage{round_no}"]
        exporter.clear()


def test_fork_child_exports_its_own_spans() -> None:
    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork")
    with OTLPReceiver() as receiver:
        code = f"""
        import os
        import rag_instrument as ri
        ri.configure(exporter="otlp", otlp_endpoint="{receiver.endpoint}")
        with ri.stage("parent-before-fork"):
            pass
        pid = os.fork()
        if pid == 0:
            with ri.stage("child"):
                pass
            ok = ri.shutdown(timeout=5)
            os._exit(0 if ok else 3)
        with ri.stage("parent-after-fork"):
            pass
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
        assert ri.shutdown(timeout=5)
        """
        result = _run(code)
        assert result.returncode == 0, result.stderr
        assert "TypeError" not in result.stderr
        assert receiver.wait_for_spans(3)
        assert sorted(receiver.span_names()) == ["child", "parent-after-fork", "parent-before-fork"]


def test_enabled_false_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAG_INSTRUMENT_ENABLED", "0")
    settings = ri.configure(exporter="memory")
    assert settings.enabled is False
    with ri.stage("retrieval") as span:
        assert span is trace.INVALID_SPAN


class _CountingExporter:
    """Counts exported spans; optionally fails every export."""

    def __init__(self, fail: bool = False) -> None:
        self.count = 0
        self.fail = fail

    def export(self, spans: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        if self.fail:
            raise RuntimeError("collector down")
        self.count += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


def _exporter(fail: bool = False) -> Any:
    from opentelemetry.sdk.trace.export import SpanExporter

    class Exporter(_CountingExporter, SpanExporter):
        pass

    return Exporter(fail)


def test_tight_loop_of_stages_loses_no_span(tmp_path: Path) -> None:
    exporter = _exporter()
    ri.configure(exporter=exporter, log_file=str(tmp_path / "x.jsonl"))
    log = ri.get_logger()
    for i in range(20_000):
        with ri.stage("retrieval"):
            log.info("step", i=i)
    assert ri.shutdown(timeout=10.0) is True
    assert exporter.count == 20_000


def test_failed_exports_are_counted_in_a_metric() -> None:
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    ri.configure(exporter=_exporter(fail=True), metric_readers=[reader])
    for _ in range(10):
        with ri.stage("retrieval"):
            pass
    assert ri.force_flush(timeout=5.0) is False
    data = reader.get_metrics_data()
    assert data is not None
    dropped = [
        point.value
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
        if metric.name == "rag.spans.dropped"
        for point in metric.data.data_points
    ]
    assert dropped == [10]


def test_blocked_exporter_drops_counted_and_warned_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import threading

    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    release = threading.Event()

    class Blocked(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            release.wait(10)  # a collector that never answers (until the test lets go)
            return SpanExportResult.SUCCESS

    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "50")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "10")
    reader = InMemoryMetricReader()
    ri.configure(exporter=Blocked(), metric_readers=[reader])
    try:
        with caplog.at_level(logging.WARNING):
            for _ in range(500):
                with ri.stage("retrieval"):
                    pass  # never waits for the exporter: export runs on the batch thread
        full = [r for r in caplog.records if "Queue full" in r.getMessage()]
        assert len(full) <= 1
        data = reader.get_metrics_data()
        assert data is not None
        dropped = [
            point.value
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for metric in sm.metrics
            if metric.name == "rag.spans.dropped"
            for point in metric.data.data_points
        ]
        assert dropped
        assert dropped[0] >= 400
    finally:
        release.set()


def test_memory_plateaus_with_a_failing_exporter() -> None:
    import tracemalloc

    exporter = _exporter(fail=True)
    ri.configure(exporter=exporter)
    log = ri.get_logger()

    def burst(n: int) -> None:
        for i in range(n):
            with ri.request_context(request_id=f"r-{i}"), ri.stage("retrieval"):
                log.debug("step", i=i)

    burst(5_000)
    ri.force_flush(timeout=5.0)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        burst(8_000)
        ri.force_flush(timeout=5.0)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    growth = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert growth < 1_000_000, f"grew by {growth} bytes over 8,000 stages"


@pytest.mark.parametrize(
    ("sampler", "sampled_under", "ratio"),
    [
        # the SDK's meaning of each OTEL_TRACES_SAMPLER value, under a sampled and an
        # unsampled incoming traceparent
        ("always_off", (False, False), "1"),
        ("always_on", (True, True), "1"),
        ("traceidratio", (False, False), "0"),
        ("parentbased_always_off", (True, False), "1"),
        ("parentbased_always_on", (True, False), "1"),
        ("parentbased_traceidratio", (True, False), "0"),
    ],
)
def test_otel_traces_sampler_values_mean_what_the_sdk_means(
    monkeypatch: pytest.MonkeyPatch, sampler: str, sampled_under: tuple[bool, bool], ratio: str
) -> None:
    from opentelemetry import context as otel_context

    monkeypatch.setenv("OTEL_TRACES_SAMPLER", sampler)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", ratio)
    settings = ri.configure(exporter="memory")
    assert settings.parent_based_sampling is sampler.startswith("parentbased_")
    found = []
    for flags in ("01", "00"):
        parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-" + flags
        token = otel_context.attach(ri.extract_context({"traceparent": parent}))
        try:
            with ri.stage("retrieval") as span:
                found.append(span.get_span_context().trace_flags.sampled)
        finally:
            otel_context.detach(token)
    assert tuple(found) == sampled_under


def test_parent_based_sampling_off_by_argument() -> None:
    settings = ri.configure(exporter="memory", sample_ratio=1.0, parent_based_sampling=False)
    assert settings.parent_based_sampling is False
    from opentelemetry import context as otel_context

    unsampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
    token = otel_context.attach(ri.extract_context({"traceparent": unsampled}))
    try:
        with ri.stage("retrieval") as span:
            assert span.get_span_context().trace_flags.sampled
    finally:
        otel_context.detach(token)


def test_the_unsupported_sampler_warning_is_a_line_of_the_configured_log(tmp_path: Path) -> None:
    # Logged once the log output is in place: a JSON line in the file, nothing on stderr
    # (where a plain-text line would break a JSON log stream read by jq).
    log = tmp_path / "rag.jsonl"
    code = textwrap.dedent(
        f"""
        import rag_instrument as ri
        ri.configure(log_file={str(log)!r})
        ri.get_logger().info("after")
        """
    )
    env = {**os.environ, "OTEL_TRACES_SAMPLER": "xray"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = [orjson.loads(line) for line in log.read_text().splitlines()]
    assert [line["level"] for line in lines] == ["warning", "info"]
    assert "OTEL_TRACES_SAMPLER='xray'" in lines[0]["event"]


def test_the_otel_samplers_kind_goes_with_its_ratio_only() -> None:
    # OTEL_TRACES_SAMPLER=always_on set for other services, a ratio of our own: the ratio
    # stays parent-based (as documented), not a ratio deciding every span alone.
    settings = build_settings(
        env={"OTEL_TRACES_SAMPLER": "always_on", "RAG_INSTRUMENT_SAMPLE_RATIO": "0.2"}
    )
    assert (settings.sample_ratio, settings.parent_based_sampling) == (0.2, True)
    explicit = build_settings(env={"OTEL_TRACES_SAMPLER": "always_on"}, sample_ratio=0.2)
    assert explicit.parent_based_sampling is True
    alone = build_settings(env={"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.3"})
    assert (alone.sample_ratio, alone.parent_based_sampling) == (0.3, False)


def test_an_explicit_enabled_wins_over_otel_sdk_disabled() -> None:
    # The SDK's providers read OTEL_SDK_DISABLED themselves: enabled=True (and capture(),
    # which ignores the environment) still recorded no span. A fresh process: the provider
    # is built once per process.
    import os
    import subprocess
    import sys

    code = """
import rag_instrument as ri
from rag_instrument.testing import capture
assert ri.configure().enabled is False  # the variable is enabled's default
with capture() as cap, ri.stage("retrieval"):
    pass
print([s.name for s in cap.spans], "trace_id" in cap.logs[0])
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
exporter = InMemorySpanExporter()
ri.configure(exporter=exporter, enabled=True, logs_exporter="none")
with ri.stage("generation"):
    pass
ri.force_flush()
print([s.name for s in exporter.get_finished_spans()])
"""
    env = {**os.environ, "OTEL_SDK_DISABLED": "true"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["['retrieval'] True", "['generation']"]


@pytest.mark.parametrize("timeout", [None, float("inf"), float("nan"), -1, "abc", 2**70])
def test_shutdown_and_force_flush_take_any_timeout(timeout: Any) -> None:
    # Nothing raises into the application: None and infinity wait without a limit, NaN
    # and negative values not at all, a non-number is the default.
    ri.configure(exporter="memory", logs_exporter="none")
    with ri.stage("x"):
        pass
    assert isinstance(ri.force_flush(timeout), bool)
    assert isinstance(ri.shutdown(timeout), bool)
    assert not ri.is_configured()


def test_enabled_false_keeps_the_applications_own_lines(tmp_path: Path) -> None:
    # Switching the instrumentation off silenced the application's warnings too.
    import logging

    log = tmp_path / "app.jsonl"
    ri.configure(enabled=False, log_file=str(log))
    try:

        @ri.stage("retrieval")
        def retrieve() -> int:
            ri.get_logger("app").warning("payment failed")
            logging.getLogger("app.std").warning("stdlib warning")
            return 1

        assert retrieve() == 1
    finally:
        ri.shutdown()
    events = [json.loads(line)["event"] for line in log.read_text().splitlines()]
    assert events == ["payment failed", "stdlib warning"]  # no stage line: a pass-through


def test_the_first_span_after_shutdown_says_it_is_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # RELIABILITY.md 20: "late spans dropped with one log"; they were dropped silently.
    ri.configure(exporter="memory", logs_exporter="none")
    ri.shutdown()
    with caplog.at_level(logging.WARNING, logger="rag_instrument"):
        for _ in range(3):
            with ri.stage("late"):
                pass
    said = [r.getMessage() for r in caplog.records if "after shutdown" in r.getMessage()]
    assert len(said) == 1, said
    ri.configure(exporter="memory", logs_exporter="none")  # re-init works, and records
    with ri.stage("again"):
        pass
    assert [s.name for s in _memory_spans()] == ["again"]


def test_force_flush_says_false_when_spans_were_dropped_for_a_full_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    release = threading.Event()

    class Held(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:  # type: ignore[override]
            release.wait(10)
            return SpanExportResult.SUCCESS

    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "8")
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "8")
    ri.configure(exporter=Held(), log_file=str(tmp_path / "a.jsonl"), metrics_exporter="none")
    try:
        for _ in range(100):  # the export is held: the queue fills, the rest is dropped
            with ri.stage("x"):
                pass
        release.set()
        assert ri.force_flush(10) is False  # ended spans were lost before this flush
        with ri.stage("x"):
            pass
        assert ri.force_flush(10) is True  # none lost since
    finally:
        release.set()
        ri.shutdown(5)


def test_an_infinite_metric_interval_still_sends_the_metrics_at_shutdown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # configuration.md: with OTEL_METRIC_EXPORT_INTERVAL=inf, metrics are sent only at
    # force_flush() and shutdown(): the SDK's reader sends nothing at shutdown then.
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "inf")
    with OTLPReceiver() as receiver:
        ri.configure(exporter="otlp", otlp_endpoint=receiver.endpoint, logs_exporter="none")
        with ri.stage("retrieval"):
            pass
        assert ri.shutdown(5.0) is True
        names = {
            metric.name
            for request in receiver.metrics_requests
            for resource in request.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
        }
    assert "rag.stage.duration" in names


def test_the_settings_budgets_are_read_only() -> None:
    settings = ri.configure(budgets={"retrieval": 5}, logs_exporter="none")
    assert settings.budgets == {"retrieval": 5.0}
    with pytest.raises(TypeError):
        settings.budgets["generation"] = 1.0  # type: ignore[index]
    assert ri.configure(logs_exporter="none").budgets == {}
    with pytest.raises(TypeError):
        ri.configure(logs_exporter="none").budgets["x"] = 1.0  # type: ignore[index]
