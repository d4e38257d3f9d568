"""``rag-instrument db-doctor URL``: the PostgreSQL health report for people and scripts.

The URL's password is never printed: every echoed URL is masked (everything between
``://user:`` and the last ``@``, so an unencoded ``@`` in the password is masked too, and
query parameters such as ``?password=`` or ``&sslpassword=``), and the driver's own error
text is scrubbed of every form of them. A bad URL (a port that is not a number, say)
or an unreachable server is one line on standard error and exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import urllib.parse
from typing import Any

from rag_instrument._sanitize import is_secret_key, redact_text

__all__ = ["add_parser", "mask_url", "render_table", "run"]

_EXIT_UNREACHABLE = 2


#: Drivers of SQLAlchemy's async engines: the report is read through psycopg instead.
_ASYNC_DRIVERS = frozenset({"asyncpg", "psycopg_async", "aiopg"})


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def add_parser(subparsers: Any) -> None:
    """Register the ``db-doctor`` subcommand."""
    parser = subparsers.add_parser(
        "db-doctor",
        help="diagnose a PostgreSQL database (connections, cache, indexes, slow statements)",
        description="Read-only PostgreSQL health report: connection states, sizes, cache hit "
        "ratio, index usage, sequential scans and the slowest statements.",
    )
    parser.add_argument("url", metavar="URL", help="postgresql://user:password@host:port/db")
    parser.add_argument("--format", choices=("table", "json"), default="table")
    parser.add_argument(
        "--top", type=_positive_int, default=10, help="rows per ranked section (default 10)"
    )
    parser.add_argument(
        "--connect-timeout", type=_seconds, default=5.0, help="seconds (default 5)"
    )
    parser.set_defaults(func=run)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# name=value pairs of the query string (also after "#", which no driver reads but a user
# may have typed); the names are judged like log keys (password, sslpassword, token ...).
_QUERY_PAIR = re.compile(r"([?&;#]([^=&;#?]*)=)([^&;#]*)")


def _query_secrets(url: str) -> list[tuple[int, int]]:
    """Where secret-named query parameter values are in ``url``."""
    start = url.find("?")
    if start < 0:
        return []
    return [
        (m.start(3), m.end(3))
        for m in _QUERY_PAIR.finditer(url, start)
        if m.group(3) and is_secret_key(urllib.parse.unquote(m.group(2)))
    ]


def _password_span(url: str) -> tuple[int, int] | None:
    """Where the password is in ``url``: from after ``user:`` up to the last ``@``.

    Read on the raw text, not through a URL parser: an unencoded ``@`` or ``/`` in the
    password makes parsers split it, and any part they leave outside would be echoed.
    """
    scheme = url.find("://")
    start = scheme + 3 if scheme >= 0 else 0
    at = url.rfind("@")
    if at <= start:
        return None
    colon = url.find(":", start, at)
    if colon < 0:
        return None  # "user@host": no password
    return colon + 1, at


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (also for unparsable input).

    Both the user-info password and secret-named query parameters (``?password=``,
    ``&sslpassword=``) are masked.
    """
    spans = _query_secrets(url)
    where = _password_span(url)
    if where is not None:
        spans = [s for s in spans if s[0] >= where[1]] + [where]
    for start, end in sorted(spans, reverse=True):
        url = f"{url[:start]}***{url[end:]}"
    return url


def _secrets(raw: str, parsed_password: object) -> list[str]:
    """Every form of the password that could appear in a driver's message, longest first."""
    found: set[str] = set()
    where = _password_span(raw)
    spans = _query_secrets(raw) + ([where] if where is not None else [])
    for start, end in spans:
        secret = raw[start:end]
        found.update({secret, urllib.parse.unquote(secret), urllib.parse.unquote_plus(secret)})
    if parsed_password:
        found.add(str(parsed_password))
    return sorted((s for s in found if s), key=len, reverse=True)


def _error(message: str, detail: str = "", secrets: list[str] | None = None) -> int:
    """Print one line (``detail``, the driver's text, scrubbed of ``secrets``); return 2."""
    for secret in secrets or ():
        detail = detail.replace(secret, "***")
    line = f"{message}: {detail}" if detail else message
    print(f"rag-instrument db-doctor: {' '.join(line.split())}", file=sys.stderr)
    return _EXIT_UNREACHABLE


def _first_line(exc: BaseException) -> str:
    try:
        lines = str(exc).strip().splitlines()
    except Exception:
        lines = []
    return lines[0] if lines else type(exc).__name__


def run(args: argparse.Namespace) -> int:
    """Run the report; return the exit status (0 ok, 2 bad URL or unreachable server)."""
    try:
        from sqlalchemy.engine import make_url

        from rag_instrument.db.postgres import diagnose  # noqa: F401 (checks the extra)
    except ImportError:
        return _error("needs SQLAlchemy and psycopg: pip install 'rag_instrument[postgres]'")

    raw: str = args.url
    if "://" not in raw and "=" in raw:  # a libpq connection string: host=... dbname=...
        return _run_conninfo(raw, args)
    shown = mask_url(raw)
    try:
        url = make_url(raw)
    except Exception as exc:  # ArgumentError; ValueError for a port that is not a number
        # Only the type: the parser's message can quote parts of the URL. Not a URL, the
        # text may still carry a secret in another shape (password=..., a token).
        return _error(f"not a database URL: {redact_text(shown)} ({type(exc).__name__})")
    if url.drivername == "postgres" or url.drivername.startswith("postgres+"):
        # postgres:// (Heroku, Render, libpq): SQLAlchemy knows only postgresql://.
        url = url.set(drivername="postgresql" + url.drivername[len("postgres") :])
    return _run_url(raw, url, shown, args)


