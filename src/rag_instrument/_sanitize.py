"""Make arbitrary values safe to log and to put on spans.

Three jobs, applied together in one walk:

* **Redaction**: values under secret-looking keys (``api_key``, ``authorization``,
  ``password`` ...) and secret-looking substrings (``sk-...`` keys, ``Bearer`` tokens,
  passwords in URLs) become :data:`REDACTED`. The mask never echoes any part of the secret.
* **Truncation**: strings longer than the limit are cut and end with a marker that states
  the original length.
* **Serialisability**: anything that is not JSON (objects, cycles, bytes, objects whose
  ``repr`` raises, lone surrogates) becomes a safe placeholder. Nothing here ever raises.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import functools
import itertools
import math
import re
import time
import traceback
import uuid
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Mapping, Sequence
from pathlib import PurePath
from typing import Any, Final

import orjson

from rag_instrument._utils import install_text_cleaner

__all__ = [
    "MAX_SPAN_NAME_CHARS",
    "REDACTED",
    "STATEMENT_KEY",
    "Sanitizer",
    "exported_name",
    "int_text",
    "is_secret_key",
    "mask_attribute",
    "mask_literal_secrets",
    "redact_statement",
    "redact_text",
    "redact_then_truncate",
    "register_literal_secrets",
    "safe_repr",
    "safe_str",
    "stack_trace",
    "to_attribute_value",
    "truncate",
    "valid_utf8",
]

REDACTED: Final = "[REDACTED]"

_SECRET_WORDS: Final = frozenset(
    {
        "password",
        "passwd",
        "pwd",
        "pw",
        "passphrase",
        "pass",
        "secret",
        "token",
        "apikey",
        "authorization",
        "auth",
        "credential",
        "credentials",
        "cookie",
        "signature",
        "sig",
        "dsn",
        "jwt",
        "bearer",
        # Session cookies by their usual names (Django, Java, PHP, Express, Flask).
        "sessionid",
        "jsessionid",
        "phpsessid",
        "session",
    }
)
# Names that stay secrets with a number after them (``password_1``, ``token2``).
_NUMBERED_SECRETS: Final = frozenset(
    {
        "password", "passwd", "pwd", "passphrase", "secret", "token", "apikey",
        "credential", "credentials", "authorization", "jwt", "cookie", "dsn",
    }
)
# Two-word names, joined without separator after splitting (``api_key`` -> ``apikey``).
_SECRET_PAIRS: Final = frozenset(
    {
        "apikey",
        "accesskey",
        "privatekey",
        "secretkey",
        "sessionid",
        "sessionkey",
        "clientsecret",
        "setcookie",
        "openaikey",
        "anthropickey",
        "signingkey",
        "encryptionkey",
        "masterkey",
        "accountkey",
        "connectsid",
        # A password's hash or salt (``password_hash``, ``pwd_salt``).
        "passwordhash",
        "passwordsalt",
        "passworddigest",
        "passwdhash",
        "pwdhash",
        "pwdsalt",
        "pwhash",
        "passhash",
    }
)
# A last word that merely ends with one of these is a secret too (``dbpassword``,
# ``AWSSECRETKEY``, ``csrftoken``) - but not ``tokens`` or ``keyword``.
_SECRET_SUFFIXES: Final = (
    "password",
    "passwd",
    "secret",
    "apikey",
    "accesskey",
    "privatekey",
    "secretkey",
    "token",
    "sessid",
    "sessionid",
)
_WORD_SPLIT: Final = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])")


@functools.lru_cache(maxsize=4096)
def is_secret_key(key: str) -> bool:
    """Return whether a mapping key names a secret (``api_key``, ``X-Api-Key``, ``password``).

    The key's last word (or last two, for ``api_key`` / ``private_key``) decides, compared
    whole: ``access_token``, ``db_password``, ``AWS_SECRET_ACCESS_KEY`` and
    ``http.request.header.authorization`` are secrets, while ``max_tokens``,
    ``gen_ai.usage.input_tokens`` and ``rag.llm.time_to_first_token_ms`` (a duration about
    a token) are not. A last word that ends with ``password``, ``secret``, ``token`` or
    ``apikey`` (``dbpassword``, ``csrftoken``) counts too. A number at the end is an index,
    not a word (``password_1``, SQLAlchemy's name for the value a ``where`` compares a
    ``password`` column with; ``token2``); a password's hash or salt is a secret too.
    """
    words = [w.lower() for w in _WORD_SPLIT.split(key) if w]
    numbered = False
    while words and words[-1].isdigit():
        words.pop()
        numbered = True
    if not words:
        return False
    last = words[-1].rstrip("0123456789") or words[-1]
    if last != words[-1]:
        numbered = True
        words[-1] = last
    if numbered:
        # An index after a name (password_1, token2) keeps the name's meaning only for
        # names that mean a secret whatever they stand next to: not "pass" (retrieval_pass_1),
        # "session", "auth" (auth0) or "sig".
        return last in _NUMBERED_SECRETS or (
            len(words) >= 2 and words[-2] + last in _SECRET_PAIRS
        )
    if last in _SECRET_WORDS:
        return True
    if len(words) >= 2:
        joined = words[-2] + last
        # api_key; and one word split at a case change: passWord, dbPassWord.
        if joined in _SECRET_PAIRS or joined in _SECRET_WORDS:
            return True
    return len(last) > 5 and last.endswith(_SECRET_SUFFIXES)


# One pattern per kind of secret, each run only when a cheap substring test says it may
# match: a single alternation of them all costs microseconds per string, because the
# regular-expression engine tries every alternative at every position.

_PEM: Final = re.compile(
    # A private key block, whole (or to the end of the text when its END line was cut off).
    r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
    r"(?:.*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|.*\Z)",
    re.DOTALL,
)
# scheme://user:PASSWORD@host. Two readings, as two passes (see _url_passwords): first
# the password runs to the last "@" of the URL (a password with "?" in it; see
# _wide_password), then to the last "@" before the host (an "@" followed by a host name and
# then "/", "?", "#", a blank or the end), within what stops at "?" or a blank, so that
# passwords with "@", "/" or "#" in them (unencoded, as hand-written DSNs have them) are
# masked whole while an e-mail in the query string stays. Not when the colon starts a port
# ("host:443/?to=a@b.c": no credentials at all). Found from each "://" outwards, with the
# ends looked up rather than backtracked to: a text of many "://" costs linear time.
_URL_CREDENTIALS: Final = re.compile(r"://[^\s:/?#@]*:(?!\d{1,5}(?:[/?#]|$|\s))(?!\[REDACTED)")
_BLANK: Final = re.compile(r"\s")
_BLANK_OR_QUERY: Final = re.compile(r"[\s?]")
_HOST_AT: Final = re.compile(r"@(?=[^\s@/?#]+(?:[/?#\s]|$))")
_URL_USER_TOKEN: Final = re.compile(
    # scheme://TOKEN@host: a user part long or digit-bearing enough to be a credential
    # (https://ghp_...@github.com, https://<key>@sentry.io) - not "postgres@localhost".
    r"(://)(?=[^\s:/?#@]*\d)[^\s:/?#@\[\]]{12,}(?=@)|(://)[^\s:/?#@\[\]]{24,}(?=@)"
)
_COOKIE: Final = re.compile(
    # The whole header value: every cookie in it may be a session.
    r"""(?im)(\b(?:set-)?cookie["']?\s*[:=]\s*(?:[bB]?["'])?)"""
    r"""(?!\s*[bB]?["']?\s*\[REDACTED\])[^\r\n"']+"""
)
_AUTH_HEADER: Final = re.compile(
    # Authorization: <scheme> <credentials> - whatever the credentials look like.
    r"""(?i)(\b(?:proxy-)?authorization["']?\s*[:=]\s*["']?"""
    r"""(?:bearer|basic|token|digest|negotiate|apikey|dsn)\s+)(?!\[REDACTED\])[^\s"',;]+"""
)
_AUTH_SCHEME: Final = re.compile(
    # "Bearer <credential>" in free text: only credential-shaped words, so that "Basic
    # research" and "token budget exhausted" survive.
    r"(?i)\b((?:bearer|basic|token)\s+)(?!\[REDACTED\])([A-Za-z0-9._~+/=-]{8,})"
)
# name=value, name: value and "name": "value" in free text (environment dumps, query
# strings, reprs, JSON), where the name is judged by is_secret_key(): NAME_PASSWORD=,
# AWS_SECRET_ACCESS_KEY=, db_password='...', "api_key": "...". Found from each "=" or ":"
# outwards (see _mask_key_values): a pattern that tries a name at every position of a
# long text costs far more.
_SEPARATOR: Final = re.compile(r"[=:]")
_SEPARATOR_ENCODED: Final = re.compile(r"[=:]|%3[dDaA]")  # also URL-encoded: password%3Dv
# What may stand between the separator and a value's opening quote: blanks, the ">" of
# "=>", an opening bracket (a list of one: ["v"]) and a string prefix (a bytes repr: b'v').
_VALUE_LEAD: Final = re.compile(
    r"""\s*(?:[>=]\s*)?(?:[\[(]\s*(?=[bBrRuU]{0,2}["']))?(?:[bBrRuU]{1,2}(?=["']))?"""
)
# What "key=" must be followed by to be a secret: 10 or more of a key's alphabet (base64,
# hex, URL-encoded), and a key's randomness: upper and lower case with a digit or a base64
# sign ("wJalrXUtnFEMI/K7MDENG/...", "Zx9Kq2LmP0rT"), or a run of 16 or more letters and
# digits mixed ("3f9a0c7b2e4d6f8a..."). Not "key=user_profile_v2", "key=uploads/2024/x.pdf",
# "key=192.168.0.1", "key=tenant-42-shard-7".
_BARE_KEY_CHARS: Final = re.compile(r"[A-Za-z0-9+/=_.%-]{10,}")
_ALNUM_RUN: Final = re.compile(r"[A-Za-z0-9]{16,}")
_UPPER: Final = re.compile(r"[A-Z]")
_LOWER: Final = re.compile(r"[a-z]")
_DIGIT: Final = re.compile(r"[0-9]")
_DIGIT_OR_SIGN: Final = re.compile(r"[0-9+/=]")


def _bare_key_value(raw: str) -> bool:
    """Whether the value of a bare ``key=`` looks like a credential (see above)."""
    if not _BARE_KEY_CHARS.fullmatch(raw):  # ASCII only from here on
        return False
    if _UPPER.search(raw) and _LOWER.search(raw) and _DIGIT_OR_SIGN.search(raw):
        return True
    # A run of 16 or more letters and digits with both in it (each run read once).
    return any(
        _DIGIT.search(run.group(0)) and (_UPPER.search(run.group(0)) or _LOWER.search(run.group(0)))
        for run in _ALNUM_RUN.finditer(raw)
    )
# A quoted value runs to its closing quote; a backslash-escaped quote inside it (JSON's
# "Xy\"9k") does not close it.
_QUOTED: Final = {
    "'": re.compile(r"(?:[^'\\\r\n]|\\[^\r\n])*"),
    '"': re.compile(r'(?:[^"\\\r\n]|\\[^\r\n])*'),
}
# A value quoted with escaped quotes: JSON held in a JSON string ("{\"password\": \"v\"}").
_ESCAPED_QUOTED: Final = re.compile(r"""(?:[^\\\r\n]|\\[^"'\r\n])*""")
_BARE_VALUE: Final = re.compile(r"""(?!//)[^\s"'&,;}\])]+""")
_NAME_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
_MAX_NAME: Final = 256
_TOKEN_COUNT: Final = re.compile(r"[0-9][0-9_,.]{0,9}")
_AUTH_SCHEME_WORDS: Final = frozenset(
    {"bearer", "basic", "token", "digest", "negotiate", "apikey", "dsn"}
)
# Values that say something about a secret rather than being one ("token: None",
# "password: (empty)", "signature: verified"): kept, as is a small plain number ("pass:
# 3 of 5"). A real secret is neither a status word nor a number of up to three digits.
_PLACEHOLDERS: Final = frozenset(
    {
        "none", "null", "nil", "missing", "empty", "true", "false", "yes", "no", "ok",
        "expired", "verified", "unverified", "configured", "unconfigured", "set", "unset",
        "required", "optional", "invalid", "valid", "provided", "redacted", "masked",
        "hidden", "absent", "present", "enabled", "disabled", "undefined", "unknown",
        "n/a", "na", "default", "***", "...",
    }
)  # fmt: skip
_SMALL_NUMBER: Final = re.compile(r"[0-9]{1,3}")

# The prefixed key formats of the major providers (after gitleaks' and detect-secrets'
# rule sets). Each prefix is specific enough; the lengths follow the issuers' formats.
_PROVIDER_RULES: Final[tuple[tuple[tuple[str, ...], str], ...]] = (
    # (literal marks, any of which must be in the text, pattern run only then). Running
    # each pattern only when its own mark is there keeps prose cheap: one alternation of
    # them all costs the regular-expression engine every alternative at every position.
    (("sk_live_", "sk_test_", "sk_prod_", "rk_live_", "rk_test_", "rk_prod_"),
     # Stripe secret / restricted keys. Provider prefixes may follow a name they are glued
     # to ("OPENAI_KEY_sk-...", "idAKIA..."), so no word boundary before the specific ones.
     r"(?<![A-Za-z0-9])[sr]k_(?:live|test|prod)_[A-Za-z0-9]{10,}"),
    (("whsec_",), r"\bwhsec_[A-Za-z0-9+/=]{20,}"),  # Stripe webhook signing secrets
    (("AIza",), r"\bAIza[0-9A-Za-z_-]{35}"),  # Google API keys
    (("ya29.",), r"\bya29\.[0-9A-Za-z_-]{20,}"),  # Google OAuth access tokens
    (("GOCSPX-",), r"\bGOCSPX-[0-9A-Za-z_-]{20,}"),  # Google OAuth client secrets
    (("glpat-", "glptt-", "gldt-", "glrt-", "glcbt-", "glsoat-", "glffct-", "glimt-",
      "gloas-", "glagent-"),
     # GitLab
     r"(?<![A-Za-z0-9])gl(?:pat|ptt|dt|rt|cbt|soat|ffct|imt|oas|agent)-[0-9A-Za-z_-]{20,}"),
    (("hf_",),  # Hugging Face user tokens (34 letters when glued to a word: "xhf_...")
     r"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{30,}|(?<=[a-z])hf_[A-Za-z]{34}\b"),
    (("api_org_",), r"\bapi_org_[A-Za-z0-9]{30,}"),  # Hugging Face organisation tokens
    (("xox",), r"\bxox[abposer]-[A-Za-z0-9-]{10,}"),  # Slack bot / user / app tokens
    (("xapp-",), r"\bxapp-\d-[A-Za-z0-9-]{10,}"),  # Slack app-level tokens
    (("hooks.slack.com",),
     r"hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9/_+-]{20,}"),  # webhooks
    (("ghp_", "gho_", "ghu_", "ghs_", "ghr_"),  # GitHub (36 characters when glued)
     r"gh[pousr]_[A-Za-z0-9]{36,}|\bgh[pousr]_[A-Za-z0-9]{30,}"),
    (("github_pat_",), r"github_pat_[A-Za-z0-9_]{30,}"),  # GitHub fine-grained tokens
    (("AKIA", "ASIA", "ABIA", "ACCA", "A3T"),
     # AWS access key ids
     r"(?<![A-Z0-9])(?:AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])[A-Z2-7]{16}(?![A-Za-z0-9])"),
    (("npm_",), r"\bnpm_[A-Za-z0-9]{36}\b"),  # npm tokens
    (("pypi-AgEIcHlwaS5vcmc",), r"\bpypi-AgEIcHlwaS5vcmc[A-Za-z0-9_-]{50,}"),  # PyPI
    (("SG.",), r"\bSG\.[A-Za-z0-9_-]{16,32}\.[A-Za-z0-9_-]{16,64}"),  # SendGrid keys
    (("dapi",), r"\bdapi[0-9a-f]{32}\b"),  # Databricks tokens
    (("eyJ",), r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]+"),  # JWTs
)  # fmt: skip
_PROVIDERS: Final = tuple((marks, re.compile(pattern)) for marks, pattern in _PROVIDER_RULES)


# The credentials of instrumented clients (their API keys, whatever their shape), masked as
# literals in every log line written, the application's own lines included (a line that
# quotes an SDK error: "Incorrect API key provided: <key>"). Registered where the library
# reads them (:func:`register_literal_secrets`); a few per process.
LITERAL_SECRETS: list[bytes] = []
_LITERAL_SEEN: set[str] = set()
_MAX_LITERALS: Final = 64


def register_literal_secrets(values: Sequence[str]) -> None:
    """Remember credentials to mask, as literals, in every log line.

    Only values that look like a credential: 8 characters or more, and either 20 or more
    or not plain words (``_credential_shaped``). A local server's placeholder key
    (``"not-needed"``, ``"lm-studio"``) would otherwise mask those words in every line.
    """
    for value in values:
        if (
            value not in _LITERAL_SEEN
            and len(value) >= 8
            and (len(value) >= 20 or _credential_shaped(value))
            and len(_LITERAL_SEEN) < _MAX_LITERALS
        ):
            _LITERAL_SEEN.add(value)
            LITERAL_SECRETS.append(value.encode("utf-8", "surrogatepass"))


def mask_literal_secrets(data: bytes) -> bytes:
    """``data`` (a rendered log line) with the registered credentials masked."""
    for literal in LITERAL_SECRETS:
        if literal in data:
            data = data.replace(literal, b"[REDACTED]")
    return data


def _mask_provider_keys(text: str) -> str:
    for marks, pattern in _PROVIDERS:
        for mark in marks:
            if mark in text:
                text = pattern.sub(REDACTED, text)
                break
    return text


# OpenAI / Anthropic keys: "sk-" then a random part (sk-proj-..., sk-ant-api03-...).
# Identifiers that merely start with "sk-" ("sk-learn-compat", "sk-2024-plan") survive:
# the key needs a provider's key prefix (sk-proj-, sk-ant-...), a run of 20+ letters and
# digits (longer than words are), or of 12+ mixing letter cases or digits.
_SK_KEY: Final = re.compile(
    # A provider's own prefix is specific enough to be found glued to a word too
    # ("openaikeysk-proj-..."); a plain "sk-" needs a word boundary before it.
    r"(?:(?<![A-Za-z0-9])sk-|sk-(?:proj|ant|svcacct|admin)-)[A-Za-z0-9_-]{16,}"
)
_RANDOM_RUN: Final = re.compile(r"[A-Za-z0-9]{12,}")


def _keep_prefix(match: re.Match[str]) -> str:
    return match.group(1) + REDACTED


def _wide_password(password: str) -> bool:
    # To the last "@" of the URL, unless that "@" is in a query parameter's value
    # ("?email=a@b.c"): then the narrow reading (to the "@" before the host) decides.
    cut = max(password.rfind("?"), password.rfind("&"))
    return not (cut >= 0 and "=" in password[cut:])


def _mask_values(
    text: str, start: re.Pattern[str], value_end: Callable[[int], tuple[int, int]]
) -> str:
    """Mask values found from each match of ``start``, looking their ends up.

    The one scanning loop of the rules that look a value's end up rather than backtrack
    to it (linear time). ``value_end(value_start)`` gives ``(end, resume)``: with
    ``end >= 0`` the text from ``value_start`` to ``end`` is masked and the search goes on
    from ``end``; otherwise it goes on from ``resume`` (``-1``: the next character after
    the match's start).
    """
    parts: list[str] = []
    done = pos = 0
    while True:
        found = start.search(text, pos)
        if found is None:
            break
        value_start = found.end()
        end, resume = value_end(value_start)
        if end < 0:
            pos = resume if resume >= 0 else found.start() + 1
            continue
        parts.append(text[done:value_start])
        parts.append(REDACTED)
        done = pos = end
    if not parts:
        return text
    parts.append(text[done:])
    return "".join(parts)


def _url_passwords(text: str, *, wide: bool) -> str:
    """Mask URL passwords (see _URL_CREDENTIALS), the ``wide`` reading or the narrow one."""
    run_end = -1  # where the value that started last stops (a blank, a "?")
    last_at = -1  # the last "@" before run_end
    host_ats: list[int] | None = None  # where an "@" is followed by a host, in order

    def value_end(value_start: int) -> tuple[int, int]:
        nonlocal run_end, last_at, host_ats
        if value_start >= run_end:  # a new run: where it stops, its last "@"
            stop = (_BLANK if wide else _BLANK_OR_QUERY).search(text, value_start)
            run_end = stop.start() if stop is not None else len(text)
            last_at = text.rfind("@", value_start, run_end)
        if last_at < value_start:
            return -1, -1
        if wide:
            if _wide_password(text[value_start:last_at]):
                return last_at, -1
            return -1, last_at  # the whole URL is the narrow reading's to judge
        if host_ats is None:
            host_ats = [at.start() for at in _HOST_AT.finditer(text)]
        index = bisect_left(host_ats, run_end) - 1
        if index >= 0 and host_ats[index] >= value_start:
            return host_ats[index], -1
        return -1, -1

    return _mask_values(text, _URL_CREDENTIALS, value_end)


def _url_user(match: re.Match[str]) -> str:
    return (match.group(1) or match.group(2)) + REDACTED


def _auth_scheme(match: re.Match[str]) -> str:
    credential = match.group(2)
    if len(credential) >= 20 or _credential_shaped(credential):
        return match.group(1) + REDACTED
    return match.group(0)


_DOTTED: Final = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+){2,}")


