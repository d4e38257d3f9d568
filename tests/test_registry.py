"""The registry: integrations plug error formatters and span kinds into the core."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

import rag_instrument as ri
from rag_instrument import _registry
from rag_instrument._errors import exception_message
from rag_instrument._sanitize import Sanitizer
from rag_instrument.testing import Capture


class VendorError(Exception):
    pass


VendorError.__module__ = "acme_vendor.errors"


@pytest.fixture
def restore_registry() -> Iterator[None]:
    formatters, kinds = dict(_registry._formatters), dict(_registry._span_kinds)
    yield
    _registry._formatters, _registry._span_kinds = formatters, kinds


@pytest.mark.usefixtures("restore_registry")
def test_a_registered_formatter_renders_its_module_only() -> None:
    _registry.register_error_formatter("acme_vendor", lambda exc: "VendorError: hidden")
    assert _registry.format_error(VendorError("secret row 42")) == "VendorError: hidden"
    assert _registry.format_error(ValueError("x")) is None

    class Lookalike(Exception):
        pass

    Lookalike.__module__ = "acme_vendorish"  # a prefix match must stop at a dot
    assert _registry.format_error(Lookalike("x")) is None


@pytest.mark.usefixtures("restore_registry")
def test_a_failing_or_declining_formatter_counts_as_none() -> None:
    def broken(exc: BaseException) -> str | None:
        raise RuntimeError("formatter bug")

    _registry.register_error_formatter("acme_vendor", broken)
    assert _registry.format_error(VendorError("x")) is None
    _registry.register_error_formatter("acme_vendor", lambda exc: None)  # replaces
    assert _registry.format_error(VendorError("x")) is None


@pytest.mark.usefixtures("restore_registry")
def test_a_registered_span_kind_reaches_the_stage_span(rag_capture: Capture) -> None:
    assert _registry.span_kind("retrieval") == "RETRIEVER"
    assert _registry.span_kind("acme_scoring") == "CHAIN"
    _registry.register_span_kind("acme_scoring", "RERANKER")
    with ri.stage("acme_scoring"):
        pass
    assert rag_capture.span("acme_scoring").attributes["openinference.span.kind"] == "RERANKER"


def test_statement_errors_are_hidden_by_the_database_formatter(sqlite_engine) -> None:
    sqlalchemy = pytest.importorskip("sqlalchemy")
    engine = sqlite_engine()
    with pytest.raises(sqlalchemy.exc.OperationalError) as info, engine.connect() as conn:
        conn.execute(sqlalchemy.text("SELECT * FROM missing WHERE ssn = :s"), {"s": "123-45"})
    message = exception_message(info.value, Sanitizer(), capture_content=False)
    assert "123-45" not in message
    assert message.startswith("OperationalError: [SQL: SELECT * FROM missing WHERE ssn = ")


def test_the_database_formatter_applies_without_importing_the_integration() -> None:
    pytest.importorskip("sqlalchemy")
    code = (
        "import sys, sqlalchemy, rag_instrument\n"
        "from rag_instrument._errors import exception_message\n"
        "from rag_instrument._sanitize import Sanitizer\n"
        "assert 'rag_instrument.db' not in sys.modules\n"
        "engine = sqlalchemy.create_engine('sqlite://')\n"
        "try:\n"
        "    with engine.connect() as conn:\n"
        "        conn.execute(sqlalchemy.text('SELECT :s FROM missing'), {'s': 'pw-1'})\n"
        "except sqlalchemy.exc.OperationalError as exc:\n"
        "    print(exception_message(exc, Sanitizer(), False))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert "pw-1" not in result.stdout
    assert result.stdout.startswith("OperationalError: [SQL: SELECT ")
