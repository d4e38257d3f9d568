"""Internal helpers: the never-raise guard, rate-limited warnings and function-kind dispatch."""

from __future__ import annotations

import inspect
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from enum import Enum
from typing import Any, Final

__all__ = [
    "FunctionKind",
    "RateLimitedLogger",
    "function_kind",
    "http_status",
    "install_text_cleaner",
    "internal_error",
    "internal_logger",
    "user_code_error",
]

#: Our own diagnostics go to this standard-library logger. It is never routed back through
#: rag_instrument's pipeline while that pipeline is emitting (see ``logs._StdlibHandler``).
internal_logger = logging.getLogger("rag_instrument.internal")

_WINDOW_S = 20.0


class RateLimitedLogger:
    """Log each distinct message at most once per window (20 s by default).

    A broken exporter or a misbehaving callback can fail on every call; one line per 20 s per
    message is enough to notice it without flooding the application's logs (the SDK spec's
    advice, and the behaviour of otel-python's ``DuplicateFilter``).
    """

    def __init__(self, logger: logging.Logger, window_s: float = _WINDOW_S) -> None:
        self._logger = logger
        self._window_s = window_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def warning(
        self, message: str, *, exc_info: BaseException | None = None, key: str | None = None
    ) -> bool:
        """Log ``message`` unless it was logged within the window; return whether it was.

        ``key``: what counts as the same message (default: the message itself), for a
        message that quotes something that changes each time (an error's text).
        """
        return self._log(logging.WARNING, message, exc_info, key)

    def info(self, message: str) -> bool:
        """Like :meth:`warning`, at info level (an expected condition worth one line)."""
        return self._log(logging.INFO, message, None)

    def _log(
        self, level: int, message: str, exc_info: BaseException | None, key: str | None = None
    ) -> bool:
        now = time.monotonic()
        if key is None:
            key = message
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self._window_s:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return False
            if len(self._last) > 1024:  # bound the memory: the oldest half is forgotten
                for old in sorted(self._last, key=self._last.__getitem__)[:512]:
                    del self._last[old]
                    self._suppressed.pop(old, None)
            self._last[key] = now
            suppressed = self._suppressed.pop(key, 0)
        text = message if not suppressed else f"{message} ({suppressed} similar suppressed)"
        try:
            self._logger.log(level, text, exc_info=exc_info)
        except Exception:
            pass
        return True

    def reset(self) -> None:
        """Forget what was logged (used by tests and ``configure()``)."""
        with self._lock:
            self._last.clear()
            self._suppressed.clear()


warn_once = RateLimitedLogger(internal_logger)


def _raise_internal() -> bool:
    # Our own test-suite sets this so that a bug in rag_instrument fails loudly instead of
    # being swallowed like a broken exporter would be. Applications never set it.
    return os.environ.get("RAG_INSTRUMENT_RAISE_INTERNAL_ERRORS", "") == "1"


def internal_error(where: str, exc: BaseException) -> None:
    """Report a bug in rag_instrument itself without disturbing the application.

    Logged at most once per 20 s per place; re-raised when
    ``RAG_INSTRUMENT_RAISE_INTERNAL_ERRORS=1`` (our own test-suite).
    """
    warn_once.warning(
        f"rag_instrument internal error in {where}: {type(exc).__name__}", exc_info=exc
    )
    if _raise_internal():
        raise exc


def _cut(text: str, limit: int) -> str:
    return text[:limit]


#: Masks secrets in ``text``, then cuts it to ``limit``: ``_sanitize`` installs its
#: ``redact_then_truncate`` here when it is imported (always, with the package), so that
#: this bottom module does not import it (that would be an import circle).
_clean_text: Callable[[str, int], str] = _cut


def install_text_cleaner(clean: Callable[[str, int], str]) -> None:
    """Set the function that redacts and cuts exception texts in internal warnings."""
    global _clean_text
    _clean_text = clean


