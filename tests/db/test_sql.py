"""The SQL reader: literals never leak, placeholders stay, shapes and names are derived."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import exc as sa_exc

from rag_instrument._sanitize import Sanitizer
from rag_instrument.db._sql import analyze, limit_value, sanitize, sanitize_statement_error

TEMPLATE = "SELECT * FROM t WHERE a = {lit} AND b = :b"
EXPECTED = "SELECT * FROM t WHERE a = ? AND b = :b"


@given(st.text())
def test_standard_strings_never_leak(secret: str) -> None:
    literal = "'" + secret.replace("'", "''") + "'"
    assert sanitize(TEMPLATE.format(lit=literal)) == EXPECTED


@given(st.text())
def test_escape_strings_never_leak(secret: str) -> None:
    escaped = secret.replace("\\", "\\\\").replace("'", "\\'")
    assert sanitize(TEMPLATE.format(lit="E'" + escaped + "'")) == EXPECTED


@given(st.text().filter(lambda s: "$x$" not in s))
def test_dollar_quoted_strings_never_leak(secret: str) -> None:
    assert sanitize(TEMPLATE.format(lit="$x$" + secret + "$x$")) == EXPECTED


@given(st.text().filter(lambda s: "$$" not in s and not s.endswith("$")))
def test_untagged_dollar_quoted_strings_never_leak_nor_swallow(secret: str) -> None:
    assert sanitize(TEMPLATE.format(lit="$$" + secret + "$$"), "postgresql") == EXPECTED


@given(st.lists(st.text().filter(lambda s: "/*" not in s and "*/" not in s), min_size=2))
def test_nested_block_comments_never_leak(secrets: list[str]) -> None:
    nested = "/* " + " /* ".join(secrets) + " */" * len(secrets)
    sql = f"SELECT * FROM t WHERE a = 1 {nested} AND b = :b"
    assert sanitize(sql, "postgresql") == EXPECTED
    assert sanitize(sql) == EXPECTED  # standard SQL nests block comments too


@given(st.lists(st.text(), min_size=1, max_size=5), st.sampled_from(["postgresql", None]))
def test_array_literals_never_leak(secrets: list[str], dialect: str | None) -> None:
    items = ", ".join("'" + s.replace("'", "''") + "'" for s in secrets)
    assert sanitize(TEMPLATE.format(lit=f"ARRAY[{items}]"), dialect) == (
        "SELECT * FROM t WHERE a = ARRAY[?] AND b = :b"
    )
    mixed = sanitize(f"SELECT ARRAY[tag, {items}] FROM t", dialect)
    assert mixed == "SELECT ARRAY[tag, " + ", ".join("?" * len(secrets)) + "] FROM t"


@given(st.integers() | st.floats(allow_nan=False, allow_infinity=False))
def test_numbers_never_leak(number: float) -> None:
    text = sanitize(TEMPLATE.format(lit=repr(abs(number))))
    assert text == EXPECTED


@given(st.integers(min_value=0))
def test_prefixed_and_underscored_numbers_never_leak(number: int) -> None:
    for lit in (f"{number:_}", f"{number:_d}", bin(number), oct(number), hex(number)):
        assert sanitize(TEMPLATE.format(lit=lit)) == EXPECTED, lit
        assert sanitize(TEMPLATE.format(lit=lit.upper()), "postgresql") == EXPECTED, lit


@given(st.text(), st.sampled_from(["sqlite", "mysql"]))
def test_double_quoted_strings_never_leak_on_sqlite_and_mysql(secret: str, dialect: str) -> None:
    if dialect == "mysql":
        literal = '"' + secret.replace("\\", "\\\\").replace('"', '\\"') + '"'
    else:
        literal = '"' + secret.replace('"', '""') + '"'
    assert sanitize(TEMPLATE.format(lit=literal), dialect) == EXPECTED


@given(st.text())
def test_mysql_backslash_escapes_never_leak(secret: str) -> None:
    literal = "'" + secret.replace("\\", "\\\\").replace("'", "\\'") + "'"
    assert sanitize(TEMPLATE.format(lit=literal), "mysql") == EXPECTED


@given(st.text(min_size=1))
def test_unterminated_string_swallows_the_rest(secret: str) -> None:
    text = sanitize("SELECT 1 FROM t WHERE a = '" + secret.replace("'", "''"))
    assert text == "SELECT ? FROM t WHERE a = ?"


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT * FROM users WHERE email = 'a@b.c'", "SELECT * FROM users WHERE email = ?"),
        ("SELECT 'it''s'", "SELECT ?"),
        ("SELECT x FROM t WHERE id IN (1, 2, 3)", "SELECT x FROM t WHERE id IN (?)"),
        ("SELECT x FROM t WHERE id IN (?, ?, ?)", "SELECT x FROM t WHERE id IN (?)"),
        ("SELECT 1.5e3, 0x1F, X'ff', B'101'", "SELECT ?, ?, ?, ?"),
        ("SELECT a\n  FROM   t -- note 'secret'\n", "SELECT a FROM t"),
        ("SELECT /* ssn 123-45-6789 */ a FROM t", "SELECT a FROM t"),
        ("SELECT col1, t2.x FROM table2 t2", "SELECT col1, t2.x FROM table2 t2"),
        ('SELECT "quoted ident" FROM "My Table"', 'SELECT "quoted ident" FROM "My Table"'),
        ("SELECT x::int FROM t", "SELECT x::int FROM t"),
    ],
)
def test_literals_become_question_marks(sql: str, expected: str) -> None:
    assert sanitize(sql) == expected


@pytest.mark.parametrize(
    ("sql", "dialect", "expected"),
    [
        # Review findings: each of these leaked the value before.
        (
            "SELECT * FROM t WHERE tags && ARRAY[tag,'alice@x.com']",
            "postgresql",
            "SELECT * FROM t WHERE tags && ARRAY[tag,?]",
        ),
        (
            "SELECT 1 /* a /* b */ alice@x.com */ FROM t",
            "postgresql",
            "SELECT ? FROM t",
        ),
        ("SELECT $$abc$$ AS x FROM users WHERE id = :id", "postgresql", None),
        (
            "SELECT * FROM users WHERE salary > 120_500",
            None,
            "SELECT * FROM users WHERE salary > ?",
        ),
        ("SELECT 0b1011, 0o777, 0x1F, 1.2.3, 123e, 1e5x", None, "SELECT ?, ?, ?, ??, ?, ?"),
        ('SELECT id FROM users WHERE email = "alice@x.com"', "sqlite", None),
        ('SELECT id FROM users WHERE email = "alice@x.com"', "mysql", None),
        ("SELECT id FROM users WHERE name = 'O\\' OR 1 = \\'alice'", "mysql", None),
        ("SELECT id FROM users # alice@x.com", "mysql", "SELECT id FROM users"),
        ("SELECT id FROM [users] WHERE [e] = 'alice'", "mssql", None),
    ],
)
def test_dialect_specific_literals_become_question_marks(
    sql: str, dialect: str, expected: str | None
) -> None:
    text = sanitize(sql, dialect)
    for secret in ("alice", "abc", "500"):
        assert secret not in text
    if expected is not None:
        assert text == expected
    if sql.startswith("SELECT $$"):
        assert text == "SELECT ? AS x FROM users WHERE id = :id"  # the rest is not swallowed


def test_double_quotes_stay_identifiers_where_the_dialect_says_so() -> None:
    sql = 'SELECT "email" FROM "Users"'
    assert sanitize(sql, "postgresql") == sql
    assert sanitize(sql) == sql
    # SQLite reads "x" as a string where no name exists: masked unless its place says name.
    assert sanitize(sql, "sqlite") == 'SELECT ? FROM "Users"'
    assert analyze('SELECT a FROM "Users"', "postgresql").collection == "Users"
    # Brackets are arrays and subscripts on PostgreSQL, identifiers on SQL Server.
    assert sanitize("SELECT a[1] FROM t", "postgresql") == "SELECT a[?] FROM t"
    assert sanitize("SELECT [a b] FROM t", "mssql") == "SELECT [a b] FROM t"
    assert analyze("SELECT a FROM [Users]", "mssql").collection == "Users"


def test_the_cache_is_per_dialect() -> None:
    sql = 'SELECT "alice@x.com"'
    assert analyze(sql, "postgresql").text == sql
    assert analyze(sql, "sqlite").text == "SELECT ?"
    assert analyze(sql, "postgresql").text == sql


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT x FROM t WHERE id IN (-1, 2, +3)", "SELECT x FROM t WHERE id IN (?)"),
        ("SELECT x FROM t WHERE id IN (- 1)", "SELECT x FROM t WHERE id IN (?)"),
        (
            "SELECT x FROM t WHERE id = ANY(ARRAY[1, -2, 3])",
            "SELECT x FROM t WHERE id = ANY(ARRAY[?])",
        ),
        ("SELECT x FROM t WHERE id = ANY(array[?,?])", "SELECT x FROM t WHERE id = ANY(array[?])"),
    ],
)
def test_signed_in_lists_and_arrays_collapse_to_one_shape(sql: str, expected: str) -> None:
    info = analyze(sql)
    assert info.text == expected
    assert info.shape == expected


@pytest.mark.parametrize(
    ("sql", "explainable"),
    [
        ("SELECT id FROM t WHERE a = :a", True),
        ("select 1;", True),
        ("(SELECT 1) UNION SELECT 2", True),
        ("WITH c AS (SELECT 1) SELECT * FROM c", True),
        ("SELECT 1; INSERT INTO audit VALUES (1)", False),
        ("SELECT 1; -- only a comment after", True),
        ("SELECT 1; SELECT 2", False),
        ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", False),
        ("WITH u AS (UPDATE t SET a = 1 RETURNING *) SELECT * FROM u", False),
        ("WITH i AS (INSERT INTO t VALUES (1) RETURNING *) SELECT * FROM i", False),
        ("WITH m AS (MERGE INTO t USING s ON true DO NOTHING) SELECT 1", False),
        ("INSERT INTO t SELECT 1", False),
        ("UPDATE t SET a = 1", False),
        ("EXPLAIN SELECT 1", False),
        ("SELECT ';'; DELETE FROM t", False),
    ],
)
def test_only_single_selects_are_explainable(sql: str, explainable: bool) -> None:
    assert analyze(sql, "postgresql").explainable is explainable
    assert analyze(sql, "sqlite").explainable is explainable


def test_statement_errors_render_without_parameters_or_values() -> None:
    orig = Exception("UNIQUE constraint failed: users.email = alice@x.com")
    exc = sa_exc.IntegrityError(
        "INSERT INTO users (email, note) VALUES (?, 'ssn 123-45-6789')", ("alice@x.com",), orig
    )
    assert "alice@x.com" in str(exc)  # what SQLAlchemy itself shows
    message = sanitize_statement_error(exc)
    assert message == "Exception: [SQL: INSERT INTO users (email, note) VALUES (?, ?)]"
    truncated = sanitize_statement_error(exc, Sanitizer(max_chars=20))
    assert truncated == Sanitizer(max_chars=20).text(message) != message
    quoted = sa_exc.OperationalError('SELECT "alice@x.com"', {"p": "hunter2"}, orig)
    assert "alice" not in (sanitize_statement_error(quoted) or "")
    assert sanitize_statement_error(ValueError("alice@x.com")) is None
    assert sanitize_statement_error(sa_exc.StatementError("m", None, {}, None)) == (
        "StatementError: [SQL hidden]"
    )


@pytest.mark.parametrize("placeholder", [":email", "%(email)s", "%s", "?", "$1"])
def test_placeholders_are_kept_in_text_and_uniform_in_shape(placeholder: str) -> None:
    info = analyze(f"SELECT id FROM users WHERE email = {placeholder}")
    assert info.text == f"SELECT id FROM users WHERE email = {placeholder}"
    assert info.shape == "SELECT id FROM users WHERE email = ?"


def test_shape_ignores_literal_values() -> None:
    a = analyze("SELECT * FROM docs WHERE collection_id = 1 AND title = 'x'")
    b = analyze("SELECT * FROM docs WHERE collection_id = 2 AND title = 'y'")
    assert a.shape == b.shape


@pytest.mark.parametrize(
    ("sql", "operation", "collection", "span_name"),
    [
        ("SELECT id FROM users WHERE id = 1", "SELECT", "users", "SELECT users"),
        ("select id from public.users", "SELECT", "public.users", "SELECT public.users"),
        ("SELECT a FROM x JOIN y ON x.id = y.id", "SELECT", None, "SELECT"),
        ("SELECT a FROM x, y", "SELECT", None, "SELECT"),
        ("SELECT * FROM (SELECT 1) AS s", "SELECT", None, "SELECT"),
        ("SELECT 1", "SELECT", None, "SELECT"),
        ("INSERT INTO docs (a) VALUES (?)", "INSERT", "docs", "INSERT docs"),
        ('UPDATE "Docs" SET a = 1', "UPDATE", "Docs", "UPDATE Docs"),
        ("DELETE FROM docs WHERE id = 3", "DELETE", "docs", "DELETE docs"),
        ("CREATE TABLE IF NOT EXISTS docs (id int)", "CREATE", "docs", "CREATE docs"),
        ("CREATE INDEX ix ON docs USING hnsw (e vector_l2_ops)", "CREATE", "docs", "CREATE docs"),
        ("DROP TABLE IF EXISTS docs", "DROP", "docs", "DROP docs"),
        ("WITH c AS (SELECT 1) SELECT * FROM c", "SELECT", "c", "SELECT c"),
        ("BEGIN", "BEGIN", None, "BEGIN"),
        ("", None, None, "db.query"),
    ],
)
def test_operation_and_collection(
    sql: str, operation: str | None, collection: str | None, span_name: str
) -> None:
    info = analyze(sql)
    assert (info.operation, info.collection, info.span_name) == (operation, collection, span_name)


@pytest.mark.parametrize(
    ("sql", "params", "expected"),
    [
        ("SELECT id FROM items ORDER BY e <-> '[1,2]' LIMIT 5", None, 5),
        ("SELECT id FROM items LIMIT %(param_1)s", {"param_1": 7}, 7),
        ("SELECT id FROM items WHERE a = $1 LIMIT $2", ("x", 9), 9),
        ("SELECT id FROM items WHERE a = ? LIMIT ?", ("x", 4), 4),
        ("SELECT id FROM items WHERE a = :a LIMIT :n", {"a": 1, "n": 3}, 3),
        ("SELECT id FROM (SELECT id FROM t LIMIT 2) s", None, None),
        ("SELECT id FROM items LIMIT :n", {}, None),
        # The standard's form, SQLAlchemy's .fetch(): FETCH FIRST / NEXT n ROWS ONLY.
        ("SELECT id FROM items ORDER BY e <-> :q FETCH FIRST :k ROWS ONLY", {"k": 6}, 6),
        ("SELECT id FROM items ORDER BY e FETCH NEXT 3 ROWS ONLY", None, 3),
        ("SELECT id FROM items ORDER BY e FETCH FIRST ROW ONLY", None, 1),
    ],
)
def test_limit(sql: str, params: object, expected: int | None) -> None:
    assert limit_value(analyze(sql), params) == expected


@pytest.mark.parametrize(
    ("operator", "metric"),
    [("<->", "l2"), ("<=>", "cosine"), ("<#>", "inner_product"), ("<+>", "l1")],
)
def test_vector_operators(operator: str, metric: str) -> None:
    info = analyze(f"SELECT id FROM items ORDER BY embedding {operator} %(q)s LIMIT 3")
    assert info.vector_metric == metric
    assert analyze(f"SELECT '{operator}' FROM items").vector_metric is None


def test_vector_setting_statements_are_recognised() -> None:
    assert analyze("SET hnsw.ef_search = 100").touches_vector_settings
    assert analyze("SET LOCAL ivfflat.probes = 4").touches_vector_settings
    assert analyze("SELECT set_config('hnsw.ef_search', '80', false)").touches_vector_settings
    assert analyze("RESET ALL").touches_vector_settings
    assert not analyze("SET search_path = public").touches_vector_settings
    assert not analyze("SELECT 'ef_search'").touches_vector_settings


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        # SQLAlchemy quotes mixed-case tables: N+1 must tell them apart (it saw one shape).
        (
            'SELECT "Docs0".id, "Docs0".body FROM "Docs0" WHERE "Docs0".id = ?',
            'SELECT "Docs0".id, "Docs0".body FROM "Docs0" WHERE "Docs0".id = ?',
        ),
        ('SELECT t."Col" AS "Alias" FROM t', 'SELECT t."Col" AS "Alias" FROM t'),
        ('INSERT INTO "My Table" (a) VALUES ("pw")', 'INSERT INTO "My Table" (a) VALUES (?)'),
        ('UPDATE "T" SET a = "secret" WHERE "b" = 1', 'UPDATE "T" SET a = ? WHERE ? = ?'),
        ('SELECT * FROM t WHERE name = "alice@x.com"', "SELECT * FROM t WHERE name = ?"),
        ('SELECT "alice@x.com"', "SELECT ?"),
        # a comparison, not a table: SQLite reads an unknown name there as a string
        ('SELECT a FROM t WHERE a IS DISTINCT FROM "hunter2"', "SELECT a FROM t WHERE a IS DISTINCT FROM ?"),
        ('SELECT a FROM t WHERE a IS NOT DISTINCT FROM "pw-1"', "SELECT a FROM t WHERE a IS NOT DISTINCT FROM ?"),
        ('VACUUM INTO "/backups/secret.db"', "VACUUM INTO ?"),  # a file name, a value
        # an unclosed quote swallows the rest, whatever stands before it
        ("SELECT * FROM \"t WHERE b = 'secret'", "SELECT * FROM ?"),
    ],
)
def test_sqlite_double_quotes_are_names_only_where_a_name_stands(sql: str, expected: str) -> None:
    assert sanitize(sql, "sqlite") == expected


def test_is_distinct_from_is_no_table() -> None:
    for dialect in ("sqlite", "postgresql"):
        assert analyze("SELECT * FROM t WHERE a IS DISTINCT FROM 5", dialect).collection == "t"


@pytest.mark.parametrize("dialect", ["postgresql", "mssql", None])
def test_an_unclosed_quoted_name_does_not_keep_what_follows(dialect: str | None) -> None:
    assert sanitize("SELECT \"a FROM t WHERE b = 'secret'", dialect) == "SELECT ?"


def test_an_in_list_that_does_not_close_as_expected_fails_fast() -> None:
    # Adjacent quantifiers that could take the same characters made a list of cast
    # placeholders ending in something else (", now())") take seconds at 18 items, on the
    # thread running the statement: the time quadrupled with every two more. In a child
    # process: the regex engine holds the interpreter, so a regression would hang here.
    import subprocess
    import sys

    code = """
