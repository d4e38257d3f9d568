"""Read SQL without changing it: sanitised text, statement shape, operation, table, LIMIT.

Everything here works on the text the driver receives and never alters what is sent.
:func:`analyze` tokenises a statement once, in one pass, and derives:

* ``text``: the statement for ``db.query.text``, with bind placeholders kept (``:name``,
  ``%(name)s``, ``%s``, ``?``, ``$1``) and every literal inside the SQL replaced by ``?``:
  strings (with ``''`` or, in ``E'...'`` strings, backslash escapes), dollar-quoted
  strings (tagged or not), numbers (``1_000``, ``0x1F``, ``0b101``, ``0o17``, ``1.5e3``),
  hex and bit strings. Comments are dropped (they can hold anything; PostgreSQL's nest),
  whitespace runs become one space, and ``IN (?, ?, ?)`` (signs included) and
  ``ARRAY[?, ?, ?]`` become ``IN (?)`` and ``ARRAY[?]``. An unterminated string or
  comment swallows the rest of the statement rather than leak it.
* ``shape``: ``text`` with placeholders also made ``?``, the key N+1 detection counts.
* ``operation`` / ``collection``: ``SELECT`` and ``users`` when plainly derivable (one
  table, no subquery in ``FROM``), else the operation alone, or nothing.
* ``explainable``: one statement whose first keyword is ``SELECT`` (or ``WITH`` ...
  ``SELECT`` without data-modifying CTEs): the only kind a plan is read for.
* the LIMIT (a number, or which bind parameter holds it) and pgvector's distance operator.

The dialect decides what quotes and comments mean. Block comments nest (standard SQL,
PostgreSQL, SQL Server) except on SQLite and MySQL. ``"..."`` is an identifier in standard SQL and
PostgreSQL, but SQLite and MySQL also accept it as a string, so there it becomes ``?``.
MySQL strings take backslash escapes and ``#`` starts a comment; ``[name]`` is an
identifier only on SQL Server and SQLite (elsewhere brackets are arrays and subscripts).

Results are cached per (dialect, statement text): SQLAlchemy reuses its compiled strings.
"""

from __future__ import annotations

import re
import threading
from typing import Any, Final

from rag_instrument._registry import register_error_formatter
from rag_instrument._sanitize import is_secret_key

__all__ = [
    "StatementInfo",
    "analyze",
    "collapse_in_lists",
    "limit_value",
    "sanitize",
    "sanitize_statement_error",
]

_COMMENT_LINE: Final = r"--[^\n]*"
_COMMENT_BLOCK: Final = r"/\*.*?(?:\*/|\Z)"
# The tag group always participates (empty for $$...$$), so the backreference can match.
_DOLLAR: Final = r"\$(?P<tag>[A-Za-z_][A-Za-z0-9_]*|)\$.*?(?:\$(?P=tag)\$|\Z)"
_ESTRING: Final = r"(?<![\w$])[eE]'(?:[^'\\]|\\.|'')*(?:'|\Z)"
_STRING: Final = r"(?:(?<![\w$])(?:[nNbBxX]|[uU]&))?'(?:[^']|'')*(?:'|\Z)"
_STRING_BACKSLASH: Final = r"(?:(?<![\w$])[nNbBxX])?'(?:[^'\\]|\\.|'')*(?:'|\Z)"
_DQ_STRING: Final = r'"(?:[^"]|"")*(?:"|\Z)'
_DQ_STRING_BACKSLASH: Final = r'"(?:[^"\\]|\\.|"")*(?:"|\Z)'
_BACKTICK: Final = r"`[^`]*(?:`|\Z)"
_BRACKET: Final = r"\[[A-Za-z_][^\]\s'\",\[]*\]"
_PARAM: Final = r"%\([^()\s]+\)s|%s|\$\d+|(?<![:\w]):[A-Za-z_]\w*|\?"
_VECOP: Final = r"<->|<=>|<\#>|<\+>|<~>|<%>"
# Any run starting with a digit (or a dot and a digit) is a number, whatever follows it:
# 1_000, 0x1F, 0b101, 0o17, 1.5e-3, and malformed ones (1.2.3, 123e) never leak a digit.
_NUMBER: Final = r"(?:\d[\w$]*(?:\.[\w$]*)?|\.\d[\w$]*)(?:(?<=[eE])[+-][\w$]*)?"