def user_code_error(where: str, exc: BaseException) -> None:
    """Report a failure of code we call but do not own (an exporter, a processor, a hook).

    Never re-raised: losing telemetry is acceptable, changing the application is not.
    """
    try:
        text = str(exc)
    except Exception:
        text = "<unprintable>"
    # Redacted before it is cut: a cut first could leave half a secret unrecognisable.
    text = _clean_text(text, 200)
    # Rate-limited by where and what, not by the error's text (which may hold a request
    # id, a counter, a span's name): one broken exporter, one warning per window.
    warn_once.warning(
        f"rag_instrument: {where} failed: {type(exc).__name__}: {text}",
        key=f"{where.split(' (', 1)[0]}:{type(exc).__qualname__}",
    )


class FunctionKind(Enum):
    """How a decorated callable must be wrapped."""

    SYNC = "sync"
    ASYNC = "async"
    GENERATOR = "generator"
    ASYNC_GENERATOR = "async_generator"


def function_kind(fn: Callable[..., Any]) -> FunctionKind:
    """Classify ``fn`` (functions, methods, ``functools.partial`` and callable objects)."""
    if inspect.isasyncgenfunction(fn):
        return FunctionKind.ASYNC_GENERATOR
    if inspect.iscoroutinefunction(fn):
        return FunctionKind.ASYNC
    if inspect.isgeneratorfunction(fn):
        return FunctionKind.GENERATOR
    if not inspect.isfunction(fn) and not inspect.ismethod(fn):
        call = getattr(type(fn), "__call__", None)  # noqa: B004 - the class's, not callable()
        if call is not None and call is not fn:
            if inspect.isasyncgenfunction(call):
                return FunctionKind.ASYNC_GENERATOR
            if inspect.iscoroutinefunction(call):
                return FunctionKind.ASYNC
            if inspect.isgeneratorfunction(call):
                return FunctionKind.GENERATOR
    return FunctionKind.SYNC


def http_status(exc: BaseException) -> int | None:
    """The HTTP status an error carries (``status_code``, ``status`` or ``response``), if any.

    Covers the openai and anthropic SDKs' status errors, httpx and requests errors.
    """
    for value in (
        getattr(exc, "status_code", None),
        getattr(exc, "status", None),
        getattr(getattr(exc, "response", None), "status_code", None),
    ):
        if type(value) is int:
            return value
        if isinstance(value, int) and not isinstance(value, bool):  # an IntEnum: HTTPStatus(503)
            return int(value)
        if isinstance(value, str) and len(value) == 3 and value.isdigit() and value.isascii():
            return int(value)  # "503", as some clients keep it
    return None


#: The HTTP methods a route budget (``"POST /api/search"``) may name, in any case.
HTTP_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "QUERY"}
)


def route_key(name: str) -> str | None:
    """A route budget's key as request lines name the route (``"post /a"`` -> ``"POST /a"``).

    ``None`` when ``name`` is not ``"METHOD /path"`` (a stage's name).
    """
    method, sep, path = name.strip().partition(" ")
    path = path.strip()
    if sep and path.startswith("/") and method.upper() in HTTP_METHODS:
        return f"{method.upper()} {path}"
    return None


#: What to renew in a forked child, per object: a lock another thread held at the fork
#: stays locked in the child for good (the child has only the forking thread).
_RENEW_AFTER_FORK: weakref.WeakKeyDictionary[Any, Callable[[Any], None]] = (
    weakref.WeakKeyDictionary()
)


def renew_after_fork(owner: Any, renew: Callable[[Any], None] | None = None) -> None:
    """Call ``renew(owner)`` in a forked child (default: a new ``owner._lock``)."""
    _RENEW_AFTER_FORK[owner] = renew or _new_lock


_RLOCK_TYPE: Final = type(threading.RLock())


def _new_lock(owner: Any) -> None:
    # The same kind as before: a re-entrant lock stays re-entrant.
    owner._lock = threading.RLock() if isinstance(owner._lock, _RLOCK_TYPE) else threading.Lock()


def _renew_all_after_fork() -> None:
    for owner, renew in list(_RENEW_AFTER_FORK.items()):
        try:
            renew(owner)
        except Exception:  # in a fresh child, with nothing to report to yet
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_all_after_fork)
