"""``rag-instrument demo``: an instrumented RAG pipeline you can run anywhere.

A few concurrent requests go through query rewriting, retrieval, reranking and generation
(each with simulated latency), under a ``search`` stage with budgets. The JSON log is
written to a file, whose name is printed, and a per-stage timing table is computed from
that file, the same way ``jq`` over the log would.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

import rag_instrument as ri
from rag_instrument import _breakdown

__all__ = ["add_parser", "run", "run_demo", "stage_table"]

_BUDGETS = {"search": 150.0, "retrieval": 60.0, "generation": 90.0}


async def _sleep_ms(mean_ms: float, rng: random.Random) -> float:
    ms = max(1.0, rng.gauss(mean_ms, mean_ms / 4))
    await asyncio.sleep(ms / 1000)
    return ms


@ri.stage(ri.PipelineStage.QUERY_REWRITING)
async def rewrite(question: str, rng: random.Random) -> str:
    """Rewrite the question (an LLM call in a real service)."""
    ms = await _sleep_ms(8, rng)
    _breakdown.record("llm", ms)
    return question.lower().strip("?")


@ri.stage(ri.PipelineStage.EMBEDDING)
async def embed(text: str, rng: random.Random) -> list[float]:
    """Embed the query."""
    ms = await _sleep_ms(5, rng)
    _breakdown.record("embedding", ms)
    return [float(ord(c) % 7) for c in text[:8]]


@ri.stage(ri.PipelineStage.RETRIEVAL, top_k=5)
async def retrieve(query: str, rng: random.Random) -> list[str]:
    """Look up metadata, then search the vector index."""
    await embed(query, rng)
    for _ in range(2):
        _breakdown.record("db", await _sleep_ms(3, rng))
    # One request in a few hits a cold index partition: the budget line says so.
    _breakdown.record("vector", await _sleep_ms(70 if rng.random() < 0.25 else 20, rng))
    return [f"doc-{i}" for i in range(5)]


@ri.stage(ri.PipelineStage.RERANKING)
async def rerank(query: str, docs: list[str], rng: random.Random) -> list[str]:
    """Order the candidates."""
    await _sleep_ms(6, rng)
    return sorted(docs, key=lambda d: hash((query, d)))[:3]


@ri.stage(ri.PipelineStage.GENERATION)
async def generate(query: str, docs: list[str], rng: random.Random) -> str:
    """Answer from the documents (an LLM call in a real service)."""
    _breakdown.record("llm", await _sleep_ms(45, rng))
    return f"answer to {query!r} from {len(docs)} documents"


@ri.stage(ri.PipelineStage.SEARCH)
async def search(question: str, request_id: str, seed: int) -> str:
    """One request through the whole pipeline."""
    rng = random.Random(seed)  # noqa: S311 - simulated latency, not security
    ri.bind_context(request_id=request_id)
    query = await rewrite(question, rng)
    docs = await retrieve(query, rng)
    top = await rerank(query, docs, rng)
    return await generate(query, top, rng)


async def _requests(count: int, concurrency: int) -> None:
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with gate:
            await search(f"What is question {i}?", f"req-{i:03d}", seed=i)

    await asyncio.gather(*(one(i) for i in range(count)))


def stage_table(lines: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-stage count, mean, p50, p95 and max of ``execution_time_ms``.

    Selects the lines that carry ``context.pipeline_stage`` and ``execution_time_ms``,
    as the README's jq one-liner does.
    """
    times: dict[str, list[float]] = {}
    for line in lines:
        stage_name = (line.get("context") or {}).get("pipeline_stage")
        ms = line.get("execution_time_ms")
        if stage_name and isinstance(ms, int | float):
            times.setdefault(stage_name, []).append(float(ms))
    rows = []
    for stage_name in sorted(times):
        values = sorted(times[stage_name])
        rows.append(
            {
                "stage": stage_name,
                "count": len(values),
                "avg_ms": sum(values) / len(values),
                "p50_ms": _percentile(values, 50),
                "p95_ms": _percentile(values, 95),
                "max_ms": values[-1],
            }
        )
    return rows


def _percentile(sorted_values: list[float], pct: float) -> float:
    rank = max(0, math.ceil(pct / 100 * len(sorted_values)) - 1)
    return sorted_values[rank]


def run_demo(log_file: Path, requests: int = 12, concurrency: int = 4) -> list[dict[str, Any]]:
    """Run the demo pipeline, write its JSON log to ``log_file`` and return the table rows."""
    # Explicit settings: an environment set up for an application (RAG_INSTRUMENT_ENABLED,
    # _LOG_LEVEL, _LOG_FORMAT ...) must not empty the demo's table.
    ri.configure(
        service_name="rag-instrument-demo",
        log_file=str(log_file),
        log_format="json",
        log_level="info",
        enabled=True,
        budgets=_BUDGETS,
        capture_logging=False,
    )
    try:
        asyncio.run(_requests(requests, concurrency))
    finally:
        ri.shutdown()
    lines = []
    for raw in log_file.read_bytes().splitlines():
        try:
            lines.append(orjson.loads(raw))
        except orjson.JSONDecodeError:
            continue
    return stage_table(lines)


def _print_table(rows: list[dict[str, Any]], budgets: dict[str, float]) -> None:
    header = (
        f"{'stage':<16} {'count':>5} {'avg_ms':>8} {'p50_ms':>8} {'p95_ms':>8} {'max_ms':>8}"
        "  budget"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        budget = budgets.get(row["stage"])
        note = f"{budget:.0f} ms" if budget is not None else ""
        if budget is not None and row["max_ms"] > budget:
            note += " (exceeded)"
        print(
            f"{row['stage']:<16} {row['count']:>5} {row['avg_ms']:>8.1f} {row['p50_ms']:>8.1f} "
            f"{row['p95_ms']:>8.1f} {row['max_ms']:>8.1f}  {note}"
        )


def run(args: argparse.Namespace) -> int:
    """Entry point of ``rag-instrument demo``."""
    log_file = Path(args.log_file or f"rag-demo-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
    if log_file.exists():
        log_file.unlink()
    started = time.perf_counter()
    rows = run_demo(log_file, requests=args.requests, concurrency=args.concurrency)
    elapsed = time.perf_counter() - started
    print(f"Ran {args.requests} requests ({args.concurrency} at a time) in {elapsed:.2f} s.")
    print(f"JSON log: {log_file.resolve()}")
    print()
    _print_table(rows, _BUDGETS)
    print()
    print("Which stage blew its budget, and on what:")
    print(
        f"  jq -c 'select(.event == \"budget exceeded\") | {{stage, execution_time_ms, largest}}' "
        f"{log_file}"
    )
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``demo``."""
    parser = subparsers.add_parser(
        "demo",
        help="run a sample instrumented RAG pipeline and print per-stage timings",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    parser.add_argument("--requests", type=int, default=12, help="requests to run (default 12)")
    parser.add_argument(
        "--concurrency", type=int, default=4, help="requests in flight at once (default 4)"
    )
    parser.add_argument(
        "--log-file",
        help="where to write the JSON log (default rag-demo-<time>.jsonl; an existing file "
        "is replaced)",
    )
    parser.set_defaults(func=run)
