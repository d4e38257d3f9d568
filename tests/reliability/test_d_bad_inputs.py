"""D. Bad inputs (RELIABILITY.md D23-D26), with properties over attribute values and fields."""

from __future__ import annotations

import json
import math
import socket
import sys
import threading
import time
import uuid
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

import rag_instrument as ri
from rag_instrument._sanitize import Sanitizer, to_attribute_value
from rag_instrument.testing import Capture

ATTRIBUTE_TYPES = (str, bool, int, float)


INT64 = range(-(2**63), 2**63)  # what OTLP's int_value carries


def _valid_attribute(value: Any) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return value in INT64
    if isinstance(value, ATTRIBUTE_TYPES):
        return True
    return (
        isinstance(value, list | tuple)
        and len({type(v) for v in value}) <= 1
        and all(_valid_attribute(v) for v in value)
    )


def test_d23_none_dict_and_mixed_list_attributes(
    rag_capture: Capture, caplog: pytest.LogCaptureFixture
) -> None:
    with ri.stage("retrieval", none=None, mapping={"a": 1}, mixed=[1, "a", None]):
        pass
    attrs = dict(rag_capture.span("retrieval").attributes or {})
    assert "none" not in attrs
    assert json.loads(attrs["mapping"]) == {"a": 1}
    assert json.loads(attrs["mixed"]) == [1, "a", None]
    assert not [r for r in caplog.records if "Invalid type" in r.getMessage()]


class _Model:
    """Stands in for a pydantic model: arbitrary object, big repr."""

    def __repr__(self) -> str:
        return "Model(" + "x" * 100_000 + ")"


class _RaisingRepr:
    def __repr__(self) -> str:
        raise RuntimeError("no")


def _hostile_values() -> list[Any]:
    cyclic: dict[str, Any] = {}
    cyclic["self"] = cyclic
    sock = socket.socket()
    sock.close()
    return [
        json,  # a module
        threading.Lock(),
        sock,
        cyclic,
        {uuid.uuid4(): 1},
        _RaisingRepr(),
        _Model(),
        b"\x00\xff" * 10,
        math.nan,
        list(range(100_000)),
    ]


@pytest.mark.parametrize("value", _hostile_values(), ids=lambda v: type(v).__name__)
def test_d24_hostile_arguments_become_placeholders_fast(value: Any, rag_capture: Capture) -> None:
    started = time.perf_counter()
    with ri.stage("retrieval", arg=value):
        pass
    ri.get_logger().info("arg", value=value)
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0  # wide margin around the 10 ms goal (a loaded CI box)
    orjson.dumps(rag_capture.logs)
    for span in rag_capture.spans:
        assert all(_valid_attribute(v) for v in (span.attributes or {}).values())


def test_d25_huge_prompt_and_list_are_truncated_with_the_original_length(
    rag_capture: Capture,
) -> None:
    prompt = "p" * 10_000_000
    with ri.stage("generation", prompt=prompt, items=list(range(100_000))):
        pass
    ri.get_logger().info("big", prompt=prompt)
    attrs = dict(rag_capture.span("generation").attributes or {})
    assert attrs["prompt"].endswith("...[truncated, 10000000 chars]")
    assert len(attrs["prompt"]) < 3_000
    assert len(attrs["items"]) <= 200
    (line,) = rag_capture.find_logs("big")
    assert len(json.dumps(line)) < 5_000
    many = {f"k{i}": i for i in range(1_000)}
    with ri.stage("many", **many):
        pass
    assert len(rag_capture.span("many").attributes or {}) <= 128


class _BadStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str")


def test_d26_odd_names_keys_characters_and_exceptions(
    rag_capture: Capture, capsys: pytest.CaptureFixture[str]
) -> None:
    log = ri.get_logger()
    with ri.stage(""):  # empty: not traced, never raises at run time
        pass
    with ri.stage(None):  # type: ignore[arg-type]
        pass
    log.info("surrogate \ud800 nul \x00", **{"k\ud800": "v\udfff", "n": "\x00"})
    log.info("non-str keys", mapping={1: "a", (2, 3): "b", None: "c"})
    with pytest.raises(_BadStr), ri.stage("retrieval"):
        raise _BadStr
    log.exception("outside an except block")
    for line in capsys.readouterr().err.splitlines():
        json.loads(line)
    for line in rag_capture.logs:
        orjson.dumps(line)
    assert rag_capture.find_logs("retrieval failed")


json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=2**63 - 2, max_value=2**70)
    | st.integers(min_value=-(2**70), max_value=-(2**63) + 1) | st.floats() | st.text() | st.binary(),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=5) | st.integers(), children, max_size=4)
        | st.tuples(children, children)
        | st.frozensets(st.integers(), max_size=3)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_like)
def test_d_property_any_attribute_value_is_a_valid_attribute_or_omitted(value: Any) -> None:
    out = to_attribute_value(value, Sanitizer(100))
    assert out is None or _valid_attribute(out)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.dictionaries(st.text(max_size=10), json_like, max_size=5), st.text(max_size=30))
def test_d_property_any_log_fields_give_one_json_line(
    rag_capture: Capture, fields: dict[str, Any], event: str
) -> None:
    rag_capture.clear()
    ri.get_logger().info(event, **{f"f_{k}": v for k, v in fields.items()})
    (line,) = rag_capture.logs  # exactly one line, parsed back from JSON by the capture
    assert isinstance(line["event"], str)
    assert set(line) >= {"timestamp", "level", "event", "logger", "context"}


def test_d_integers_beyond_64_bits_are_text_on_spans_and_encode(rag_capture: Capture) -> None:
    # OTLP carries int64: 2**70 used to fail the encoder ("Value out of range") and the
    # attribute was lost.
    with ri.stage("a", small=2**70, neg=-(2**63) - 1, edge=2**63 - 1, many=[1, 2**64]):
        pass
    span = rag_capture.span("a")
    attrs = dict(span.attributes or {})
    assert attrs["small"] == str(2**70)
    assert attrs["neg"] == str(-(2**63) - 1)
    assert attrs["edge"] == 2**63 - 1
    assert list(attrs["many"]) == ["1", str(2**64)]
    decoded = {
        kv.key: kv.value
        for resource in encode_spans([span]).resource_spans
        for scope in resource.scope_spans
        for encoded in scope.spans
        for kv in encoded.attributes
    }
    assert decoded["small"].string_value == str(2**70)
    assert decoded["edge"].int_value == 2**63 - 1


def test_d_huge_integers_are_cut_like_strings(rag_capture: Capture) -> None:
    old = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        huge = 10**50000
        ri.get_logger().info("m", f=huge)
        with ri.stage("s", v=huge):
            pass
    finally:
        sys.set_int_max_str_digits(old)
    (line,) = rag_capture.find_logs("m")
    assert line["f"] == "<int of about 50,001 digits>"
    assert rag_capture.span("s").attributes["v"] == "<int of about 50,001 digits>"  # type: ignore[index]
    assert len(orjson.dumps(line)) < 2000
    # one just past the limit is cut as a string would be, with the original length
    assert Sanitizer(10).value(2**70) == "1180591620...[truncated, 22 chars]"
