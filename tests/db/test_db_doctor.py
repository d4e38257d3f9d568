"""``rag-instrument db-doctor``: table and JSON output, masked passwords, exit status 2."""

from __future__ import annotations

import json
from typing import Any

import pytest
from db_helpers import require_role

from rag_instrument.cli.__main__ import main
from rag_instrument.cli.db_doctor import mask_url


def test_mask_url_hides_the_password() -> None:
    assert mask_url("postgresql://u:hunter22@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert "hunter22" not in mask_url("postgresql://u:hunter22@h:5432/db?sslmode=require")
    assert mask_url("not a url u:hunter22@x").count("hunter22") == 0


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:p@ss@h/db",
        "postgresql://u:hun@ter@2@h:5432/db?sslmode=require",
        "postgresql://u:pa/ss:w@h/db",
        "u:hun@ter2@h",
        "postgresql://u:hunter2@h:notaport/db",
    ],
)
def test_mask_url_hides_every_part_of_the_password(url: str) -> None:
    masked = mask_url(url)
    assert "***@" in masked
    for part in ("p@ss", "ss@", "hun", "ter", "pa/ss", "ss:w"):
        if part in url:
            assert part not in masked, masked
    assert mask_url("postgresql://u@h/db") == "postgresql://u@h/db"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://u:hunter2@h:notaport/db", "not a database URL"),
        ("postgresql://u:hun@ter2@127.0.0.1:1/db", "unencoded '@'"),
    ],
)
def test_bad_port_or_unencoded_at_is_one_line_and_status_2(
    url: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["db-doctor", url, "--connect-timeout", "1"])
    out, err = capsys.readouterr()
    assert status == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert message in err
    assert "Traceback" not in err
    for part in ("hunter2", "hun", "ter2"):
        assert part not in err


def test_unreachable_server_is_one_line_and_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["db-doctor", "postgresql://u:hunter22@127.0.0.1:1/db", "--connect-timeout", "1"])
    out, err = capsys.readouterr()
    assert status == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert "cannot connect to postgresql://u:***@127.0.0.1:1/db" in err
    assert "hunter22" not in err


@pytest.mark.parametrize(
    ("url", "message"),
    [("sqlite:///x.db", "only PostgreSQL"), ("::nonsense::", "not a database URL")],
)
def test_bad_urls(url: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["db-doctor", url]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.postgres
def test_json_report(capsys: pytest.CaptureFixture[str]) -> None:
    require_role("rag_reader")
    status = main(
        [
            "db-doctor",
            "postgresql://rag_reader:pw-unused@127.0.0.1:5432/test",
            "--format",
            "json",
            "--top",
            "3",
        ]
    )
    out, _ = capsys.readouterr()
    assert status == 0
    data = json.loads(out)
    assert data["url"] == "postgresql://rag_reader:***@127.0.0.1:5432/test"
    assert data["database"]["rows"][0]["database"] == "test"
    assert "pw-unused" not in out
    assert {"connections", "cache_hit", "slowest_by_mean", "findings"} <= set(data)


@pytest.mark.postgres
def test_table_report(capsys: pytest.CaptureFixture[str]) -> None:
    require_role("rag_reader")
    assert main(["db-doctor", "postgresql://rag_reader@127.0.0.1:5432/test"]) == 0
    out = capsys.readouterr().out
    assert "Cache hit ratio (target above 90%" in out
    assert "Slowest statements by mean time" in out
    assert "Findings" in out


# --- issue 11: query-string passwords, --top, repeated reasons, the cache-hit minimum ---------


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u@h/db?password=hunter22",
        "postgresql://u@h/db?sslmode=require&password=hunter22&x=1",
        "postgresql://u@h/db?sslpassword=hunter22",
        "postgresql://u:hunter22@h/db?password=hunter22",
        "postgresql://u@h/db?PASSWORD=hun%74er22",
    ],
)
def test_query_string_passwords_are_masked(url: str) -> None:
    masked = mask_url(url)
    assert "hunter22" not in masked
    assert "hun%74er22" not in masked
    assert "***" in masked


