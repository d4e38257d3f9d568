"""Query plans of slow SELECTs: ``EXPLAIN (FORMAT JSON)`` and SQLite ``EXPLAIN QUERY PLAN``.

The plan is read on the connection that ran the statement, with the same parameters,
through a fresh DBAPI cursor: SQLAlchemy's events do not see it (no span, no recursion) and
the application's cursor and its pending rows are untouched. ``EXPLAIN`` without
``ANALYZE`` never runs the statement, and only single statements whose first keyword is
``SELECT`` (or ``WITH`` without data-modifying CTEs) are explained: the driver would run
the rest of ``"SELECT 1; INSERT ..."`` for real (``StatementInfo.explainable``). On
PostgreSQL it runs inside a ``SAVEPOINT`` when a transaction is open, so even a failing
``EXPLAIN`` cannot abort the application's transaction. Plans are sanitised like the
statement text: literal values that the planner folded into conditions
(``Filter: (email = 'a@b.c'::text)``) become ``?``.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Final

from rag_instrument.db._sql import _scan

__all__ = ["Explainer", "sanitize_plan"]

_SAVEPOINT: Final = "rag_instrument_explain"
_PG_EXPLAIN = "EXPLAIN (FORMAT JSON) "  # never ANALYZE: the statement must not run again
_INTERVAL_S: Final = 60.0
_MAX_SHAPES: Final = 4096


def sanitize_plan(value: Any, dialect: str | None = None) -> Any:
    """Replace SQL literals in every string of a plan (keys and numbers are kept)."""
    if isinstance(value, str):
        return _scan(value, dialect)[0]
    if isinstance(value, dict):
        return {k: sanitize_plan(v, dialect) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [sanitize_plan(v, dialect) for v in value]
    return value


def _sqlite_plan(dbapi_conn: Any, statement: str, parameters: Any) -> list[str]:
    cursor = dbapi_conn.cursor()
    try:
        cursor.execute("EXPLAIN QUERY PLAN " + statement, parameters)
        rows = cursor.fetchall()
    finally:
        cursor.close()
    # Rows are (id, parent, notused, detail); indent children under their parent.
    depth: dict[int, int] = {}
    lines: list[str] = []
    for row in rows:
        node, parent, detail = int(row[0]), int(row[1]), str(row[3])
        level = depth.get(parent, -1) + 1
        depth[node] = level
        lines.append("  " * level + detail)
    return lines


def _postgres_plan(dbapi_conn: Any, statement: str, parameters: Any) -> Any:
    cursor = dbapi_conn.cursor()
    try:
        try:
            cursor.execute(f"SAVEPOINT {_SAVEPOINT}")
            savepoint = True
        except Exception:
            # No transaction block (autocommit): nothing to protect.
            savepoint = False
        try:
            cursor.execute(_PG_EXPLAIN + statement, parameters)
            rows = cursor.fetchall()
        except BaseException:
            if savepoint:
                cursor.execute(f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}")
                cursor.execute(f"RELEASE SAVEPOINT {_SAVEPOINT}")
            raise
        if savepoint:
            cursor.execute(f"RELEASE SAVEPOINT {_SAVEPOINT}")
    finally:
        cursor.close()
    plan = rows[0][0]
    if isinstance(plan, str | bytes):
        plan = json.loads(plan)
    return plan


class Explainer:
    """Reads plans, at most once per statement shape per minute."""

    def __init__(self, dialect_name: str) -> None:
        self.dialect_name = dialect_name
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    @property
    def supported(self) -> bool:
        """Whether plans can be read for this dialect."""
        return self.dialect_name in ("sqlite", "postgresql")

    def due(self, shape: str) -> bool:
        """Claim the right to explain ``shape`` now (False within a minute of the last)."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(shape)
            if last is not None and now - last < _INTERVAL_S:
                return False
            if len(self._last) >= _MAX_SHAPES:
                self._last = {k: t for k, t in self._last.items() if now - t < _INTERVAL_S}
            self._last[shape] = now
            return True

    def plan(self, dbapi_conn: Any, statement: str, parameters: Any) -> Any:
        """The sanitised plan of ``statement``; raises whatever the driver raises."""
        if self.dialect_name == "sqlite":
            # Line by line, keeping the indentation that shows the plan's tree.
            lines = _sqlite_plan(dbapi_conn, statement, parameters)
            stripped = [line.lstrip(" ") for line in lines]
            return [
                " " * (len(line) - len(detail)) + sanitize_plan(detail, "sqlite")
                for line, detail in zip(lines, stripped, strict=True)
            ]
        return sanitize_plan(_postgres_plan(dbapi_conn, statement, parameters), "postgresql")
