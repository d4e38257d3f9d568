"""Redaction recall and precision: a table of true and false cases, plus properties.

The token formats follow the rule sets secret scanners maintain (gitleaks, detect-secrets):
each provider's documented prefix and length. Fake keys are built from pieces so that this
file itself does not look like a leak to those scanners.
"""

from __future__ import annotations

import re
import string
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rag_instrument._sanitize import REDACTED, Sanitizer, is_secret_key, redact_text

R62 = "A1b2C3d4E5f6G7h8J9k0L1m2N3p4Q5r6S7t8U9v0W1x2Y3z4"  # base62 soup


def _k(prefix: str, n: int, alphabet: str = R62) -> str:
    return prefix + (alphabet * 4)[:n]


# (text, the secret part that must not survive)
RECALL = [
    # 1. names joined by underscores or prefixes
    ("DB_PASSWORD=hunter2-x other=1", "hunter2-x"),
    ("NAME_PASSWORD=opensesame", "opensesame"),
    ("export AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCY", "wJalrXUtnFEMI"),
    ("Settings(db_password='p@ss word', host='db')", "p@ss word"),
    ('{"api_key": "abc123xyz", "n": 1}', "abc123xyz"),
    ("smtp_pass=letmein99", "letmein99"),
    ("GITHUB_TOKEN=notashapedtoken", "notashapedtoken"),
    ("STRIPE_API_KEY: plainvalue", "plainvalue"),
    ("app.client_secret = s3cr3tvalue", "s3cr3tvalue"),
    # headers
    ("Cookie: sessionid=abc123; csrftoken=def456", "abc123"),
    ("Cookie: sessionid=abc123; csrftoken=def456", "def456"),
    ("set-cookie: sid=zz9plural; Path=/", "zz9plural"),
    ("Authorization: Bearer abc", "abc"),
    ("retried with Bearer abc.def.ghi", "abc.def.ghi"),  # a JWT's shape, however short
    ("authorization: Basic dXNlcjpwYXNz", "dXNlcjpwYXNz"),
    ("Proxy-Authorization: Digest someopaque", "someopaque"),
    ("curl -H 'X-Api-Key: kkk111' https://api", "kkk111"),
    # signed URLs
    ("https://b.s3.amazonaws.com/o?X-Amz-Signature=abcdef0123&X-Amz-Expires=60", "abcdef0123"),
    ("https://b.s3.amazonaws.com/o?X-Amz-Security-Token=IQoJb3JpZ2luX2Vj&x=1", "IQoJb3JpZ2luX2Vj"),
    ("https://s.blob.core.windows.net/c/b?sv=2020&sig=abcDEF%2B123&se=2024", "abcDEF%2B123"),
    ("https://storage.googleapis.com/b/o?X-Goog-Signature=0a1b2c3d4e5f", "0a1b2c3d4e5f"),
    ("https://cdn.example.com/v.mp4?Expires=1&Signature=Zm9vYmFy~x&Key-Pair-Id=K", "Zm9vYmFy~x"),
    # URL credentials
    ("postgresql://app:p@ss/w#rd@db:5432/prod", "p@ss/w#rd"),
    ("redis://:only-a-password@cache:6379/0", "only-a-password"),
    (_k("https://ghp_", 36) + "@github.com/o/r.git", _k("ghp_", 36)),
    ("https://a1b2c3d4e5f6a7b8@o123.ingest.sentry.io/42", "a1b2c3d4e5f6a7b8"),
    ("https://x-access-token:tok3n-v4lue@github.com/o/r", "tok3n-v4lue"),
    # PEM
    (
        "key:\n-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----",
        "MIIEowIBAAKCAQEA",
    ),
    ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAA", "b3BlbnNzaC1rZXktdjEAAAA"),
    (
        "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkq\n-----END PRIVATE KEY-----",
        "MIIEvQIBADANBgkq",
    ),
    ("-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIO\n-----END EC PRIVATE KEY-----", "MHcCAQEEIO"),
    # provider formats
    (_k("sk-", 48), _k("sk-", 48)),  # OpenAI (legacy)
    (_k("sk-proj-", 64), _k("sk-proj-", 64)),  # OpenAI project key
    (_k("sk-ant-api03-", 93) + "AA", _k("sk-ant-api03-", 93)),  # Anthropic
    (_k("sk_live_", 24), _k("sk_live_", 24)),  # Stripe secret key
    (_k("rk_test_", 24), _k("rk_test_", 24)),  # Stripe restricted key
    (_k("whsec_", 32), _k("whsec_", 32)),  # Stripe webhook secret
    (_k("AIza", 35), _k("AIza", 35)),  # Google API key
    (_k("ya29.", 40), _k("ya29.", 40)),  # Google OAuth token
    (_k("GOCSPX-", 28), _k("GOCSPX-", 28)),  # Google OAuth client secret
    (_k("glpat-", 20), _k("glpat-", 20)),  # GitLab PAT
    (_k("glptt-", 40), _k("glptt-", 40)),  # GitLab pipeline trigger token
    (_k("gldt-", 20), _k("gldt-", 20)),  # GitLab deploy token
    (_k("hf_", 34, string.ascii_letters), _k("hf_", 34, string.ascii_letters)),  # HF
    (_k("api_org_", 34, string.ascii_letters), _k("api_org_", 34, string.ascii_letters)),
    ("xoxb-123456789012-1234567890123-" + _k("", 24), _k("", 24)),  # Slack bot
    ("xoxp-123456789012-" + _k("", 20), _k("", 20)),  # Slack user
    ("xapp-1-A0123456789-" + _k("", 20), _k("", 20)),  # Slack app
    ("https://hooks.slack.com/services/T00000000/B00000000/" + _k("", 24), _k("", 24)),
    (_k("ghp_", 36), _k("ghp_", 36)),  # GitHub classic PAT
    (_k("gho_", 36), _k("gho_", 36)),
    (_k("ghs_", 36), _k("ghs_", 36)),
    (_k("github_pat_", 82), _k("github_pat_", 82)),  # GitHub fine-grained
    ("AKIA" + "IOSFODNN7EXAMPL2", "IOSFODNN7EXAMPL2"),  # AWS access key id
    ("ASIA" + "QWERTYUIOPASDFG2", "QWERTYUIOPASDFG2"),  # AWS temporary key id
    (_k("npm_", 36), _k("npm_", 36)),
    ("pypi-AgEIcHlwaS5vcmc" + _k("", 60), _k("", 60)),
    ("SG." + _k("", 22) + "." + _k("", 43), _k("", 43)),  # SendGrid
    ("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NSJ9.c2lnbmF0dXJl", "c2lnbmF0dXJl"),  # JWT
    # provider keys glued to other text
    ("OPENAI_KEY_" + _k("sk-proj-", 36), _k("sk-proj-", 36)),
    ("id" + "AKIA" + "IOSFODNN7EXAMPL2.", "IOSFODNN7EXAMPL2"),
    ("prefix" + _k("ghp_", 36) + "suffix", _k("ghp_", 36)),
    ("token=" + _k("github_pat_", 82), _k("github_pat_", 82)),
    ("x" + _k("hf_", 34, string.ascii_letters), _k("hf_", 34, string.ascii_letters)),
    # PostgreSQL's DETAIL lines quote the row (issue 11, item 3)
    ("DETAIL:  Key (email)=(alice@example.com) already exists.", "alice@example.com"),
    ("signup failed: Key (email)=(alice@example.com)", "alice@example.com"),
    ('Key (tenant, email)=(7, bob@example.org) is not present in table "users".', "bob@example"),
    ("Key (lower(email))=(eve@example.org) is still referenced from table t", "eve@example"),
    ("Key (during)=([2024-01-01,2024-02-01)) conflicts with existing key (during)=([x,y))",
     "2024-01-01"),
    ("DETAIL:  Failing row contains (1, carol@example.com, null).", "carol@example.com"),
    ("[SQL: insert into u values (%(e)s)]\n[parameters: {'e': 'dave@example.com'}]",
     "dave@example.com"),
    # command lines and markup (issue 11, item 1)
    ("Command '['pg_dump', '--password=hunter2abc']' returned 1", "hunter2abc"),
    ("login with --password hunter2abcd", "hunter2abcd"),
    ("app --api-key Zk9sQ2xvVwXy --verbose", "Zk9sQ2xvVwXy"),
    ("<password>hunter2abc</password>", "hunter2abc"),
    ("<ns:ApiKey>k3yv4lue99</ns:ApiKey>", "k3yv4lue99"),
    ("https://x.test/cb?next=%2Flogin%3Fpassword%3Dhunter2abc", "hunter2abc"),
    ("mysql -u root -phunter2abc shop", "hunter2abc"),
    ("mysqldump -h db -phunter2abc shop > dump.sql", "hunter2abc"),
    ("curl -u admin:hunter2abc https://api.test", "hunter2abc"),
    ("curl --user=admin:hunter2abc https://api.test", "hunter2abc"),
    # a real secret after the names whose placeholder values are kept
    ("token: s3cr3tT0k3nv4lue", "s3cr3tT0k3nv4lue"),
    ("password: nonesuch42", "nonesuch42"),
    ("api_key: truelyrandom", "truelyrandom"),
    ("pass: 1234", "1234"),
    ("jwt: " + "eyJhbGciOiJIUzI1NiJ9", "eyJhbGciOiJIUzI1NiJ9"),
    # something between the name and the value's opening quote, or no closing quote
    ("cannot connect with {'token': b'Zq8vTx3LmN0pRw5s'}", "Zq8vTx3LmN0pRw5s"),
    ("Settings(db_password=b'Hunter2Bytes', port=5)", "Hunter2Bytes"),
    ("{b'cookie': b'session=abc123XYZsess'}", "abc123XYZsess"),
    ('{"password": ["S3cretPw"]}', "S3cretPw"),
    ("password => 'S3cretPw'", "S3cretPw"),
    ("login failed for password='S3cretPw", "S3cretPw"),
    ('password="it\'s a secret" and more', "it's a secret"),
    # "key=" with a credential-shaped value; provider prefixes glued to letters
    ("signing with key=3f9a0c7b2e4d6f8a1b3c5d7e9f0a2b4c", "3f9a0c7b2e4d6f8a1b3c5d7e9f0a2b4c"),
    ("https://maps.test/api?key=Hunter2PwXyzQrst42&q=x", "Hunter2PwXyzQrst42"),
    ("aws key=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY loaded", "wJalrXUtnFEMI"),
    ("GET /sign?key=wJalrXUtnFEMI%2FK7MDENG%2FbPxRfiCYEXAMPLEKEY&x=1", "wJalrXUtnFEMI"),
    ("signing key=Zx9Kq2LmP0rT loaded", "Zx9Kq2LmP0rT"),
    ("key=a1b2c3d4e5f6a7b8.c9d0e1f2", "a1b2c3d4e5f6a7b8"),
    ("openaikey" + _k("sk-proj-", 40), _k("sk-proj-", 40)[8:]),
    ("x" * 10 + _k("sk-ant-api03-", 40), _k("sk-ant-api03-", 40)[13:]),
    # session cookies by name, in text and URLs
    ("sessionid=k3j5h2l9x0q8w7e6r5t4y3u2; HttpOnly", "k3j5h2l9x0q8w7e6r5t4y3u2"),
    ("GET /app;jsessionid=A1B2C3D4E5F6A7B8C9D0", "A1B2C3D4E5F6A7B8C9D0"),
    ("PHPSESSID=9f8e7d6c5b4a39f8e7d6c5b4a3 set", "9f8e7d6c5b4a39f8e7d6c5b4a3"),
    # an escaped quote inside a quoted value, JSON held in a JSON string, Go's :=
    ('{"password": "Xy\\"9kLmTAIL"}', "9kLmTAIL"),
    ('{"error": "{\\"password\\": \\"hunter2-x\\"}"}', "hunter2-x"),
    ('db_password := "Sup3rS3cret"', "Sup3rS3cret"),
    ("passWord: hunter2-x", "hunter2-x"),
    # a long environment variable name
    ("MYCOMPANY_" + "X" * 70 + "_REPLICA_CONNECTION_DB_PASSWORD=hunter2-x", "hunter2-x"),
]  # fmt: skip