def test_query_string_password_never_printed_on_the_error_paths(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for url in (
        "postgresql://u@127.0.0.1:1/db?password=hunter22&connect_timeout=1",
        "postgresql://u@127.0.0.1:notaport/db?password=hunter22",
        "postgresql://u@127.0.0.1:1/db?password=hunter22&sslmode=nonsense",
    ):
        status = main(["db-doctor", url, "--connect-timeout", "1"])
        out, err = capsys.readouterr()
        assert status == 2
        assert "hunter22" not in out + err
        assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("top", ["-1", "0", "x"])
def test_top_must_be_positive(top: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["db-doctor", "postgresql://u@127.0.0.1:1/db", "--top", top])
    assert info.value.code == 2
    assert "--top" in capsys.readouterr().err


def test_diagnose_rejects_top_below_one() -> None:
    from sqlalchemy import create_engine

    from rag_instrument.db.postgres import diagnose

    engine = create_engine("postgresql+psycopg://u@127.0.0.1:1/db")
    try:
        with pytest.raises(ValueError, match="top"):
            diagnose(engine, top=0)
    finally:
        engine.dispose()


def _report(cache_hit: Any, statements_reason: str | None) -> Any:
    from rag_instrument.db import postgres as pg

    empty: Any = pg.Section()
    stmts: Any = pg.Section(unavailable=statements_reason)
    report = pg.Report(
        database=empty,
        connections=empty,
        largest_tables=empty,
        cache_hit=pg.Section(rows=[cache_hit]),
        index_usage=empty,
        unused_indexes=empty,
        seq_scan_tables=empty,
        slowest_by_mean=stmts,
        slowest_by_total=stmts,
        findings=[],
    )
    report.findings.extend(pg._findings(report))
    return report


def test_a_missing_extension_is_said_once() -> None:
    from rag_instrument.cli.db_doctor import render_table
    from rag_instrument.db import postgres as pg

    reason = "extension pg_stat_statements is not installed in this database"
    report = _report(pg.CacheHit(1, 0, 1.0, 1, 0, 1.0), reason)
    assert render_table(report.to_dict()).count("pg_stat_statements is not installed") == 1
    unavailable = [f for f in report.findings if "not available" in f.message]
    assert len(unavailable) == 1
    assert unavailable[0].section == "slowest_by_mean, slowest_by_total"


def test_a_low_hit_ratio_from_few_reads_says_why_it_is_no_warning() -> None:
    from rag_instrument.cli.db_doctor import render_table
    from rag_instrument.db import postgres as pg

    few = _report(pg.CacheHit(40, 60, 0.4, 0, 0, None), None)
    (finding,) = few.findings
    assert finding.level == "info"
    assert "1,000" in finding.message
    assert "too few to judge" in render_table(few.to_dict())
    many = _report(pg.CacheHit(4000, 6000, 0.4, 0, 0, None), None)
    assert [f.level for f in many.findings] == ["warning"]


def test_the_postgres_module_hint_names_the_postgres_extra() -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['sqlalchemy'] = None\n"
        "try:\n    import rag_instrument.db.postgres\n"
        "except ImportError as exc:\n    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "pip install 'rag_instrument[postgres]'" in out


@pytest.mark.postgres
@pytest.mark.parametrize(
    "target",
    [
        "postgres://rag_reader:pw-unused@127.0.0.1:5432/test",  # Heroku / Render DATABASE_URL
        "host=127.0.0.1 port=5432 dbname=test user=rag_reader password=pw-unused",  # libpq
    ],
)
def test_postgres_scheme_and_libpq_strings_are_accepted(
    target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    require_role("rag_reader")
    status = main(["db-doctor", target, "--format", "json", "--top", "1"])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert json.loads(out)["database"]["rows"][0]["database"] == "test"
    assert "pw-unused" not in out + err


@pytest.mark.parametrize(
    "target",
    [
        "host=127.0.0.1 port=notaport password=KVsecret8",
        "password=KVsecret8 garbage",
        "not a url password=KVsecret8 x://",
    ],
)
def test_unusable_connection_text_never_echoes_its_password(
    target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["db-doctor", target]) == 2
    out, err = capsys.readouterr()
    assert "KVsecret8" not in out + err
    assert err.count("\n") == 1  # one line, no traceback



@pytest.mark.parametrize("timeout", ["nan", "inf", "0", "-1", "soon"])
def test_connect_timeout_must_be_a_positive_number(
    timeout: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = "postgresql://postgres@127.0.0.1:5432/test"
    with pytest.raises(SystemExit) as exit_info:
        main(["db-doctor", url, "--connect-timeout", timeout])
    assert exit_info.value.code == 2
    assert "--connect-timeout" in capsys.readouterr().err


def test_an_async_driver_url_is_read_through_psycopg(capsys: pytest.CaptureFixture[str]) -> None:
    # postgresql+asyncpg:// (an app's async URL, pasted as it is) said it could not connect.
    require_role("rag_reader")
    url = "postgresql+asyncpg://rag_reader:pw-unused@127.0.0.1:5432/test"
    assert main(["db-doctor", url, "--format", "json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["database"]["rows"][0]["database"] == "test"
    assert "never awaited" not in err
    assert "pw-unused" not in out + err
