"""Milvus boolean expressions and error messages, with their literal values hidden.

Private to :mod:`rag_instrument.integrations.milvus` (which re-exports
:func:`filter_shape` and :func:`sanitize_error`); needs nothing from pymilvus.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["filter_shape", "sanitize_error"]


_TOKEN: Final = re.compile(
    r"""
    (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    |(?P<open>["'`].*)  # a quote never closed: nothing after it can be trusted
    |(?P<comment>/\*.*?(?:\*/|\Z)|//[^\n]*|\#[^\n]*)
    |(?P<num>(?<![\w.])(?:\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+)(?![\w.]))
    |(?P<tmpl>\{[A-Za-z_]\w*\})
    |(?P<ident>[A-Za-z_$][\w$]*)
    |(?P<ws>\s+)
    |(?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)
_KEYWORDS: Final = frozenset({"and", "or", "not", "in", "like", "is", "null", "exists"})
_BOOLEANS: Final = frozenset({"true", "false"})
_LIST: Final = re.compile(r"\[\s*\?(?:\s*,\s*\?)*\s*,?\s*\]")
_SHAPES: dict[str, tuple[str, tuple[str, ...]]] = {}


def filter_shape(expr: str) -> tuple[str, tuple[str, ...]]:
    """``(shape, fields)`` of a Milvus boolean expression.

    String, number and boolean literals become ``?`` and lists of them ``[?]``; JSON keys
    (``meta["lang"]``) and template placeholders (``{age}``) are kept. ``fields`` are the
    field names the expression reads, in order (functions and keywords excluded).

    Example:
        >>> filter_shape('lang == "en" and year in [2020, 2021]')
        ('lang == ? and year in [?]', ('lang', 'year'))
    """
    cached = _SHAPES.get(expr)
    if cached is not None:
        return cached
    tokens = [(m.lastgroup or "other", m.group()) for m in _TOKEN.finditer(expr)]
    out: list[str] = []
    fields: list[str] = []
    previous: list[str] = []  # significant tokens so far
    for position, (kind, text) in enumerate(tokens):
        if kind == "ws":
            if out and not out[-1].endswith(" "):
                out.append(" ")
            continue
        if kind in ("open", "comment"):
            out.append("?")
            previous.append("?")
            continue
        if kind == "str":
            # A JSON key (meta["k"]) is part of the field reference, not a value.
            is_key = len(previous) >= 2 and previous[-1] == "[" and _is_ref(previous[-2])
            out.append(text if is_key else "?")
        elif kind == "num":
            out.append("?")
        elif kind == "ident":
            lowered = text.lower()
            if lowered in _BOOLEANS:
                out.append("?")
            else:
                out.append(text)
                following = next((t for k, t in tokens[position + 1 :] if k != "ws"), "")
                if lowered not in _KEYWORDS and following != "(" and text not in fields:
                    fields.append(text)
        else:
            out.append(text)
        previous.append(text)
    shape = _LIST.sub("[?]", "".join(out).strip())
    result = (shape, tuple(fields))
    if len(_SHAPES) >= 1024:
        _SHAPES.clear()
    _SHAPES[expr] = result
    return result


def _is_ref(text: str) -> bool:
    if text == "]":
        return True
    lowered = text.lower()
    return (
        bool(re.fullmatch(r"[A-Za-z_$][\w$]*", text))
        and lowered not in _KEYWORDS
        and lowered not in _BOOLEANS
    )


_LITERAL: Final = re.compile(
    # Quoted literals (one never closed runs to the end of the message), comments, numbers.
    r""""(?:[^"\\]|\\.)*(?:"|\Z)|'(?:[^'\\]|\\.)*(?:'|\Z)|`[^`]*(?:`|\Z)"""
    r"""|/\*.*?(?:\*/|\Z)|(?<!:)//[^\n]*|(?<![\w/&])\#[^\n]*"""  # not a URL's "//"
    r"""|(?<![\w.])\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w.])""",
    re.DOTALL,
)


def sanitize_error(exc: BaseException) -> str | None:
    """A pymilvus error's text with its literal values replaced by ``?``.

    Milvus echoes a bad filter expression in its error message (``year > "..."``), values
    included; the code and the message's shape are kept.
    """
    message = getattr(exc, "message", None)
    if not isinstance(message, str):
        message = str(exc)
    code = getattr(exc, "code", None)
    prefix = f"{type(exc).__name__}(code={code})" if isinstance(code, int) else type(exc).__name__
    return f"{prefix}: {_LITERAL.sub('?', message)}"
