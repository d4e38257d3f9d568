"""Export requests capped by size: the estimate that splits a batch."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.attributes import BoundedAttributes

from rag_instrument import _sending

SCALARS = st.one_of(
    st.text(max_size=40),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True),
    st.booleans(),
)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=5).map(tuple), st.lists(SCALARS, max_size=5))


def _reference(attributes: Any) -> int:
    """The estimate as first written: key, value and 8 bytes per attribute."""

    def value_bytes(value: Any) -> int:
        if isinstance(value, str):
            return len(value) * 2 if not value.isascii() else len(value)
        if isinstance(value, tuple | list):
            return sum(value_bytes(v) + 4 for v in value)
        return 10

    plain = getattr(attributes, "_dict", attributes) or {}
    return sum(len(key) + value_bytes(value) + 8 for key, value in plain.items())


@settings(max_examples=200)
@given(st.dictionaries(st.text(max_size=20), VALUES, max_size=12), st.booleans())
def test_the_estimate_is_the_same_as_first_written(values: dict[str, Any], bounded: bool) -> None:
    attributes: Any = BoundedAttributes(attributes=values, immutable=False) if bounded else values
    assert _sending._attributes_bytes(attributes) == _reference(attributes)


def test_the_estimate_counts_non_ascii_text_twice() -> None:
    assert _sending._attributes_bytes({"k": "é" * 10}) == 1 + 8 + 20
    assert _sending._attributes_bytes({"k": "e" * 10}) == 1 + 8 + 10
    assert _sending._attributes_bytes({"k": ("ab", 3)}) == 1 + 8 + (2 + 4) + (10 + 4)
    assert _sending._attributes_bytes(None) == 0
