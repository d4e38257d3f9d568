"""``rag-instrument analyze`` against the README's jq pipeline on a large log (issue 7).

Generates a 1,000,000-line (about 200 MB) log shaped like a RAG service's: per request an
application line, the stage lines (rewrite, embedding inside retrieval, retrieval, rerank,
generation, search) with breakdowns, the LLM call lines, the web middleware's
``request completed`` line, and now and then a retry, a slow query and a budget warning.
Then, in the same run, times the jq pipeline and ``rag-instrument analyze --format json``
(each a fresh process; wall-clock time and peak resident memory from ``wait4``), checks that
both give the same ``stage``/``avg_time``/``max_time``, and prints them side by side.

Goal: at most one tenth of the jq time, peak memory under 100 MB.

    .venv/bin/python benchmarks/bench_analyze.py [--lines 1000000] [--log PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import orjson

from rag_instrument.analysis._parallel import default_jobs

JQ = (
    "jq 'select(.context.pipeline_stage) | {stage: .context.pipeline_stage, "
    "time: .execution_time_ms}' | jq -s 'group_by(.stage) | map({stage: .[0].stage, "
    "avg_time: (map(.time) | add / length), max_time: (map(.time) | max)})'"
)
STAGES = ("query_rewriting", "embedding", "retrieval", "reranking", "generation", "search")


def generate(path: Path, lines: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    written = 0
    request = 0
    start = 1_764_000_000.0
    with path.open("wb", buffering=1 << 20) as out:
        while written < lines:
            request += 1
            trace = f"{rng.getrandbits(128):032x}"
            context = {"request_id": f"r{request}"}
            now = start + request * 0.05

            def emit(record: dict[str, object], now: float = now) -> None:
                nonlocal written
                if written < lines:
                    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
                    head = {"timestamp": f"{stamp}.{int(now * 1e6) % 1_000_000:06d}Z"}
                    out.write(orjson.dumps({**head, **record}) + b"\n")
                    written += 1

            def base(
                event: str, level: str = "info", logger: str = "rag_instrument", trace: str = trace
            ) -> dict:
                return {"level": level, "event": event, "logger": logger, "trace_id": trace,
                        "span_id": f"{rng.getrandbits(64):016x}"}

            emit({**base("question received", logger="app"), "context": context,
                  "chars": rng.randint(10, 300)})
            durations = {s: max(0.5, rng.lognormvariate(3, 0.6)) for s in STAGES}
            for stage in STAGES:
                ms = round(durations[stage] if stage != "search" else sum(durations.values()), 3)
                if stage in ("query_rewriting", "generation"):
                    if rng.random() < 0.03:
                        emit({**base("retrying", "warning"), "context": context, "stage": stage,
                              "target": "OpenAIProvider.generate", "attempt": 1,
                              "error_type": "RateLimitError", "wait_s": 0.5})
                    emit({**base("llm call completed"), "context": context, "stage": stage,
                          "execution_time_ms": round(ms * 0.9, 3), "provider": "openai",
                          "model": "gpt-4o", "cache_hit": rng.random() < 0.2})
                if stage == "retrieval" and rng.random() < 0.01:
                    emit({**base("slow query", "warning"), "context": context, "stage": stage,
                          "pipeline_stage": stage, "db.query.text": "SELECT * FROM chunks "
                          "WHERE collection_id = %(c)s ORDER BY created_at",
                          "execution_time_ms": 210.5, "db.system.name": "postgresql"})
                breakdown: dict[str, dict[str, float]] = {}
                if stage == "retrieval":
                    breakdown["db"] = {"count": 3, "ms": round(ms * 0.1, 3)}
                    breakdown["vector"] = {"count": 1, "ms": round(ms * 0.5, 3)}
                if stage == "generation":
                    breakdown["llm"] = {"count": 1, "ms": round(ms * 0.6, 3)}
                record = {**base(f"{stage} completed"),
                          "context": {"pipeline_stage": stage, **context},
                          "execution_time_ms": ms}
                if breakdown:
                    record["breakdown"] = breakdown
                emit(record)
            emit({**base("request completed"), "context": context, "method": "POST",
                  "route": "/api/search", "status": 200,
                  "execution_time_ms": round(sum(durations.values()) + 1.5, 3)})


def _tree_rss_kb(pid: int) -> int:
    """Resident memory of a process and all its descendants, from /proc (Linux)."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            with open(f"/proc/{current}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            with open(f"/proc/{current}/task/{current}/children") as children:
                stack.extend(int(c) for c in children.read().split())
        except (OSError, ValueError):
            continue
    return total


