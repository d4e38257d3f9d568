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
import math
import re
import traceback
import uuid
from collections.abc import Callable, Mapping
from pathlib import PurePath
from typing import Any, Final

import orjson

from rag_instrument._registry import format_error
from rag_instrument._utils import http_status

__all__ = [
    "REDACTED",
    "Sanitizer",
    "is_secret_key",
    "redact_text",
    "safe_repr",
    "safe_str",
    "stack_trace",
    "to_attribute_value",
    "truncate",
]

REDACTED: Final = "[REDACTED]"

_SECRET_WORDS: Final = frozenset(
    {
        "password",
        "passwd",
        "pwd",
        "passphrase",
        "secret",
        "token",
        "apikey",
        "authorization",
        "auth",
        "credential",
        "credentials",
        "cookie",
        "signature",
        "dsn",
        "jwt",
        "bearer",
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
        "clientsecret",
        "setcookie",
        "openaikey",
        "anthropickey",
        "signingkey",
        "encryptionkey",
    }
)
_WORD_SPLIT: Final = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])")


@functools.lru_cache(maxsize=4096)
def is_secret_key(key: str) -> bool:
    """Return whether a mapping key names a secret (``api_key``, ``X-Api-Key``, ``password``).

    The key's last word (or last two, for ``api_key`` / ``private_key``) decides, compared
    whole: ``access_token``, ``db_password`` and ``http.request.header.authorization`` are
    secrets, while ``max_tokens``, ``gen_ai.usage.input_tokens`` and
    ``rag.llm.time_to_first_token_ms`` (a duration about a token) are not.
    """
    words = [w.lower() for w in _WORD_SPLIT.split(key) if w]
    if not words:
        return False
    if words[-1] in _SECRET_WORDS:
        return True
    return len(words) >= 2 and words[-2] + words[-1] in _SECRET_PAIRS


# One pattern per kind of secret, each run only when a cheap substring test says it may
# match: a single alternation of them all costs microseconds per string, because the
# regular-expression engine tries every alternative at every position.
_URL_PASSWORD: Final = re.compile(
    # scheme://user:PASSWORD@host - the password runs to the last "@" of the URL, so
    # passwords containing "@", "/" or "#" (unencoded, as hand-written DSNs have them) are
    # masked whole; an "@" later in a path or query only widens the mask.
    r"(://[^\s:/?#@]*:)[^\s]*(?=@[^\s@]*(?:\s|$))"
)
_AUTH_SCHEME: Final = re.compile(r"(?i)\b((?:bearer|basic|token)\s+)[A-Za-z0-9._~+/=-]{6,}")
_KEY_VALUE: Final = re.compile(
    # key=value and "key": "value" in free text (query strings, exception messages, JSON).
    r"""(?i)\b((?:api[_-]?key|x-api-key|access[_-]?token|refresh[_-]?token|auth[_-]?token"""
    r"""|id[_-]?token|client[_-]?secret|secret|password|passwd|pwd|token)"""
    r"""["']?\s*[=:]\s*["']?)(?!\[REDACTED\])[^\s"'&,;}]+"""  # not twice (URL user "pwd")
)
_TOKENS: Final = re.compile(
    r"\bsk-[A-Za-z0-9_-]{12,}"  # OpenAI / Anthropic style keys
    r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"  # AWS access key ids
    r"|\bgh[pousr]_[A-Za-z0-9]{30,}"  # GitHub tokens
    r"|\bxox[abposr]-[A-Za-z0-9-]{10,}"  # Slack tokens
    r"|\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]+"  # JWTs
)
_KEY_WORDS: Final = ("key", "token", "secret", "pass", "pwd")
_SCHEME_WORDS: Final = ("bearer", "basic", "token")
_TOKEN_MARKS: Final = ("sk-", "AKIA", "ASIA", "xox", "eyJ")


def _keep_prefix(match: re.Match[str]) -> str:
    return match.group(1) + REDACTED


def _redact(text: str) -> str:
    if "://" in text:
        text = _URL_PASSWORD.sub(_keep_prefix, text)
    lower = text.lower()
    if "bearer" in lower or "basic" in lower or "token" in lower:
        text = _AUTH_SCHEME.sub(_keep_prefix, text)
    if "key" in lower or "token" in lower or "secret" in lower or "pass" in lower or "pwd" in lower:
        text = _KEY_VALUE.sub(_keep_prefix, text)
    if (
        "sk-" in text
        or "AKIA" in text
        or "ASIA" in text
        or "xox" in text
        or "eyJ" in text
        or ("gh" in text and "_" in text)
    ):
        text = _TOKENS.sub(REDACTED, text)
    return text


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


def truncate(text: str, limit: int) -> str:
    """Cut ``text`` to ``limit`` characters plus a marker giving the original length."""
    if limit < 0 or len(text) <= limit:
        return text
    return f"{text[:limit]}...[truncated, {len(text)} chars]"