def _credential_shaped(word: str) -> bool:
    # Prose ("research", "budget", "sk-learn") is lowercase or capitalised words, maybe
    # hyphenated; credentials are base64/base62 soup with digits, symbols or mixed case,
    # or a JWT's three dotted parts (header.payload.signature), however short.
    if _DOTTED.fullmatch(word):
        return True
    for part in re.split(r"[-_.~]", word):
        if any(not ch.isalpha() for ch in part):
            return True
        rest = part[1:]
        if rest and not (rest.islower() or rest.isupper()):
            return True
    return False


#: How much of a bare value is read to judge it (a bare ``key=``'s credential shape); a
#: value judged a secret is masked whole, however long.
_JUDGED: Final = 128


def _key_value_at(
    text: str, sep: int, sep_end: int, runs: list[int] | None = None
) -> tuple[int, int] | None:
    """For the separator at ``sep``: where a secret's value is, to be masked.

    ``runs`` (``[start, end]`` of the last bare value found, kept by the caller across
    separators in order) spares finding the same value's end again from each separator
    inside it: "key=key=key=..." costs linear time, not quadratic.
    """
    # Back over blanks and a closing quote to the name: "api_key" : "v", NAME = v.
    stop = sep
    while stop > 0 and text[stop - 1] in " \t":
        stop -= 1
    if stop > 0 and text[stop - 1] in "\"'":
        stop -= 1
        if stop > 0 and text[stop - 1] == "\\":  # an escaped quote: JSON in a string
            stop -= 1
    start = stop
    while start > 0 and stop - start <= _MAX_NAME and text[start - 1] in _NAME_CHARS:
        start -= 1
    if start == stop or stop - start > _MAX_NAME:
        return None
    if start > 0 and (text[start - 1].isalnum() or text[start - 1] == "_"):
        return None  # the name runs on in a non-ASCII word: not a name
    if start > 0 and text[start - 1] == "%" and stop - start > 2:
        start += 2  # URL-encoded: "%3Fpassword%3D..." is "?password=..."
    key = text[start:stop].lstrip("-")  # a command-line option: --password=v
    if not key or not (key[0].isalpha() or key[0] == "_"):
        return None
    # "key=<credential>" (a signing key, ?key= in a URL) names a secret where "key: value"
    # in prose does not: only with "=" and a credential-shaped value (_bare_key_value).
    bare_key = key.lower() == "key" and text[sep] != ":" and not text.startswith("%3a", sep)
    if not bare_key and not is_secret_key(key):
        return None
    if key.lower() == "session":
        return None  # a key's or a log's word ("key=session:abc"); a Cookie header is masked whole
    value_start = _VALUE_LEAD.match(text, sep_end).end()  # type: ignore[union-attr]
    if text.startswith("[REDACTED", value_start):
        return None
    quote = text[value_start : value_start + 1]
    if quote == "\\" and text[value_start + 1 : value_start + 2] in ("'", '"'):
        value_start += 2  # \"value\": to the next escaped quote
        raw = _ESCAPED_QUOTED.match(text, value_start).group(0)  # type: ignore[union-attr]
    elif quote in ("'", '"'):
        # To the closing quote, or to the end of the line when there is none (a value cut
        # off, or a quote left open: nothing after the opening quote can be trusted).
        value_start += 1
        raw = _QUOTED[quote].match(text, value_start).group(0)  # type: ignore[union-attr]
    else:
        if text.startswith("//", value_start):
            return None  # "scheme://": not a value
        if runs is not None and runs[0] <= value_start < runs[1]:
            end = runs[1]  # inside the last value found: it ends where that one does
        else:
            bare = _BARE_VALUE.match(text, value_start)
            if bare is None:
                return None
            end = bare.end()
            if runs is not None:
                runs[0], runs[1] = value_start, end
        if end - value_start > _JUDGED:  # judged by its start, masked whole
            head = text[value_start : value_start + _JUDGED]
            if bare_key and not _bare_key_value(head):
                return None
            return value_start, end
        raw = text[value_start:end]
    if not raw:
        return None
    if bare_key and not _bare_key_value(raw):
        return None  # a cache key, an object's path, an address, a date: not a secret
    if raw.lower() in _AUTH_SCHEME_WORDS:
        return None  # "Authorization: Bearer ..." - the scheme pass masks the rest
    if raw.strip("()<>[]").lower() in _PLACEHOLDERS or _SMALL_NUMBER.fullmatch(raw):
        return None  # "token: None", "passphrase: (empty)", "pass: 3 of 5"
    if _TOKEN_COUNT.fullmatch(raw) and key.lower().rstrip("s").endswith("token"):
        return None  # "token: 512" counts tokens
    return value_start, value_start + len(raw)  # quotes, if any, stay


