"""Read SQL without changing it: sanitised text, statement shape, operation, table, LIMIT.

Everything here works on the text the driver receives and never alters what is sent.
:func:`analyze` tokenises a statement once and derives:

* ``text``: the statement for ``db.query.text``, with bind placeholders kept (``:name``,
  ``%(name)s``, ``%s``, ``?``, ``$1``) and every literal inside the SQL replaced by ``?``:
  strings (with ``''`` or, in ``E'...'`` strings, backslash escapes), dollar-quoted
  strings, numbers, hex and bit strings. Comments are dropped (they can hold anything),
  whitespace runs become one space and ``IN (?, ?, ?)`` becomes ``IN (?)``. An
  unterminated string swallows the rest of the statement rather than leak it.
* ``shape``: ``text`` with placeholders also made ``?``, the key N+1 detection counts.
* ``operation`` / ``collection``: ``SELECT`` and ``users`` when plainly derivable (one
  table, no subquery in ``FROM``), else the operation alone, or nothing.
* the LIMIT (a number, or which bind parameter holds it) and pgvector's distance operator.

Results are cached per statement text (SQLAlchemy reuses its compiled strings).
"""

from __future__ import annotations

import re
import threading
from typing import Any, Final

__all__ = ["StatementInfo", "analyze", "collapse_in_lists", "limit_value", "sanitize"]

