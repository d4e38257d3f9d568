"""``rag-instrument demo``: an instrumented RAG pipeline you can run anywhere.

A few concurrent requests go through query rewriting, retrieval, reranking and generation
under a ``search`` stage with budgets. The model is a local stand-in with latency, token
counts and transient faults, behind the library's retry and cache mixins; the database,
embedding and vector-index work is simulated and reported to the breakdown. The JSON log is
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

__all__ = ["StandInLLM", "add_parser", "run", "run_demo", "stage_table"]

_BUDGETS = {"search": 150.0, "retrieval": 60.0, "generation": 90.0}


async def _sleep_ms(mean_ms: float, rng: random.Random) -> float:
    ms = max(1.0, rng.gauss(mean_ms, mean_ms / 4))
    await asyncio.sleep(ms / 1000)
    return ms


class TransientError(ConnectionError):
    """A stand-in for a 503 from the model API (retried by :class:`StandInLLM`)."""

    status_code = 503


class StandInLLM(ri.CacheMixin, ri.RetryMixin, ri.LLMProvider):
    """A local model with latency, token counts and an occasional transient fault."""

    system = "stand-in"
    model = "demo-llm"
    retry_attempts = 3
    retry_wait_min = 0.005
    retry_wait_max = 0.02
    timeout = 2.0

    def __init__(self, fault_rate: float, seed: int = 7) -> None:
        self._rng = random.Random(seed)  # noqa: S311 - simulated faults, not security
        self._fault_rate = fault_rate
        self._faulted: set[str] = set()

    async def _generate(self, prompt: str, **params: Any) -> ri.LLMResult:
        mean_ms = float(params.get("mean_ms", 40.0))
        await asyncio.sleep(max(1.0, self._rng.gauss(mean_ms, mean_ms / 4)) / 1000)
        # Transient: a prompt that failed once succeeds when retried.
        if prompt not in self._faulted and self._rng.random() < self._fault_rate:
            self._faulted.add(prompt)
            raise TransientError("model overloaded, try again")
        words = prompt.split()
        return ri.LLMResult(
            text=f"answer based on {len(words)} words",
            input_tokens=len(words),
            output_tokens=12,
            finish_reason="stop",
            model=self.model,
        )


@ri.stage(ri.PipelineStage.QUERY_REWRITING)
async def rewrite(question: str, llm: StandInLLM) -> str:
    """Rewrite the question with the model (repeated questions come from the cache)."""
    await llm.generate(f"Rewrite as a search query: {question}", temperature=0, mean_ms=8)
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
async def generate(query: str, docs: list[str], llm: StandInLLM) -> str:
    """Answer from the documents."""
    context = " ".join(docs)
    result = await llm.generate(f"Context: {context}\nQuestion: {query}", temperature=0)
    return result.text if isinstance(result, ri.LLMResult) else str(result)


@ri.stage(ri.PipelineStage.SEARCH)
async def search(question: str, request_id: str, seed: int, llm: StandInLLM) -> str:
    """One request through the whole pipeline."""
    rng = random.Random(seed)  # noqa: S311 - simulated latency, not security
    ri.bind_context(request_id=request_id)
    query = await rewrite(question, llm)
    docs = await retrieve(query, rng)
    top = await rerank(query, docs, rng)
    return await generate(query, top, llm)


async def _requests(count: int, concurrency: int, fault_rate: float) -> None:
    gate = asyncio.Semaphore(concurrency)
    llm = StandInLLM(fault_rate)
    StandInLLM.cache_clear()

    async def one(i: int) -> None:
        async with gate:
            # A few questions repeat, so that the cache has something to answer.
            question = f"What is question {i % max(1, count - 2)}?"
            try:
                await search(question, f"req-{i:03d}", i, llm)
            except Exception:
                pass

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


def run_demo(
    log_file: Path, requests: int = 12, concurrency: int = 4, fault_rate: float = 0.15
) -> list[dict[str, Any]]:
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
        asyncio.run(_requests(requests, concurrency, fault_rate))
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
    rows = run_demo(
        log_file,
        requests=args.requests,
        concurrency=args.concurrency,
        fault_rate=args.fault_rate,
    )
    elapsed = time.perf_counter() - started
    print(f"Ran {args.requests} requests ({args.concurrency} at a time) in {elapsed:.2f} s.")
    print(f"JSON log: {log_file.resolve()}")
    retries = cache_hits = 0
    for raw in log_file.read_bytes().splitlines():
        line = orjson.loads(raw)
        retries += line.get("event") == "retrying"
        if line.get("event") == "search completed":
            cache_hits += line.get("breakdown", {}).get("cache", {}).get("hits", 0)
    print(
        f"Model calls retried after transient faults: {retries}; answered from cache: {cache_hits}."
    )
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
    parser.add_argument(
        "--fault-rate",
        type=float,
        default=0.15,
        help="share of model calls that fail transiently (default 0.15)",
    )
    parser.set_defaults(func=run)
