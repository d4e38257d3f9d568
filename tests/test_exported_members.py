"""The package namespace and __all__ agree, and every public module declares __all__."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import rag_instrument as ri


def test_all_names_resolve_and_nothing_public_is_missing() -> None:
    for name in ri.__all__:
        assert getattr(ri, name) is not None, name
    public = {
        name
        for name, value in vars(ri).items()
        if not name.startswith("_") and not isinstance(value, type(importlib))
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
