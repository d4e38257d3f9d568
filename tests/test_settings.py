"""The settings table: one declaration per setting, from which everything else derives."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest

import rag_instrument as ri
from rag_instrument._settings import (
    Settings,
    build_settings,
    markdown_table,
    settings_table,
)

DOCS = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
#: configure() arguments that are objects, not settings (no environment variable).
NOT_SETTINGS = ("metric_readers", "tracer_provider", "meter_provider")
REWRITE = (
    "python -c 'import pathlib, rag_instrument._settings as s; "
    """s.write_table(pathlib.Path("docs/configuration.md"))'"""
)


def test_the_docs_table_is_the_settings_table() -> None:
    page = DOCS.read_text()
    expected = markdown_table()
    assert expected in page, (
        "docs/configuration.md's table differs from the settings table; run\n" + REWRITE
    )


def test_the_docs_table_can_be_rewritten(tmp_path: Path) -> None:
    from rag_instrument._settings import write_table

    page = tmp_path / "configuration.md"
    page.write_text(
        "# Configuration\n\n| argument | environment | default | meaning |\n| old |\n\nAfter.\n"
    )
    assert write_table(page) is True
    assert page.read_text() == "# Configuration\n\n" + markdown_table() + "\nAfter.\n"
    assert write_table(page) is False


def test_configure_takes_every_setting_and_documents_it() -> None:
    names = [row.name for row in settings_table()]
    parameters = list(inspect.signature(ri.configure).parameters)
    missing = [name for name in names if name not in parameters]
    assert not missing, f"add `{missing[0]}: <type> | None = None,` to configure() in _config.py"
    assert parameters == [*names, *NOT_SETTINGS]
    doc = inspect.getdoc(ri.configure) or ""  # 3.13 dedents __doc__ itself: compare clean text
    for name in parameters:
        assert f"\n    {name}: " in doc, name


def test_every_setting_field_is_a_row_with_its_default() -> None:
    rows = {row.name: row for row in settings_table()}
    derived = {"span_exporter", "otlp_signal_endpoints"}  # made from rows, not rows
    fields = [f.name for f in dataclasses.fields(Settings) if f.name not in derived]
    assert list(rows) == fields
    defaults = Settings()
    for name, row in rows.items():
        assert getattr(defaults, name) == row.default
        assert row.env_names[0] == f"RAG_INSTRUMENT_{name.upper()}"
        assert row.doc
        assert "|" not in row.doc


@pytest.mark.parametrize("row", settings_table(), ids=lambda row: row.name)
def test_each_setting_reads_its_environment_variable(row: object) -> None:
    from rag_instrument._settings import Setting

    assert isinstance(row, Setting)
    default = row.default
    samples = {bool: "false" if default else "true", int: "7", float: "0.5"}
    raw = samples.get(type(default))
    if raw is None:
        raw = {
            "service_name": "from-env",
            "exporter": "memory",
            "otlp_endpoint": "http://collector:4318",
            "log_format": "console",
            "log_file": None,
            "log_level": "debug",
            "budgets": "retrieval=10",
            "metrics_exporter": "none",
            "logs_exporter": "none",
            "capture_logging_level": "debug",
            "event_loop_threshold_ms": "250",
        }.get(row.name)
    if row.name == "log_file":
        pytest.skip("a path: checked in test_config")
    assert raw is not None, f"add an environment value for {row.name!r} to this test"
    from_env = getattr(build_settings(env={row.env_names[0]: raw}), row.name)
    assert from_env == row.parse(row.name, raw, "test")
    assert from_env != default


@pytest.mark.parametrize("row", settings_table(), ids=lambda row: row.name)
def test_errors_name_the_setting_and_the_variable(row: object) -> None:
    from rag_instrument._settings import Setting

    assert isinstance(row, Setting)
    if row.name in ("service_name", "log_file"):
        pytest.skip("any non-empty string or path is valid here: checked in test_config")
    env_name = row.env_names[0]
    with pytest.raises(ValueError, match=rf"invalid {row.name}.*environment variable {env_name}"):
        build_settings(env={env_name: "\x00not valid\x00"})


def test_unknown_setting_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="unknown setting"):
        build_settings(env={}, colour="blue")


def test_an_invalid_setting_is_named_without_its_password() -> None:
    # A mistyped endpoint (port "43l8") still carries a password: the error must not.
    with pytest.raises(ValueError, match="otlp_endpoint") as raised:
        ri.configure(
            "svc", exporter="otlp", otlp_endpoint="http://collector:Sup3rSecretPw@otel:43l8"
        )
    assert "Sup3rSecretPw" not in str(raised.value)
    assert "collector:[REDACTED]@otel:43l8" in str(raised.value)


def test_booleans_take_the_integers_one_and_zero_as_the_message_says() -> None:
    assert build_settings(enabled=1).enabled is True
    assert build_settings(capture_content=0).capture_content is False
    with pytest.raises(ValueError, match=r"enabled 2 .*1/0"):
        build_settings(enabled=2)


@pytest.mark.parametrize("value", [-0.1, "x", 1.5, float("nan")])
def test_a_bad_sample_ratio_names_the_accepted_range(value: object) -> None:
    with pytest.raises(ValueError, match=r"sample_ratio .*between 0 and 1"):
        build_settings(sample_ratio=value)