def _token_re(
    *,
    comment: str,
    estring: bool,
    string: str,
    dq: str | None,
    idents: str,
) -> re.Pattern[str]:
    parts = [f"(?P<comment>{comment})"]
    parts.append(f"(?P<dollar>{_DOLLAR})")
    if estring:
        parts.append(f"(?P<estring>{_ESTRING})")
    parts.append(f"(?P<string>{string})")
    if dq is not None:
        parts.append(f"(?P<dqstring>{dq})")
    parts += [
        f"(?P<qident>{idents})",
        f"(?P<param>{_PARAM})",
        f"(?P<vecop>{_VECOP})",
        f"(?P<number>{_NUMBER})",
        r"(?P<word>[A-Za-z_][\w$]*)",
        r"(?P<space>\s+)",
        r"(?P<other>.)",
    ]
    return re.compile("|".join(parts), re.DOTALL)


# Block comments nest in PostgreSQL, SQL Server and standard SQL: there the token is only
# the opening "/*" and the scanner finds the matching "*/" (see _nested_comment_end).
_PG_TOKEN: Final = _token_re(
    comment=f"{_COMMENT_LINE}|/\\*",
    estring=True,
    string=_STRING,
    dq=None,
    idents=f'"(?:[^"]|"")*(?:"|\\Z)|{_BACKTICK}',
)
_SQLITE_TOKEN: Final = _token_re(
    comment=f"{_COMMENT_LINE}|{_COMMENT_BLOCK}",
    estring=False,
    string=_STRING,
    dq=_DQ_STRING,
    idents=f"{_BACKTICK}|{_BRACKET}",
)
_MYSQL_TOKEN: Final = _token_re(
    comment=f"{_COMMENT_LINE}|\\#[^\\n]*|{_COMMENT_BLOCK}",
    estring=False,
    string=_STRING_BACKSLASH,
    dq=_DQ_STRING_BACKSLASH,
    idents=_BACKTICK,
)
_MSSQL_TOKEN: Final = _token_re(
    comment=f"{_COMMENT_LINE}|/\\*",
    estring=False,
    string=_STRING,
    dq=None,
    idents=f'"(?:[^"]|"")*(?:"|\\Z)|{_BRACKET}',
)
_STANDARD_TOKEN: Final = _token_re(
    comment=f"{_COMMENT_LINE}|/\\*",
    estring=True,
    string=_STRING,
    dq=None,
    idents=f'"(?:[^"]|"")*(?:"|\\Z)|{_BACKTICK}',
)
# For text whose dialect is unknown and that must not leak (exception messages): every
# quoted form a dialect might read as a string is one.
_STRICT_TOKEN: Final = _token_re(
    comment=f"{_COMMENT_LINE}|/\\*",
    estring=True,
    string=_STRING,
    dq=_DQ_STRING,
    idents=_BACKTICK,
)
_STRICT: Final = "strict"
_TOKENS: Final = {
    "postgresql": _PG_TOKEN,
    "sqlite": _SQLITE_TOKEN,
    "mysql": _MYSQL_TOKEN,
    "mariadb": _MYSQL_TOKEN,
    "mssql": _MSSQL_TOKEN,
    _STRICT: _STRICT_TOKEN,
}
_FLAT_COMMENTS: Final = frozenset({"sqlite", "mysql", "mariadb"})
_COMMENT_DELIMITER: Final = re.compile(r"/\*|\*/")
# A bound value as each driver writes it (?, %s, %(name)s, $1, :name), with the type cast
# SQLAlchemy adds to each expanded value on PostgreSQL (``%(id_1_1)s::INTEGER``).
_PLACEHOLDER: Final = r"(?:\?|%s|%\(\w+\)s|\$\d+|:[A-Za-z_]\w*)"
# A cast's type: words separated by spaces ("TIMESTAMP WITHOUT TIME ZONE"), then maybe a
# size and brackets. No two quantifiers next to each other can take the same characters:
# a list that does not end as expected fails in linear time, not by trying every split
# (an earlier form took seconds for 18 items).
_CAST: Final = (
    r"(?:\s*::\s*[A-Za-z_]\w*(?:\s+[A-Za-z_]\w*)*(?:\(\s*\d+(?:\s*,\s*\d+)?\s*\))?(?:\[\])?)?"
)
_SIGNED: Final = rf"(?:[-+]\s*)?{_PLACEHOLDER}{_CAST}"
_IN_LIST: Final = re.compile(rf"\b(IN)\s*\(\s*{_SIGNED}(?:\s*,\s*{_SIGNED})*\s*\)", re.IGNORECASE)
_ARRAY_LIST: Final = re.compile(
    rf"\b(ARRAY)\s*\[\s*{_SIGNED}(?:\s*,\s*{_SIGNED})*\s*\]", re.IGNORECASE
)
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
        "explainable",
        "index_servable",
        "is_select",
        "limit",
        "limit_param",
        "operation",
        "secret_params",
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
        explainable: bool = False,
        secret_params: frozenset[str | int] = frozenset(),
        index_servable: bool = False,
    ) -> None:
        #: A vector search an index can serve: ORDER BY a distance, with a LIMIT (pgvector's
        #: indexes serve nothing else; a search without them is a sequential scan).
        self.index_servable = index_servable
        #: Keys (names, or positions) of the parameters compared with or stored in a
        #: secret-named column: their values are never recorded.
        self.secret_params = secret_params
        self.text = text
        self.shape = shape
        self.operation = operation
        self.collection = collection
        self.is_select = operation == "SELECT"
        self.limit = limit
        self.limit_param = limit_param
        self.vector_metric = vector_metric
        self.touches_vector_settings = touches_vector_settings
        self.explainable = explainable
        if operation and collection:
            self.span_name = f"{operation} {collection}"
        else:
            self.span_name = operation or "db.query"