def _mask_key_values(text: str) -> str:
    parts: list[str] = []
    done = 0
    separators = _SEPARATOR_ENCODED if "%3" in text else _SEPARATOR
    runs = [0, 0]
    for sep in separators.finditer(text):
        if sep.start() < done:
            continue  # inside a value already masked
        found = _key_value_at(text, sep.start(), sep.end(), runs)
        if found is None:
            continue
        start, end = found
        parts.append(text[done:start])
        parts.append(REDACTED)
        done = end
    if not parts:
        return text
    parts.append(text[done:])
    return "".join(parts)


_SK_PREFIXES: Final = ("sk-proj-", "sk-ant-", "sk-svcacct-", "sk-admin-", "sk-None-")


def _sk_key(match: re.Match[str]) -> str:
    text = match.group(0)
    start = match.start()
    glued = start > 0 and match.string[start - 1].isalnum()
    if glued:
        # Glued to a word ("openaikeysk-proj-..."): a key only with a key's random body,
        # not "flask-admin-dashboard-7d9f8" or "disk-proj-cleanup-utility".
        for run in _RANDOM_RUN.findall(text):
            if len(run) >= 20 and _classes(run) >= 2:
                return REDACTED
        return text
    if text.startswith(_SK_PREFIXES):
        return REDACTED  # a provider's own key prefix: whatever follows
    for run in _RANDOM_RUN.findall(text):
        if len(run) >= 20:
            return REDACTED  # longer than any word
        if _classes(run) >= 2:
            return REDACTED
    return text


