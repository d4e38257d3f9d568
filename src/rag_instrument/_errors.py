"""Exception messages that are safe to put on a span or a log line.

Exception text is the one free text the library records without being asked to: an SDK
error quoting the prompt, a database driver quoting the row (``DETAIL: Key (email)=
(...)``), an application error quoting either. :func:`exception_message` renders what may
be said of an exception: database errors without their SQL literals, parameters or
``DETAIL`` lines, SDK errors as type, HTTP status and code unless content capture is on,
anything else redacted and cut, with quotes of the exceptions it was raised from, of the
content its stage saw (content capture off) and of the call's literal secrets hidden.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Final

import orjson

from rag_instrument._registry import format_error
from rag_instrument._sanitize import REDACTED, Sanitizer, safe_str
from rag_instrument._utils import http_status

__all__ = [
    "exception_chain",
    "exception_message",
    "hide_content",
    "is_database_error",
    "remember_exception",
]


def _type_name(value: object) -> str:
    try:
        return type(value).__name__
    except Exception:
        return "object"


_SDK_MODULES: Final = (
    "openai.",
    "anthropic.",
    "ibm_watsonx_ai.",
    "cohere.",
    "mistralai.",
    "google.genai.",
)


def _sdk_message(exc: BaseException) -> str:
    # LLM SDK errors echo request content (the prompt, a rejected message) in their text.
    status = http_status(exc)
    code = getattr(exc, "code", None)
    parts = [type(exc).__name__]
    if isinstance(status, int):
        parts.append(f"HTTP {status}")
    if isinstance(code, str) and code.isidentifier() and len(code) <= 64:
        parts.append(code)
    return " ".join(parts) + " (message hidden: content capture is off)"


def _statement_error_message(exc: BaseException) -> str:
    # SQLAlchemy's StatementError text carries the raw SQL and a "[parameters: ...]" block,
    # and the driver's message under it can quote values ("Key (email)=(...)").
    # The database integration registers its formatter (rag_instrument._registry).
    orig = getattr(exc, "orig", None)
    if getattr(exc, "statement", "") is None and isinstance(orig, BaseException):
        # No statement was sent (connecting failed): the driver's first line says why
        # ("connection to server ... failed: Connection refused"), quoted values masked.
        return _driver_message(orig)
    rendered = format_error(exc)
    if rendered is not None:
        return rendered
    inner = f" ({type(orig).__module__}.{type(orig).__name__})" if orig is not None else ""
    return f"{type(exc).__name__}{inner}: statement and parameters hidden"


_DRIVER_ROOTS: Final = frozenset(
    {
        "psycopg",
        "psycopg2",
        "asyncpg",
        "pg8000",
        "sqlite3",
        "aiosqlite",
        "pymysql",
        "MySQLdb",
        "mysql",
        "aiomysql",
        "asyncmy",
        "oracledb",
        "cx_Oracle",
        "pyodbc",
        "pymssql",
        "duckdb",
    }
)
# The driver's words around a value: "Key (email)=(alice@x.com)", "for type integer: "abc"".
_DRIVER_VALUES: Final = re.compile(r"\(([^()]*)\)=\((?:[^()]|\([^()]*\))*\)|(:\s*)\"[^\"]*\"\s*$")


def _driver_values(match: re.Match[str]) -> str:
    if match.group(1) is not None:
        return f"({match.group(1)})=(?)"
    return f"{match.group(2)}?"


# asyncpg's check of a bound parameter: "invalid input for query argument $1: <the value,
# quoted or not> (<why>)"; the value goes, the reason stays (its own quotes are masked).
_ARGUMENT: Final = re.compile(r"(query argument \$\d+: ).*?( \((?:[^()]|\([^()]*\))*\))?$")
# A value in single quotes (MySQL's "Duplicate entry 'a@b.c' for key ...", asyncpg's
# arguments); PostgreSQL quotes names in double quotes, which stay.
_SINGLE_QUOTED: Final = re.compile(r"'(?:[^']|'')*'")


def _driver_message(exc: BaseException) -> str:
    # A database driver's own exception (psycopg's UniqueViolation ...): its first line says
    # what went wrong ("duplicate key value violates unique constraint ..."); the DETAIL,
    # HINT and CONTEXT lines after it quote the row's values. Keep the first line, with any
    # value it quotes replaced.
    first = safe_str(exc).split("\n", 1)[0].strip()
    first = _DRIVER_VALUES.sub(_driver_values, first)
    first = _ARGUMENT.sub(lambda m: f"{m.group(1)}?{m.group(2) or ''}", first)
    return f"{_type_name(exc)}: {_SINGLE_QUOTED.sub('?', first)}"


def _is_driver_error(exc: BaseException) -> bool:
    module = type(exc).__module__ or ""
    # SQLAlchemy's adapters of async drivers (AsyncAdapt_asyncpg_dbapi.Error ...) carry
    # the driver's message as their own.
    return module.split(".", 1)[0] in _DRIVER_ROOTS or module.startswith("sqlalchemy.dialects.")


# What the library learnt about an exception where it was raised: the safe summary an LLM
# call recorded for it (content capture off), and the literal secrets (a client's API key)
# that must not appear in any text of it, on any span or line, wherever it ends up. Kept in
# the exception's own __dict__ (built-in exceptions take no weak references), so it lives
# exactly as long as the exception.
_SHOWN_KEY: Final = "__rag_instrument_shown__"


class _Shown:
    """How an exception may be shown; its repr says nothing (error reporters print it)."""

    __slots__ = ("secrets", "summary")

    def __init__(self, summary: str | None, secrets: tuple[str, ...]) -> None:
        self.summary = summary
        self.secrets = secrets

    def __repr__(self) -> str:
        return "<rag_instrument: redaction state>"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Shown, (None, ()))  # never pickled along with the exception


def remember_exception(
    exc: BaseException, *, summary: str | None, secrets: tuple[str, ...] = ()
) -> None:
    """Record how ``exc`` may be shown wherever it is reported later.

    ``summary`` replaces its text (``None``: its text, redacted) and ``secrets`` are masked
    in it. Used by the LLM call that saw it first, so that the stages it propagates
    through say no more than the call's own span.
    """
    try:
        state = vars(exc)
    except TypeError:  # an exception class with __slots__ only: nothing to remember
        return
    if isinstance(state, dict):
        state[_SHOWN_KEY] = _Shown(summary, secrets)


def _remembered(exc: BaseException) -> tuple[str | None, tuple[str, ...]] | None:
    try:
        state = vars(exc)
    except TypeError:
        return None
    found = state.get(_SHOWN_KEY) if isinstance(state, dict) else None
    return (found.summary, found.secrets) if isinstance(found, _Shown) else None


_HIDDEN: Final = "[content hidden]"
_MIN_CONTENT_CHARS: Final = 8
_MIN_QUOTE: Final = 24


def hide_content(text: str, hidden: Sequence[str]) -> str:
    """Replace quotes of each ``hidden`` text in ``text`` with a marker.

    A quote is the text whole, repr- or JSON-escaped, or a long enough prefix of it (as
    ``f"{prompt[:50]}..."`` makes).
    """
    for content in hidden:
        if len(content) < _MIN_CONTENT_CHARS:
            continue
        forms = list(
            dict.fromkeys((content, repr(content)[1:-1], orjson.dumps(content).decode()[1:-1]))
        )
        for form in forms:  # whole quotes first
            if form in text:
                text = text.replace(form, _HIDDEN)
        for form in forms:  # then cut ones: from where they start, as far as they match
            probe = form[:_MIN_QUOTE]
            if len(probe) < _MIN_QUOTE:
                continue
            start = text.find(probe)
            while start != -1:
                end = start + len(probe)
                limit = min(len(text), start + len(form))
                while end < limit and text[end] == form[end - start]:
                    end += 1
                text = text[:start] + _HIDDEN + text[end:]
                start = text.find(probe, start + len(_HIDDEN))
    return text


def exception_chain(exc: BaseException, limit: int = 16) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from (cause, else unsuppressed context)."""
    out: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(out) < limit and not any(current is e for e in out):
        out.append(current)
        current = current.__cause__ or (
            None if current.__suppress_context__ else current.__context__
        )
    return out


