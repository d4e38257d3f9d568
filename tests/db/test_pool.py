"""Connection pool telemetry (``db/_pool``): checkout wait, slow and timed-out checkouts, gauges."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.pool import NullPool, QueuePool, StaticPool

import rag_instrument as ri
from rag_instrument.testing import Capture, capture


@pytest.fixture(autouse=True)
def _no_pools_of_earlier_tests() -> None:
    """Engines of earlier tests kept only by reference cycles still report their pools
    until the collector frees them, which depends on when it last ran: free them first."""
    gc.collect()


def _poll(cap: Capture, metric: str, ready: Callable[[list[Any]], bool]) -> list[Any]:
    """The metric's points once ``ready`` holds (waiting for another thread, 30 s at most)."""
    deadline = time.monotonic() + 30.0
    while True:
        points = cap.metrics().get(metric, [])
        if (points and ready(points)) or time.monotonic() > deadline:
            return points
        threading.Event().wait(0.01)


def _counts(cap: Capture) -> dict[str, int]:
    return {
        p.attributes["db.client.connection.state"]: p.value
        for p in cap.metrics().get("db.client.connection.count", [])
    }


def test_pool_lines_outside_a_stage_have_no_stage_field(
    tmp_path: Path, sqlite_engine: Any
) -> None:
    eng = sqlite_engine(
        f"sqlite:///{tmp_path / 'nostage.sqlite'}",
        poolclass=QueuePool,
        pool_size=1,
        max_overflow=0,
        pool_timeout=0.05,
    )
    handle = ri.instrument_sqlalchemy(eng, pool_slow_ms=0)
    with capture() as cap:
        held = eng.connect()
        with pytest.raises(sa_exc.TimeoutError):
            eng.connect()
        held.close()
    lines = cap.find_logs("pool checkout slow") + cap.find_logs("pool checkout timeout")
    assert len(lines) >= 2
    for line in lines:
        assert "pipeline_stage" not in line  # absent, not null
    handle.uninstrument()
    eng.dispose()


def test_pool_metrics_slow_checkout_and_timeout(tmp_path: Path, sqlite_engine: Any) -> None:
    eng = sqlite_engine(
        f"sqlite:///{tmp_path / 'pool.sqlite'}",
        poolclass=QueuePool,
        pool_size=1,
        max_overflow=0,
        pool_timeout=0.05,
    )
    handle = ri.instrument_sqlalchemy(eng, pool_slow_ms=0)
    with capture() as cap:
        with ri.stage("retrieval"):
            held = eng.connect()
            with pytest.raises(sa_exc.TimeoutError) as info:
                eng.connect()
            assert info.value.__class__ is sa_exc.TimeoutError
            metrics = cap.metrics()
            held.close()
    counts = {
        p.attributes["db.client.connection.state"]: p.value
        for p in metrics["db.client.connection.count"]
    }
    assert counts == {"idle": 0, "used": 1}
    assert [p.value for p in metrics["db.client.connection.max"]] == [1]
    assert [p.value for p in metrics["db.client.connection.pending_requests"]] == [0]
    wait = metrics["db.client.connection.wait_time"][0]
    assert wait.count == 2
    assert wait.sum >= 0.05
    assert cap.find_logs("pool checkout slow")
    (timeout,) = cap.find_logs("pool checkout timeout")
    assert timeout["pipeline_stage"] == "retrieval"
    assert all(line["pipeline_stage"] == "retrieval" for line in cap.find_logs("pool checkout slow"))
    stage_events = [e.name for e in cap.span("retrieval").events]
    assert "db.client.connection.timeout" in stage_events
    handle.uninstrument()
    eng.dispose()


def test_pool_pending_requests_while_waiting(tmp_path: Path, sqlite_engine: Any) -> None:
    eng = sqlite_engine(
        f"sqlite:///{tmp_path / 'pending.sqlite'}", poolclass=QueuePool, pool_size=1, max_overflow=0
    )
    handle = ri.instrument_sqlalchemy(eng)
    with capture() as cap:
        held = eng.connect()
        started = threading.Event()

        def waiter() -> None:
            started.set()
            with eng.connect():
                pass

        thread = threading.Thread(target=waiter)
        thread.start()
        started.wait()
        points = _poll(cap, "db.client.connection.pending_requests", lambda ps: ps[0].value == 1)
        assert points[0].value == 1
        held.close()
        thread.join()
    handle.uninstrument()
    eng.dispose()