def _classes(run: str) -> int:
    """How many of digits, lower and upper case letters ``run`` mixes."""
    digits = any(c.isdigit() for c in run)
    return digits + any(c.islower() for c in run) + any(c.isupper() for c in run)


_KV_WORDS: Final = (
    "key", "token", "secret", "pass", "pwd", "auth", "cookie", "sig", "credential",
    "dsn", "jwt", "bearer", "session", "sessid", ".sid",
)  # fmt: skip


# One C-level scan instead of a Python loop of substring tests.
_KV_HINT: Final = re.compile("|".join(map(re.escape, _KV_WORDS)))


# <password>v</password>, <ApiKey>v</ApiKey>: an XML element named like a secret.
_XML_ELEMENT: Final = re.compile(r"<([A-Za-z_][\w.:-]{0,80})>(?!\[REDACTED\])([^<>]+)</\1>")


def _xml_element(match: re.Match[str]) -> str:
    name = match.group(1)
    if not is_secret_key(name.rsplit(":", 1)[-1]):
        return match.group(0)
    value = match.group(2).strip()
    if value.lower() in _PLACEHOLDERS or _SMALL_NUMBER.fullmatch(value):
        return match.group(0)
    return f"<{name}>{REDACTED}</{name}>"


# --password VALUE, --api-key VALUE: a long option named like a secret, its value after a
# blank. Only a credential-shaped value (digits, symbols, mixed case, 20+ characters), so
# that help text ("--password is required", "set --token when ...") survives.
_LONG_OPTION: Final = re.compile(
    r"(?<![\w-])--([A-Za-z][\w-]{1,60})([ \t]+)(?!-)(?!\[REDACTED)([^\s\"',;]+)"
)


