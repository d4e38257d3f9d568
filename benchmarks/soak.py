"""Soak: a million wrapped calls with the exporter down; memory and open state must plateau.

Each call is a request: a ``search`` stage around a ``retrieval`` stage (one SQLite
statement through an instrumented engine, a ``@ri.cached`` lookup) and a ``generation``
stage (an ``LLMProvider`` call through ``CacheMixin`` and ``RetryMixin``, mostly cache hits,
every 7th prompt new), with a bound ``request_id`` and a log line, while the span exporter
fails on every export (a collector that is down).

    python benchmarks/soak.py [--calls 1000000] [--every 100000] [--warmup 100000]

Every ``--every`` calls it prints the resident memory and the library's open state: spans
started and not ended, cache calls in flight, statement listeners on the engine, and the
sizes of the bounded internal maps. Goal (RELIABILITY.md I47): after warm-up, resident
memory grows by less than 20 MB and the open state does not grow at all. Exit status 1
when a goal is missed. ``tests/reliability/test_i_load.py`` runs 50,000 calls of it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from sqlalchemy import create_engine, text
from sqlalchemy.pool import StaticPool

import rag_instrument as ri
from rag_instrument import _leaf

GOAL_RSS_GROWTH_MB = 20.0


class DownExporter(SpanExporter):
    """A collector that is down: every export fails."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:  # type: ignore[override]
        raise ConnectionError("collector down")


class OpenSpans(SpanProcessor):
    """Counts spans started and not yet ended."""

    def __init__(self) -> None:
        self.open: set[int] = set()

    def on_start(self, span: Span, parent_context: Any = None) -> None:
        self.open.add(span.get_span_context().span_id)

    def on_end(self, span: ReadableSpan) -> None:
        if span.context is not None:
            self.open.discard(span.context.span_id)


def rss_mb() -> float:
    """Resident set size of this process, in MB (Linux ``/proc``; else peak RSS)."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, ValueError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 1e6 if sys.platform == "darwin" else peak / 1e3


@dataclasses.dataclass
class Sample:
    """The process's state after ``calls`` calls."""

    calls: int
    rss_mb: float
    open_spans: int
    in_flight: int
    listeners: int
    internal: int


@dataclasses.dataclass
class Result:
    """Samples taken during one soak run, and the verdict against the goals."""

    samples: list[Sample]
    warmup: int
    seconds: float

    def after_warmup(self) -> list[Sample]:
        """The samples from the end of the warm-up on."""
        return [s for s in self.samples if s.calls >= self.warmup] or self.samples[-1:]

    def rss_growth_mb(self) -> float:
        """Resident memory growth from the end of the warm-up to the end."""
        kept = self.after_warmup()
        return kept[-1].rss_mb - kept[0].rss_mb

    def problems(self, goal_mb: float = GOAL_RSS_GROWTH_MB) -> list[str]:
        """What missed its goal (empty when everything plateaued)."""
        kept = self.after_warmup()
        first, last = kept[0], kept[-1]
        out: list[str] = []
        if self.rss_growth_mb() >= goal_mb:
            out.append(f"resident memory grew {self.rss_growth_mb():.1f} MB (goal < {goal_mb})")
        for name in ("open_spans", "in_flight", "listeners", "internal"):
            if getattr(last, name) > getattr(first, name):
                out.append(f"{name} grew from {getattr(first, name)} to {getattr(last, name)}")
        return out


class Model(ri.CacheMixin, ri.RetryMixin, ri.LLMProvider):
    """A local model: answers at once; ``CacheMixin`` answers repeated prompts."""

    system, model = "soak", "local"
    cache_maxsize = 512

    async def _generate(self, prompt: str, **params: Any) -> ri.LLMResult:
        return ri.LLMResult(f"answer to {prompt}", input_tokens=12, output_tokens=30)


@ri.cached(maxsize=256)
def rerank_score(doc: int) -> float:
    """A cached helper called inside the retrieval stage."""
    return doc / 7.0


def _in_flight(model: Model) -> int:
    total = 0
    for store in (Model._rag_store(), getattr(rerank_score, "_rag_store", None)):
        flights = getattr(store, "flights", None)
        if isinstance(flights, dict):
            total += len(flights)
    return total


