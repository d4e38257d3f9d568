"""``rag-instrument demo``: an instrumented RAG application you can run anywhere.

Documents are ingested (stored with the SQLAlchemy ORM in SQLite, embedded in batches,
indexed in an in-process vector index), then requests go through query rewriting,
retrieval, reranking and generation under a ``search`` stage with budgets. The model is a
local stand-in with latency, token counts and transient faults, behind the library's retry
and cache mixins. The JSON log and an HTML report are written where the output says, and
the log is analysed the way ``rag-instrument analyze`` does.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import rag_instrument as ri
from rag_instrument.analysis import Analysis, analyze
from rag_instrument.analysis._render import render_table, use_colour
from rag_instrument.analysis._report import render_report
from rag_instrument.cli._demo_pipeline import (
    DIMENSIONS,
    Corpus,
    StandInLLM,
    VectorIndex,
    open_corpus,
    search,
)
from rag_instrument.cli.analyze import at_least_one
from rag_instrument.cli.report import overwrites_input

__all__ = ["BUDGETS", "StandInLLM", "add_parser", "run", "run_demo"]

BUDGETS = {"search": 150.0, "retrieval": 60.0, "generation": 90.0}
_DOCUMENTS = 60


class _Progress:
    """``[#####.....] 23/50`` on stderr, only when stderr is a terminal."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total, self.done, self.stream = total, 0, stream
        self.enabled = total > 0 and _isatty(stream)

    def step(self) -> None:
        self.done += 1
        if self.enabled:
            filled = 30 * self.done // self.total
            self.stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total}")
            if self.done == self.total:
                self.stream.write("\n")
            self.stream.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def make_index(args: argparse.Namespace) -> VectorIndex | None:
    """The vector index to use: ``None`` is the in-process one (the hook for real engines)."""
    if not args.milvus:
        return None
    try:
        # Instrumented with instrument_milvus: the trace shows each Milvus call (#8).
        from rag_instrument.cli._demo_milvus import MilvusIndex
    except ImportError:
        raise ImportError(
            "--milvus needs pymilvus (and milvus-lite for a local file): "
            "pip install 'rag_instrument[milvus]'"
        ) from None
    return MilvusIndex(args.milvus, dimensions=DIMENSIONS)


async def _requests(
    count: int,
    concurrency: int,
    fault_rate: float,
    database_url: str | None,
    index: VectorIndex | None,
    progress: _Progress,
) -> None:
    corpus: Corpus = await open_corpus(database_url, _DOCUMENTS, seed=11, index=index)
    gate = asyncio.Semaphore(concurrency)
    llm = StandInLLM(fault_rate)
    StandInLLM.cache_clear()

    async def one(i: int) -> None:
        async with gate:
            # A few questions repeat, so that the cache has something to answer.
            question = f"What is question {i % max(1, count - max(2, count // 8))}?"
            try:
                await search(question, f"req-{i:03d}", i, corpus, llm)
            except Exception:
                pass  # a request that failed is in the log as failed: nothing to add here
            progress.step()

    try:
        await asyncio.gather(*(one(i) for i in range(count)))
    finally:
        corpus.close()


def run_demo(
    log_file: Path,
    requests: int = 50,
    concurrency: int = 4,
    fault_rate: float = 0.15,
    *,
    report: Path | None = None,
    database_url: str | None = None,
    index: VectorIndex | None = None,
    progress: TextIO | None = None,
) -> Analysis:
    """Run the demo application, write its JSON log (and report); return the analysis.

    An existing ``log_file`` is replaced.
    """
    if log_file.exists():
        log_file.unlink()
    # Explicit settings: an environment set up for an application (RAG_INSTRUMENT_ENABLED,
    # _LOG_LEVEL, _LOG_FORMAT ...) must not empty the demo's table.
    ri.configure(
        service_name="rag-instrument-demo",
        log_file=str(log_file),
        log_format="json",
        log_level="info",
        enabled=True,
        budgets=BUDGETS,
        capture_logging=False,
    )
    try:
        asyncio.run(
            _requests(
                requests,
                concurrency,
                fault_rate,
                database_url,
                index,
                _Progress(requests, progress or sys.stderr),
            )
        )
    finally:
        ri.shutdown()
    result = analyze([str(log_file)], budgets=BUDGETS, details=report is not None)
    if report is not None:
        report.write_text(render_report(result, [str(log_file)]), encoding="utf-8")
    return result


def _unreachable(url: str) -> str | None:
    """Why the database at ``url`` cannot be used, in one line; ``None`` when it can."""
    import sqlalchemy
    from sqlalchemy import exc as sa_exc

    from rag_instrument._sanitize import redact_text

    driver = sqlalchemy.engine.make_url(url).drivername
    libpq = driver in ("postgresql", "postgresql+psycopg", "postgresql+psycopg2")
    try:
        engine = sqlalchemy.create_engine(
            url, connect_args={"connect_timeout": 10} if libpq else {}
        )
    except (ImportError, sa_exc.ArgumentError) as exc:  # no such driver, or not installed
        return redact_text(f"cannot use {driver}: {str(exc).splitlines()[0]}")
    try:
        with engine.connect():
            return None
    except sa_exc.DBAPIError as exc:  # refused, unknown host, no such database, bad role
        first = str(exc.orig or exc).strip().split("\n", 1)[0]
        where = engine.url.render_as_string(hide_password=True)
        return redact_text(f"cannot connect to {where}: {first}")
    finally:
        engine.dispose()