# Text that must come out exactly as it went in.
PRECISION = [
    "Basic research shows that chunking matters",
    "token budget exhausted after 3 calls",
    "token: 512",
    "tokens: 1,024",
    "max_tokens=512 temperature=0.2",
    "https://example.com/unsubscribe?email=alice@example.com",
    "https://example.com:8443/verify?email=alice@example.com&step=2",
    "https://example.com/users/alice@example.com",
    "postgres@localhost is the default role",
    "postgresql://postgres@db:5432/app",
    "use sk-learn-compat for the legacy path",
    "the sk-2024-roadmap-final document",
    "task-scheduler-v2 and disk-usage",
    "Bearer tokens expire",
    "the Basic plan",
    "keyword: retrieval",
    "passage: The quick brown fox",
    "author: Jane Doe",
    "monkey=banana",
    "time: 12:30",
    "http.request.header.accept: application/json",
    "cache_key: 3f2a",
    "key: value",
    "key=value and key=primary",
    "sort by key=name_of_field",
    # "key=" with ordinary keys; words glued before a provider-looking prefix
    "cache key=user_profile_v2 hit",
    "s3 put key=uploads/2024/report.pdf",
    "key=192.168.0.1 and key=2024-01-01T00:00:00Z",
    "redis GET key=session:abc123def456 miss",
    "key=user_profile_v2_2024_backup and key=tenant-42-shard-7-replica-3",
    "deploying flask-admin-dashboard-7d9f8c6b5-x2k4p",
    "GET /api/v1/task-admin-settings-overview 200",
    "https://github.com/org/disk-proj-cleanup-utility-tool",
    "kiosk-ant-colony-simulation-results",
    "primary_key=id",
    "ghost_story about gh_pages",
    "the AKIA prefix names AWS keys",
    "retrieval completed in 12.5 ms",
    # placeholder and status values under secret names (issue 11, item 8)
    "token: None",
    "password: null",
    "api_key: missing",
    "secret: true",
    "jwt: expired",
    "auth: ok",
    "signature: verified",
    "dsn: configured",
    "credentials: none provided",
    "pass: 3 of 5",
    "passphrase: (empty)",
    "API_KEY=unset",
    '{"password": null, "token": "redacted"}',
    "<password></password> and <token>none</token>",
    # near misses of the command-line, markup and DETAIL rules
    "mysql -p shop",
    "--password is required; set --token when the server asks",
    "--token None and --passphrase (empty)",
    "ls -p /tmp and grep -phrase",
    "curl -u admin https://api.test",
    "Key (email) is indexed; key=(a)",
    "<title>password reset</title>",
    "the task-skeleton and disk-sk-tool",
    "idAKIA is not a key",
]


