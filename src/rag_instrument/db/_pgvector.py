"""pgvector searches: search parameters in effect on the connection and the index type.

A statement that uses one of pgvector's distance operators (``<->`` L2, ``<=>`` cosine,
``<#>`` negative inner product, ``<+>`` L1, ``<~>`` Hamming, ``<%>`` Jaccard) is a vector
search. Its span gets the ``rag.vector.*`` attributes:

* ``hnsw.ef_search`` / ``ivfflat.probes``: read with ``current_setting()`` on the same
  connection, cached per DBAPI connection until the connection is checked in, a
  transaction ends (``SET LOCAL`` ends with it) or a ``SET`` / ``RESET`` / ``set_config()``
  touching them is seen.
* the index that served the search (``rag.vector.index_type`` ``hnsw`` / ``ivfflat`` and
  ``rag.vector.index_name``): from the query plan when a slow search was explained
  (``explain_slow=True``), which also tells a sequential scan from an index scan; otherwise
  the table's pgvector index whose operator class matches the operator, from the catalogue.
  The catalogue is read once per table (again after DDL through the engine, or five
  minutes later for DDL run elsewhere).
* Only the setting of the index type used is reported: a search served by no vector index
  (an exact, sequential scan) has neither ``hnsw.ef_search`` nor ``ivfflat.probes``, and
  the settings are not even read for it.

These look-ups use a fresh DBAPI cursor, so they are invisible to SQLAlchemy's events and do
not disturb the application's cursor.
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any, Final

__all__ = ["IndexTypes", "invalidate_settings", "read_settings"]

SETTINGS_KEY: Final = "rag_instrument.pgvector.settings"
_SETTINGS_SQL: Final = (
    "SELECT current_setting('hnsw.ef_search', true), current_setting('ivfflat.probes', true)"
)
_PLAIN_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*(?:\.[A-Za-z_][A-Za-z0-9_$]*)?")
_OPCLASS_METRIC: Final = (
    ("_l2_ops", "l2"),
    ("_cosine_ops", "cosine"),
    ("_ip_ops", "inner_product"),
    ("_l1_ops", "l1"),
    ("_hamming_ops", "hamming"),
    ("_jaccard_ops", "jaccard"),
)
_INDEX_TTL_S: Final = 300.0


def _int_or_none(value: Any) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _query(dbapi_conn: Any, sql: str) -> list[Any]:
    cursor = dbapi_conn.cursor()
    try:
        cursor.execute(sql)
        return list(cursor.fetchall())
    finally:
        cursor.close()


def read_settings(info: dict[Any, Any], dbapi_conn: Any) -> dict[str, int]:
    """``{"hnsw.ef_search": 40, "ivfflat.probes": 1}`` for this connection (cached in ``info``).

    Args:
        info: the connection record's ``info`` dict (lives as long as the DBAPI connection).
        dbapi_conn: the DBAPI connection the search ran on.
    """
    cached: dict[str, int] | None = info.get(SETTINGS_KEY)
    if cached is not None:
        return cached
    rows = _query(dbapi_conn, _SETTINGS_SQL)
    settings: dict[str, int] = {}
    if rows:
        ef_search, probes = _int_or_none(rows[0][0]), _int_or_none(rows[0][1])
        if ef_search is not None:
            settings["hnsw.ef_search"] = ef_search
        if probes is not None:
            settings["ivfflat.probes"] = probes
    info[SETTINGS_KEY] = settings
    return settings


def invalidate_settings(info: dict[Any, Any] | None) -> None:
    """Forget the cached search settings of a connection."""
    if info:
        info.pop(SETTINGS_KEY, None)


def _index_sql(table: str) -> str:
    # ``table`` matched _PLAIN_NAME, so it holds no quote; to_regclass folds case and
    # follows search_path exactly as the statement's own reference did.
    query = (
        "SELECT c.relname, am.amname, opc.opcname FROM pg_index i "
        "JOIN pg_class c ON c.oid = i.indexrelid "
        "JOIN pg_am am ON am.oid = c.relam "
        "JOIN pg_opclass opc ON opc.oid = ANY(i.indclass::oid[]) "
        "WHERE i.indrelid = to_regclass('{table}') AND am.amname IN ('hnsw', 'ivfflat')"
    )
    return query.format(table=table)


def _metric_of(opclass: str) -> str | None:
    for suffix, metric in _OPCLASS_METRIC:
        if opclass.endswith(suffix):
            return metric
    return None


#: A vector index of a table: (index name, access method, metric of its operator class).
VectorIndex = tuple[str, str, str | None]


def _plan_nodes(plan: Any) -> list[dict[str, Any]]:
    """Every node of a PostgreSQL ``EXPLAIN (FORMAT JSON)`` plan, depth first."""
    out: list[dict[str, Any]] = []
    stack: list[Any] = [plan]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, dict):
            if "Node Type" in item:
                out.append(item)
            stack.extend(item[key] for key in ("Plans", "Plan") if key in item)
    return out


class IndexTypes:
    """The pgvector indexes of each table, read from the catalogue once per table."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[float, list[VectorIndex]]] = {}
        self._lock = threading.Lock()

    def clear(self) -> None:
        """Forget every table's indexes (DDL ran: an index may have come or gone)."""
        with self._lock:
            self._cache.clear()

    def indexes(self, dbapi_conn: Any, table: str | None) -> list[VectorIndex] | None:
        """The pgvector indexes of ``table``; ``None`` when the table is not derivable."""
        if table is None or not _PLAIN_NAME.fullmatch(table):
            return None
        now = time.monotonic()
        with self._lock:
            found = self._cache.get(table)
        if found is not None and now - found[0] < _INDEX_TTL_S:
            return found[1]
        rows = [
            (str(name), str(amname), _metric_of(str(opcname)))
            for name, amname, opcname in _query(dbapi_conn, _index_sql(table))
        ]
        with self._lock:
            if len(self._cache) > 1024:
                self._cache.clear()
            self._cache[table] = (now, rows)
        return rows

    def lookup(self, dbapi_conn: Any, table: str | None, metric: str) -> tuple[str, str] | None:
        """``(index type, index name)`` of the index able to serve ``metric`` on ``table``.

        ``None`` when the table has no such index (the search is a sequential scan) or the
        table is not derivable from the statement.
        """
        for name, amname, index_metric in self.indexes(dbapi_conn, table) or ():
            if index_metric == metric:
                return amname, name
        return None

    def from_plan(self, dbapi_conn: Any, table: str | None, plan: Any) -> tuple[str, str] | None:
        """``(index type, index name)`` of the pgvector index the plan scans, or ``None``."""
        used = {
            str(node["Index Name"])
            for node in _plan_nodes(plan)
            if isinstance(node.get("Index Name"), str)
        }
        if not used:
            return None
        for name, amname, _ in self.indexes(dbapi_conn, table) or ():
            if name in used:
                return amname, name
        return None
