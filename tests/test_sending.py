"""Export requests capped by size: the estimate that splits a batch."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.attributes import BoundedAttributes

from rag_instrument import _sending

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)  # what UTF-8 holds
SCALARS = st.one_of(
    TEXT,
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True),
    st.booleans(),
)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=5).map(tuple), st.lists(SCALARS, max_size=5))


def _payload(attributes: Any) -> int:
    """The bytes OTLP carries for the attributes: UTF-8 keys and text, 10 per number."""

    def value_bytes(value: Any) -> int:
        if isinstance(value, str):
            return len(value.encode())
        if isinstance(value, tuple | list):
            return sum(value_bytes(v) for v in value)
        return 10  # a varint's most, a double's 8, a bool's 1

    plain = getattr(attributes, "_dict", attributes) or {}
    return sum(len(key.encode()) + value_bytes(value) for key, value in plain.items())


@settings(max_examples=300)
@given(st.dictionaries(TEXT.filter(lambda k: len(k) <= 20), VALUES, max_size=12), st.booleans())
def test_the_estimate_is_never_below_what_otlp_carries(values: dict[str, Any], bounded: bool) -> None:
    attributes: Any = BoundedAttributes(attributes=values, immutable=False) if bounded else values
    assert _sending._attributes_bytes(attributes) >= _payload(attributes)


def test_the_estimate_counts_text_in_utf8_with_framing() -> None:
    assert _sending._attributes_bytes({"k": "e" * 10}) == len(b'{"k":"eeeeeeeeee"}') + 14
    assert _sending._attributes_bytes({"k": "\u00e9" * 10}) == len('{"k":""}') + 20 + 14
    assert _sending._attributes_bytes({"k": "\U0001f600"}) == len('{"k":""}') + 4 + 14
    assert _sending._attributes_bytes(None) == 0


def test_what_json_cannot_hold_is_measured_value_by_value() -> None:
    # An integer beyond 64 bits: key, 10 for the number and 8 bytes of framing.
    assert _sending._attributes_bytes({"k": 2**70}) == 1 + 10 + 8
    assert _sending._attributes_bytes({"k": ("ab", 2**70)}) == 1 + 8 + (2 + 4) + (10 + 4)
    assert _sending._attributes_bytes({"k": "\u00e9" * 10, "n": 2**70}) == (1 + 8 + 20) + 19


def test_arrays_of_small_numbers_are_not_underestimated() -> None:
    # Found by the property above on Python 3.13: JSON writes 0 in two characters ("0,"),
    # OTLP frames each element (up to 13 bytes for a number).
    for values in ({"": (0, 0, 0)}, {"k": [0.0] * 50}, {"k": (1,)}):
        assert _sending._attributes_bytes(values) >= _payload(values)


def test_bytes_and_maps_are_measured_and_text_with_commas_is_not_inflated() -> None:
    assert _sending._attributes_bytes({"k": b"x" * 100_000}) >= 100_000
    assert _sending._attributes_bytes({"k": {"a": "x" * 10_000, "b": b""}}) >= 10_000
    # Commas inside a string are text, not array elements.
    assert _sending._attributes_bytes({"k": "," * 4000}) < 2 * 4000


def test_a_span_too_big_is_cut_to_about_the_limit_whatever_its_text() -> None:
    # Each attribute was sized as 2 bytes a non-ASCII character where the span's estimate
    # counts 3: with CJK text every attribute was cut, leaving the span nearly empty.
    from opentelemetry.sdk.trace import ReadableSpan

    limit = 3 * 1024 * 1024
    for char in ("x", "\u6f22"):
        attributes = {f"chunks{i}": [char * 2000] * 200 for i in range(12)}
        span = ReadableSpan(name="retrieval", attributes=attributes)
        cut = _sending.within_size(span, limit)
        size = _sending.estimated_bytes(cut)
        assert size <= limit
        assert size > limit * 0.6, (char, size)  # not cut far below what fits
        kept = [k for k, v in (cut.attributes or {}).items() if not isinstance(v, str)]
        assert kept, char
