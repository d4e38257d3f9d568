"""Shared fixtures: every test starts unconfigured, with no RAG_INSTRUMENT_* environment."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

import rag_instrument as ri
from rag_instrument import _context, _utils

# A bug inside rag_instrument must fail our tests, not be swallowed like a broken exporter.
os.environ["RAG_INSTRUMENT_RAISE_INTERNAL_ERRORS"] = "1"

_ENV_PREFIXES = ("RAG_INSTRUMENT_", "OTEL_")

# CI machines are loaded 2-core boxes: no per-example time limit (hypothesis's default
# 200 ms deadline fails correct code there), and a slow data generation is not an error.
settings.register_profile(
    "rag_instrument", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("rag_instrument")


@pytest.fixture(autouse=True)
def _clean_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith(_ENV_PREFIXES) and name != "RAG_INSTRUMENT_RAISE_INTERNAL_ERRORS":
            monkeypatch.delenv(name)
    _utils.warn_once.reset()
    bound_token = _context._bound.set(_context.EMPTY)
    yield
    ri.shutdown(timeout=5.0)
    _context._bound.reset(bound_token)
    _utils.warn_once.reset()


@pytest.fixture
def sqlite_engine() -> Iterator[Callable[..., Any]]:
    """``sqlite_engine(url="sqlite://", **kwargs)``: a SQLAlchemy engine disposed at teardown.

    Python 3.13 warns (an error here) about SQLite connections left for the garbage
    collector to close; an engine made here closes its connections when the test ends,
    also when the test fails half-way.
    """
    create_engine = pytest.importorskip("sqlalchemy").create_engine
    engines: list[Any] = []

    def make(url: str = "sqlite://", **kwargs: Any) -> Any:
        engine = create_engine(url, **kwargs)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.dispose()
