"""The SQL reader: literals never leak, placeholders stay, shapes and names are derived."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rag_instrument.db._explain import sanitize_plan
from rag_instrument.db._sql import analyze, limit_value, sanitize

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


@given(st.integers() | st.floats(allow_nan=False, allow_infinity=False))
def test_numbers_never_leak(number: float) -> None:
    text = sanitize(TEMPLATE.format(lit=repr(abs(number))))
    assert text == EXPECTED


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


def test_plans_are_sanitised_too() -> None:
    plan = [{"Plan": {"Node Type": "Seq Scan", "Filter": "(email = 'a@b.c'::text)", "Rows": 3}}]
    assert sanitize_plan(plan) == [
        {"Plan": {"Node Type": "Seq Scan", "Filter": "(email = ?::text)", "Rows": 3}}
    ]