def collapse_in_lists(text: str) -> str:
    """``IN (?, -?, ?)`` -> ``IN (?)``, ``ARRAY[?, ?]`` -> ``ARRAY[?]``: one shape, any length.

    Whatever the driver's placeholders (``IN (%(id_1_1)s::INTEGER, %(id_1_2)s::INTEGER)``,
    ``IN ($1, $2)``): the list becomes ``(?)``.
    """
    if "?" not in text and "%" not in text and "$" not in text and ":" not in text:
        return text
    return _ARRAY_LIST.sub(r"\1[?]", _IN_LIST.sub(r"\1 (?)", text))


def _nested_comment_end(sql: str, pos: int) -> int:
    """The end of a PostgreSQL block comment whose ``/*`` ends at ``pos`` (they nest)."""
    depth = 1
    search = _COMMENT_DELIMITER.search
    while True:
        found = search(sql, pos)
        if found is None:
            return len(sql)  # unterminated: swallow the rest
        pos = found.end()
        depth += 1 if found.group() == "/*" else -1
        if depth == 0:
            return pos


#: Words after which SQLite reads a double-quoted token as a name (a table, an alias).
_NAME_AFTER: Final = frozenset({"FROM", "JOIN", "INTO", "UPDATE", "TABLE", "AS", "INDEX"})