@pytest.mark.parametrize(("text", "secret"), RECALL)
def test_secret_is_masked(text: str, secret: str) -> None:
    out = redact_text(text)
    assert secret not in out, out
    assert REDACTED in out
    assert redact_text(out) == out  # idempotent


@pytest.mark.parametrize("text", PRECISION)
def test_ordinary_text_survives(text: str) -> None:
    assert redact_text(text) == text


def test_masks_keep_the_surrounding_text() -> None:
    assert redact_text("DB_PASSWORD=x1 DB_HOST=db") == f"DB_PASSWORD={REDACTED} DB_HOST=db"
    assert redact_text("Settings(db_password='a b', port=5)") == (
        f"Settings(db_password='{REDACTED}', port=5)"
    )
    assert redact_text("Cookie: a=1; b=2\nnext line") == f"Cookie: {REDACTED}\nnext line"
    assert redact_text("https://app:pw@db:5432/x?email=a@b.co") == (
        f"https://app:{REDACTED}@db:5432/x?email=a@b.co"
    )
    pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----"
    assert redact_text(f"before {pem} after") == f"before {REDACTED} after"


@pytest.mark.parametrize(
    "key",
    ["NAME_PASSWORD", "AWS_SECRET_ACCESS_KEY", "dbpassword", "csrftoken", "X-Amz-Signature",
     "sig", "MASTER_KEY", "storage_account_key", "X-Amz-Security-Token", "passWord",
     "dbPassWord", "userPassWord", "sessionid", "JSESSIONID", "PHPSESSID", "connect.sid",
     "session"],
)  # fmt: skip
def test_joined_secret_names(key: str) -> None:
    assert is_secret_key(key)


