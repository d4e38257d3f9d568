"""The suite on a stock machine: missing extensions or roles skip (fail under CI=true).

The README's test command run where PostgreSQL lacks pgvector, pg_stat_statements or the
reader role must skip what needs them with a reason naming the setup script, and leave no
engine, table or connection behind (a leaked engine is a ResourceWarning, an error under
this suite's warning filter, in whatever test happens to run next).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from db_helpers import PG_URL, SETUP_HINT, require_extension, require_postgres, require_role
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "check",
    [
        lambda: require_extension("rag_no_such_extension"),
        lambda: require_role("rag_no_such_role"),
    ],
)
def test_missing_setup_skips_with_the_hint_or_fails_under_ci(
    check: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_postgres()
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"bash \.ci/services\.sh"):
        check()  # type: ignore[operator]
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        check()  # type: ignore[operator]
    assert "bash .ci/services.sh" in SETUP_HINT


@pytest.mark.postgres
def test_suite_against_a_database_without_extensions_skips_cleanly() -> None:
    require_postgres()
    name = f"rag_bare_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f"CREATE DATABASE {name}"))
        env = {k: v for k, v in os.environ.items() if k != "CI"}
        env["RAG_TEST_PG_DB"] = name
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "-p",
                "no:randomly",
                "tests/db/test_pgvector.py",
                "tests/db/test_postgres.py::test_diagnose_as_a_non_superuser",
                "tests/db/test_postgres.py::test_statement_span_on_postgresql",
                "-rs",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        assert "bash .ci/services.sh" in output
        assert "error" not in output.lower().split("short test summary")[-1]
        with admin.connect() as conn:  # nothing left behind in the bare database
            leftover = conn.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE datname = :d"), {"d": name}
            ).scalar()
        assert leftover == 0
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()