def measure(command: list[str] | str, out: Path) -> tuple[float, float, float]:
    """Wall-clock seconds, CPU seconds (user + system, children included) and peak memory
    (MB: the resident memory of the whole process tree, sampled every 10 ms)."""
    peak = 0
    with out.open("wb") as handle:
        started = time.perf_counter()
        proc = subprocess.Popen(command, stdout=handle, shell=isinstance(command, str))
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.wait(0.01):
                peak = max(peak, _tree_rss_kb(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - started
        done.set()
        sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{command!r} failed with exit status {proc.returncode}")
    return elapsed, usage.ru_utime + usage.ru_stime, max(peak, usage.ru_maxrss) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--log", type=Path, help="reuse (or write) the log here")
    args = parser.parse_args()
    if shutil.which("jq") is None:
        sys.exit("jq is not installed (.ci/services.sh installs it)")
    with tempfile.TemporaryDirectory() as tmp:
        log = args.log or Path(tmp) / "rag.jsonl"
        if not log.exists():
            started = time.perf_counter()
            generate(log, args.lines)
            print(f"generated {log} in {time.perf_counter() - started:.1f} s")
        size_mb = log.stat().st_size / 1e6
        with log.open("rb") as handle:
            count = sum(1 for _ in handle)
        print(f"log: {count:,} lines, {size_mb:.0f} MB\n")

        jq = measure(f"cat {log} | {JQ}", Path(tmp) / "jq.json")
        ours_cmd = [sys.executable, "-m", "rag_instrument.cli", "analyze", str(log),
                    "--format", "json"]
        ours = measure(ours_cmd, Path(tmp) / "ours.json")
        single = measure([*ours_cmd, "--jobs", "1"], Path(tmp) / "single.json")

        # Sums do not depend on the order of the lines: one process or two, every figure
        # is the same to the last bit.
        assert (Path(tmp) / "ours.json").read_bytes() == (Path(tmp) / "single.json").read_bytes()
        theirs_rows = {r["stage"]: r for r in json.loads((Path(tmp) / "jq.json").read_text())}
        for name in ("ours.json", "single.json"):
            rows = {r["stage"]: r for r in json.loads((Path(tmp) / name).read_text())}
            assert set(theirs_rows) == set(rows), (set(theirs_rows), set(rows))
            for stage, row in theirs_rows.items():
                assert abs(rows[stage]["avg_time"] - row["avg_time"]) <= 1e-9 * row["avg_time"]
                assert rows[stage]["max_time"] == row["max_time"], stage

        jobs = default_jobs()
        print(f"{'':<44}{'wall s':>8}{'CPU s':>8}{'peak MB':>9}")
        for label, (wall, cpu, mb) in (
            ("jq pipeline (README)", jq),
            (f"rag-instrument analyze --format json ({jobs} jobs)", ours),
            ("rag-instrument analyze --format json --jobs 1", single),
        ):
            print(f"{label:<44}{wall:>8.2f}{cpu:>8.2f}{mb:>9.0f}")
        load = os.getloadavg()[0]
        print(
            f"\nours / jq, wall time: {ours[0] / jq[0]:.3f} ({jobs} jobs), "
            f"{single[0] / jq[0]:.3f} (1 job); CPU time: {ours[1] / jq[1]:.3f} ({jobs} jobs), "
            f"{single[1] / jq[1]:.3f} (1 job)\n(goal <= 0.100 of jq's time; load average "
            f"{load:.1f} on {os.cpu_count()} CPUs)"
        )
        print(
            f"peak memory: {ours[2]:.0f} MB ({jobs} jobs), {single[2]:.0f} MB (1 job), "
            f"goal < 100 MB; jq {jq[2]:.0f} MB. Same stage/avg_time/max_time as jq; the same "
            "JSON from 1 and 2 jobs."
        )


if __name__ == "__main__":
    main()