def safe_repr(value: object, limit: int = 200) -> str:
    """``repr(value)`` cut to ``limit``, or a placeholder naming the type when ``repr`` fails."""
    try:
        text = repr(value)  # repr() itself rejects a __repr__ that returns a non-str
    except Exception:  # a hostile __repr__ may raise anything
        return f"<unrepresentable {_type_name(value)}>"
    return truncate(_fix_surrogates(text), limit)


def _type_name(value: object) -> str:
    try:
        return type(value).__name__
    except Exception:
        return "object"


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
        """Redact, fix encoding and truncate one string."""
        if self.redact:
            value = redact_text(value)
        return truncate(_fix_surrogates(value), self.max_chars)

    def mapping(self, items: Mapping[Any, Any]) -> dict[str, Any]:
        """Sanitise a mapping of log fields; never raises."""
        try:
            return self._mapping(items, 0, set())
        except Exception:
            return {"_unserializable": f"<unrepresentable {_type_name(items)}>"}

    def value(self, value: Any, key: str | None = None) -> Any:
        """Sanitise one value (``key`` is its mapping key, for key-based redaction)."""
        try:
            if key is not None and self.redact and is_secret_key(key):
                return REDACTED
            return self._value(value, 0, set())
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

    def _mapping(self, items: Mapping[Any, Any], depth: int, seen: set[int]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for n, (k, v) in enumerate(items.items()):
            if n >= _MAX_ITEMS:
                out["..."] = f"[{len(items) - _MAX_ITEMS} more items]"
                break
            key = self._key(k)
            if self.redact and is_secret_key(key):
                out[key] = REDACTED
            else:
                out[key] = self._value(v, depth + 1, seen)
        return out

    def _pair(self, pair: tuple[str, Any], depth: int, seen: set[int]) -> Any:
        # ("Authorization", "Bearer ...") in a list of header pairs: the key names a secret.
        if self.redact and is_secret_key(pair[0]):
            return [self.text(pair[0]), REDACTED]
        return self._value(pair, depth, seen)

    def _value(self, value: Any, depth: int, seen: set[int]) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, _SCALARS):
            if isinstance(value, float) and not math.isfinite(value):
                return str(value)  # NaN and infinities are not JSON
            if isinstance(value, int) and not _INT_MIN <= value <= _INT_MAX:
                return str(value)  # beyond 64 bits: JSON parsers would lose precision
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
                seq = list(value) if isinstance(value, set | frozenset) else value
                items = [
                    self._pair(v, depth + 1, seen)
                    if type(v) is tuple and len(v) == 2 and isinstance(v[0], str)
                    else self._value(v, depth + 1, seen)
                    for v in seq[:_MAX_ITEMS]
                ]
                if len(seq) > _MAX_ITEMS:
                    items.append(f"[{len(seq) - _MAX_ITEMS} more items]")
                return items
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
        # its repr may be huge or hold credentials, so only a bounded, redacted repr.
        text = safe_repr(value, min(self.max_chars, 200))
        return redact_text(text) if self.redact else text


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
    compact JSON string, identically on every supported OpenTelemetry version.
    """
    if value is None:
        return None
    if isinstance(value, str):
        return sanitizer.text(value)
    if isinstance(value, bool | int | float):
        return value
    if isinstance(value, enum.Enum):
        return to_attribute_value(value.value, sanitizer)
    if isinstance(value, list | tuple) and value:
        first = type(value[0])
        if first in (str, bool, int, float) and all(type(v) is first for v in value):
            if first is str:
                return [sanitizer.text(v) for v in value[:_MAX_ITEMS]]
            return list(value[:_MAX_ITEMS])
    clean = sanitizer.value(value)
    try:
        return sanitizer.text(orjson.dumps(clean, option=orjson.OPT_NON_STR_KEYS).decode())
    except Exception:
        return f"<unrepresentable {_type_name(value)}>"


# --- exception messages --------------------------------------------------------------------

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
    rendered = format_error(exc)
    if rendered is not None:
        return rendered
    orig = getattr(exc, "orig", None)
    inner = f" ({type(orig).__module__}.{type(orig).__name__})" if orig is not None else ""
    return f"{type(exc).__name__}{inner}: statement and parameters hidden"


def exception_message(exc: BaseException, sanitizer: Sanitizer, capture_content: bool) -> str:
    """The text of ``exc`` that is safe to put on a span or a log line.

    Database statement errors never show their SQL literals or parameters; LLM SDK errors
    show only their type, HTTP status and error code unless content capture is on; any
    other message is redacted and truncated.
    """
    module = type(exc).__module__ or ""
    if module.startswith("sqlalchemy") and hasattr(exc, "statement"):
        return sanitizer.text(_statement_error_message(exc))
    if not capture_content and f"{module}.".startswith(_SDK_MODULES):
        return _sdk_message(exc)
    rendered = format_error(exc)  # an integration's safe rendering (e.g. pymilvus errors)
    if rendered is not None:
        return sanitizer.text(rendered)
    return sanitizer.text(safe_str(exc))


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
