"""Per-call overhead of ``@ri.stage`` on a trivial sync function, in one run.

Rows: plain call; ``@ri.stage`` with ``enabled=False``; with nothing configured; configured
(a span exporter that drops spans, JSON log lines to a file); and the yardstick: a
hand-written OpenTelemetry SDK span plus a structlog JSON line doing the same job (stage
name, duration, level, UTC timestamp, trace and span ids, written to a file per line).

    python benchmarks/bench_overhead.py [--calls N] [--repeats R]

Figures are per call after a warm-up: the median of R repeats of N calls, except for the
two rows that are compared (configured stage and yardstick), which take turns for 2R
rounds and report their best round. Goals are printed beside the figures. Machines are
noisy: compare rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

import rag_instrument as ri


class DropExporter(SpanExporter):
    """Accepts and discards spans: measures our cost, not an exporter's."""

    def export(self, spans: Sequence[object]) -> SpanExportResult:  # type: ignore[override]
        return SpanExportResult.SUCCESS


def per_call_us(fn: Callable[[], object], calls: int, repeats: int) -> float:
    for _ in range(min(calls, 2000)):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter_ns() - start) / calls / 1000)
    return statistics.median(samples)


def best_of_alternating(
    cases: dict[str, Callable[[], object]], calls: int, rounds: int
) -> dict[str, float]:
    """Per-call time of each case: the best of ``rounds`` rounds, cases taking turns.

    Taking turns keeps a change in machine load from landing on one case only, and the
    best round is the one least disturbed by other processes.
    """
    for fn in cases.values():
        for _ in range(min(calls, 2000)):
            fn()
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(rounds):
        for name, fn in cases.items():
            start = time.perf_counter_ns()
            for _ in range(calls):
                fn()
            best[name] = min(best[name], (time.perf_counter_ns() - start) / calls / 1000)
    return best


def work() -> int:
    return 1


def hand_written(tmpdir: str) -> Callable[[], int]:
    """A hand-written OpenTelemetry SDK span plus a structlog JSON line (the yardstick)."""
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(DropExporter(), max_queue_size=65536))
    tracer = provider.get_tracer("bench")
    log_file = open(os.path.join(tmpdir, "hand.jsonl"), "a")  # noqa: SIM115 - lives for the run

    def add_trace_ids(_logger: object, _method: str, event: dict[str, Any]) -> dict[str, Any]:
        # The same job as ours: every line leads to its trace.
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            event["trace_id"] = format(ctx.trace_id, "032x")
            event["span_id"] = format(ctx.span_id, "016x")
        return event

    log = structlog.wrap_logger(
        structlog.WriteLogger(log_file),
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            add_trace_ids,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
    )

    def call() -> int:
        start = time.perf_counter()
        with tracer.start_as_current_span("retrieval"):
            result = work()
            log.info(
                "retrieval completed",
                execution_time_ms=(time.perf_counter() - start) * 1000,
                context={"pipeline_stage": "retrieval"},
            )
        return result

    return call


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    staged = ri.stage("retrieval")(work)

    with tempfile.TemporaryDirectory() as tmpdir:
        rows: list[tuple[str, float, str]] = []
        plain = per_call_us(work, args.calls, args.repeats)
        rows.append(("plain call", plain, ""))

        ri.configure(enabled=False)
        disabled = per_call_us(staged, args.calls, args.repeats)
        rows.append(
            ("@ri.stage, enabled=False", disabled, f"goal: <= plain + 1 us ({plain + 1:.2f})")
        )
        ri.shutdown()

        unconfigured = per_call_us(staged, args.calls, args.repeats)
        rows.append(("@ri.stage, nothing configured", unconfigured, ""))

        ri.configure(
            exporter=DropExporter(),
            log_file=os.path.join(tmpdir, "ri.jsonl"),
            capture_logging=False,
        )
        # The two cases that are compared take turns, round by round.
        best = best_of_alternating(
            {"ours": staged, "yardstick": hand_written(tmpdir)}, args.calls, args.repeats * 2
        )
        configured, yardstick = best["ours"], best["yardstick"]
        ri.shutdown()
        rows.append(
            (
                "@ri.stage, configured (span + JSON line)",
                configured,
                f"goal: <= 0.8x hand-written ({0.8 * yardstick:.2f}); "
                f"is {configured / yardstick:.2f}x",
            )
        )
        rows.append(("hand-written OTel span + structlog line", yardstick, "yardstick"))

    width = max(len(r[0]) for r in rows)
    print(
        f"Python {sys.version.split()[0]}, {args.calls} calls x {args.repeats} repeats (median); "
        f"configured and yardstick: best of {args.repeats * 2} alternating rounds"
    )
    print(f"{'case':<{width}}  {'us/call':>8}  notes")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>8.2f}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
