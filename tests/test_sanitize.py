"""Redaction, truncation and safe serialisation, property-based where inputs vary."""

from __future__ import annotations

import re
import string
import traceback
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rag_instrument as ri
from rag_instrument._sanitize import (
    REDACTED,
    Sanitizer,
    is_secret_key,
    redact_text,
    safe_repr,
    stack_trace,
    to_attribute_value,
    truncate,
)
from rag_instrument.testing import capture

TOKEN = st.text(string.ascii_letters + string.digits, min_size=16, max_size=40)
# A real key's random part mixes letter cases and digits; "sk-" plus one plain word is an
# identifier ("sk-learn"), kept for precision (see test_redaction_precision.py).
KEY_BODY = TOKEN.filter(
    lambda t: (
        sum((any(c.isdigit() for c in t), any(c.islower() for c in t), any(c.isupper() for c in t)))
        >= 2
    )
)
FILLER = st.text(string.ascii_letters + " .,;", max_size=40)


@given(FILLER, KEY_BODY, FILLER)
def test_openai_style_keys_never_survive(before: str, token: str, after: str) -> None:
    secret = f"sk-{token}"
    out = redact_text(f"{before} {secret} {after}")
    assert secret not in out
    assert out.count(token) == f"{before} {after}".count(token)  # no part of the key survives
    assert REDACTED in out


@given(TOKEN, st.sampled_from(["Bearer", "Basic", "Token"]))
def test_authorization_values_never_survive(token: str, scheme: str) -> None:
    out = redact_text(f"Authorization: {scheme} {token}")
    assert token not in out
    assert out == f"Authorization: {scheme} {REDACTED}"


@given(
    st.sampled_from(["postgresql", "redis", "https", "mysql+pymysql"]),
    st.text(string.ascii_lowercase, min_size=1, max_size=10),
    st.text(string.ascii_letters + string.digits + "!$%^&*@/#?:", min_size=1, max_size=20).filter(
        # Up to five digits then "/", "?" or "#" reads as a port: a documented miss.
        lambda p: not re.match(r"\d{1,5}(?:[/?#]|$)", p)
    ),
)
def test_url_passwords_never_survive(scheme: str, user: str, password: str) -> None:
    url = f"{scheme}://{user}:{password}@host:5432/db"
    out = redact_text(url)
    assert out == f"{scheme}://{user}:{REDACTED}@host:5432/db"


@given(st.text(max_size=300))
def test_redaction_is_idempotent_and_never_raises(text: str) -> None:
    once = redact_text(text)
    assert redact_text(once) == once


@given(st.text(max_size=500), st.integers(min_value=0, max_value=400))
def test_truncation_keeps_prefix_and_states_length(text: str, limit: int) -> None:
    out = truncate(text, limit)
    if len(text) <= limit:
        assert out == text
    else:
        assert out.startswith(text[:limit])
        assert out.endswith(f"...[truncated, {len(text)} chars]")


@given(
    st.sampled_from(
        [
            "api_key",
            "apiKey",
            "API-KEY",
            "x-api-key",
            "Authorization",
            "password",
            "db_password",
            "client_secret",
            "access_token",
            "token",
            "Cookie",
            "private_key",
            "sessionId",
            "password_1",  # SQLAlchemy's bind for ``where(User.password == ...)``
            "api_key_2",
            "token2",
            "pw",
            "password_hash",
            "pwd_salt",
        ]
    )
)
def test_secret_keys(key: str) -> None:
    assert is_secret_key(key)


@given(
    st.sampled_from(
        [
            "max_tokens",
            "input_tokens",
            "gen_ai.usage.output_tokens",
            "author",
            "passage",
            "keyword",
            "top_k",
            "model",
            "prompt",
            "monkey",
            "tokens_saved",
            "tokens_1",
            "max_tokens_2",
            "gpt4",
            "retrieval_pass_1",  # a pipeline's passes, numbered
            "rerank_pass2",
            "auth0",
        ]
    )
)
def test_ordinary_keys(key: str) -> None:
    assert not is_secret_key(key)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=200)
