"""The runtime accessor: ``get_runtime()`` / ``is_configured()`` and the runtime's interface."""

from __future__ import annotations

import threading

from opentelemetry.trace import SpanKind

import rag_instrument as ri
from rag_instrument._runtime import Runtime
from rag_instrument.testing import capture


def test_unconfigured_then_configured_then_shut_down() -> None:
    assert ri.is_configured() is False
    before = ri.get_runtime()
    assert before.configured is False
    assert before.log is None

    settings = ri.configure(service_name="svc", budgets={"retrieval": 5})
    runtime = ri.get_runtime()
    assert ri.is_configured() is True
    assert runtime is not before
    assert runtime.settings is settings
    assert runtime.budgets == {"retrieval": 5.0}

    ri.shutdown()
    assert ri.is_configured() is False
    assert ri.get_runtime().configured is False


def test_a_reference_taken_early_still_sees_later_configuration() -> None:
    # What every module does: import the accessor once, call it when work happens.
    from rag_instrument import get_runtime

    ri.configure(service_name="first")
    assert get_runtime().settings.service_name == "first"
    ri.configure(service_name="second")
    assert get_runtime().settings.service_name == "second"


def test_a_failed_configure_keeps_the_runtime() -> None:
    ri.configure(service_name="kept")
    runtime = ri.get_runtime()
    try:
        ri.configure(exporter="bogus")
    except ValueError:
        pass
    assert ri.get_runtime() is runtime


def test_disabled_runtime_is_configured_but_not_enabled() -> None:
    ri.configure(enabled=False)
    assert ri.is_configured() is True
    assert ri.get_runtime().enabled is False


def test_claim_is_true_once_per_runtime_across_threads() -> None:
    runtime = ri.get_runtime()
    wins: list[bool] = []
    barrier = threading.Barrier(8)

    def race() -> None:
        barrier.wait()
        wins.append(runtime.claim("observer"))

    threads = [threading.Thread(target=race) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(wins) == [False] * 7 + [True]
    assert runtime.claim("another") is True
    ri.configure()
    assert ri.get_runtime().claim("observer") is True  # a new runtime starts afresh


def test_instruments_are_created_once_per_runtime() -> None:
    runtime = ri.get_runtime()
    assert runtime.histogram("h", "s") is runtime.histogram("h", "s")
    assert runtime.counter("c", "1") is runtime.counter("c", "1")


def test_leaf_spans_go_through_the_exporters_tools() -> None:
    with capture() as cap:
        runtime = ri.get_runtime()
        with ri.stage("retrieval"):
            leaf = runtime.start_leaf_span("SELECT t", SpanKind.CLIENT, {"k": "v"})
            leaf.end()
    (span,) = [s for s in cap.spans if s.name == "SELECT t"]
    assert span.parent is not None
    assert span.attributes == {"k": "v"}


def test_leaf_spans_without_configuration_use_the_tracer() -> None:
    runtime = ri.get_runtime()
    assert runtime.configured is False
    from rag_instrument.exporters import LeafSpan

    span = runtime.start_leaf_span("q", SpanKind.CLIENT, {})
    # Not configured by rag_instrument: whatever the global API gives (a no-op span, or an
    # SDK span when an SDK provider is installed), never the exporters' leaf span.
    assert not isinstance(span, LeafSpan)
    runtime.mark_if_clean(span, {}, "x")  # nothing to mark, and no error either
    span.end()


def test_runtime_is_the_public_type() -> None:
    assert isinstance(ri.get_runtime(), ri.Runtime)
    assert ri.Runtime is Runtime
