"""pgvector searches: search parameters in effect on the connection and the index type.

A statement that uses one of pgvector's distance operators (``<->`` L2, ``<=>`` cosine,
``<#>`` negative inner product, ``<+>`` L1, ``<~>`` Hamming, ``<%>`` Jaccard) is a vector
search. Its span gets the ``rag.vector.*`` attributes:

* ``hnsw.ef_search`` / ``ivfflat.probes``: read with ``current_setting()`` on the same
  connection, cached per DBAPI connection until the connection is checked in, a
  transaction ends (``SET LOCAL`` ends with it) or a ``SET`` / ``RESET`` / ``set_config()``
  touching them is seen.
* the index type (``hnsw``, ``ivfflat``): the table's pgvector index whose operator class
  matches the operator, looked up once per table per five minutes.

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
        "SELECT am.amname, opc.opcname FROM pg_index i "
        "JOIN pg_class c ON c.oid = i.indexrelid "
        "JOIN pg_am am ON am.oid = c.relam "
        "JOIN pg_opclass opc ON opc.oid = ANY(i.indclass::oid[]) "
        "WHERE i.indrelid = to_regclass('{table}') AND am.amname IN ('hnsw', 'ivfflat')"
    )
    return query.format(table=table)


class IndexTypes:
    """The pgvector index type serving ``(table, metric)``, cached for five minutes."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str], tuple[float, str | None]] = {}
        self._lock = threading.Lock()

    def lookup(self, dbapi_conn: Any, table: str | None, metric: str) -> str | None:
        """``"hnsw"``, ``"ivfflat"`` or ``None`` (no matching index, or not derivable)."""
        if table is None or not _PLAIN_NAME.fullmatch(table):
            return None
        key = (table, metric)
        now = time.monotonic()
        with self._lock:
            found = self._cache.get(key)
        if found is not None and now - found[0] < _INDEX_TTL_S:
            return found[1]
        index_type: str | None = None
        for amname, opcname in _query(dbapi_conn, _index_sql(table)):
            if any(str(opcname).endswith(s) and m == metric for s, m in _OPCLASS_METRIC):
                index_type = str(amname)
                break
        with self._lock:
            if len(self._cache) > 1024:
                self._cache.clear()
            self._cache[key] = (now, index_type)
        return index_type
