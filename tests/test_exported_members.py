"""The package namespace and __all__ agree, and every public module declares __all__."""

from __future__ import annotations
import __future__

import importlib
import pkgutil
import sys

import pytest

import rag_instrument as ri


def test_all_names_resolve_and_nothing_public_is_missing() -> None:
    for name in ri.__all__:
        assert getattr(ri, name) is not None, name
    public = {
        name
        for name, value in vars(ri).items()
        if not name.startswith("_")
        and not isinstance(value, type(importlib))
        and not isinstance(value, __future__._Feature)  # type: ignore[attr-defined]
    }
    assert public <= set(ri.__all__), public - set(ri.__all__)
    assert sorted(ri.__all__) == ri.__all__


def test_unknown_attribute_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        ri.no_such_name  # type: ignore[attr-defined]  # noqa: B018


def test_every_public_module_declares_all() -> None:
    for info in pkgutil.walk_packages(ri.__path__, "rag_instrument."):
        if any(part.startswith("_") for part in info.name.split(".")[1:]):
            continue
        module = importlib.import_module(info.name)
        assert hasattr(module, "__all__"), info.name
        for name in module.__all__:
            assert hasattr(module, name), f"{info.name}.{name}"


def test_version_comes_from_metadata() -> None:
    from importlib.metadata import version

    assert ri.__version__ == version("rag_instrument")


def test_retry_is_the_decorator_even_after_the_module_is_imported() -> None:
    import rag_instrument.retry  # noqa: F401 - the import that used to shadow the name

    assert ri.retry is sys.modules["rag_instrument.retry"].retry
    assert callable(ri.retry)


def test_extra_backed_names_resolve_lazily() -> None:
    from rag_instrument.integrations.openai import instrument_openai

    assert ri.instrument_openai is instrument_openai
    assert "instrument_sqlalchemy" in dir(ri)


def test_importing_the_package_does_not_load_the_sdk_or_extras() -> None:
    import subprocess

    code = (
        "import sys, rag_instrument\n"
        "loaded = [m for m in ('opentelemetry.sdk', 'sqlalchemy', 'openai', 'anthropic', 'redis')"
        " if m in sys.modules]\n"
        "print(','.join(loaded))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""
