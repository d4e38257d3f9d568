"""Overhead of LLMProvider, ri.retry and ri.cached, against their uninstrumented baselines.

Run: ``python benchmarks/bench_llm.py``. Prints one table; the "configured" rows use a span
exporter that drops everything and a JSON log written to a temporary file.
"""

from __future__ import annotations

import asyncio
import hashlib
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import tenacity
from cachetools import TTLCache
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

import rag_instrument as ri
from rag_instrument.cache import cached
from rag_instrument.retry import retry

REPEATS = 7


class _Drop(SpanExporter):
    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def per_call_us(fn: Callable[[], Any], n: int) -> float:
    for _ in range(max(n // 10, 100)):  # warm-up
        fn()
    runs = []
    for _ in range(REPEATS):
        start = time.perf_counter_ns()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter_ns() - start) / n / 1000.0)
    return statistics.median(runs)


def per_call_us_async(make: Callable[[], Any], n: int) -> float:
    async def loop(count: int) -> None:
        for _ in range(count):
            await make()

    asyncio.run(loop(max(n // 10, 100)))
    runs = []
    for _ in range(REPEATS):
        start = time.perf_counter_ns()
        asyncio.run(loop(n))
        runs.append((time.perf_counter_ns() - start) / n / 1000.0)
    return statistics.median(runs)


class Bare:
    async def _generate(self, prompt: str, **params: Any) -> ri.LLMResult:
        return ri.LLMResult("ok", 1, 1, "stop", "m")


class Provider(ri.LLMProvider):
    system, model = "bench", "m"

    async def _generate(self, prompt: str, **params: Any) -> ri.LLMResult:
        return ri.LLMResult("ok", 1, 1, "stop", "m")


def main() -> None:
    tmp = Path(tempfile.mkdtemp()) / "bench.jsonl"
    ri.configure(exporter=_Drop(), log_file=str(tmp))
    rows: list[tuple[str, float, str]] = []

    # 1. provider call: span + log line + metrics vs the bare coroutine
    bare, provider = Bare(), Provider()
    base = per_call_us_async(lambda: bare._generate("q"), 5_000)
    instrumented = per_call_us_async(lambda: provider.generate("q"), 5_000)
    rows.append(("uninstrumented _generate (await)", base, ""))
    rows.append(("LLMProvider.generate, configured", instrumented, ""))
    rows.append(("  overhead: span + log line + metrics", instrumented - base, "(no goal set)"))

    # 2. retry happy path
    def plain() -> int:
        return 1

    ours = retry(plain)
    theirs = tenacity.retry(stop=tenacity.stop_after_attempt(3), reraise=True)(plain)
    p = per_call_us(plain, 200_000)
    o = per_call_us(ours, 200_000)
    t = per_call_us(theirs, 20_000)
    rows.append(("plain call", p, ""))
    rows.append(("@tenacity.retry, first-attempt success", t, ""))
    rows.append(("@ri.retry, first-attempt success", o, ""))
    rows.append(("  overhead vs plain call", o - p, "goal <= 2 us"))

    # 3. cache hit for a 2 KB prompt
    prompt = ("lorem ipsum dolor sit amet " * 80)[:2048]

    @cached(maxsize=1024, ttl=3600)
    def answer(q: str) -> str:
        return "a"

    answer(prompt)
    ttl: TTLCache[str, str] = TTLCache(maxsize=1024, ttl=3600)
    lock = threading.Lock()
    data = prompt.encode()
    ttl[hashlib.sha256(data).hexdigest()] = "a"

    def bare_lookup() -> str | None:
        key = hashlib.sha256(prompt.encode()).hexdigest()
        with lock:
            return ttl.get(key)

    sha = per_call_us(lambda: hashlib.sha256(prompt.encode()).hexdigest(), 100_000)
    b = per_call_us(bare_lookup, 100_000)
    c = per_call_us(lambda: answer(prompt), 100_000)
    rows.append(("sha256 of the 2 KB key", sha, ""))
    rows.append(("bare TTLCache lookup + sha256", b, ""))
    rows.append(("@ri.cached hit, configured (counters, breakdown)", c, ""))
    rows.append(("  overhead over the key's sha256", c - sha, "goal <= 4 us"))
    ri.shutdown()

    width = max(len(r[0]) for r in rows)
    print(f"Python {sys.version.split()[0]}, median of {REPEATS} runs, microseconds per call")
    print(f"{'case'.ljust(width)}  {'us/call':>9}  goal")
    for name, value, goal in rows:
        print(f"{name.ljust(width)}  {value:9.2f}  {goal}")


if __name__ == "__main__":
    main()
