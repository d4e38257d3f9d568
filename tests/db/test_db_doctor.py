"""``rag-instrument db-doctor``: table and JSON output, masked passwords, exit status 2."""

from __future__ import annotations

import json

import pytest
from db_helpers import require_postgres

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
    require_postgres()
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
    require_postgres()
    assert main(["db-doctor", "postgresql://rag_reader@127.0.0.1:5432/test"]) == 0
    out = capsys.readouterr().out
    assert "Cache hit ratio (target above 90%)" in out
    assert "Slowest statements by mean time" in out
    assert "Findings" in out
