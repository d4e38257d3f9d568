"""pytest plugin: the ``rag_capture`` fixture (registered through the ``pytest11`` entry point)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from rag_instrument._context import EMPTY, reset_bound, set_bound
from rag_instrument.testing import Capture, capture

__all__ = ["rag_capture"]


@pytest.fixture
def rag_capture() -> Iterator[Capture]:
    """Spans, metrics and log lines recorded in memory during the test.

    The test starts with no bound context (``ri.bind_context``), and what it binds is
    dropped after it.

    Example::

        def test_search(rag_capture):
            run_search("q")
            assert rag_capture.span("retrieval").attributes["rag.stage"] == "retrieval"
    """
    # Each test starts with nothing bound, and what it binds goes with it: values bound
    # by one test (sync tests share a context) must not show in the next one's lines.
    token = set_bound(EMPTY)
    try:
        with capture() as cap:
            yield cap
    finally:
        try:
            reset_bound(token)
        except ValueError:  # pragma: no cover - torn down in another context
            set_bound(EMPTY)