def _internal_sizes() -> int:
    # The bounded internal maps: they may fill up to their caps, never past them.
    sizes = [len(_leaf._SANITIZED) > _leaf._SANITIZED_MAX]
    return sum(sizes)


def soak(
    calls: int, every: int, warmup: int, *, quiet: bool = False, light: bool = False
) -> Result:
    """Run ``calls`` requests; sample every ``every``; return the samples.

    ``light``: one stage per request holding the statement, the cached lookup and the
    model call, without the log line (the test suite's shorter run).
    """
    ri.configure(exporter=DownExporter(), log_file=os.devnull, log_level="info")
    counter = OpenSpans()
    provider = trace.get_tracer_provider()
    provider.add_span_processor(counter)  # type: ignore[attr-defined]
    engine = create_engine("sqlite://", poolclass=StaticPool)
    handle = ri.instrument_sqlalchemy(engine)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE docs (id INTEGER PRIMARY KEY, body TEXT)"))
        conn.execute(text("INSERT INTO docs (body) VALUES ('a'), ('b'), ('c')"))
    model = Model()
    log = ri.get_logger("soak")
    samples: list[Sample] = []

    async def light_request(i: int, conn: Any) -> None:
        async with ri.stage(ri.PipelineStage.RETRIEVAL):
            conn.execute(text("SELECT id FROM docs WHERE id > :n"), {"n": i % 2}).all()
            rerank_score(i % 50)
            await model.generate(f"question {i % 7 if i % 7 else i}")

    async def request(i: int, conn: Any) -> None:
        with ri.request_context(request_id=f"r-{i}"):
            async with ri.stage(ri.PipelineStage.SEARCH):
                async with ri.stage(ri.PipelineStage.RETRIEVAL):
                    rows = conn.execute(text("SELECT id FROM docs WHERE id > :n"), {"n": i % 2})
                    for (doc,) in rows:
                        rerank_score(doc + i % 50)
                async with ri.stage(ri.PipelineStage.GENERATION):
                    await model.generate(f"question {i % 7 if i % 7 else i}")
                log.info("request done", docs=2)

    def sample(done: int) -> None:
        gc.collect()
        point = Sample(
            calls=done,
            rss_mb=round(rss_mb(), 1),
            open_spans=len(counter.open),
            in_flight=_in_flight(model),
            listeners=len(engine.dispatch.before_cursor_execute),
            internal=_internal_sizes(),
        )
        samples.append(point)
        if not quiet:
            print(
                f"{done:>9,} calls  rss {point.rss_mb:8.1f} MB  open spans {point.open_spans}"
                f"  in flight {point.in_flight}  listeners {point.listeners}",
                flush=True,
            )

    async def main() -> None:
        run = light_request if light else request
        with engine.connect() as conn:
            for i in range(1, calls + 1):
                await run(i, conn)
                if i % every == 0 or i == warmup:
                    sample(i)

    started = time.perf_counter()
    try:
        sample(0)
        asyncio.run(main())
    finally:
        handle.uninstrument()
        engine.dispose()
        ri.shutdown(timeout=1.0)
    return Result(samples, warmup, time.perf_counter() - started)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the soak from the command line; exit status 1 when a goal is missed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--every", type=int, default=100_000)
    parser.add_argument("--warmup", type=int, default=100_000)
    args = parser.parse_args(argv)
    result = soak(args.calls, args.every, args.warmup)
    print(
        f"\n{args.calls:,} calls in {result.seconds:.0f} s "
        f"({result.seconds / args.calls * 1e6:.0f} us per request of 5 spans, 1 statement, "
        f"2 cache lookups, 1 model call, 4 log lines)"
    )
    print(
        f"resident memory after warm-up: {result.rss_growth_mb():+.1f} MB "
        f"(goal < {GOAL_RSS_GROWTH_MB:.0f} MB)"
    )
    problems = result.problems()
    for problem in problems:
        print(f"FAIL: {problem}")
    if not problems:
        print("OK: memory and open state plateaued")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
