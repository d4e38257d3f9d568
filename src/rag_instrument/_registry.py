"""What integrations plug into the core, instead of the core knowing them.

The way OpenTelemetry's propagators and structlog's processors are plugged in rather than
known: an integration registers, when it is imported, what the core needs from it.

* **Error formatters.** An exception from a library may carry data that must never reach a
  span or a log line (a SQLAlchemy ``StatementError`` holds the SQL and its bound
  parameters). :func:`register_error_formatter` gives the core a safe rendering for the
  exceptions of one module prefix; :func:`format_error` asks for it.
* **Span kinds.** The OpenInference span kind of a stage (``retrieval`` is a
  ``RETRIEVER``): :func:`register_span_kind` / :func:`span_kind`.

Registration happens at import time, before any request: the tables are plain dicts,
replaced as a whole on change, so readers need no lock.

At the bottom of the house: imports nothing from rag_instrument.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from typing import Final

__all__ = [
    "ErrorFormatter",
    "format_error",
    "lazy_formatter",
    "register_error_formatter",
    "register_span_kind",
    "span_kind",
]

#: Returns a safe message for ``exc``, or ``None`` when it does not handle this exception.
ErrorFormatter = Callable[[BaseException], "str | None"]

_LOCK: Final = threading.Lock()
_formatters: dict[str, ErrorFormatter] = {}
_span_kinds: dict[str, str] = {}
DEFAULT_SPAN_KIND: Final = "CHAIN"


def register_error_formatter(module_prefix: str, formatter: ErrorFormatter) -> None:
    """Render exceptions whose class lives in ``module_prefix`` (e.g. ``"sqlalchemy"``).

    A later registration for the same prefix replaces the earlier one.
    """
    global _formatters
    with _LOCK:
        _formatters = {**_formatters, module_prefix: formatter}


def lazy_formatter(module: str, name: str) -> ErrorFormatter:
    """A formatter that imports ``module`` and calls its ``name`` on first use.

    For the package's top level, which may name integrations: the formatter of an
    integration the application never imported still applies, without importing it early.
    """

    def formatter(exc: BaseException) -> str | None:
        function = getattr(importlib.import_module(module), name)
        result = function(exc)
        return result if isinstance(result, str) else None

    return formatter


def format_error(exc: BaseException) -> str | None:
    """The registered safe rendering of ``exc``; ``None`` when no formatter handles it.

    Never raises: a failing formatter counts as not handling the exception.
    """
    module = type(exc).__module__ or ""
    for prefix, formatter in _formatters.items():
        if module == prefix or module.startswith(prefix + "."):
            try:
                rendered = formatter(exc)
            except Exception:  # a broken formatter: the caller's generic fallback applies
                rendered = None
            if isinstance(rendered, str):
                return rendered
    return None


def register_span_kind(stage: str, kind: str) -> None:
    """The OpenInference span kind (``RETRIEVER``, ``LLM`` ...) of stages named ``stage``."""
    global _span_kinds
    with _LOCK:
        _span_kinds = {**_span_kinds, stage: kind}


def span_kind(stage: str) -> str:
    """The span kind registered for ``stage``; ``CHAIN`` when none was."""
    return _span_kinds.get(stage, DEFAULT_SPAN_KIND)