def _long_option(match: re.Match[str]) -> str:
    value = match.group(3)
    if not is_secret_key(match.group(1)) or value.strip("()<>[]").lower() in _PLACEHOLDERS:
        return match.group(0)
    if len(value) >= 20 or _credential_shaped(value):
        return f"--{match.group(1)}{match.group(2)}{REDACTED}"
    return match.group(0)


# curl -u user:password / --user user:password (the password part only), and mysql
# -pPASSWORD (also mysqldump, mysqladmin): the option glued to its value. Only after the
# client's own name on the same line ("-p" alone is too common an option to mask
# elsewhere). Each option is found once and the name looked up before it (see
# _after_word_on_line): a line of many "curl -u " costs linear time.
_CURL_WORD: Final = re.compile(r"\bcurl\b")
_CURL_OPTION: Final = re.compile(
    r"""(\s(?:-u|--user)(?:\s+|=)["']?[^\s:"']*:)(?!\[REDACTED)[^\s"']+"""
)
_MYSQL_WORD: Final = re.compile(r"\bmysql(?:dump|admin|import|check|sh)?\b")
_MYSQL_OPTION: Final = re.compile(r"(\s-p)(?!\[REDACTED)[^\s\-][^\s]*")
_NEWLINE: Final = re.compile(r"\n")


def _after_word_on_line(text: str, word: re.Pattern[str], option: re.Pattern[str]) -> str:
    """Mask ``option``'s value (keeping its group 1) where ``word`` ends before it on its line."""
    ends = [found.end() for found in word.finditer(text)]
    if not ends:
        return text
    newlines = [found.start() for found in _NEWLINE.finditer(text)]

    def masked(match: re.Match[str]) -> str:
        start = match.start()
        index = bisect_right(ends, start) - 1
        if index < 0:
            return match.group(0)
        # No line break between the word and the option: the same command line.
        if bisect_left(newlines, ends[index]) != bisect_left(newlines, start):
            return match.group(0)
        return match.group(1) + REDACTED

    return option.sub(masked, text)


# PostgreSQL's DETAIL lines quote the row: "Key (email)=(alice@x.com) already exists",
# "... is not present in table", "conflicts with existing key (during)=([1,2))",
# "Failing row contains (1, alice@x.com, null)". The column names stay, the values go.
_PG_KEY_PREFIX: Final = re.compile(r"(?i)\bkey \((?:[^()\n]|\([^()\n]*\))*\)=\(")
_PG_KEY_END: Final = re.compile(
    r"(?i)\)(?: already exists| is not present| is still referenced| conflicts with)"
)
_PG_KEY_REST: Final = re.compile(r"(?:[^()\n]|\([^()\n]*\))*(?=\))")


def _pg_key_values(text: str) -> str:
    """Mask the values of "Key (cols)=(values)".

    To the phrase that follows them on the line (") already exists", ...), or else to
    their closing parenthesis. The phrases are found once and looked up from each key
    (a line of many "Key (" costs linear time).
    """
    ends = [found.start() for found in _PG_KEY_END.finditer(text)]
    newlines = [found.start() for found in _NEWLINE.finditer(text)]

    def value_end(value_start: int) -> tuple[int, int]:
        index = bisect_left(ends, value_start)
        if index < len(ends) and bisect_left(newlines, value_start) == bisect_left(
            newlines, ends[index]
        ):
            return ends[index], -1  # the first such phrase on the same line
        rest = _PG_KEY_REST.match(text, value_start)
        return (rest.end(), -1) if rest is not None else (-1, -1)

    return _mask_values(text, _PG_KEY_PREFIX, value_end)


_PG_FAILING_ROW: Final = re.compile(
    r"(Failing row contains \()[^\n]*?(?=\)\.?(?:\n|$))|(Failing row contains \()[^\n]*"
)
# SQLAlchemy's error text appends the statement's parameters: "[parameters: {...}]".
_SQL_PARAMETERS: Final = re.compile(
    r"(\[parameters: )[^\n]*?(?=\]\s*(?:\n|$|\())|(\[parameters: )[^\n]*"
)


def _first_group(match: re.Match[str]) -> str:
    return (match.group(1) or match.group(2)) + REDACTED


# SQLAlchemy's error text quotes the statement: "[SQL: INSERT ... VALUES ('bob', 7)]". In a
# line that quotes the error (the application's own "db error: %s"), its literals become
# "?", as in db.query.text: strings (E'', N'', '' escapes) and numbers. Each pattern scans
# its text once (no nested or unbounded retries: crafted text costs linear time).
# The block ends where SQLAlchemy ends it: before its "[parameters: ...]" or "(Background on
# this error ...)" line, or at the end of the text; "[SQL: " in other text is left alone.
_SQL_BLOCK_END: Final = re.compile(r"\](?=\n\[parameters: |\n\(Background on this error|\s*\Z)")
_SQL_LITERAL: Final = re.compile(
    r"[Ee]'(?:[^'\\]|\\.|'')*(?:'|\Z)"  # E'...': backslash escapes
    r"|[NnBbXxUu]?&?'(?:[^']|'')*(?:'|\Z)"
    r"|\$(\w*)\$"  # a dollar-quoted body's opening tag: the rest of the block is a value
    r"|(?<![\w.$])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?![\w.])",
    re.DOTALL,
)


def _sql_literals(statement: str) -> str:
    out: list[str] = []
    pos = 0
    for match in _SQL_LITERAL.finditer(statement):
        out.append(statement[pos : match.start()])
        if match.group(0).startswith("$"):  # dollar quoting: masked to the end, once
            out.append("?")
            return "".join(out)
        out.append("?")
        pos = match.end()
    out.append(statement[pos:])
    return "".join(out)


def _sql_blocks(text: str) -> str:
    """``text`` with the literals of its ``[SQL: ...]`` blocks replaced (linear time)."""
    out: list[str] = []
    pos = 0
    while True:
        start = text.find("[SQL: ", pos)
        if start < 0:
            break
        body = start + 6
        end = _SQL_BLOCK_END.search(text, body)
        if end is None:  # no end after this one: none after a later one either
            break
        out.append(text[pos:body])
        out.append(_sql_literals(text[body : end.start()]))
        pos = end.start()
    out.append(text[pos:])
    return "".join(out)


