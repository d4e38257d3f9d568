"""What instrumenting a Milvus search costs (issue 8).

One run builds a Milvus Lite collection of 10,000 random 128-dimension vectors (IVF_FLAT,
nlist 128) and times the same single-vector, top-10 search (nprobe 16) three ways, each on
its own client of the same server:

* bare: an uninstrumented ``MilvusClient``;
* instrumented: ``instrument_milvus(client)``, inside a stage;
* instrumented + vector_search: the instrumented client called from a ``@vector_search``
  function, inside a stage.

Spans go to the SDK's batch processor and an exporter that discards them; log lines to a
file. The configurations alternate round by round, so a change in machine load does not
land on one of them only; each figure is the median over rounds of the round's mean. On a
loaded machine the difference between them is within the noise, so the run also measures the
instrumentation alone: the same wrappers around a stand-in ``search`` that returns a
recorded result at once, beside the bare search's time. Goal: the instrumentation adds
under 2% to the search's time.

    .venv/bin/python benchmarks/bench_vector.py [--searches 300] [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from pymilvus import DataType, MilvusClient

import rag_instrument as ri

DIM = 128
ROWS = 10_000
PARAMS = {"metric_type": "L2", "params": {"nprobe": 16}}


class Discard(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def build(path: str) -> None:
    client = MilvusClient(path)
    rng = random.Random(42)
    schema = MilvusClient.create_schema(auto_id=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=DIM)
    index = client.prepare_index_params()
    index.add_index("vector", index_type="IVF_FLAT", metric_type="L2", params={"nlist": 128})
    client.create_collection("bench", schema=schema, index_params=index)
    for start in range(0, ROWS, 2000):
        client.insert(
            "bench",
            [
                {"id": i, "vector": [rng.random() for _ in range(DIM)]}
                for i in range(start, start + 2000)
            ],
        )
    client.flush("bench")
    client.close()


def mean_ms(search: Callable[[list[float]], Any], queries: list[list[float]]) -> float:
    started = time.perf_counter()
    for query in queries:
        search(query)
    return (time.perf_counter() - started) / len(queries) * 1000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--searches", type=int, default=300, help="searches per round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.db")
        build(path)
        ri.configure(
            service_name="bench-vector",
            exporter=Discard(),
            log_file=os.path.join(tmp, "bench.jsonl"),
        )
        bare = MilvusClient(path)
        instrumented = ri.instrument_milvus(MilvusClient(path))
        both = ri.instrument_milvus(MilvusClient(path))

        def search_bare(query: list[float]) -> Any:
            return bare.search("bench", data=[query], limit=10, search_params=PARAMS)

        def search_instrumented(query: list[float]) -> Any:
            return instrumented.search("bench", data=[query], limit=10, search_params=PARAMS)

        @ri.vector_search(db_system="milvus", index_type="IVF_FLAT", metric="L2")
        def search_both(query: list[float], limit: int = 10) -> Any:
            return both.search("bench", data=[query], limit=limit, search_params=PARAMS)

        rng = random.Random(7)
        queries = [[rng.random() for _ in range(DIM)] for _ in range(args.searches)]
        for search in (search_bare, search_instrumented, search_both):  # warm up, read schema
            mean_ms(search, queries[:50])
        results: dict[str, list[float]] = {"bare": [], "instrumented": [], "both": []}
        for _ in range(args.rounds):
            results["bare"].append(mean_ms(search_bare, queries))
            with ri.stage("retrieval"):
                results["instrumented"].append(mean_ms(search_instrumented, queries))
            with ri.stage("retrieval"):
                results["both"].append(mean_ms(search_both, queries))
        base = statistics.median(results["bare"])
        print(f"Milvus Lite, {ROWS} x {DIM}-d vectors, IVF_FLAT nlist 128, nprobe 16, top 10")
        print(f"{'bare':<34} {base:8.3f} ms per search")
        for key, label in (
            ("instrumented", "instrument_milvus"),
            ("both", "instrument_milvus + vector_search"),
        ):
            value = statistics.median(results[key])
            added = (value - base) / base * 100.0
            verdict = "met" if added < 2.0 else "MISSED"
            print(
                f"{label:<34} {value:8.3f} ms per search ({added:+.2f}%) "
                f"goal < 2%: {verdict}"
            )
        # The instrumentation alone: the wrappers around a search that costs nothing.
        recorded = search_bare(queries[0])
        alone = MilvusClient(path)
        alone.search = lambda *a, **k: recorded  # type: ignore[method-assign]
        ri.instrument_milvus(alone)

        @ri.vector_search(db_system="milvus", index_type="IVF_FLAT", metric="L2")
        def alone_both(query: list[float], limit: int = 10) -> Any:
            return alone.search("bench", data=[query], limit=limit, search_params=PARAMS)

        def alone_instrumented(query: list[float]) -> Any:
            return alone.search("bench", data=[query], limit=10, search_params=PARAMS)

        many = queries * 10
        for label, fn in (
            ("instrument_milvus alone", alone_instrumented),
            ("instrument_milvus + vector_search alone", alone_both),
        ):
            with ri.stage("retrieval"):
                mean_ms(fn, many)  # warm up
                cost_us = min(mean_ms(fn, many) for _ in range(3)) * 1000.0
            share = cost_us / (base * 1000.0) * 100.0
            verdict = "met" if share < 2.0 else "MISSED"
            print(
                f"{label:<42} {cost_us:7.1f} us per search = {share:.2f}% of a bare search; "
                f"goal < 2%: {verdict}"
            )
        for client in (bare, instrumented, both, alone):
            client.close()
        ri.shutdown()


if __name__ == "__main__":
    main()