@pytest.mark.parametrize(
    "key",
    ["max_tokens", "keyword", "primary_key", "cache_key", "signal", "tokens_saved", "crossWord",
     "session_count"],
)  # fmt: skip
def test_ordinary_names(key: str) -> None:
    assert not is_secret_key(key)


# --- properties -------------------------------------------------------------------------------

FILLER = st.text(string.ascii_letters + string.digits + " .,;()\n", max_size=30)
SEPARATORS = st.sampled_from([" ", "\n", " (", ", ", "\t"])


@settings(max_examples=300, deadline=None)
@given(FILLER, SEPARATORS, st.sampled_from(RECALL), SEPARATORS, FILLER)
def test_secrets_never_survive_in_any_surrounding(
    before: str, sep1: str, case: tuple[str, str], sep2: str, after: str
) -> None:
    text, secret = case
    out = redact_text(f"{before}{sep1}{text}{sep2}{after}")
    assert secret not in out


WORDS = st.sampled_from(
    [
        "the", "Basic", "Bearer", "token", "tokens", "research", "budget", "key", "secret",
        "password", "retrieval", "sk-learn", "512", "https://example.com/a?email=x@y.org",
        "Stage", "ghost", "AKIA", "hf", "cookie", "session", "authorization", "signature",
    ]
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(WORDS, max_size=12), st.sampled_from([" ", ", ", " - ", "\n"]))
def test_prose_without_assignments_survives(words: list[str], joiner: str) -> None:
    text = joiner.join(words)
    assert redact_text(text) == text