def _redact(text: str) -> str:
    if "PRIVATE KEY" in text:
        text = _PEM.sub(REDACTED, text)
    if "://" in text:
        if "@" in text:  # every reading needs an "@" after the password
            text = _url_passwords(text, wide=True)
            text = _url_passwords(text, wide=False)
        if "@" in text:
            text = _URL_USER_TOKEN.sub(_url_user, text)
    lower = text.lower()
    if "cookie" in lower:
        text = _COOKIE.sub(_keep_prefix, text)
    if "authorization" in lower:
        text = _AUTH_HEADER.sub(_keep_prefix, text)
    if "bearer" in lower or "basic" in lower or "token" in lower:
        text = _AUTH_SCHEME.sub(_auth_scheme, text)
    if _KV_HINT.search(lower):
        text = _mask_key_values(text)
        if "</" in text:
            text = _XML_ELEMENT.sub(_xml_element, text)
        if "--" in text:
            text = _LONG_OPTION.sub(_long_option, text)
    if " -" in text:  # a command line's options
        if "curl" in lower:
            text = _after_word_on_line(text, _CURL_WORD, _CURL_OPTION)
        if "mysql" in lower:
            text = _after_word_on_line(text, _MYSQL_WORD, _MYSQL_OPTION)
    if "(" in text:
        if ")=(" in text:
            text = _pg_key_values(text)
        if "Failing row contains (" in text:
            text = _PG_FAILING_ROW.sub(_first_group, text)
    if "[parameters: " in text:
        text = _SQL_PARAMETERS.sub(_first_group, text)
    if "[SQL: " in text:
        text = _sql_blocks(text)
    if "sk-" in text:
        text = _SK_KEY.sub(_sk_key, text)
    return _mask_provider_keys(text)


# Short strings repeat (stage names, span kinds, SQL shapes): remember the ones found clean.
# Only clean ones, so that no secret is kept alive here.
_CLEAN: dict[str, None] = {}


def redact_text(text: str) -> str:
    """Mask secret-looking substrings of ``text``; the rest is left as it is."""
    if len(text) < 8 or text in _CLEAN:
        return text
    out = _redact(text)
    if out == text and len(text) <= 256:
        if len(_CLEAN) >= 8192:
            _CLEAN.clear()
        _CLEAN[text] = None
    return out


#: A placeholder of a statement (``:name``, ``%(name)s``, ``$1``, ``?``, ``%s``).
# A placeholder where a statement's value stands: after a comparison or assignment, in a
# list (IN, VALUES), alone. A "?" inside a word or a URL ("s3cr?t") is no placeholder.
_VALUE_PLACEHOLDER: Final = re.compile(
    r"(?:(?<=[=<>(,])|(?<=[=<>(,]\s)|(?<=\s[Ii][Nn]\s)|(?<=[Ll][Ii][Kk][Ee]\s))"
    r"(?:[A-Za-z_]\w{0,63}\()?"  # inside a call: upper(?), crypt(:pw, ...)
    r"(?::[A-Za-z_]\w*|%\(\w+\)s|\$\d+|\?|%s)(?=[\s),;]|$)"
)
#: The attribute (and log field) holding a statement's text.
STATEMENT_KEY: Final = "db.query.text"


def redact_statement(text: str) -> str:
    """:func:`redact_text` for a SQL statement, its placeholders kept.

    ``password = :p`` names a parameter and holds no secret; the text around the
    placeholders is masked as any text.
    """
    if len(text) < 8 or text in _CLEAN:
        return text
    if "'" in text or "\\" in text:
        # String literals (someone else's statement, a line quoting one): a "?" or ":x"
        # inside one is part of a value, maybe a secret's; masked as any text.
        return redact_text(text)
    parts: list[str] = []
    pos = 0
    for match in _VALUE_PLACEHOLDER.finditer(text):
        parts.append(redact_text(text[pos : match.start()]))
        parts.append(match.group())
        pos = match.end()
    parts.append(redact_text(text[pos:]))
    return "".join(parts)


def mask_attribute(key: Any, value: Any) -> Any:
    """A span attribute's ``value`` with its secrets masked (``value`` itself when clean).

    Values under a secret name (numbers too: a PIN), secrets in strings (a statement's
    placeholders kept), in the strings of a sequence, and in bytes read as text. Booleans
    are left alone. The one decision for attributes set by hand and for the export's pass.
    """
    kind = type(value)
    if kind is bool:
        return value
    if type(key) is str and is_secret_key(key):
        return REDACTED
    if kind is str:
        return redact_statement(value) if key == STATEMENT_KEY else redact_text(value)
    if kind is tuple or kind is list:
        clean = tuple(_mask_item(v) for v in value)
        return value if clean == tuple(value) else clean
    if kind is bytes or kind is bytearray:
        return _mask_item(value)
    return value


def _mask_item(value: Any) -> Any:
    """One value of a sequence attribute (or a bytes one), secrets masked."""
    kind = type(value)
    if kind is str:
        return redact_text(value)
    if kind is bytes or kind is bytearray:  # read as text; bytes again if anything changed
        text = bytes(value).decode("utf-8", "replace")
        clean = redact_text(text)
        return value if clean == text else clean.encode("utf-8")
    return value


def truncate(text: str, limit: int) -> str:
    """Cut ``text`` to ``limit`` characters plus a marker giving the original length."""
    if limit < 0 or len(text) <= limit:
        return text
    return f"{text[:limit]}...[truncated, {len(text)} chars]"


#: Longest span name exported (names from other instrumentations too: a URL, a query).
MAX_SPAN_NAME_CHARS: Final = 200


def exported_name(name: str) -> str:
    """A span's name as export leaves it: secrets masked, cut to :data:`MAX_SPAN_NAME_CHARS`."""
    return truncate(redact_text(name), MAX_SPAN_NAME_CHARS) if name else name


#: Redaction looks this far past a cut, so a secret straddling the cut is still recognised
#: whole (the longest token format is well under it), while a 10 MB value costs no more to
#: redact than a few kilobytes.
_LOOKAHEAD: Final = 4096


def redact_then_truncate(text: str, limit: int) -> str:
    """Mask secrets in ``text``, then cut it to ``limit`` (never the other way round).

    A cut first could split a secret from the pattern that recognises it (``DB_PASS`` |
    ``WORD=hunter2``) and leave part of it behind.
    """
    if limit < 0 or len(text) <= limit:
        return redact_text(text)
    window = redact_text(text[: limit + _LOOKAHEAD])
    return f"{window[:limit]}...[truncated, {len(text)} chars]"


# Rendering budget: a repr that took longer than this once is not called again for its
# type (a repr that sleeps, walks a remote object or formats millions of items).
_REPR_BUDGET_S: Final = 0.005
_SLOW_REPR_TYPES: dict[type, None] = {}
#: Sized objects with more items than this are described, not repr'd (a 10-million-item
#: deque takes seconds to render).
_MAX_REPR_ITEMS: Final = 1000


def _sized(value: object) -> int | None:
    if isinstance(value, str | bytes | bytearray):
        return None
    try:
        size = len(value)  # type: ignore[arg-type]
    except Exception:  # no __len__, or one that raises
        return None
    return size if isinstance(size, int) else None


