"""pytest plugin: the ``rag_capture`` fixture (registered through the ``pytest11`` entry point)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from rag_instrument._context import bound, reset_bound, set_bound
from rag_instrument.testing import Capture, capture

__all__ = ["rag_capture"]


@pytest.fixture
def rag_capture() -> Iterator[Capture]:
    """Spans, metrics and log lines recorded in memory during the test.

    What the test binds (``ri.bind_context``) is dropped after it, so the next test does
    not see it; what fixtures set up before it bound is kept.

    Example::

        def test_search(rag_capture):
            run_search("q")
            assert rag_capture.span("retrieval").attributes["rag.stage"] == "retrieval"
    """
    # What the test binds goes with it: values bound by one test (sync tests share a
    # context) must not show in the next one's lines. What fixtures set up before this
    # one bound (an application's autouse fixture) stays in force for the test.
    before = bound()
    token = set_bound(before)
    try:
        with capture() as cap:
            yield cap
    finally:
        try:
            reset_bound(token)
        except ValueError:  # pragma: no cover - torn down in another context
            set_bound(before)
