"""Helpers shared by the database tests: the PostgreSQL test server and unique names."""

from __future__ import annotations

import functools
import os
import uuid

import pytest

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
PG_ASYNC_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
PG_READER_URL = "postgresql+psycopg://rag_reader@127.0.0.1:5432/test"


@functools.cache
def _pg_reachable() -> bool:
    import psycopg

    try:
        with psycopg.connect(
            "host=127.0.0.1 port=5432 user=postgres dbname=test", connect_timeout=3
        ):
            return True
    except psycopg.OperationalError:
        return False


def require_postgres() -> None:
    """Skip when the server is unreachable, except in CI, where that is a failure."""
    if _pg_reachable():
        return
    if os.environ.get("CI") == "true":
        pytest.fail("PostgreSQL at 127.0.0.1:5432 is unreachable (CI=true: not skipping)")
    pytest.skip("PostgreSQL at 127.0.0.1:5432 is unreachable (start it: bash .ci/services.sh)")


def unique(prefix: str) -> str:
    """A table or schema name no other test (or test run) uses."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"
