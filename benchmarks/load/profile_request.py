"""Where the instrumentation's CPU goes, per request of examples/fastapi_app, in one process.

    python benchmarks/load/profile_request.py [--requests 400] [--rounds 3] [--profile]

The app runs in this process behind httpx's ASGI transport, one request at a time, with
the model latency at 0. Each configuration adds one piece, so the difference between rows
is that piece's cost (CPU time of the whole process per request, all threads; the
configurations take turns for ``--rounds`` rounds and each reports its best round;
"request path" is the main thread's share, "other threads" the database driver's and
the span export threads; the OTLP receiver runs in a child process, so its decoding
does not count):

    plain          configure(enabled=False), no middleware, engine not instrumented
    spans only     spans recorded, dropped at export; log level "critical" (no lines);
                   no metrics (a custom exporter has no metrics reader)
    + log lines    JSON lines to a file
    + OTLP spans   spans encoded and sent over OTLP/HTTP to a local receiver
    + metrics      the library's metrics recorded too, exported over OTLP every 30 s

``--profile`` prints the top functions (cProfile, by own time) of the last configuration's
last round (the main thread only: the export thread's encoding does not show there).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from examples.fastapi_app.app import create_app  # noqa: E402
from run import QUESTIONS, WORDS  # noqa: E402
from sink import ChildSink  # noqa: E402

import rag_instrument as ri  # noqa: E402


class DropExporter(SpanExporter):
    def export(self, spans: Sequence[object]) -> SpanExportResult:  # type: ignore[override]
        return SpanExportResult.SUCCESS


async def run(
    app: Any, requests: int, profile: cProfile.Profile | None = None
) -> tuple[float, float]:
    import random

    rng = random.Random(0)
    transport = httpx.ASGITransport(app=app)
    client_cm = httpx.AsyncClient(transport=transport, base_url="http://x")
    async with app.router.lifespan_context(app), client_cm as client:
        docs = [
            {"source": f"d{n}", "text": " ".join(rng.choice(WORDS) for _ in range(80))}
            for n in range(300)
        ]
        for start in range(0, 300, 100):
            await client.post("/api/ingest", json={"documents": docs[start : start + 100]})
        for n in range(50):  # warm-up
            await client.post("/api/search", json={"query": QUESTIONS[n % 6]})
        ri.force_flush()
        if profile is not None:
            profile.enable()
        cpu = time.process_time()
        main = time.thread_time()
        for n in range(requests):
            await client.post("/api/search", json={"query": QUESTIONS[n % 6]})
        main = time.thread_time() - main
        ri.force_flush()
        cpu = time.process_time() - cpu
        if profile is not None:
            profile.disable()
    return cpu / requests * 1e6, main / requests * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="rag-profile-"))
    rows: list[tuple[str, float]] = []
    with ChildSink() as receiver:
        configs: list[tuple[str, dict[str, Any] | None]] = [
            ("plain", None),
            ("spans only", {"exporter": DropExporter(), "log_level": "critical"}),
            ("+ log lines", {"exporter": DropExporter(), "log_file": str(tmp / "a.jsonl")}),
            (
                "+ OTLP spans",
                {
                    "exporter": "otlp",
                    "metrics_exporter": "none",
                    "otlp_endpoint": receiver.endpoint,
                    "log_file": str(tmp / "b.jsonl"),
                },
            ),
            (
                "+ metrics",
                {
                    "exporter": "otlp",
                    "otlp_endpoint": receiver.endpoint,
                    "log_file": str(tmp / "c.jsonl"),
                },
            ),
        ]
        best: dict[str, float] = {}
        best_main: dict[str, float] = {}
        for round_no in range(args.rounds):
            for n, (name, settings) in enumerate(configs):
                db = f"sqlite+aiosqlite:///{tmp / f'{round_no}-{n}.db'}"
                if settings is None:
                    ri.configure(enabled=False)
                    app = create_app(db, llm_latency_ms=0, configure=False, instrument=False)
                else:
                    ri.configure(service_name="profile", **settings)
                    app = create_app(db, llm_latency_ms=0, configure=False, instrument=True)
                last = n == len(configs) - 1 and round_no == args.rounds - 1
                profile = cProfile.Profile() if args.profile and last else None
                us, main_us = asyncio.run(run(app, args.requests, profile))
                if us < best.get(name, us + 1):
                    best[name], best_main[name] = us, main_us
                ri.shutdown()
                if profile is not None:
                    out = io.StringIO()
                    stats = pstats.Stats(profile, stream=out).sort_stats("tottime")
                    stats.print_stats(35)
                    print(out.getvalue())
        for name, _settings in configs:
            rows.append((name, best[name]))
            print(
                f"{name:<14}{best[name]:>9.0f} us CPU per request (best of {args.rounds}); "
                f"request path {best_main[name]:.0f} us, other threads "
                f"{best[name] - best_main[name]:.0f} us"
            )
    base = rows[0][1]
    for (name, us), (_, before) in zip(rows[1:], rows[:-1], strict=True):
        print(f"{name:<14}{us - before:>+9.0f} us   (total over plain {us - base:+.0f} us)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
