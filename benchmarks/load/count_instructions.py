"""Instructions per search request of examples/fastapi_app, by configuration (callgrind).

    python benchmarks/load/count_instructions.py [--requests 20 80] [--only NAME ...]

CPU time on a shared 2-core machine moves by more than the pieces ``profile_request.py``
tries to tell apart (the same row has measured +450 us and +2,135 us an hour apart).
``valgrind --tool=callgrind`` counts instructions instead, which repeat to a fraction of a
percent run to run, whatever else the machine does. Each configuration of
``profile_request.py`` runs under callgrind twice, with two request counts (``--requests``;
the setup, ingestion and warm-up are the same in both), and the difference divided by
the difference in requests is its instructions per request, the export thread included.
The OTLP receiver runs in a child process, as in ``profile_request.py``, so its decoding
is not counted. Spans are exported in batches of 1,024 and at the run's flushes, and metrics
at shutdown, not on a timer (a timed export would make the count follow the machine's
speed). Slow (callgrind runs Python about 50 times slower; the app's setup,
ingestion and warm-up run in every run): 2 to 5 minutes a run on our machines, two runs
at a time. ``PYTHONHASHSEED`` is fixed for repeatability.

Instructions are not time: a piece that misses the caches costs more per instruction.
They show which version of a piece does less work, reliably, on any machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CONFIGS = ("plain", "spans only", "+ log lines", "+ OTLP spans", "+ metrics")


def _settings(name: str, endpoint: str, tmp: Path) -> dict[str, Any] | None:
    from profile_request import DropExporter

    return {
        "plain": None,
        "spans only": {"exporter": DropExporter(), "log_level": "critical"},
        "+ log lines": {"exporter": DropExporter(), "log_file": str(tmp / "a.jsonl")},
        "+ OTLP spans": {
            "exporter": "otlp",
            "metrics_exporter": "none",
            "otlp_endpoint": endpoint,
            "log_file": str(tmp / "b.jsonl"),
        },
        "+ metrics": {
            "exporter": "otlp",
            "otlp_endpoint": endpoint,
            "log_file": str(tmp / "c.jsonl"),
        },
    }[name]


def child(name: str, requests: int, endpoint: str) -> None:
    """One configuration, ``requests`` requests (run under callgrind by :func:`main`)."""
    sys.path.insert(0, str(HERE))
    import profile_request as pr

    import rag_instrument as ri

    tmp = Path(tempfile.mkdtemp(prefix="rag-count-"))
    settings = _settings(name, endpoint, tmp)
    db = f"sqlite+aiosqlite:///{tmp / 'x.db'}"
    if settings is None:
        ri.configure(enabled=False)
        app = pr.create_app(db, llm_latency_ms=0, configure=False, instrument=False)
    else:
        ri.configure(service_name="count", **settings)
        app = pr.create_app(db, llm_latency_ms=0, configure=False, instrument=True)
    asyncio.run(pr.run(app, requests))
    ri.shutdown()


def _count(name: str, requests: int, endpoint: str, out: Path) -> int:
    # Exports at the run's flushes only, not on a timer: under callgrind a second of wall
    # time holds a few requests, and a timed export's HTTP request would be shared by few
    # spans (under load, one a second carries hundreds), so the count would follow the
    # machine's speed. Batches of 1,024 spans and one metrics export at shutdown (the
    # same in both runs) keep the figures repeatable.
    env = dict(
        os.environ,
        PYTHONHASHSEED="0",
        OTEL_BSP_SCHEDULE_DELAY="3600000",
        OTEL_METRIC_EXPORT_INTERVAL="3600000",
    )
    done = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            sys.executable,
            __file__,
            "--child",
            name,
            str(requests),
            endpoint,
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        sys.exit(f"{name} ({requests} requests) failed:\n{done.stderr[-3000:]}")
    return int(found.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, nargs=2, default=(20, 80))
    parser.add_argument("--only", nargs="*", choices=CONFIGS, default=None)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]), args.child[2])
        return 0
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (Debian: apt-get install valgrind)")
    sys.path.insert(0, str(HERE))
    from sink import ChildSink

    few, many = args.requests
    names = args.only or list(CONFIGS)
    tmp = Path(tempfile.mkdtemp(prefix="rag-callgrind-"))
    with ChildSink() as receiver, ThreadPoolExecutor(2) as pool:
        jobs = {
            (name, n): pool.submit(_count, name, n, receiver.endpoint, tmp / f"{i}-{n}.out")
            for i, name in enumerate(names)
            for n in (few, many)
        }
        per_request = {
            name: (jobs[(name, many)].result() - jobs[(name, few)].result()) / (many - few)
            for name in names
        }
    previous = None
    for name in names:
        value = per_request[name]
        step = "" if previous is None else f"  {value - previous:>+12,.0f} over the row before"
        print(f"{name:<14}{value:>14,.0f} instructions per request{step}")
        previous = value
    return 0


if __name__ == "__main__":
    sys.exit(main())