def _names_something(sql: str, end: int, tokens: list[tuple[str, str, int]]) -> bool:
    """Whether the double-quoted token ending at ``end`` stands where only a name can.

    SQLite takes ``"x"`` for an identifier, or for a string when no such name exists, so
    it is masked as a string unless its place says name: ``"t".c``, ``t."c"``, or after
    ``FROM``, ``JOIN``, ``INTO``, ``UPDATE``, ``TABLE``, ``AS``, ``INDEX`` (how SQLAlchemy
    quotes mixed-case and reserved names).
    """
    if sql[end : end + 1] == ".":
        return True
    if not tokens:
        return False
    kind, value, _ = tokens[-1]
    if kind == "punct":
        return value == "."
    if kind == "word" and value.upper() == "EXISTS":
        # CREATE TABLE IF NOT EXISTS "x", DROP INDEX IF EXISTS "x": still the name's place.
        words = [t[1].upper() for t in tokens[-4:-1] if t[0] == "word"]
        if words[-1:] == ["NOT"]:
            words.pop()
        return words[-1:] == ["IF"] and len(words) >= 2 and words[-2] in _NAME_AFTER
    if kind != "word" or value.upper() not in _NAME_AFTER:
        return False
    # "a IS [NOT] DISTINCT FROM "x"" compares with a value, "VACUUM INTO "x"" names a
    # file: there "x" may be a string.
    before = tokens[-2][1].upper() if len(tokens) > 1 and tokens[-2][0] == "word" else ""
    return not (
        (value.upper() == "FROM" and before == "DISTINCT")
        or (value.upper() == "INTO" and before == "VACUUM")
    )


def _scan(
    sql: str, dialect: str | None = None
) -> tuple[str, str, list[tuple[str, str, int]], list[str | int]]:
    """Tokenise ``sql`` as ``dialect`` reads it: sanitised text, shape, tokens, placeholders.

    Tokens are ``(kind, value, depth)`` with ``depth`` the parenthesis depth; placeholder
    keys are the names or positions of the bind parameters, in order.
    """
    text_parts: list[str] = []
    shape_parts: list[str] = []
    tokens: list[tuple[str, str, int]] = []
    params: list[str | int] = []
    positional = 0
    depth = 0
    match_at = _TOKENS.get(dialect or "", _STANDARD_TOKEN).match
    nested = dialect not in _FLAT_COMMENTS
    pos, end = 0, len(sql)
    while pos < end:
        match = match_at(sql, pos)
        assert match is not None  # the last alternative matches any character
        pos = match.end()
        kind = match.lastgroup
        value = match.group()
        if kind == "comment":
            if nested and value == "/*":
                pos = _nested_comment_end(sql, pos)
            if text_parts and text_parts[-1] != " ":
                text_parts.append(" ")
                shape_parts.append(" ")
            continue
        if kind == "space":
            if text_parts and text_parts[-1] != " ":
                text_parts.append(" ")
                shape_parts.append(" ")
            continue
        if kind == "qident" and value[:1] == '"' and value.count('"') % 2:
            kind = "dqstring"  # an unclosed quoted name swallows the rest: masked, not kept
        elif (
            kind == "dqstring"
            and dialect == "sqlite"
            and value.count('"') % 2 == 0  # closed: an unclosed one swallows the rest
            and _names_something(sql, pos, tokens)
        ):
            kind = "qident"  # SQLite reads "x" as a string only where no name can stand
        if kind in ("dollar", "estring", "string", "dqstring", "number"):
            text_parts.append("?")
            shape_parts.append("?")
            tokens.append(("literal", value.replace("_", "") if kind == "number" else "", depth))
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
            if upper == "FROM" and i > 0 and tokens[i - 1][1].upper() == "DISTINCT":
                continue  # a IS [NOT] DISTINCT FROM b: a comparison, not a table
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
        if kind != "word" or depth != 0:
            continue
        upper = value.upper()
        at = i + 1  # the count's token
        if upper == "FETCH" and tokens[i + 1][1].upper() in ("FIRST", "NEXT"):
            # The standard's LIMIT (SQLAlchemy's .fetch()): FETCH FIRST n ROWS ONLY, where
            # a missing n is one row.
            if i + 2 < len(tokens) and tokens[i + 2][0] in ("literal", "param"):
                at = i + 2
            elif i + 2 < len(tokens) and tokens[i + 2][1].upper() in ("ROW", "ROWS"):
                return 1, None
            else:
                return None, None
            upper = "LIMIT"
        if upper == "LIMIT":
            nkind, nvalue, _ = tokens[at]
            if nkind == "literal" and nvalue.isdigit():
                return int(nvalue), None
            if nkind == "param":
                return None, params[int(nvalue)]
            return None, None
    return None, None