from rag_instrument.db._sql import collapse_in_lists
items = ", ".join(f"%(x_1_{k})s::TIMESTAMP WITHOUT TIME ZONE" for k in range(60))
text = f"SELECT id FROM t WHERE x IN ({items}, now())"
assert collapse_in_lists(text) == text
assert collapse_in_lists(f"SELECT id FROM t WHERE x IN ({items})").endswith("IN (?)")
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60
    )  # linear: milliseconds; the old pattern: longer than the universe (a TimeoutExpired)
    assert done.stdout.strip() == "ok", done.stderr


@pytest.mark.parametrize(
    ("sql", "servable"),
    [
        ("SELECT id FROM t ORDER BY e <-> %(q)s LIMIT 5", True),
        ("SELECT id, e <=> :q AS distance FROM t ORDER BY distance LIMIT :k", True),
        ("SELECT id FROM t ORDER BY e <#> :q FETCH FIRST 3 ROWS ONLY", True),
        # What pgvector's indexes do not serve: a sequential scan, no index to report.
        ("SELECT id FROM t ORDER BY e <-> %(q)s", False),
        ("SELECT id FROM t WHERE e <-> %(q)s < 0.3 LIMIT 3", False),
        ("SELECT id, x AS d FROM t ORDER BY d LIMIT 3", False),
    ],
)
def test_a_vector_search_an_index_can_serve(sql: str, servable: bool) -> None:
    assert analyze(sql, "postgresql").index_servable is servable