def _own_message(exc: BaseException, capture_content: bool, from_driver: bool = False) -> str:
    remembered = _remembered(exc)
    if remembered is not None and remembered[0] is not None and not capture_content:
        return remembered[0]
    module = type(exc).__module__ or ""
    if module.startswith("sqlalchemy") and hasattr(exc, "statement"):
        return _statement_error_message(exc)
    if from_driver or _is_driver_error(exc):
        return _driver_message(exc)
    if not capture_content and f"{module}.".startswith(_SDK_MODULES):
        return _sdk_message(exc)
    rendered = format_error(exc)  # an integration's safe rendering (e.g. pymilvus errors)
    if rendered is not None:
        return rendered
    return safe_str(exc)


def is_database_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a database driver's error or a SQLAlchemy statement error.

    What such an error was raised from (asyncpg's ``ValueError: invalid UUID '<value>'``
    while encoding a parameter) is the driver's own doing and quotes the same values: show
    it with ``exception_message(..., from_driver=True)``.
    """
    module = type(exc).__module__ or ""
    return (module.startswith("sqlalchemy") and hasattr(exc, "statement")) or _is_driver_error(
        exc
    )


def _sensitive(exc: BaseException, capture_content: bool) -> bool:
    # Whose raw text must not be quoted by the exceptions raised from it.
    if is_database_error(exc):
        return True
    module = type(exc).__module__ or ""
    remembered = _remembered(exc)
    if remembered is not None and remembered[0] is not None and not capture_content:
        return True
    return not capture_content and f"{module}.".startswith(_SDK_MODULES)


def exception_message(
    exc: BaseException,
    sanitizer: Sanitizer,
    capture_content: bool,
    hide: Sequence[str] = (),
    related: Sequence[BaseException] = (),
    *,
    from_driver: bool = False,
) -> str:
    """The text of ``exc`` that is safe to put on a span or a log line.

    Database statement errors never show their SQL literals or parameters, driver errors
    only their first line with quoted values replaced (no ``DETAIL: Key (email)=(...)``);
    LLM SDK errors show only their type, HTTP status and error code unless content capture
    is on; any other message is redacted and truncated. Whatever the exception was raised
    from is looked at too: an application error that quotes a database or SDK error's
    text (``f"insert failed: {e}"``) has the quote hidden, and the literal secrets an LLM
    call was made with are masked. Without content capture, ``hide`` (the prompts and
    completions the enclosing stage saw) are hidden where quoted. ``related`` are the
    exception groups ``exc`` is a member of: a member made inside an ``except`` block
    (``ExceptionGroup("g", [SignupError(f"failed: {e}")])``) has no chain of its own, the
    group holds it, so what the groups were raised from is looked at too.
    ``from_driver``: ``exc`` is what a database error was raised from (see
    :func:`is_database_error`): shown as a driver's own message is. Never raises.
    """
    try:
        message = _own_message(exc, capture_content, from_driver)
        hidden: list[str] = [] if capture_content else list(hide)
        secrets: list[str] = []
        links = exception_chain(exc)
        for group in related:
            links.extend(link for link in exception_chain(group) if link is not exc)
        # The driver error a failed connection's message was made from, safely: not hidden.
        shown = getattr(exc, "orig", None) if getattr(exc, "statement", "") is None else None
        for link in links:
            remembered = _remembered(link)
            if remembered is not None:
                secrets.extend(remembered[1])
            if link is not exc and link is not shown and _sensitive(link, capture_content):
                hidden.append(safe_str(link))
                orig = getattr(link, "orig", None)
                if isinstance(orig, BaseException):
                    hidden.append(safe_str(orig))
        for secret in secrets:
            if secret and secret in message:
                message = message.replace(secret, REDACTED)
        if hidden:
            message = hide_content(message, hidden)
        return sanitizer.text(message)
    except Exception:
        return f"{_type_name(exc)} (message unavailable)"