_DATA_MODIFYING: Final = frozenset({"INSERT", "UPDATE", "DELETE", "MERGE"})


def _explainable(tokens: list[tuple[str, str, int]], op: str | None) -> bool:
    """One statement, a SELECT (or WITH ... SELECT reading only): safe to ``EXPLAIN``.

    ``EXPLAIN`` without ``ANALYZE`` runs nothing itself, but a driver given
    ``"EXPLAIN SELECT 1; INSERT ..."`` runs the second statement for real.
    """
    if op != "SELECT":
        return False
    first: str | None = None
    for i, (kind, value, _depth) in enumerate(tokens):
        if kind == "punct" and value == ";":
            if any(t[1] != ";" for t in tokens[i + 1 :]):
                return False  # more than one statement
            break
        if kind == "word":
            upper = value.upper()
            if first is None:
                first = upper
                if first not in ("SELECT", "WITH"):
                    return False
            elif first == "WITH" and upper in _DATA_MODIFYING:
                return False
    return first is not None


def _analyze(sql: str, dialect: str | None = None) -> StatementInfo:
    text, shape, tokens, params = _scan(sql, dialect)
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
    return StatementInfo(
        text,
        shape,
        op,
        collection,
        limit,
        limit_param,
        metric,
        settings,
        _explainable(tokens, op),
        _secret_params(tokens, params),
        metric is not None and _orders_by_distance(tokens),
    )


def _orders_by_distance(tokens: list[tuple[str, str, int]]) -> bool:
    """Whether a query of the statement sorts by a vector distance and takes few rows.

    What pgvector's indexes serve, in the outer query, a subquery or a CTE. The distance
    itself (``ORDER BY e <-> :q``, in parentheses too) or its alias in the
    select list (``e <-> :q AS distance ... ORDER BY distance``), then ``LIMIT`` or
    ``FETCH`` at that query's level.
    """
    aliases: set[str] = set()
    for i, (kind, value, _depth) in enumerate(tokens):
        if kind == "word" and value.upper() == "AS" and i + 1 < len(tokens):
            # An alias of an expression holding a distance (looked back to its item's start).
            k = i - 1
            while k >= max(0, i - 64) and not (
                tokens[k][:2] == ("punct", ",")
                or (tokens[k][0] == "word" and tokens[k][1].upper() in ("SELECT", "DISTINCT"))
            ):
                if tokens[k][0] == "vecop":
                    aliases.add(_ident(tokens[i + 1][1]).lower())
                    break
                k -= 1
    n = len(tokens)
    for i, (kind, value, depth) in enumerate(tokens):
        if not (kind == "word" and value.upper() == "BY" and i >= 1):
            continue
        if tokens[i - 1][1].upper() != "ORDER":
            continue
        distance = False
        for kind2, value2, depth2 in tokens[i + 1 : min(n, i + 4096)]:
            if depth2 < depth:  # that query's closing parenthesis
                break
            if kind2 == "vecop":
                distance = True
            elif kind2 in ("word", "qident") and depth2 == depth:
                upper = value2.upper()
                if upper in ("LIMIT", "FETCH"):
                    if distance:
                        return True
                    break
                if _ident(value2).lower() in aliases:
                    distance = True
    return False


_cache: dict[tuple[str | None, str], StatementInfo] = {}
_cache_lock = threading.Lock()


