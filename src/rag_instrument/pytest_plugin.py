"""pytest plugin: the ``rag_capture`` fixture (registered through the ``pytest11`` entry point)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from rag_instrument.testing import Capture, capture

__all__ = ["rag_capture"]


@pytest.fixture
def rag_capture() -> Iterator[Capture]:
    """Spans, metrics and log lines recorded in memory during the test.

    Example::

        def test_search(rag_capture):
            run_search("q")
            assert rag_capture.span("retrieval").attributes["rag.stage"] == "retrieval"
    """
    with capture() as cap:
        yield cap