@given(
    st.text("qjvwQJVW", min_size=3, max_size=40),
    st.integers(min_value=1, max_value=60),
)
def test_redaction_runs_before_truncation(value: str, limit: int) -> None:
    # A cut never separates a secret from the name that gives it away: cutting
    # "DB_PASSWORD=qjv|wQ" after "DB_PASSWO" would have left "qjv..." unmasked otherwise.
    text = f"config DB_PASSWORD={value} more"
    out = Sanitizer(limit).text(text)
    assert value[:3] not in out


@given(st.text(max_size=200))
def test_redaction_is_total_and_idempotent(text: str) -> None:
    once = redact_text(text)
    assert redact_text(once) == once


def test_marker_never_echoes_the_match() -> None:
    key = _k("sk-proj-", 64)
    out = redact_text(f"key {key}")
    assert not re.search(r"[A-Za-z0-9]{6,}", out.replace("key", "").replace("REDACTED", ""))


PLACEHOLDER_VALUES = ["None", "null", "nil", "missing", "empty", "(empty)", "true", "False",
                      "ok", "expired", "verified", "configured", "set", "unset", "required",
                      "invalid", "provided", "redacted", "3", "42", "512"]  # fmt: skip
SECRET_NAMES = ["token", "password", "api_key", "secret", "jwt", "auth", "signature", "dsn",
                "credentials", "pass", "passphrase", "DB_PASSWORD", "client_secret"]  # fmt: skip


@given(st.sampled_from(SECRET_NAMES), st.sampled_from([": ", "=", " = ", '": "']),
       st.sampled_from(PLACEHOLDER_VALUES))  # fmt: skip
def test_status_words_under_secret_names_survive(name: str, sep: str, value: str) -> None:
    text = f"{name}{sep}{value}" if '"' not in sep else f'"{name}{sep}{value}"'
    assert redact_text(text) == text


@given(
    st.sampled_from(SECRET_NAMES),
    st.sampled_from([": ", "=", "%3D"]),
    # A secret's shape: letters and digits (status words are letters only, counts digits).
    st.text(string.ascii_letters + string.digits, min_size=6, max_size=30).filter(
        lambda v: any(c.isdigit() for c in v) and any(c.isalpha() for c in v)
    ),
)
def test_real_values_under_the_same_names_are_masked(name: str, sep: str, value: str) -> None:
    out = redact_text(f"{name}{sep}{value}")
    assert value not in out


@pytest.mark.parametrize(
    "payload",
    [
        "key=" * 6000,  # a bare "key=" whose value runs on through every other one
        "a=key=" * 4000,
        "://" * 8000,  # URL credentials tried from each "://"
        "a://:" * 4800 + "&a=b@h:x",
        "x@" + "a://:" * 4800,
        "key=" + "a" * 24000,
        "curl -u " * 6000,  # a client's name, then options, on one line
        "mysql -p " * 5400,
        "Key ()=(" * 6000,  # PostgreSQL's "Key (col)=(value)"
    ],
    ids=[
        "key=", "a=key=", "://", "url then a query", "url after an @", "one long value",
        "curl -u", "mysql -p", "Key ()=(",
    ],
)
def test_masking_costs_linear_time_in_what_a_client_sends(payload: str) -> None:
    # A request's query string or user agent is masked on the request path: text that made
    # masking quadratic (5.6 s of CPU for 24 KB of "key=") let one client slow the server.
    # The bound is wide (about 30 times what linear masking costs here).
    sanitizer = Sanitizer(max_chars=len(payload))
    started = time.process_time()
    sanitizer.text(payload)
    assert time.process_time() - started < 1.0