def _run_conninfo(raw: str, args: argparse.Namespace) -> int:
    """``db-doctor "host=... dbname=... user=..."``: the same report for a libpq string."""
    from sqlalchemy.engine import URL

    try:
        from psycopg.conninfo import conninfo_to_dict

        params = {k: str(v) for k, v in conninfo_to_dict(raw).items() if v is not None}
    except ImportError:
        return _error(
            "needs psycopg for a connection string: pip install 'rag_instrument[postgres]'"
        )
    except Exception as exc:
        return _error(f"not a connection string: {redact_text(raw)} ({type(exc).__name__})")
    password = params.pop("password", None)
    port = params.pop("port", None)
    try:
        url = URL.create(
            "postgresql+psycopg",
            username=params.pop("user", None),
            password=password,
            host=params.pop("host", None) or params.pop("hostaddr", None),
            port=int(port) if port else None,
            database=params.pop("dbname", None),
            query=params,
        )
    except Exception as exc:
        return _error(f"not a connection string: {redact_text(raw)} ({type(exc).__name__})")
    shown = url.render_as_string(hide_password=True)
    return _run_url(url.render_as_string(hide_password=False), url, shown, args)


def _run_url(raw: str, url: Any, shown: str, args: argparse.Namespace) -> int:
    from sqlalchemy import create_engine
    from sqlalchemy.exc import SQLAlchemyError

    from rag_instrument.db.postgres import diagnose

    where = _password_span(raw)
    if where is not None and url.password != urllib.parse.unquote(raw[where[0] : where[1]]):
        # "u:p@ss@host": the parser took "ss@host" for the host, and the driver's error
        # would then quote part of the password.
        return _error(
            f"not a database URL: {shown} (the password seems to contain an unencoded "
            "'@': percent-encode it as %40)"
        )
    secrets = _secrets(raw, url.password)
    if url.get_backend_name() not in ("postgresql", "postgres"):
        return _error(f"only PostgreSQL is supported, got {url.get_backend_name()!r}")
    if url.get_driver_name() in ("", "psycopg2") and "+" not in url.drivername:
        url = url.set(drivername="postgresql+psycopg")  # psycopg 3 comes with the extra
    elif url.get_driver_name() in _ASYNC_DRIVERS:
        # The report reads through a sync engine: the same server through psycopg.
        url = url.set(drivername="postgresql+psycopg")
    connect_args: dict[str, Any] = {}
    if url.get_driver_name() in ("psycopg", "psycopg2"):
        connect_args["connect_timeout"] = max(1, round(args.connect_timeout))
    try:
        engine = create_engine(url, connect_args=connect_args)
    except Exception as exc:  # ArgumentError, ImportError, a bad query argument ...
        return _error(f"cannot use {shown}", _first_line(exc), secrets)
    try:
        report = diagnose(engine, top=args.top)
    except (SQLAlchemyError, OSError, ValueError) as exc:
        orig = getattr(exc, "orig", None)
        text = _first_line(orig if orig is not None else exc)
        return _error(f"cannot connect to {shown}", text, secrets)
    finally:
        engine.dispose()
    if args.format == "json":
        print(json.dumps({"url": shown, **report.to_dict()}, indent=2))
    else:
        print(f"database: {shown}")
        print(render_table(report.to_dict()))
    return 0


def _table(rows: list[dict[str, Any]], columns: list[str]) -> list[str]:
    cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    rows_out = [columns, *cells]
    return [
        ("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True))).rstrip()
        for r in rows_out
    ]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


_SECTIONS = (
    ("database", "Database"),
    ("connections", "Connections (pg_stat_activity)"),
    ("largest_tables", "Largest tables"),
    ("cache_hit", "Cache hit ratio (target above 90%, judged once 1,000 blocks were read)"),
    ("index_usage", "Index usage"),
    ("unused_indexes", "Unused indexes (never scanned, not unique)"),
    ("seq_scan_tables", "Tables read by sequential scans"),
    ("slowest_by_mean", "Slowest statements by mean time (pg_stat_statements)"),
    ("slowest_by_total", "Statements by total time (pg_stat_statements)"),
)


def render_table(report: dict[str, Any]) -> str:
    """The report (as from ``Report.to_dict()``) as plain-text tables.

    A reason shared by several sections (pg_stat_statements missing) is printed once; the
    findings do not repeat what the sections already say.
    """
    lines: list[str] = []
    said: set[str] = set()
    for key, title in _SECTIONS:
        section = report[key]
        lines.append("")
        lines.append(title)
        reason = section["unavailable"]
        if reason is not None:
            lines.append(
                "  unavailable: (see above)" if reason in said else f"  unavailable: {reason}"
            )
            said.add(reason)
        elif not section["rows"]:
            lines.append("  (none)")
        else:
            lines.extend(_table(section["rows"], list(section["rows"][0])))
    lines.append("")
    lines.append("Findings")
    findings = [f for f in report["findings"] if not f["message"].startswith("not available:")]
    if not findings:
        lines.append("  nothing stands out against the usual targets")
    lines.extend(f"  [{f['level']}] {f['section']}: {f['message']}" for f in findings)
    return "\n".join(lines)