def _unwritable(path: Path) -> str | None:
    """Why ``path`` cannot be written (checked before the demo runs), or ``None``."""
    existed = path.exists()
    try:
        if path.is_dir():
            return "is a directory"
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    if not existed:
        path.unlink(missing_ok=True)
    return None


def run(args: argparse.Namespace) -> int:
    """Entry point of ``rag-instrument demo``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_file = Path(args.log_file or f"rag-demo-{stamp}.jsonl")
    report = Path(args.report)
    if overwrites_input(report, [str(log_file)]) is not None:
        print(
            f"rag-instrument: --report {report} is the log file: write the report elsewhere",
            file=sys.stderr,
        )
        return 2
    engine = "PostgreSQL" if args.postgres else "SQLite"
    try:
        import sqlalchemy  # noqa: F401
    except ImportError:
        engine = "no database"
        if args.postgres:
            print(
                "rag-instrument: --postgres needs SQLAlchemy and psycopg: "
                "pip install 'rag_instrument[postgres]'",
                file=sys.stderr,
            )
            return 2
        print(
            "SQLAlchemy is not installed, so the database steps are left out "
            "(pip install 'rag_instrument[sqlalchemy]' to include them).\n"
        )
    if args.postgres:
        problem = _unreachable(args.postgres)
        if problem is not None:
            print(f"rag-instrument demo: {problem}", file=sys.stderr)
            return 2
    for what, path in (("--log-file", log_file), ("--report", report)):
        problem = _unwritable(path)
        if problem is not None:
            print(f"rag-instrument demo: {what} {path}: {problem}", file=sys.stderr)
            return 2
    try:
        index = make_index(args)
    except ImportError as exc:
        print(f"rag-instrument: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    result = run_demo(
        log_file,
        requests=args.requests,
        concurrency=args.concurrency,
        fault_rate=args.fault_rate,
        report=report,
        database_url=args.postgres,
        index=index,
    )
    elapsed = time.perf_counter() - started
    print(
        f"Ingested {_DOCUMENTS} documents, then ran {args.requests} requests "
        f"({args.concurrency} at a time) in {elapsed:.1f} s ({engine}, "
        f"{'Milvus' if args.milvus else 'in-process vector index'}, stand-in LLM)."
    )
    print(f"JSON log: {log_file.resolve()}")
    print(f"Report:   {report.resolve()}  <- open it in a browser")
    print()
    sys.stdout.write(render_table(result, colour=use_colour(sys.stdout)))
    print()
    print(f"The same table from the log: rag-instrument analyze {log_file}")
    return 0


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a share from 0 to 1, got {text!r}")
    return value


def _database_url(text: str) -> str:
    try:
        from sqlalchemy.engine import make_url
    except ImportError:  # the demo says which extra it needs when it gets there
        return text
    from rag_instrument._sanitize import redact_text

    shown = redact_text(text)  # a password in the URL is not echoed
    try:
        url = make_url(text)
    except Exception:
        raise argparse.ArgumentTypeError(
            f"expected a database URL such as postgresql+psycopg://user@host/db, got {shown!r}"
        ) from None
    if not url.drivername.startswith("postgresql"):
        raise argparse.ArgumentTypeError(
            f"expected a PostgreSQL URL (postgresql+psycopg://...), got {shown!r}"
        )
    if url.drivername in ("postgresql+asyncpg", "postgresql+aiopg", "postgresql+psycopg_async"):
        raise argparse.ArgumentTypeError(
            f"the demo runs its database synchronously: use postgresql+psycopg://..., "
            f"got {shown!r}"
        )
    return text


def add_parser(subparsers: Any) -> None:
    """Register ``demo``."""
    parser = subparsers.add_parser(
        "demo",
        help="run a sample instrumented RAG application, write its log and report, analyse it",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    parser.add_argument(
        "--requests", type=at_least_one, default=50, help="requests to run (default 50)"
    )
    parser.add_argument(
        "--concurrency",
        type=at_least_one,
        default=4,
        help="requests in flight at once (default 4)",
    )
    parser.add_argument(
        "--log-file",
        help="where to write the JSON log (default rag-demo-<time>.jsonl; an existing file "
        "is replaced)",
    )
    parser.add_argument(
        "--report", default="report.html", help="where to write the HTML report (default "
        "report.html)",
    )
    parser.add_argument(
        "--fault-rate",
        type=_share,
        default=0.15,
        help="share of model calls that fail transiently (default 0.15)",
    )
    parser.add_argument(
        "--postgres",
        metavar="URL",
        type=_database_url,
        help="use this PostgreSQL database instead of SQLite in memory, e.g. "
        "postgresql+psycopg://user@host/db (tables are created and dropped)",
    )
    parser.add_argument(
        "--milvus",
        metavar="URI",
        nargs="?",
        const="milvus-demo.db",
        help="use Milvus for the vector index: Milvus Lite in a local file (default "
        "milvus-demo.db) or a server URI such as http://localhost:19530 (extra milvus; a "
        "collection is created and dropped)",
    )
    parser.set_defaults(func=run)