def safe_repr(value: object, limit: int = 200, *, redact: bool = True) -> str:
    """``repr(value)`` redacted, then cut to ``limit``; a placeholder when it cannot be had.

    Never raises, and bounds the cost: objects with more than 1,000 items are described by
    type and length instead, and a type whose ``repr`` once took more than 5 ms is not
    rendered again (placeholder ``<Type: repr skipped>``).
    """
    kind = type(value)
    if kind in _SLOW_REPR_TYPES:
        return f"<{_type_name(value)}: repr skipped>"
    size = _sized(value)
    if size is not None and size > _MAX_REPR_ITEMS:
        return f"<{_type_name(value)} len={size}>"
    start = time.perf_counter()
    try:
        text = repr(value)  # repr() itself rejects a __repr__ that returns a non-str
    except Exception:  # a hostile __repr__ may raise anything
        return f"<unrepresentable {_type_name(value)}>"
    finally:
        if time.perf_counter() - start > _REPR_BUDGET_S:
            if len(_SLOW_REPR_TYPES) >= 1024:
                _SLOW_REPR_TYPES.clear()
            _SLOW_REPR_TYPES[kind] = None
    text = _fix_surrogates(text)
    if not redact:
        return truncate(text, limit)
    return redact_then_truncate(text, limit)


def _type_name(value: object) -> str:
    try:
        return type(value).__name__
    except Exception:
        return "object"


def valid_utf8(text: str) -> str:
    """``text``, with lone surrogates (not encodable as UTF-8) written as escapes."""
    return _fix_surrogates(text)


