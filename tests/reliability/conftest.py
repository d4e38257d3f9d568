"""Shared helpers of the reliability suite (RELIABILITY.md, section b)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest


def run_python(code: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter without our test-suite environment."""
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


def missing(what: str) -> None:
    """Skip because ``what`` is missing on this machine; under ``CI=true`` fail instead."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} (CI=true: not skipping)")
    pytest.skip(f"{what}: run `bash .ci/services.sh` (as root) to set it up")


@pytest.fixture
def no_internal_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    """Behave as in production: internal errors are logged, never raised."""
    monkeypatch.delenv("RAG_INSTRUMENT_RAISE_INTERNAL_ERRORS", raising=False)


def metric_points(reader: Any, name: str) -> list[Any]:
    data = reader.get_metrics_data()
    if data is None:
        return []
    return [
        point
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
        if metric.name == name
        for point in metric.data.data_points
    ]