def test_pool_is_followed_across_dispose(tmp_path: Path, sqlite_engine: Any) -> None:
    eng = sqlite_engine(f"sqlite:///{tmp_path / 'd.sqlite'}", poolclass=QueuePool)
    handle = ri.instrument_sqlalchemy(eng)
    eng.dispose()
    assert "connect" in eng.pool.__dict__
    with capture() as cap, eng.connect():
        pass
    assert cap.metrics()["db.client.connection.wait_time"][0].count == 1
    handle.uninstrument()
    assert "connect" not in eng.pool.__dict__
    eng.dispose()


def test_a_fast_checkout_is_measured_but_not_reported_as_slow(
    tmp_path: Path, sqlite_engine: Any
) -> None:
    eng = sqlite_engine(f"sqlite:///{tmp_path / 'fast.sqlite'}", poolclass=QueuePool)
    handle = ri.instrument_sqlalchemy(eng, pool_slow_ms=60_000)
    with capture() as cap:
        for _ in range(3):
            with eng.connect() as conn:
                conn.execute(text("SELECT 1"))
    wait = cap.metrics()["db.client.connection.wait_time"][0]
    assert wait.count == 3
    assert wait.attributes["db.client.connection.pool.name"].endswith("fast.sqlite")
    assert cap.find_logs("pool checkout slow") == []
    handle.uninstrument()
    eng.dispose()


def test_two_pools_on_one_database_named_by_the_application_are_two_series(
    tmp_path: Path, sqlite_engine: Any
) -> None:
    url = f"sqlite:///{tmp_path / 'shared.sqlite'}"
    writer = sqlite_engine(url, poolclass=QueuePool, pool_logging_name="writer")
    reader = sqlite_engine(url, poolclass=QueuePool, pool_logging_name="reader")
    handles = [ri.instrument_sqlalchemy(writer), ri.instrument_sqlalchemy(reader)]
    with capture() as cap:
        for engine in (writer, reader, reader):
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
    waits = {
        p.attributes["db.client.connection.pool.name"]: p.count
        for p in cap.metrics()["db.client.connection.wait_time"]
    }
    assert waits == {"writer": 1, "reader": 2}
    for handle in handles:
        handle.uninstrument()


@pytest.mark.parametrize("poolclass", [StaticPool, NullPool])
def test_pools_without_counts_report_used_connections_from_checkouts(
    tmp_path: Path, poolclass: type, sqlite_engine: Any
) -> None:
    eng = sqlite_engine(f"sqlite:///{tmp_path / 'p.sqlite'}", poolclass=poolclass)
    handle = ri.instrument_sqlalchemy(eng)
    with capture() as cap:
        with eng.connect():
            assert _counts(cap)["used"] == 1
        assert _counts(cap)["used"] == 0
        assert "db.client.connection.max" not in cap.metrics()  # no bound to report
    handle.uninstrument()
    eng.dispose()


def test_uninstrument_stops_the_gauges_and_the_timing(tmp_path: Path, sqlite_engine: Any) -> None:
    eng = sqlite_engine(f"sqlite:///{tmp_path / 'u.sqlite'}", poolclass=QueuePool)
    handle = ri.instrument_sqlalchemy(eng)
    handle.uninstrument()
    with capture() as cap, eng.connect():
        metrics = cap.metrics()
    assert "db.client.connection.wait_time" not in metrics
    assert not metrics.get("db.client.connection.count")
    eng.dispose()


def test_without_configuration_the_pool_behaves_as_without_instrumentation(
    tmp_path: Path, sqlite_engine: Any
) -> None:
    eng = sqlite_engine(
        f"sqlite:///{tmp_path / 'off.sqlite'}",
        poolclass=QueuePool, pool_size=1, max_overflow=0, pool_timeout=0.05,
    )
    handle = ri.instrument_sqlalchemy(eng)
    held = eng.connect()  # nothing configured: no telemetry, the same connection and errors
    assert held.execute(text("SELECT 7")).scalar() == 7
    with pytest.raises(sa_exc.TimeoutError):
        eng.connect()
    held.close()
    handle.uninstrument()
    eng.dispose()