def _fix_surrogates(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


_MAX_DEPTH: Final = 8
_MAX_ITEMS: Final = 200
_SCALARS: Final = (bool, int, float, type(None))
_INT_MIN: Final = -(2**63)
_INT_MAX: Final = 2**64 - 1


#: Characters one log line's fields (or one attribute's value) may render to in all: a
#: value past it is a marker, and rendering stops (a list of 200 dicts of 200 long strings
#: would otherwise take seconds and write a line of 80 MB).
TOTAL_CHARS: Final = 262_144
_OVER_BUDGET: Final = "[over the size budget]"
#: What each top-level field of a line may still use once the total is spent.
_FIELD_CHARS: Final = 4096


class _Walk(set[int]):
    """What one rendering walk holds: the containers open (for cycles), the budget left."""

    __slots__ = ("left",)

    def __init__(self) -> None:
        super().__init__()
        self.left = TOTAL_CHARS


class Sanitizer:
    """Turn values into JSON-safe, redacted, size-bounded Python values.

    Args:
        max_chars: the longest string kept whole (``configure(max_content_chars=...)``).
        redact: whether to mask secrets (on by default; ``configure(redact=False)``).
    """

    __slots__ = ("max_chars", "redact")

    def __init__(self, max_chars: int = 2000, *, redact: bool = True) -> None:
        self.max_chars = max_chars
        self.redact = redact

    def text(self, value: str) -> str:
        """Redact, fix encoding and truncate one string (in that order)."""
        if self.redact:
            return redact_then_truncate(_fix_surrogates(value), self.max_chars)
        return truncate(_fix_surrogates(value), self.max_chars)

    def statement(self, value: str) -> str:
        """:meth:`text` for a SQL statement: its placeholders kept (:func:`redact_statement`)."""
        value = _fix_surrogates(value)
        if self.redact:
            value = redact_statement(value)
        return truncate(value, self.max_chars)

    def mapping(self, items: Mapping[Any, Any]) -> dict[str, Any]:
        """Sanitise a mapping of log fields; never raises."""
        try:
            return self._mapping(items, 0, _Walk())
        except Exception:
            return {"_unserializable": f"<unrepresentable {_type_name(items)}>"}

    def value(self, value: Any, key: str | None = None) -> Any:
        """Sanitise one value (``key`` is its mapping key, for key-based redaction)."""
        try:
            if key is not None and self.redact and is_secret_key(key):
                return REDACTED
            return self._value(value, 0, _Walk())
        except Exception:
            return f"<unrepresentable {_type_name(value)}>"

    def _key(self, key: Any) -> str:
        if isinstance(key, str):
            return _fix_surrogates(key)
        if isinstance(key, enum.Enum):
            key = key.value
        if isinstance(key, str | int | float | bool | uuid.UUID) or key is None:
            return str(key)
        return safe_repr(key, 100)

    def _mapping(self, items: Mapping[Any, Any], depth: int, seen: _Walk) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for n, (k, v) in enumerate(items.items()):
            if n >= _MAX_ITEMS:
                out["..."] = f"[{len(items) - _MAX_ITEMS} more items]"
                break
            if depth == 0:
                # Each of a line's own fields gets a little, whatever came before it: a
                # huge field does not take the request id written after it.
                seen.left = max(seen.left, _FIELD_CHARS)
            elif seen.left <= 0:
                out["..."] = f"[{len(items) - n} more items: {_OVER_BUDGET}]"
                break
            key = self._key(k)
            seen.left -= len(key) + 4
            if self.redact and is_secret_key(key):
                out[key] = REDACTED
            elif key == STATEMENT_KEY and type(v) is str:
                out[key] = self.statement(v)
            else:
                out[key] = self._value(v, depth + 1, seen)
        return out

    def _pair(self, pair: tuple[str, Any], depth: int, seen: _Walk) -> Any:
        # ("Authorization", "Bearer ...") in a list of header pairs: the key names a secret.
        if self.redact and is_secret_key(pair[0]):
            return [self.text(pair[0]), REDACTED]
        return self._value(pair, depth, seen)

    def _value(self, value: Any, depth: int, seen: _Walk) -> Any:
        if seen.left <= 0:  # the line's (the attribute's) budget is spent: no more work
            return _OVER_BUDGET
        if isinstance(value, str):
            text = self.text(value)
            seen.left -= len(text) + 2
            return text
        seen.left -= 8
        if isinstance(value, _SCALARS):
            if isinstance(value, float) and not math.isfinite(value):
                return str(value)  # NaN and infinities are not JSON
            if isinstance(value, int) and not _INT_MIN <= value <= _INT_MAX:
                # beyond 64 bits: JSON parsers would lose precision; a string, cut as one
                return int_text(value, self.max_chars)
            return value
        if isinstance(value, enum.Enum):
            return self._value(value.value, depth, seen)
        if depth >= _MAX_DEPTH:
            return f"<{_type_name(value)} nested too deep>"
        if isinstance(value, Mapping | list | tuple | set | frozenset):
            ident = id(value)
            if ident in seen:
                return "<cycle>"
            seen.add(ident)
            try:
                if isinstance(value, Mapping):
                    return self._mapping(value, depth, seen)
                fields = getattr(type(value), "_fields", None) if type(value) is not tuple else None
                if isinstance(fields, tuple) and len(fields) == len(value):
                    # A named tuple: a mapping of its fields, so that their names are read
                    # (Credentials(user, password) is masked by name, as a dataclass is).
                    return self._mapping(dict(zip(fields, value, strict=True)), depth, seen)
                seq = (
                    list(itertools.islice(value, _MAX_ITEMS + 1))
                    if isinstance(value, set | frozenset)
                    else value
                )
                items: list[Any] = []
                for n, v in enumerate(seq[:_MAX_ITEMS]):
                    if seen.left <= 0:
                        items.append(f"[{len(value) - n} more items: {_OVER_BUDGET}]")
                        return items
                    items.append(
                        self._pair(v, depth + 1, seen)
                        if type(v) is tuple and len(v) == 2 and isinstance(v[0], str)
                        else self._value(v, depth + 1, seen)
                    )
                if len(seq) > _MAX_ITEMS:
                    items.append(f"[{len(value) - _MAX_ITEMS} more items]")
                return items
            except Exception:  # a container whose items() or iteration raises: this value only
                return f"<unrepresentable {_type_name(value)}>"
            finally:
                seen.discard(ident)
        if isinstance(value, bytes | bytearray | memoryview):
            return f"<bytes len={len(value)}>"
        if isinstance(value, dt.datetime | dt.date | dt.time):
            return value.isoformat()
        if isinstance(value, uuid.UUID | PurePath | dt.timedelta):
            return str(value)
        if isinstance(value, BaseException):
            return self.text(f"{_type_name(value)}: {safe_str(value)}")
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return f"<{_type_name(value)}>"
        # Anything else (a client object, a module, a lock, a socket, a model instance):
        # its repr may be huge, slow or hold credentials: only a bounded, redacted repr.
        return safe_repr(value, min(self.max_chars, 200), redact=self.redact)


#: log10(2): digits per bit, to size an integer's decimal form without making it.
_DIGITS_PER_BIT: Final = 0.30103
_MAX_INT_DIGITS: Final = 4300
_OTLP_INT_MIN: Final = -(2**63)
_OTLP_INT_MAX: Final = 2**63 - 1


def int_text(value: int, limit: int) -> str:
    """An integer's decimal digits, cut like a string at ``limit`` characters.

    ``str()`` of a huge integer costs time quadratic in its length (and raises past
    ``sys.get_int_max_str_digits()``), so one of more than 4,300 digits (Python's own
    default limit) is sized from its bit length and described, never rendered:
    ``<int of about 50,001 digits>``.
    """
    digits = int(abs(value).bit_length() * _DIGITS_PER_BIT) + 1
    if digits > _MAX_INT_DIGITS:
        return f"<int of about {digits:,} digits>"
    try:
        return truncate(str(value), limit)
    except ValueError:  # past sys.get_int_max_str_digits()
        return f"<int of about {digits:,} digits>"


def safe_str(exc: BaseException) -> str:
    """``str(exc)``, or ``"<unprintable>"`` when its ``__str__`` raises."""
    try:
        return str(exc)
    except Exception:
        return "<unprintable>"


def to_attribute_value(
    value: Any, sanitizer: Sanitizer
) -> str | bool | int | float | list[Any] | None:
    """Convert a value to an OpenTelemetry attribute value, or ``None`` to omit it.

    Strings, booleans, integers and floats pass (strings redacted and truncated);
    homogeneous lists of those pass as lists; anything else is sanitised and rendered as a
    compact JSON string, identically on every supported OpenTelemetry version. Never
    raises: a value whose ``__len__``, ``__iter__`` or ``__repr__`` raises becomes a
    placeholder.
    """
    try:
        return _to_attribute_value(value, sanitizer)
    except Exception:
        return f"<unrepresentable {_type_name(value)}>"


def _to_attribute_value(
    value: Any, sanitizer: Sanitizer
) -> str | bool | int | float | list[Any] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return sanitizer.text(value)
    if isinstance(value, bool | float):
        return value
    if isinstance(value, int):
        # OTLP carries 64-bit signed integers: a larger one would fail to encode and be
        # lost (with a warning from the encoder), so it is recorded as text.
        if _OTLP_INT_MIN <= value <= _OTLP_INT_MAX:
            return value
        return int_text(value, sanitizer.max_chars)
    if isinstance(value, enum.Enum):
        return _to_attribute_value(value.value, sanitizer)
    if isinstance(value, list | tuple) and value and not hasattr(type(value), "_fields"):
        first = type(value[0])
        head = value[:_MAX_ITEMS]
        if first in (str, bool, int, float) and all(type(v) is first for v in head):
            if first is str:
                return [sanitizer.text(v) for v in head]
            if first is int and not all(_OTLP_INT_MIN <= v <= _OTLP_INT_MAX for v in head):
                return [int_text(v, sanitizer.max_chars) for v in head]
            return list(head)
    clean = sanitizer.value(value)
    if isinstance(clean, str):  # an object shown by its repr: the text, as the log has it
        return clean
    try:
        return sanitizer.text(orjson.dumps(clean, option=orjson.OPT_NON_STR_KEYS).decode())
    except Exception:
        return f"<unrepresentable {_type_name(value)}>"


# --- stack traces ----------------------------------------------------------------------------

_REPEAT_SHOWN: Final = 3  # as Python's traceback: identical frames after 3 are counted, not shown
_CAUSE: Final = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT: Final = "\nDuring handling of the above exception, another exception occurred:\n\n"


def _frames(exc: BaseException) -> str:
    lines: list[str] = []
    last: tuple[str, int | None, str] | None = None
    repeats = 0  # how many times ``last`` came again right after itself

    def flush() -> None:
        if repeats >= _REPEAT_SHOWN:
            hidden = repeats - _REPEAT_SHOWN + 1
            plural = "s" if hidden > 1 else ""
            lines.append(f"  [Previous line repeated {hidden} more time{plural}]\n")

    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        code = frame.f_code
        key = (code.co_filename, lineno, code.co_name)
        if key == last:
            repeats += 1
            if repeats >= _REPEAT_SHOWN:
                continue
        else:
            flush()
            last, repeats = key, 0
        where = f", line {lineno}" if lineno is not None and lineno >= 0 else ""
        lines.append(f'  File "{code.co_filename}"{where}, in {code.co_name}\n')
    flush()
    return "".join(lines)


def stack_trace(
    exc: BaseException, describe: Callable[[BaseException], str], *, chain: bool = False
) -> str:
    """``exc``'s traceback in Python's layout, each frame named by file, line and function only.

    No source line is read or recorded, on any Python version (3.13 would print a whole
    multi-line call, literals included): an application's source can hold data too, and
    the file and line number find the code. ``describe`` renders each exception's last line
    (its safe type and message). With ``chain``, the causes and contexts come first, as
    Python prints them; without it, only ``exc``'s own frames. Never raises.
    """
    links: list[tuple[BaseException, str]] = [(exc, "")]
    if chain:
        seen = {id(exc)}
        current: BaseException | None = exc
        while current is not None:
            if current.__cause__ is not None:
                current, joint = current.__cause__, _CAUSE
            elif current.__context__ is not None and not current.__suppress_context__:
                current, joint = current.__context__, _CONTEXT
            else:
                break
            if id(current) in seen:
                break
            seen.add(id(current))
            links.append((current, joint))
    parts: list[str] = []
    for link, joint in reversed(links):
        try:
            frames = _frames(link)
        except Exception:
            frames = ""
        try:
            last = describe(link)
        except Exception:
            last = type(link).__name__
        head = "Traceback (most recent call last):\n" if frames else ""
        parts.append(f"{head}{frames}{last}\n{joint}")
    return "".join(parts)


install_text_cleaner(redact_then_truncate)