def analyze(sql: str, dialect: str | None = None) -> StatementInfo:
    """Everything derivable from ``sql`` as ``dialect`` (SQLAlchemy's dialect name) reads it.

    Cached per ``(dialect, sql)``; never raises on odd SQL. ``None`` or an unknown
    dialect reads standard SQL (``"..."`` an identifier, no backslash escapes).
    """
    key = (dialect, sql)
    found = _cache.get(key)
    if found is not None:
        return found
    info = _analyze(sql, dialect)
    with _cache_lock:
        if len(_cache) >= _CACHE_MAX:
            _cache.clear()  # crude but bounded: statement texts rarely exceed the cache
        _cache[key] = info
    return info


def sanitize(sql: str, dialect: str | None = None) -> str:
    """``sql`` with literals replaced by ``?`` and placeholders kept (see module docs)."""
    return analyze(sql, dialect).text


def sanitize_statement_error(exc: BaseException, sanitizer: Any = None) -> str | None:
    """A safe message for a SQLAlchemy ``StatementError``; ``None`` for any other exception.

    ``str()`` of a ``StatementError`` holds the raw SQL, a ``[parameters: ...]`` block
    with the bound values, and the driver's message (which can quote values too:
    ``Key (email)=(alice@x.com) already exists``). This renders only the driver
    exception's type and the sanitised statement::

        IntegrityError: [SQL: INSERT INTO users (email) VALUES (?)]

    The dialect is not known here, so the statement is read conservatively: double-quoted
    tokens become ``?`` too (a string in SQLite and MySQL). ``sanitizer`` (a
    ``rag_instrument._sanitize.Sanitizer``, optional) redacts and truncates the result.
    Pure and never raises.
    """
    try:
        from sqlalchemy.exc import StatementError
    except ImportError:  # pragma: no cover - this module is only imported with SQLAlchemy
        return None
    if not isinstance(exc, StatementError):
        return None
    try:
        orig = exc.orig
        name = type(orig).__name__ if orig is not None else type(exc).__name__
        statement = exc.statement
        sql = _scan(statement, _STRICT)[0] if isinstance(statement, str) else ""
        message = f"{name}: [SQL: {sql}]" if sql else f"{name}: [SQL hidden]"
        if sanitizer is not None:
            message = sanitizer.text(message)
        return message
    except Exception:
        return f"{type(exc).__name__}: [SQL hidden]"


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


# The core renders statement errors through the registry, never by importing this module.
register_error_formatter("sqlalchemy", sanitize_statement_error)


# --- bind parameters that hold secrets ------------------------------------------------------

# The scanner gives each character of a comparison ("<=", "!=") as a token of its own.
_COMPARISON_CHARS: Final = frozenset({"=", "<", ">", "!"})
_NAMES: Final = ("word", "qident")


def _column_secret(token: tuple[str, str, int]) -> bool:
    return token[0] in _NAMES and is_secret_key(_ident(token[1]))


_OPERAND_STOPS: Final = frozenset(
    {
        "AND", "OR", "WHERE", "SET", "VALUES", "SELECT", "FROM", "ON", "WHEN", "THEN",
        "ELSE", "RETURNING", "HAVING", "USING", "CASE", "END",
    }
)


def _comparison_at(tokens: list[tuple[str, str, int]], i: int) -> int | None:
    """The comparison the parameter at ``i`` is an operand of: the operator's index.

    Looked back over the parameter's own expression (``upper(?)``, ``ANY(?)``, an ``IN``
    list, ``crypt(?, password)``), never past a clause keyword or another condition.
    """
    depth = tokens[i][2]
    for k in range(i - 1, max(-1, i - 33), -1):
        kind, value, token_depth = tokens[k]
        if kind == "word":
            upper = value.upper()
            if upper in ("LIKE", "ILIKE", "IN"):
                return k
            if upper in _OPERAND_STOPS:
                return None
        elif kind == "punct":
            if value in _COMPARISON_CHARS:
                return k
            if value == "," and token_depth < depth:
                return None
        depth = min(depth, token_depth)
    return None


