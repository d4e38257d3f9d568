"""Exceptions in log lines: driver DETAIL text through chains and groups (issue 11, item 3)."""

from __future__ import annotations

import json
import logging

import pytest

import rag_instrument as ri
from rag_instrument.testing import Capture

DETAIL = "Key (email)=(alice@example.com) already exists."


class UniqueViolation(Exception):
    """Shaped like psycopg's: first line, then DETAIL with the row's values."""


UniqueViolation.__module__ = "psycopg.errors"


def _violation() -> UniqueViolation:
    return UniqueViolation(
        'duplicate key value violates unique constraint "users_email_key"\nDETAIL:  ' + DETAIL
    )


class SignupError(Exception):
    pass


def _text(cap: Capture) -> str:
    return json.dumps(cap.logs)


def test_driver_detail_is_dropped_through_a_chain(rag_capture: Capture) -> None:
    log = ri.get_logger()
    try:
        try:
            raise _violation()
        except UniqueViolation as exc:
            raise SignupError(f"signup failed: {exc}") from exc
    except SignupError:
        log.exception("signup failed")
    text = _text(rag_capture)
    assert "alice@example.com" not in text
    (line,) = rag_capture.find_logs("signup failed")
    values = [stack["exc_value"] for stack in line["exception"]]
    assert values[0].startswith("signup failed: [content hidden]")
    assert values[1] == (
        'UniqueViolation: duplicate key value violates unique constraint "users_email_key"'
    )


def _raise(exc: BaseException) -> None:
    raise exc


def test_driver_detail_is_dropped_in_exception_group_members(rag_capture: Capture) -> None:
    log = ri.get_logger()
    try:
        _raise(ExceptionGroup("batch failed", [_violation(), ValueError("ok to show")]))
    except ExceptionGroup:
        log.exception("batch failed")
    text = _text(rag_capture)
    assert "alice@example.com" not in text
    assert "ok to show" in text  # members are still described
    assert "users_email_key" in text


def test_nested_groups_and_stdlib_logging(rag_capture: Capture) -> None:
    inner = ExceptionGroup("inner", [_violation()])
    try:
        try:
            _raise(ExceptionGroup("outer", [inner]))
        except ExceptionGroup as group:
            raise RuntimeError("wrapped") from group
    except RuntimeError:
        logging.getLogger("app").exception("stdlib path")
    assert "alice@example.com" not in _text(rag_capture)
    assert rag_capture.find_logs("stdlib path")


def test_invalid_input_value_is_replaced(rag_capture: Capture) -> None:
    exc = UniqueViolation('invalid input syntax for type integer: "4111 1111 1111 1111"')
    with pytest.raises(UniqueViolation):
        with ri.stage("ingestion"):
            raise exc
    assert "4111" not in _text(rag_capture)
    (line,) = rag_capture.find_logs("ingestion failed")
    assert line["error_message"] == ("UniqueViolation: invalid input syntax for type integer: ?")


def _member_values(stacks: list[dict[str, object]]) -> list[str]:
    out: list[str] = []
    for stack in stacks:
        out.append(str(stack["exc_value"]))
        members = stack.get("exceptions")
        if isinstance(members, list):
            for member in members:
                out.extend(_member_values(member))
    return out


@pytest.mark.parametrize("nested", [False, True])
def test_group_member_quoting_the_error_the_group_was_raised_from(
    rag_capture: Capture, nested: bool
) -> None:
    # The member is made, not raised, inside the except block: it has no chain of its own;
    # its group's context is the driver error.
    try:
        try:
            raise _violation()
        except UniqueViolation as exc:
            group = ExceptionGroup("g", [SignupError(f"signup failed: {exc}")])
            _raise(ExceptionGroup("outer", [group]) if nested else group)
    except ExceptionGroup:
        logging.getLogger("app").exception("x")
    assert "alice@example.com" not in _text(rag_capture)
    (line,) = rag_capture.find_logs("x")
    member = [v for v in _member_values(line["exception"]) if v.startswith("signup failed")]
    assert member == ["signup failed: [content hidden]"]


def test_driver_detail_quoted_in_messages_and_fields_keeps_columns_only(
    rag_capture: Capture,
) -> None:
    exc = _violation()
    logging.getLogger("app").error("signup failed: %s", exc)
    ri.get_logger().error("signup failed (structlog)", err=str(exc))
    ri.get_logger().error("detail only", detail=DETAIL.removesuffix(" already exists."))
    text = _text(rag_capture)
    assert "alice@example.com" not in text
    assert text.count("Key (email)=([REDACTED])") == 3