@given(json_values)
def test_sanitised_values_always_serialise(value: Any) -> None:
    clean = Sanitizer(50).value(value)
    orjson.dumps(clean)


@given(st.lists(st.integers(), min_size=201, max_size=400))
def test_long_lists_are_capped(values: list[int]) -> None:
    clean = Sanitizer().value(values)
    assert len(clean) == 201
    assert clean[-1] == f"[{len(values) - 200} more items]"


def test_deep_nesting_is_bounded() -> None:
    value: Any = "leaf"
    for _ in range(50):
        value = [value]
    clean = Sanitizer().value(value)
    orjson.dumps(clean)
    assert "nested too deep" in orjson.dumps(clean).decode()


def test_safe_repr_of_hostile_objects() -> None:
    class Raises:
        def __repr__(self) -> str:
            raise ValueError("no")

    class Long:
        def __repr__(self) -> str:
            return "x" * 1000

    assert safe_repr(Raises()) == "<unrepresentable Raises>"
    assert safe_repr(Long(), 10) == "x" * 10 + "...[truncated, 1000 chars]"


def test_attribute_values() -> None:
    sanitizer = Sanitizer(40)
    assert to_attribute_value(None, sanitizer) is None
    assert to_attribute_value(3, sanitizer) == 3
    assert to_attribute_value(["a", "b"], sanitizer) == ["a", "b"]
    assert to_attribute_value([1, "a"], sanitizer) == '[1,"a"]'
    assert (
        to_attribute_value({"api_key": "x", "n": 1}, sanitizer) == '{"api_key":"[REDACTED]","n":1}'
    )
    assert to_attribute_value("y" * 50, sanitizer) == "y" * 40 + "...[truncated, 50 chars]"


def test_url_user_named_like_a_secret_key_keeps_the_host() -> None:
    assert redact_text("postgresql://pwd:s3cret@host:5432/db") == (
        "postgresql://pwd:[REDACTED]@host:5432/db"
    )
    assert redact_text("redis://token:abc@cache:6379/0") == "redis://token:[REDACTED]@cache:6379/0"


# --- stack traces: frames by file, line and function, never source text --------------------


def _python_without_source(text: str) -> str:
    """Python's own rendering minus what it reads from source files (code lines, carets)."""
    return "".join(line for line in text.splitlines(keepends=True) if not line.startswith("    "))


def _python_last_line(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).rstrip("\n")


def _recurse(depth: int) -> None:
    if depth:
        _recurse(depth - 1)
    raise LookupError("no such drawer")


def _call_with_a_literal_in_its_source() -> None:
    # The literal sits on lines of the failing call; Python 3.13 prints them all.
    _recurse(
        0,
    ) if "opal-harbour-7" else None


@given(st.integers(min_value=0, max_value=12))
def test_stack_trace_is_pythons_layout_without_source_lines(depth: int) -> None:
    with pytest.raises(LookupError) as info:
        _recurse(depth)
    exc = info.value
    ours = stack_trace(exc, _python_last_line)
    assert ours == _python_without_source("".join(traceback.format_exception(exc)))
    assert ("Previous line repeated" in ours) is (depth > 3)  # recursion is folded
    for frame in traceback.extract_tb(exc.__traceback__):
        assert f'  File "{frame.filename}", line {frame.lineno}, in {frame.name}\n' in ours


def test_stack_trace_never_holds_source_text_on_any_version() -> None:
    with pytest.raises(LookupError) as info:
        _call_with_a_literal_in_its_source()
    ours = stack_trace(info.value, lambda exc: f"{type(exc).__name__}: hidden")
    assert "opal-harbour-7" not in ours
    assert "_recurse(" not in ours
    assert not [line for line in ours.splitlines() if line.startswith("    ")]
    assert "in _call_with_a_literal_in_its_source\n" in ours
    assert ours.startswith("Traceback (most recent call last):\n")
    assert ours.endswith("LookupError: hidden\n")


def _chained(kind: str) -> BaseException:
    try:
        try:
            _recurse(1)
        except LookupError as first:
            if kind == "cause":
                raise ValueError("second") from first
            if kind == "suppressed":
                raise ValueError("second") from None
            raise ValueError("second")  # noqa: B904 - the implicit context is the point
    except ValueError as exc:
        return exc
    raise AssertionError


