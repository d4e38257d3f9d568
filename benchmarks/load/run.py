"""Load test: examples/fastapi_app under uvicorn, with and without instrumentation, in one run.

    python benchmarks/load/run.py [--requests 1500] [--concurrency 16] [--rounds 3]
                                  [--llm-ms 20] [--llm-jitter 0] [--docs 300]

Two uvicorn servers (``serve.py``, 127.0.0.1, ephemeral ports) serve the example RAG app:
``plain`` (``configure(enabled=False)``, no middleware, engine not instrumented) and
``instrumented`` (``RequestMiddleware``, SQLAlchemy instrumentation, every stage; spans go
over OTLP/HTTP to a local receiver in a child process (``sink.py``), JSON log lines to a
file). Each round drives ``POST /api/search`` on both, taking turns (ABBA), with a fixed
number of requests at a fixed concurrency; the load stops by itself. Printed per mode:
requests per second, p50 / p95 / p99 latency (over the requests of all rounds together:
a percentile of 3 x 600 requests moves less than one of 600), the servers' CPU time per
request (user + system of the whole process, the export thread included, and ``event
loop``: the main thread's share, the request path), and how many spans and log lines
each request produced; then the cost, and the same cost round by round (each round's two
runs are next to each other in time, so their spread shows how far the machine moved).
The goal of issue #9: instrumentation costs under 3% of throughput and of p95.

The stand-in model waits ``--llm-ms`` per call (two calls per search, like a rewrite and
an answer); SQL and scoring are real work on SQLite. With the same wait for every call the
clients stay in step, so a request at p95 also waits for the CPU of most of the others;
``--llm-jitter 0.5`` draws each wait between half and one and a half times ``--llm-ms``
(the same draws in both servers), as a real model's varying latency would. The client
runs on the same machine: compare the two modes of one run, not runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sink import ChildSink

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

_VOCABULARY = (
    "pool connection index hnsw recall latency cache token prompt rerank embedding vector "
    "postgres sqlite query plan budget stage retrieval generation answer context chunk "
    "document score filter tenant batch timeout retry stream trace span log"
)
WORDS = _VOCABULARY.split(" ")
QUESTIONS = [
    "why is retrieval slow under load",
    "how to tune hnsw recall",
    "cache llm answers for repeated prompts",
    "what makes the connection pool run out",
    "which stage exceeds its budget",
    "how are chunks scored and reranked",
]


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU time of process ``pid`` (all its threads), or of its thread ``tid``."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


@dataclass
class Server:
    name: str
    env: dict[str, str]
    process: subprocess.Popen[str] | None = None
    port: int = 0
    results: list[Run] = field(default_factory=list)

    def start(self) -> None:
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("RAG_INSTRUMENT_", "OTEL_"))
        }
        env.update(self.env)
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "serve.py")],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        assert self.process.stdout is not None
        self.port = int(self.process.stdout.readline())

    async def wait_ready(self) -> None:
        async with httpx.AsyncClient(base_url=self.url) as client:
            for _ in range(200):
                try:
                    if (await client.get("/health")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.name} server did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


async def seed(server: Server, docs: int) -> None:
    rng = random.Random(0)
    documents = [
        {"source": f"doc{n}.md", "text": " ".join(rng.choice(WORDS) for _ in range(80))}
        for n in range(docs)
    ]
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        for start in range(0, docs, 100):
            response = await client.post(
                "/api/ingest", json={"documents": documents[start : start + 100]}
            )
            response.raise_for_status()


async def drive(server: Server, requests: int, concurrency: int) -> Run:
    """Send ``requests`` searches, ``concurrency`` at a time; latency percentiles and rps."""
    latencies: list[float] = []
    issued = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    assert server.process is not None
    async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=60) as client:

        async def worker() -> None:
            nonlocal issued
            while issued < requests:
                body = {"query": QUESTIONS[issued % len(QUESTIONS)], "top_k": 3}
                issued += 1
                start = time.perf_counter()
                response = await client.post("/api/search", json=body)
                latencies.append(time.perf_counter() - start)
                if response.status_code != 200:
                    raise RuntimeError(f"{server.name}: HTTP {response.status_code}")

        pid = server.process.pid
        # The main thread runs uvicorn's event loop: the request path. The rest is the
        # other threads' (the span export thread, the database driver's).
        cpu_before, loop_before = cpu_seconds(pid), cpu_seconds(pid, pid)
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
        cpu = cpu_seconds(pid) - cpu_before
        loop_cpu = cpu_seconds(pid, pid) - loop_before
    return Run(latencies, wall, cpu, loop_cpu)


@dataclass
class Run:
    """One mode's requests in one round (or several rounds pooled)."""

    latencies: list[float]
    wall: float
    cpu: float
    loop_cpu: float

    @classmethod
    def pooled(cls, runs: list[Run]) -> Run:
        return cls(
            [latency for run in runs for latency in run.latencies],
            sum(run.wall for run in runs),
            sum(run.cpu for run in runs),
            sum(run.loop_cpu for run in runs),
        )

    def row(self) -> dict[str, float]:
        """Requests per second, p50 / p95 / p99 in ms, CPU ms per request (all, main thread)."""
        latencies = sorted(self.latencies)
        count = len(latencies)

        def pct(p: float) -> float:
            return latencies[min(count - 1, int(p / 100 * count))] * 1000

        return {
            "rps": count / self.wall,
            "p50": pct(50),
            "p95": pct(95),
            "p99": pct(99),
            "cpu_ms": self.cpu / count * 1000,
            "loop_ms": self.loop_cpu / count * 1000,
        }