def test_a_long_bare_value_judged_a_secret_is_masked_whole() -> None:
    secret = "aB3dE5gH7jK9mN1p" * 100  # 1,600 characters, credential-shaped from its start
    out = redact_text(f"key={secret} rest")
    assert out == f"key={REDACTED} rest"
    assert redact_text("key=" + "a" * 200 + "/2024/report.pdf") == "key=" + "a" * 200 + (
        "/2024/report.pdf"
    )


@pytest.mark.parametrize(
    ("statement", "secret"),
    [
        ("INSERT INTO conns (dsn) VALUES ('postgresql://app:s3cr?tP4ssw0rd@db:5432/x')", "s3cr"),
        ("SELECT id FROM u WHERE password = 'hunter?2Secret'", "2Secret"),
        ("conn postgresql://app:s3cr?tP4ssw0rd@db:5432/x", "tP4ssw0rd"),
        ("SELECT 1 WHERE api_key=sk-abc?def1234567890abcdef", "1234567890abcdef"),
    ],
)
def test_a_statements_text_keeps_placeholders_but_never_a_secret_around_a_question_mark(
    statement: str, secret: str
) -> None:
    """db.query.text in lines and in other libraries' spans: a "?" in a value is no
    placeholder, and the value is masked whole."""
    from rag_instrument._sanitize import redact_statement

    assert secret not in redact_statement(statement)
    assert secret not in Sanitizer().mapping({"db.query.text": statement})["db.query.text"]


def test_a_statements_placeholders_after_secret_columns_are_kept() -> None:
    from rag_instrument._sanitize import redact_statement

    for statement in (
        "SELECT * FROM u WHERE email = ? AND password=?",
        "UPDATE u SET secret=:secret, access_token=%(t)s WHERE id = $1",
        "INSERT INTO u (email, password) VALUES (?, ?)",
        "SELECT * FROM users WHERE password = upper(?)",
        "UPDATE u SET password = crypt(:pw, password) WHERE token = md5(%s)",
    ):
        assert redact_statement(statement) == statement


def test_a_quoted_sqlalchemy_error_keeps_no_literal() -> None:
    """An application's own line quoting a database error: the statement's literals go."""
    text = (
        "db error: (psycopg.errors.CheckViolation) new row violates check constraint\n"
        "[SQL: INSERT INTO users (email, ssn, n, t1) "
        "VALUES ('bob@y.example', 'bad-ssn-000', 42, E'x')]\n"
        "(Background on this error at: https://sqlalche.me/e/20/gkpj)"
    )
    clean = redact_text(text)
    for literal in ("bob@y.example", "bad-ssn-000", "42", "E'x'"):
        assert literal not in clean
    assert "[SQL: INSERT INTO users (email, ssn, n, t1) VALUES (?, ?, ?, ?)]" in clean
    assert "https://sqlalche.me/e/20/gkpj" in clean


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        (
            "x\n[SQL: INSERT INTO [users] ([name], [pin]) VALUES ('bob', '482913')]\n"
            "(Background on this error at: https://sqlalche.me/e/20/gkpj)",
            "482913",
        ),
        ("x\n[SQL: SELECT 1 FROM t WHERE k = E'abc\\'def' AND z = 'secret']", "secret"),
        ("x\n[SQL: SELECT 1 FROM t WHERE p = $$hunter2$$]\n[parameters: {}]", "hunter2"),
    ],
)
def test_a_quoted_statement_loses_its_literals_however_they_are_written(
    text: str, secret: str
) -> None:
    assert secret not in redact_text(text)


def test_sql_in_brackets_within_ordinary_text_is_left_alone() -> None:
    text = "see the docs [SQL: is a tag] in my notes about version 3 and port 5432"
    assert redact_text(text) == text