# One alternation, tried left to right at each position.
_TOKEN: Final = re.compile(
    r"""
      (?P<comment>--[^\n]*|/\*.*?(?:\*/|\Z))
    | (?P<dollar>\$(?P<tag>[A-Za-z_][A-Za-z0-9_]*)?\$.*?(?:\$(?P=tag)\$|\Z))
    | (?P<estring>(?<![\w$])[eE]'(?:[^'\\]|\\.|'')*(?:'|\Z))
    | (?P<string>(?:(?<![\w$])(?:[nNbBxX]|[uU]&))?'(?:[^']|'')*(?:'|\Z))
    | (?P<qident>"(?:[^"]|"")*(?:"|\Z)|`[^`]*(?:`|\Z)|\[[A-Za-z_][^\]\s]*\])
    | (?P<param>%\([^()\s]+\)s|%s|\$\d+|(?<![:\w]):[A-Za-z_]\w*|\?)
    | (?P<vecop><->|<=>|<\#>|<\+>|<~>|<%>)
    | (?P<number>(?<![\w$.])(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?))
    | (?P<word>[A-Za-z_][\w$]*)
    | (?P<space>\s+)
    | (?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)
_IN_LIST: Final = re.compile(r"\b(IN)\s*\(\s*\?(?:\s*,\s*\?)+\s*\)", re.IGNORECASE)
_VECTOR_METRICS: Final = {
    "<->": "l2",
    "<=>": "cosine",
    "<#>": "inner_product",
    "<+>": "l1",
    "<~>": "hamming",
    "<%>": "jaccard",
}
_MAIN_OPS: Final = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE", "MERGE"})
_VECTOR_SETTINGS: Final = re.compile(r"ef_search|probes|iterative_scan|\bRESET\b|\bDISCARD\b", re.I)
_CACHE_MAX: Final = 2048


class StatementInfo:
    """What :func:`analyze` knows about one statement text (immutable, shared)."""

    __slots__ = (
        "collection",
        "is_select",
        "limit",
        "limit_param",
        "operation",
        "shape",
        "span_name",
        "text",
        "touches_vector_settings",
        "vector_metric",
    )

    def __init__(
        self,
        text: str,
        shape: str,
        operation: str | None,
        collection: str | None,
        limit: int | None,
        limit_param: str | int | None,
        vector_metric: str | None,
        touches_vector_settings: bool,
    ) -> None:
        self.text = text
        self.shape = shape
        self.operation = operation
        self.collection = collection
        self.is_select = operation == "SELECT"
        self.limit = limit
        self.limit_param = limit_param
        self.vector_metric = vector_metric
        self.touches_vector_settings = touches_vector_settings
        if operation and collection:
            self.span_name = f"{operation} {collection}"
        else:
            self.span_name = operation or "db.query"


def collapse_in_lists(text: str) -> str:
    """``IN (?, ?, ?)`` -> ``IN (?)``: one shape whatever the list length."""
    return _IN_LIST.sub(r"\1 (?)", text)


def _scan(sql: str) -> tuple[str, str, list[tuple[str, str, int]], list[str | int]]:
    """Tokenise ``sql``: sanitised text, shape, significant tokens, placeholder keys.

    Tokens are ``(kind, value, depth)`` with ``depth`` the parenthesis depth; placeholder
    keys are the names or positions of the bind parameters, in order.
    """
    text_parts: list[str] = []
    shape_parts: list[str] = []
    tokens: list[tuple[str, str, int]] = []
    params: list[str | int] = []
    positional = 0
    depth = 0
    for match in _TOKEN.finditer(sql):
        kind = match.lastgroup
        value = match.group()
        if kind == "comment":
            if text_parts and text_parts[-1] != " ":
                text_parts.append(" ")
                shape_parts.append(" ")
            continue
        if kind == "space":
            if text_parts and text_parts[-1] != " ":
                text_parts.append(" ")
                shape_parts.append(" ")
            continue
        if kind in ("dollar", "estring", "string", "number"):
            text_parts.append("?")
            shape_parts.append("?")
            tokens.append(("literal", value if kind == "number" else "", depth))
            continue
        if kind == "param":
            text_parts.append(value)
            shape_parts.append("?")
            if value.startswith("%("):
                key: str | int = value[2:-2]
            elif value.startswith("$"):
                key = int(value[1:]) - 1
            elif value.startswith(":"):
                key = value[1:]
            else:
                key = positional
                positional += 1
            params.append(key)
            tokens.append(("param", str(len(params) - 1), depth))
            continue
        text_parts.append(value)
        shape_parts.append(value)
        if kind == "other":
            if value == "(":
                depth += 1
            elif value == ")":
                depth = max(depth - 1, 0)
            tokens.append(("punct", value, depth))
        else:
            tokens.append((kind or "other", value, depth))
    text = "".join(text_parts).strip()
    shape = "".join(shape_parts).strip()
    return collapse_in_lists(text), collapse_in_lists(shape), tokens, params


def _ident(value: str) -> str:
    if value[:1] in ('"', "`", "["):
        return value[1:-1].replace('""', '"')
    return value


def _name_at(tokens: list[tuple[str, str, int]], i: int) -> tuple[str | None, int]:
    """A possibly schema-qualified name starting at ``tokens[i]``; its end index."""
    if i >= len(tokens) or tokens[i][0] not in ("word", "qident"):
        return None, i
    parts = [_ident(tokens[i][1])]
    i += 1
    while i + 1 < len(tokens) and tokens[i][1] == "." and tokens[i + 1][0] in ("word", "qident"):
        parts.append(_ident(tokens[i + 1][1]))
        i += 2
    return ".".join(parts), i


def _operation(tokens: list[tuple[str, str, int]]) -> tuple[str | None, int]:
    """The statement's operation keyword and the index of its token."""
    for i, (kind, value, _depth) in enumerate(tokens):
        if kind == "word":
            op = value.upper()
            if op != "WITH":
                return op, i
            # WITH ... : the operation is the first top-level main keyword after the CTEs.
            for j in range(i + 1, len(tokens)):
                k, v, d = tokens[j]
                if k == "word" and d == 0 and v.upper() in _MAIN_OPS:
                    return v.upper(), j
            return op, i
        if value != "(":
            return None, i
    return None, 0


_SKIP_DDL: Final = frozenset(
    {"IF", "NOT", "EXISTS", "TEMP", "TEMPORARY", "UNLOGGED", "UNIQUE", "CONCURRENTLY", "ONLY"}
)


def _collection(tokens: list[tuple[str, str, int]], op: str, at: int) -> str | None:
    depth0 = tokens[at][2]
    if op in ("SELECT", "DELETE"):
        names: set[str] = set()
        for i in range(at + 1, len(tokens)):
            kind, value, depth = tokens[i]
            if depth != depth0 or kind != "word":
                continue
            upper = value.upper()
            if upper in ("FROM", "JOIN"):
                name, end = _name_at(tokens, i + 1)
                if name is None:
                    return None  # FROM (subquery) or FROM a function: not plain
                names.add(name)
                # An implicit join (FROM a, b) also means no single table.
                while end < len(tokens) and tokens[end][0] in ("word", "qident"):
                    if tokens[end][1].upper() in ("WHERE", "JOIN", "ORDER", "GROUP", "LIMIT"):
                        break
                    end += 1
                if end < len(tokens) and tokens[end][1] == "," and tokens[end][2] == depth0:
                    return None
        return names.pop() if len(names) == 1 else None
    if op == "INSERT":
        for i in range(at + 1, len(tokens)):
            if tokens[i][0] == "word" and tokens[i][1].upper() == "INTO":
                return _name_at(tokens, i + 1)[0]
        return None
    if op == "UPDATE":
        i = at + 1
        if i < len(tokens) and tokens[i][1].upper() == "ONLY":
            i += 1
        return _name_at(tokens, i)[0]
    if op in ("CREATE", "DROP", "ALTER", "TRUNCATE"):
        i = at + 1
        while i < len(tokens) and tokens[i][1].upper() in _SKIP_DDL:
            i += 1
        if i < len(tokens) and tokens[i][1].upper() == "INDEX":
            for j in range(i + 1, len(tokens)):
                if tokens[j][0] == "word" and tokens[j][1].upper() == "ON":
                    k = j + 1
                    while k < len(tokens) and tokens[k][1].upper() in _SKIP_DDL:
                        k += 1
                    return _name_at(tokens, k)[0]
            return None
        if op == "TRUNCATE" or (i < len(tokens) and tokens[i][1].upper() == "TABLE"):
            if op != "TRUNCATE" or (i < len(tokens) and tokens[i][1].upper() == "TABLE"):
                i += 1
            while i < len(tokens) and tokens[i][1].upper() in _SKIP_DDL:
                i += 1
            return _name_at(tokens, i)[0]
    return None


def _limit(
    tokens: list[tuple[str, str, int]], params: list[str | int]
) -> tuple[int | None, str | int | None]:
    for i in range(len(tokens) - 2, -1, -1):
        kind, value, depth = tokens[i]
        if kind == "word" and depth == 0 and value.upper() == "LIMIT":
            nkind, nvalue, _ = tokens[i + 1]
            if nkind == "literal" and nvalue.isdigit():
                return int(nvalue), None
            if nkind == "param":
                return None, params[int(nvalue)]
            return None, None
    return None, None


def _analyze(sql: str) -> StatementInfo:
    text, shape, tokens, params = _scan(sql)
    op, at = _operation(tokens)
    collection = _collection(tokens, op, at) if op else None
    limit, limit_param = _limit(tokens, params) if op == "SELECT" else (None, None)
    metric = None
    for kind, value, _depth in tokens:
        if kind == "vecop":
            metric = _VECTOR_METRICS[value]
            break
    # SET / RESET / DISCARD, or set_config(): the setting's name is a literal there, so
    # look at the raw text (this flag is never exported).
    settings = op in ("SET", "RESET", "DISCARD") or (
        op == "SELECT" and "set_config" in text.lower()
    )
    settings = settings and bool(_VECTOR_SETTINGS.search(sql))
    return StatementInfo(text, shape, op, collection, limit, limit_param, metric, settings)


_cache: dict[str, StatementInfo] = {}
_cache_lock = threading.Lock()


def analyze(sql: str) -> StatementInfo:
    """Everything derivable from ``sql`` (cached; never raises on odd SQL)."""
    found = _cache.get(sql)
    if found is not None:
        return found
    info = _analyze(sql)
    with _cache_lock:
        if len(_cache) >= _CACHE_MAX:
            _cache.clear()  # crude but bounded: statement texts rarely exceed the cache
        _cache[sql] = info
    return info


def sanitize(sql: str) -> str:
    """``sql`` with literals replaced by ``?`` and placeholders kept (see module docs)."""
    return analyze(sql).text


def limit_value(info: StatementInfo, parameters: Any) -> int | None:
    """The statement's LIMIT, read from ``parameters`` when it is a bind parameter."""
    if info.limit is not None:
        return info.limit
    key = info.limit_param
    if key is None or parameters is None:
        return None
    try:
        value = parameters[key]
    except (KeyError, IndexError, TypeError):
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None