async def main_async(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="rag-load-"))
    log_file = tmp / "instrumented.jsonl"
    with ChildSink() as receiver:
        common = {
            "RAG_EXAMPLE_LLM_MS": str(args.llm_ms),
            "RAG_EXAMPLE_LLM_JITTER": str(args.llm_jitter),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        plain = Server(
            "plain",
            {
                **common,
                "RAG_EXAMPLE_INSTRUMENT": "0",
                "RAG_EXAMPLE_DATABASE_URL": f"sqlite+aiosqlite:///{tmp / 'plain.db'}",
                # The application's own lines (ingestion) still go to a file, as in the
                # instrumented server: enabled=False leaves them to the configuration.
                "RAG_INSTRUMENT_LOG_FILE": str(tmp / "plain.jsonl"),
            },
        )
        instrumented = Server(
            "instrumented",
            {
                **common,
                "RAG_EXAMPLE_INSTRUMENT": "1",
                "RAG_EXAMPLE_DATABASE_URL": f"sqlite+aiosqlite:///{tmp / 'instrumented.db'}",
                "RAG_INSTRUMENT_SERVICE_NAME": "load-test",
                "RAG_INSTRUMENT_EXPORTER": "otlp",
                "RAG_INSTRUMENT_OTLP_ENDPOINT": receiver.endpoint,
                "RAG_INSTRUMENT_LOG_FILE": str(log_file),
            },
        )
        servers = [plain, instrumented]
        try:
            for server in servers:
                server.start()
            for server in servers:
                await server.wait_ready()
                await seed(server, args.docs)
                await drive(server, max(args.requests // 5, 50), args.concurrency)  # warm-up
            spans_before = receiver.span_count()
            lines_before = _count_lines(log_file)
            for round_no in range(args.rounds):
                order = servers if round_no % 2 == 0 else servers[::-1]
                for server in order:
                    server.results.append(await drive(server, args.requests, args.concurrency))
        finally:
            for server in servers:
                server.stop()
        measured = args.requests * args.rounds
        spans = (receiver.span_count() - spans_before) / measured
        lines = (_count_lines(log_file) - lines_before) / measured

    print(
        f"POST /api/search: {args.requests} requests x {args.rounds} rounds per mode, "
        f"concurrency {args.concurrency}, model latency {args.llm_ms:g} ms x 2 calls"
        + (f" (each within {args.llm_jitter:.0%} of it)" if args.llm_jitter else "")
    )
    print(
        f"{'mode':<14}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'CPU ms/req':>12}"
        f"{'event loop':>12}{'others':>8}"
    )
    summary: dict[str, dict[str, float]] = {}
    for server in servers:
        row = Run.pooled(server.results).row()
        summary[server.name] = row
        print(
            f"{server.name:<14}{row['rps']:>9.1f}{row['p50']:>9.1f}{row['p95']:>9.1f}"
            f"{row['p99']:>9.1f}{row['cpu_ms']:>12.2f}{row['loop_ms']:>12.2f}"
            f"{row['cpu_ms'] - row['loop_ms']:>8.2f}"
        )
    base, ours = summary["plain"], summary["instrumented"]
    rps_cost = (1 - ours["rps"] / base["rps"]) * 100
    p95_cost = (ours["p95"] / base["p95"] - 1) * 100
    cpu_cost = ours["cpu_ms"] - base["cpu_ms"]
    loop_cost = ours["loop_ms"] - base["loop_ms"]
    print(
        f"instrumentation: {spans:.1f} spans and {lines:.1f} log lines per request "
        f"(OTLP to a local receiver, JSON lines to a file)"
    )
    print(
        f"cost: throughput {rps_cost:+.1f}% (goal < 3%), p95 {p95_cost:+.1f}% (goal < 3%), "
        f"CPU {cpu_cost * 1000:+.0f} us per request ({loop_cost * 1000:+.0f} us on the event loop)"
    )
    rounds = [
        (plain_run.row(), ours_run.row())
        for plain_run, ours_run in zip(plain.results, instrumented.results, strict=True)
    ]
    print(
        "round by round: throughput "
        + ", ".join(f"{(1 - o['rps'] / b['rps']) * 100:+.1f}%" for b, o in rounds)
        + "; p95 "
        + ", ".join(f"{(o['p95'] / b['p95'] - 1) * 100:+.1f}%" for b, o in rounds)
    )
    return 0


def _count_lines(path: Path) -> int:
    try:
        with path.open("rb") as handle:
            return sum(1 for _ in handle)
    except FileNotFoundError:
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--llm-ms", type=float, default=20.0)
    parser.add_argument("--llm-jitter", type=float, default=0.0)
    parser.add_argument("--docs", type=int, default=300)
    args: Any = parser.parse_args(argv)
    if not 0.0 <= args.llm_jitter < 1.0:
        parser.error(f"--llm-jitter must be at least 0 and below 1, got {args.llm_jitter:g}")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
