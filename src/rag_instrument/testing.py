"""Assert on your own spans, metrics and log lines.

Example:
    >>> import rag_instrument as ri
    >>> from rag_instrument.testing import capture
    >>> with capture() as cap:
    ...     with ri.stage("retrieval"):
    ...         pass
    >>> [span.name for span in cap.spans]
    ['retrieval']
    >>> cap.logs[0]["event"]
    'retrieval completed'

With pytest, the ``rag_capture`` fixture (registered automatically when rag_instrument is
installed) is the same object, active for the whole test.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import orjson

from rag_instrument import _config
from rag_instrument._runtime import Runtime, get_runtime

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan

__all__ = ["Capture", "capture"]


class Capture:
    """What was recorded inside :func:`capture`: finished spans, log lines and metrics."""

    def __init__(self) -> None:
        self._lines: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._runtime: Runtime | None = None

    def _write(self, data: bytes) -> None:
        line = orjson.loads(data)
        with self._lock:
            self._lines.append(line)

    @property
    def spans(self) -> list[ReadableSpan]:
        """Finished spans, in the order they ended."""
        pipelines = self._runtime.pipelines if self._runtime is not None else None
        if pipelines is None or pipelines.memory_exporter is None:
            return []
        return list(pipelines.memory_exporter.get_finished_spans())

    @property
    def logs(self) -> list[dict[str, Any]]:
        """Log lines as dicts, exactly as the JSON renderer wrote them."""
        with self._lock:
            return list(self._lines)

    def span(self, name: str) -> ReadableSpan:
        """The one finished span called ``name``.

        Raises:
            AssertionError: there is none, or more than one.
        """
        found = [s for s in self.spans if s.name == name]
        if len(found) != 1:
            names = [s.name for s in self.spans]
            raise AssertionError(f"expected one span {name!r}, found {len(found)} among {names}")
        return found[0]

    def find_logs(self, event: str | None = None, **fields: Any) -> list[dict[str, Any]]:
        """Log lines whose ``event`` (if given) and top-level ``fields`` match."""
        return [
            line
            for line in self.logs
            if (event is None or line.get("event") == event)
            and all(line.get(k) == v for k, v in fields.items())
        ]

    def metrics(self) -> dict[str, list[Any]]:
        """Metric data points collected so far, by metric name."""
        pipelines = self._runtime.pipelines if self._runtime is not None else None
        reader = pipelines.memory_reader if pipelines is not None else None
        if reader is None:
            return {}
        data = reader.get_metrics_data()
        out: dict[str, list[Any]] = {}
        if data is None:
            return out
        for resource_metrics in data.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    out.setdefault(metric.name, []).extend(metric.data.data_points)
        return out

    def clear(self) -> None:
        """Forget the spans and log lines recorded so far."""
        with self._lock:
            self._lines.clear()
        pipelines = self._runtime.pipelines if self._runtime is not None else None
        if pipelines is not None and pipelines.memory_exporter is not None:
            pipelines.memory_exporter.clear()


@contextmanager
def capture(**settings: Any) -> Iterator[Capture]:
    """Record spans, metrics and log lines in memory for the duration of the block.

    The environment is ignored, so results are the same on every machine; pass
    ``configure()`` arguments to change a setting (``budgets=...``, ``log_level="debug"``).
    The configuration in force before is restored afterwards.
    """
    previous = get_runtime()
    cap = Capture()
    values = {"exporter": "memory", **settings}
    built = _config.build_settings(env={}, **values)
    # The configuration in force is set aside, not closed: the application's exporters,
    # log file and processors come back exactly as they were (and captures nest).
    cap._runtime = _config.apply(built, log_sink=cap._write, retire=False)
    try:
        yield cap
    finally:
        _config.restore(previous)