@pytest.mark.parametrize(
    ("sql", "secret"),
    [
        ("SELECT 1 FROM u WHERE password::text = %s AND x = %s", {0}),
        ("SELECT 1 FROM u WHERE token = ANY(%s) AND pw NOT IN (%s, %s)", {0, 1, 2}),
        ("SELECT 1 FROM u WHERE lower(secret) <= upper(%s) AND name = %s", {0}),
        ("INSERT INTO users (name, password) VALUES (?, upper(?))", {1}),
        ("UPDATE u SET password = crypt(?, password) WHERE id = ?", {0}),
        ("INSERT INTO u (name, password) VALUES (%s, crypt(%s, gen_salt('bf')))", {1}),
        ("SELECT * FROM u WHERE lower(u.password) = :p", {"p"}),
        ("SELECT * FROM u WHERE name = ? AND upper(x) = ?", set()),
        ("SELECT * FROM u WHERE f(password, ?) AND y = ?", set()),
    ],
)
def test_parameters_of_secret_columns_inside_expressions(sql: str, secret: set[object]) -> None:
    assert analyze(sql, "postgresql").secret_params == secret


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM t ORDER BY (e <-> %s) LIMIT 5",
        "SELECT * FROM (SELECT * FROM t ORDER BY e <-> %s LIMIT 10) s ORDER BY s.id LIMIT 3",
        "WITH c AS (SELECT id FROM t ORDER BY e <=> %s LIMIT 10) SELECT * FROM c",
    ],
)
def test_searches_an_index_serves_in_parentheses_subqueries_and_ctes(sql: str) -> None:
    assert analyze(sql, "postgresql").index_servable is True


@given(st.text(alphabet="SELECTFROMWHEREORDBYLIMT ()=<>-#,:?%s$1'\"pw.", max_size=80))
def test_analyze_never_raises_on_sql_shaped_noise(sql: str) -> None:
    analyze(sql, "postgresql")
    analyze(sql, "sqlite")
