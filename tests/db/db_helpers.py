"""Helpers shared by the database tests: the PostgreSQL test server and unique names."""

from __future__ import annotations

import functools
import os
import uuid

import pytest

#: The database the tests use; another one (without pgvector, say) can be chosen to see
#: how the suite behaves on a machine that lacks part of the setup.
PG_DB = os.environ.get("RAG_TEST_PG_DB", "test")
PG_URL = f"postgresql+psycopg://postgres@127.0.0.1:5432/{PG_DB}"
PG_ASYNC_URL = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{PG_DB}"
PG_READER_URL = f"postgresql+psycopg://rag_reader@127.0.0.1:5432/{PG_DB}"
_DSN = f"host=127.0.0.1 port=5432 user=postgres dbname={PG_DB}"


@functools.cache
def _pg_reachable() -> bool:
    import psycopg

    try:
        with psycopg.connect(_DSN, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


SETUP_HINT = "run `bash .ci/services.sh` (as root) to set it up"


def missing(what: str) -> None:
    """Skip because ``what`` is missing on this machine; under ``CI=true`` fail instead."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} (CI=true: not skipping)")
    pytest.skip(f"{what}: {SETUP_HINT}")


def require_postgres() -> None:
    """Skip when the server is unreachable, except in CI, where that is a failure."""
    if not _pg_reachable():
        missing("PostgreSQL at 127.0.0.1:5432 is unreachable")


def _query(sql: str, *params: object) -> object:
    import psycopg

    with psycopg.connect(_DSN, connect_timeout=3) as conn:
        row = conn.execute(sql, params).fetchone()
        return row[0] if row else None


def require_extension(name: str) -> None:
    """Skip (fail under CI) unless extension ``name`` is installed in database ``test``."""
    require_postgres()
    if not _query("SELECT 1 FROM pg_extension WHERE extname = %s", name):
        missing(f"PostgreSQL extension {name!r} is not installed in database {PG_DB!r}")
    if name == "pg_stat_statements" and not _query(
        "SELECT 1 FROM pg_settings WHERE name = 'shared_preload_libraries' "
        "AND setting LIKE '%%pg_stat_statements%%'"
    ):
        missing("pg_stat_statements is not in shared_preload_libraries")


def require_role(name: str) -> None:
    """Skip (fail under CI) unless the login role ``name`` exists."""
    require_postgres()
    if not _query("SELECT 1 FROM pg_roles WHERE rolname = %s AND rolcanlogin", name):
        missing(f"PostgreSQL role {name!r} does not exist")


def unique(prefix: str) -> str:
    """A table or schema name no other test (or test run) uses."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"
