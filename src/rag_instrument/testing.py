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
import warnings
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
        self._unset_before = False  # no tracer provider was installed when it opened

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
    cap = Capture()
    values = {"exporter": "memory", **settings}
    built = _config.build_settings(env={}, **values)
    with _OPEN_LOCK:
        previous = get_runtime()
        cap._unset_before = _config.global_provider_is_unset()
        # The configuration in force is set aside, not closed: the application's
        # exporters, log file and processors come back exactly as they were (and captures
        # nest).
        cap._runtime = _config.apply(built, log_sink=cap._write, retire=False)
        _OPEN.append((cap, previous))
    try:
        yield cap
    finally:
        _close(cap)


#: The captures open now, in the order they were opened, each with the configuration that
#: was in force when it was (what closing it puts back).
_OPEN: list[tuple[Capture, Runtime]] = []
_OPEN_LOCK = threading.Lock()


def _close(cap: Capture) -> None:
    """End ``cap``: put back what was before it, even when captures overlapped.

    Captures opened in one task or thread nest: the last opened closes first, and the one
    around it records again. Captures in concurrent tasks or threads can overlap instead
    (the first opened closes first): the configuration is the process's, so while both
    were open, what either ran was recorded by the last opened; a warning says so. The one
    still open then puts back, when it closes, what was in force before the first.
    """
    with _OPEN_LOCK:
        index = next(i for i, (open_cap, _) in enumerate(_OPEN) if open_cap is cap)
        _, previous = _OPEN.pop(index)
        if index == len(_OPEN):  # the last opened: what was before it comes back
            _config.restore(previous)
            if cap._unset_before and not _OPEN:
                # No tracer provider was installed before: none is after.
                _config.release_global_provider()
            return
        later, _ = _OPEN[index]
        _OPEN[index] = (later, previous)
        if cap._runtime is not None:
            _config.retire_set_aside(cap._runtime)
    warnings.warn(
        "rag_instrument.testing.capture(): this capture ended while one opened after it "
        "(in another task or thread) was still open; the configuration is the process's, "
        "so what both blocks ran while both were open was recorded by the later one",
        RuntimeWarning,
        stacklevel=4,
    )
