"""Per-statement overhead of ``instrument_sqlalchemy`` (issue 4).

One run measures ``SELECT 1`` on SQLite in memory and on PostgreSQL (127.0.0.1:5432,
skipped with a note when unreachable), three ways, each on its own engine:

* plain: no instrumentation;
* contrib: ``opentelemetry-instrumentation-sqlalchemy`` (commenter off);
* ours: ``instrument_sqlalchemy`` with slow-query, N+1 and breakdown on, inside a stage.

Spans from both instrumentations go to the same SDK provider and batch processor, into an
exporter that discards them. Goal: ours adds at most half of what contrib adds.

    .venv/bin/python benchmarks/bench_db.py [--n 5000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable, Sequence

from opentelemetry import trace
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from sqlalchemy import Engine, create_engine, text

import rag_instrument as ri

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


class Discard(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def per_statement_us(engine: Engine, n: int) -> float:
    """Mean time of one ``SELECT 1`` over ``n`` statements, in microseconds."""
    statement = text("SELECT 1")
    with engine.connect() as conn:
        start = time.perf_counter()
        for _ in range(n):
            conn.execute(statement)
        return (time.perf_counter() - start) / n * 1e6


def measure(make: Callable[[], Engine], n: int, rounds: int = 7) -> tuple[float, float, float]:
    """Best per-statement time of plain, contrib and ours, measured in alternating rounds.

    Alternating (rather than all plain runs, then all contrib runs ...) keeps a change in
    machine load from landing on one configuration only.
    """
    plain_engine, contrib_engine, ours_engine = make(), make(), make()
    instrumentor = SQLAlchemyInstrumentor()
    # skip_dep_check: the contrib package declares sqlalchemy < 2.1 but works with 2.1.
    instrumentor.instrument(
        engine=contrib_engine,
        tracer_provider=trace.get_tracer_provider(),
        enable_commenter=False,
        skip_dep_check=True,
    )
    if not contrib_engine.dispatch.before_cursor_execute:
        raise SystemExit("opentelemetry-instrumentation-sqlalchemy did not instrument the engine")
    handle = ri.instrument_sqlalchemy(ours_engine)
    best = {"plain": float("inf"), "contrib": float("inf"), "ours": float("inf")}
    try:
        for engine in (plain_engine, contrib_engine, ours_engine):  # warm up
            per_statement_us(engine, min(n, 500))
        for _ in range(rounds):
            best["plain"] = min(best["plain"], per_statement_us(plain_engine, n))
            best["contrib"] = min(best["contrib"], per_statement_us(contrib_engine, n))
            with ri.stage("retrieval"):
                best["ours"] = min(best["ours"], per_statement_us(ours_engine, n))
    finally:
        handle.uninstrument()
        instrumentor.uninstrument()
        for engine in (plain_engine, contrib_engine, ours_engine):
            engine.dispose()
    return best["plain"], best["contrib"], best["ours"]


def report(label: str, plain: float, contrib: float, ours: float) -> None:
    contrib_added, ours_added = contrib - plain, ours - plain
    ok = ours_added <= contrib_added / 2
    print(
        f"{label:<22} plain {plain:7.1f} us | contrib +{contrib_added:6.1f} us | "
        f"ours +{ours_added:6.1f} us | goal ours <= contrib/2 ({contrib_added / 2:.1f} us): "
        f"{'met' if ok else 'MISSED'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="statements per round")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ri.configure(
            service_name="bench-db",
            exporter=Discard(),
            log_file=os.path.join(tmp, "bench.jsonl"),
            slow_query_ms=1000.0,
            n_plus_one_threshold=5,
        )
        report("SQLite (in memory)", *measure(lambda: create_engine("sqlite://"), args.n))
        try:
            probe = create_engine(PG_URL, connect_args={"connect_timeout": 2})
            with probe.connect():
                pass
            probe.dispose()
        except Exception as exc:
            reason = type(exc).__name__
            print(f"{'PostgreSQL':<22} skipped: not reachable at 127.0.0.1:5432 ({reason})")
        else:
            report("PostgreSQL (psycopg)", *measure(lambda: create_engine(PG_URL), args.n // 2))
        ri.shutdown()


if __name__ == "__main__":
    main()