def _left_operand_secret(tokens: list[tuple[str, str, int]], op: int) -> bool:
    """Whether the operand left of the operator at ``op`` names a secret column.

    ``password``, ``u."api_key"``, ``password::text``, ``lower(password)``, ``pw NOT IN``.
    """
    k = op - 1
    while k >= 0 and tokens[k][1] in _COMPARISON_CHARS and tokens[k][0] == "punct":
        k -= 1  # the first half of "<=", ">=", "!="
    if k >= 0 and tokens[k][0] == "word" and tokens[k][1].upper() == "NOT":
        k -= 1
    depth = tokens[k][2] if k >= 0 else 0
    for j in range(k, max(-1, k - 24), -1):
        kind, value, token_depth = tokens[j]
        if token_depth < depth and value == "(":
            return False  # the operand's enclosing parenthesis: its start
        if kind == "word" and value.upper() in _OPERAND_STOPS and token_depth <= depth:
            return False
        if kind == "punct" and value == "," and token_depth <= depth:
            return False
        if _column_secret(tokens[j]):
            return True
    return False


def _secret_params(
    tokens: list[tuple[str, str, int]], params: list[str | int]
) -> frozenset[str | int]:
    """Keys of the parameters compared with, or stored in, a secret-named column.

    ``password = :p``, ``password IN (?, ?)``, ``lower(password) = upper(?)``,
    ``token = ANY(%s)``, ``password = crypt(?, password)`` (the column left of the
    comparison), an ``INSERT``'s ``VALUES`` rows (the column at the same position, the
    parameter alone or inside an expression). Keys are names, or positions for ``?``,
    ``%s`` and ``$n``, as :func:`_scan` gives them.
    """
    keys: set[str | int] = set()
    for i, (kind, value, _depth) in enumerate(tokens):
        if kind != "param":
            continue
        op = _comparison_at(tokens, i)
        if op is not None and _left_operand_secret(tokens, op):
            keys.add(params[int(value)])
    keys.update(_inserted_secrets(tokens, params))
    return frozenset(keys)


def _inserted_secrets(
    tokens: list[tuple[str, str, int]], params: list[str | int]
) -> set[str | int]:
    """Parameters of ``INSERT ... (a, b) VALUES (?, ?), (?, ?)`` under secret columns."""
    at = next(
        (
            i
            for i, t in enumerate(tokens)
            if t[0] == "word" and t[1].upper() == "VALUES" and t[2] == 0
        ),
        None,
    )
    if at is None or at < 2 or tokens[at - 1][:2] != ("punct", ")"):
        return set()
    # The column list: the parenthesised group right before VALUES.
    start = at - 2
    while start >= 0 and not (tokens[start][:2] == ("punct", "(") and tokens[start][2] == 1):
        start -= 1
    if start < 0:
        return set()
    columns: list[bool] = []
    item: list[tuple[str, str, int]] = []
    for token in tokens[start + 1 : at - 1]:
        if token[:2] == ("punct", ",") and token[2] == 1:
            columns.append(bool(item) and _column_secret(item[-1]))
            item = []
        else:
            item.append(token)
    columns.append(bool(item) and _column_secret(item[-1]))
    if not any(columns):
        return set()
    keys: set[str | int] = set()
    position = -1
    values: list[tuple[str, str, int]] = []
    for token in tokens[at + 1 :]:
        if token[:2] == ("punct", "(") and token[2] == 1:  # a row starts
            position, values = 0, []
        elif position < 0:
            if token[0] == "word":  # ON CONFLICT, RETURNING ...: the rows are over
                break
        elif (token[:2] == ("punct", ",") and token[2] == 1) or (
            token[:2] == ("punct", ")") and token[2] == 0
        ):
            if position < len(columns) and columns[position]:
                keys.update(params[int(t[1])] for t in values if t[0] == "param")
            position, values = position + 1, []
            if token[1] == ")":
                position = -1
        else:
            values.append(token)
    return keys