@pytest.mark.parametrize("kind", ["cause", "context", "suppressed"])
def test_stack_trace_chain_follows_python(kind: str) -> None:
    exc = _chained(kind)
    ours = stack_trace(exc, _python_last_line, chain=True)
    assert ours == _python_without_source("".join(traceback.format_exception(exc)))
    assert ("no such drawer" in ours) is (kind != "suppressed")
    alone = stack_trace(exc, _python_last_line)
    assert "no such drawer" not in alone  # without chain: only the exception's own frames
    assert alone.endswith("ValueError: second\n")


def test_stack_trace_survives_cycles_missing_frames_and_a_failing_describe() -> None:
    exc = _chained("cause")
    assert exc.__cause__ is not None
    exc.__cause__.__cause__ = exc  # a cycle: each exception is shown once
    ours = stack_trace(exc, _python_last_line, chain=True)
    assert ours.count("ValueError: second") == 1
    assert ours.count("LookupError: no such drawer") == 1

    def failing(_exc: BaseException) -> str:
        raise RuntimeError

    assert stack_trace(ValueError("x"), failing) == "ValueError\n"  # no frames, no header


def test_stack_trace_reads_no_source_file(monkeypatch: pytest.MonkeyPatch) -> None:
    import linecache

    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("a source file was read")

    with pytest.raises(LookupError) as info:
        _recurse(2)
    linecache.clearcache()
    monkeypatch.setattr(linecache, "getline", refuse)
    monkeypatch.setattr(linecache, "getlines", refuse)
    monkeypatch.setattr(linecache, "updatecache", refuse)
    assert "in _recurse" in stack_trace(info.value, _python_last_line)


def test_named_tuples_are_masked_by_their_field_names() -> None:
    from collections import namedtuple
    from typing import NamedTuple

    credentials = namedtuple("credentials", "user password")

    class Key(NamedTuple):
        name: str
        api_key: str

    with capture() as cap:
        ri.get_logger("app").info(
            "connecting", cred=credentials("bob", "hunter2"), key=Key("k", "sk-abc"), pair=(1, 2)
        )
        with ri.stage("s", cred=credentials("bob", "hunter2")):
            pass
    (line,) = cap.find_logs("connecting")
    assert line["cred"] == {"user": "bob", "password": "[REDACTED]"}
    assert line["key"] == {"name": "k", "api_key": "[REDACTED]"}
    assert line["pair"] == [1, 2]  # a plain tuple stays a list
    assert "hunter2" not in repr(cap.span("s").attributes)


def test_a_container_that_cannot_be_read_is_one_placeholder_not_the_whole_line() -> None:
    class BadItems(dict):  # type: ignore[type-arg]
        def items(self) -> Any:
            raise RuntimeError("no items")

    class BadIter(list):  # type: ignore[type-arg]
        def __getitem__(self, index: Any) -> Any:
            raise RuntimeError("no items")

    out = Sanitizer().mapping({"other": "kept", "bad": BadItems(a=1), "worse": BadIter([1])})
    assert out == {
        "other": "kept",
        "bad": "<unrepresentable BadItems>",
        "worse": "<unrepresentable BadIter>",
    }


def test_rendering_stops_at_the_size_budget_and_later_fields_survive() -> None:
    """RELIABILITY 25: serialisation stops at the budget (an 80 MB line before)."""
    from rag_instrument._sanitize import TOTAL_CHARS

    row = ["y" * 2000] * 200
    huge = {f"k{i}": row for i in range(200)}
    out = Sanitizer().mapping({"results": huge, "request_id": "r-1"})
    rendered = orjson.dumps(out)
    assert len(rendered) < TOTAL_CHARS + 20_000
    assert out["request_id"] == "r-1"
    assert "over the size budget" in rendered.decode()
    small = {"docs": [{"id": i, "text": "t" * 50} for i in range(100)]}
    assert Sanitizer().mapping(small) == small  # an ordinary value is untouched
