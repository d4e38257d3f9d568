"""The testing helpers users assert with."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import rag_instrument as ri
from rag_instrument import _runtime
from rag_instrument.testing import Capture, capture

pytest_plugins = ["pytester"]


def test_capture_restores_the_previous_configuration(tmp_path: Path) -> None:
    log = tmp_path / "app.jsonl"
    ri.configure(log_file=str(log), service_name="app")
    with capture() as cap:
        with ri.stage("retrieval"):
            pass
        assert [s.name for s in cap.spans] == ["retrieval"]
    assert _runtime.get_runtime().settings.service_name == "app"
    with ri.stage("generation"):
        pass
    assert "generation completed" in log.read_text()
    assert "retrieval completed" not in log.read_text()


def test_capture_when_unconfigured_leaves_it_unconfigured() -> None:
    with capture():
        pass
    assert _runtime.get_runtime().configured is False


def test_capture_ignores_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAG_INSTRUMENT_LOG_LEVEL", "error")
    with capture() as cap:
        ri.get_logger().info("visible")
    assert cap.find_logs("visible")


def test_span_helper_and_clear(rag_capture: Capture) -> None:
    with ri.stage("a"):
        pass
    with ri.stage("a"):
        pass
    with pytest.raises(AssertionError, match="expected one span 'a', found 2"):
        rag_capture.span("a")
    rag_capture.clear()
    assert rag_capture.spans == []
    assert rag_capture.logs == []


def test_fixture_is_registered_as_a_plugin(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import rag_instrument as ri

        def test_app(rag_capture):
            with ri.stage("retrieval"):
                pass
            assert rag_capture.span("retrieval").attributes["rag.stage"] == "retrieval"
            assert rag_capture.logs[0]["event"] == "retrieval completed"
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_capture_does_not_shut_down_the_applications_exporter() -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    app_exporter = InMemorySpanExporter()
    ri.configure(exporter=app_exporter)
    ri.configure(exporter=app_exporter)  # reconfiguring with the same instance, too
    with capture() as cap:
        with ri.stage("inside"):
            pass
    with ri.stage("after"):
        pass
    assert ri.force_flush() is True
    assert [s.name for s in cap.spans] == ["inside"]
    assert [s.name for s in app_exporter.get_finished_spans()] == ["after"]


def test_captures_nest() -> None:
    with capture() as outer:
        with ri.stage("before"):
            pass
        with capture() as inner:
            with ri.stage("inner"):
                pass
        with ri.stage("after"):
            pass
    assert [s.name for s in inner.spans] == ["inner"]
    assert [s.name for s in outer.spans] == ["before", "after"]
    assert [line["event"] for line in outer.logs] == ["before completed", "after completed"]


def test_capture_rejects_an_unknown_setting() -> None:
    with pytest.raises(TypeError, match=r"unknown setting.*budget"), capture(budget={"x": 1}):
        pass


def test_overlapping_captures_put_back_what_was_before_them_and_say_so() -> None:
    # Two tasks each in a capture(): the first opened ends first. It used to put back the
    # configuration from before it while the second was open, and the second then put
    # back the first's: a capture that had ended kept recording the process for good.
    import asyncio

    async def job(name: str, opened: asyncio.Event, first_done: asyncio.Event) -> Capture:
        with capture() as cap:
            if name == "a":
                opened.set()
                await asyncio.sleep(0)  # let b open its capture inside ours
                with ri.stage(name):
                    pass
            else:
                await opened.wait()
                with capture():  # b's own nested capture nests as usual
                    pass
                await first_done.wait()
                with ri.stage(name):
                    pass
        return cap

    async def main() -> tuple[Capture, Capture]:
        opened, first_done = asyncio.Event(), asyncio.Event()
        b = asyncio.ensure_future(job("b", opened, first_done))
        a = await job("a", opened, first_done)
        first_done.set()
        return a, await b

    with capture() as outer:
        with pytest.warns(RuntimeWarning, match="ended while one opened after it"):
            a, b = asyncio.run(main())
        assert [s.name for s in b.spans] == ["a", "b"]  # b was in force while both were open
        with ri.stage("after"):
            pass
    assert [s.name for s in outer.spans] == ["after"]  # the configuration before both
    assert a.spans == []


def test_the_fixture_isolates_bound_context_between_tests(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import rag_instrument as ri

        def test_a(rag_capture):
            ri.bind_context(tenant="acme")
            ri.get_logger().info("a")
            assert rag_capture.logs[0]["context"] == {"tenant": "acme"}

        def test_b(rag_capture):
            ri.get_logger().info("b")
            assert rag_capture.logs[0]["context"] == {}

        def test_c(rag_capture):
            with ri.stage("s"):
                pass
            assert "tenant" not in dict(rag_capture.span("s").attributes)
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


def test_configure_inside_a_capture_says_the_capture_ends() -> None:
    # An app factory that configures itself inside capture() silently ended it.
    with capture() as cap:
        with pytest.warns(RuntimeWarning, match="inside testing.capture"):
            ri.configure(exporter="memory", logs_exporter="none")
        with ri.stage("retrieval"):
            pass
    assert cap.spans == []
    ri.shutdown()


def test_the_fixture_keeps_what_earlier_fixtures_bound(pytester: pytest.Pytester) -> None:
    # An application's autouse fixture binds a tenant: the test sees it (it was wiped).
    pytester.makepyfile(
        """
        import pytest
        import rag_instrument as ri

        @pytest.fixture(autouse=True)
        def tenant():
            ri.bind_context(tenant="acme")
            yield
            ri.unbind_context("tenant")

        def test_a(rag_capture):
            ri.get_logger().info("a")
            assert rag_capture.logs[0]["context"] == {"tenant": "acme"}
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_a_configure_that_fails_inside_a_capture_leaves_it_recording() -> None:
    # The warning came before the new configuration was built: a configure() that then
    # failed (a metric reader in use elsewhere) said the capture had ended, and it had not.
    import warnings

    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    taken = InMemoryMetricReader()
    MeterProvider(metric_readers=[taken])  # the reader is someone else's
    with capture() as cap:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "the capture records nothing" here
            with pytest.raises(ValueError, match="metric_readers"):
                ri.configure(metric_readers=[taken])
        with ri.stage("retrieval"):
            pass
    assert [s.name for s in cap.spans] == ["retrieval"]


def test_a_capture_leaves_no_tracer_provider_installed_when_none_was() -> None:
    # A test that installs its own provider after another test used capture() (in one
    # pytest process) goes as it would alone: the API takes a global provider only once.
    code = textwrap.dedent(
        """
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        import rag_instrument as ri
        from rag_instrument.testing import capture

        with capture() as cap, ri.stage("first"):
            pass
        assert [s.name for s in cap.spans] == ["first"]
        assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
        app = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(app))
        trace.set_tracer_provider(provider)
        ri.configure(logs_exporter="none")
        with ri.stage("retrieval"):
            pass
        assert trace.get_tracer_provider() is provider
        assert [s.name for s in app.get_finished_spans()] == ["retrieval"]
        with capture() as cap, ri.stage("again"):
            pass
        assert [s.name for s in cap.spans] == ["again"]
        assert trace.get_tracer_provider() is provider  # the application's, kept
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAG_INSTRUMENT_", "OTEL_"))}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert "Overriding" not in result.stderr
