"""rag_instrument: where each request's time goes in a RAG backend.

Pipeline-stage spans and JSON logs on OpenTelemetry and structlog, with per-stage budgets
and a breakdown of what each stage's time went to::

    import rag_instrument as ri

    ri.configure(service_name="search-api", log_file="logs/rag.jsonl")

    @ri.stage(ri.PipelineStage.RETRIEVAL)
    async def retrieve(query: str) -> list[str]: ...
"""

from __future__ import annotations

import importlib as _importlib
import importlib.metadata as _metadata
import importlib.util as _importlib_util
import typing as _typing

from rag_instrument import _registry
from rag_instrument._config import configure, force_flush, shutdown
from rag_instrument._context import bind_context, request_context, unbind_context, wrap_context
from rag_instrument._runtime import Runtime, get_runtime, is_configured
from rag_instrument._settings import Settings
from rag_instrument.cache import CacheMixin, CacheSpec, cached
from rag_instrument.llm import LLMProvider, LLMResult
from rag_instrument.logs import get_logger

# Imported eagerly, not lazily: once the submodule ``rag_instrument.retry`` is imported
# anywhere, Python sets the package attribute ``retry`` to the module, and a lazy
# ``__getattr__`` would never be asked for the decorator again.
from rag_instrument.retry import RetryMixin, retry
from rag_instrument.stages import PipelineStage, Stage, pipeline_stage_context, stage, traced

if _typing.TYPE_CHECKING:
    from rag_instrument.cache import RedisCache
    from rag_instrument.db import (
        db_scope,
        db_session,
        instrument_sqlalchemy,
        uninstrument_sqlalchemy,
    )
    from rag_instrument.eventloop import EventLoopWatch, watch_event_loop
    from rag_instrument.integrations.anthropic import instrument_anthropic, uninstrument_anthropic
    from rag_instrument.integrations.milvus import instrument_milvus, uninstrument_milvus
    from rag_instrument.integrations.openai import instrument_openai, uninstrument_openai
    from rag_instrument.profiling import Profile, profile
    from rag_instrument.propagation import extract_context, inject_headers
    from rag_instrument.vector import (
        EmbeddingBatchError,
        SweepRow,
        aembed_in_batches,
        embed_in_batches,
        format_table,
        sweep,
        vector_search,
    )
    from rag_instrument.web import RequestMiddleware

# Statement errors raised where the database integration was never imported still render
# through its formatter (imported on first use); importing the integration registers the
# same function directly.
_registry.register_error_formatter(
    "sqlalchemy", _registry.lazy_formatter("rag_instrument.db._sql", "sanitize_statement_error")
)
# Milvus errors quote the filter expression, literal values included.
_registry.register_error_formatter(
    "pymilvus",
    _registry.lazy_formatter("rag_instrument.integrations._milvus_expr", "sanitize_error"),
)

try:
    __version__ = _metadata.version("rag_instrument")
except _metadata.PackageNotFoundError:  # pragma: no cover - imported from a source tree
    __version__ = "0+unknown"

__all__ = [
    "CacheMixin",
    "CacheSpec",
    "EmbeddingBatchError",
    "EventLoopWatch",
    "LLMProvider",
    "LLMResult",
    "PipelineStage",
    "Profile",
    "RedisCache",
    "RequestMiddleware",
    "RetryMixin",
    "Runtime",
    "Settings",
    "Stage",
    "SweepRow",
    "__version__",
    "aembed_in_batches",
    "bind_context",
    "cached",
    "configure",
    "db_scope",
    "db_session",
    "embed_in_batches",
    "extract_context",
    "force_flush",
    "format_table",
    "get_logger",
    "get_runtime",
    "inject_headers",
    "instrument_anthropic",
    "instrument_milvus",
    "instrument_openai",
    "instrument_sqlalchemy",
    "is_configured",
    "pipeline_stage_context",
    "profile",
    "request_context",
    "retry",
    "shutdown",
    "stage",
    "sweep",
    "traced",
    "unbind_context",
    "uninstrument_anthropic",
    "uninstrument_milvus",
    "uninstrument_openai",
    "uninstrument_sqlalchemy",
    "vector_search",
    "watch_event_loop",
    "wrap_context",
]

# name -> (module, the third-party module it needs, the extra that installs it)
_LAZY: dict[str, tuple[str, str | None, str | None]] = {
    "RedisCache": ("rag_instrument.cache", "redis", "redis"),
    "instrument_openai": ("rag_instrument.integrations.openai", "openai", "openai"),
    "uninstrument_openai": ("rag_instrument.integrations.openai", "openai", "openai"),
    "instrument_anthropic": ("rag_instrument.integrations.anthropic", "anthropic", "anthropic"),
    "uninstrument_anthropic": ("rag_instrument.integrations.anthropic", "anthropic", "anthropic"),
    "instrument_sqlalchemy": ("rag_instrument.db", "sqlalchemy", "sqlalchemy"),
    "db_session": ("rag_instrument.db", "sqlalchemy", "sqlalchemy"),
    "db_scope": ("rag_instrument.db", "sqlalchemy", "sqlalchemy"),
    "uninstrument_sqlalchemy": ("rag_instrument.db", "sqlalchemy", "sqlalchemy"),
    "instrument_milvus": ("rag_instrument.integrations.milvus", "pymilvus", "milvus"),
    "uninstrument_milvus": ("rag_instrument.integrations.milvus", "pymilvus", "milvus"),
    "EmbeddingBatchError": ("rag_instrument.vector", None, None),
    "SweepRow": ("rag_instrument.vector", None, None),
    "aembed_in_batches": ("rag_instrument.vector", None, None),
    "embed_in_batches": ("rag_instrument.vector", None, None),
    "format_table": ("rag_instrument.vector", None, None),
    "sweep": ("rag_instrument.vector", None, None),
    "vector_search": ("rag_instrument.vector", None, None),
    # Standard library only, but cProfile/pstats/tracemalloc stay off the import path.
    "profile": ("rag_instrument.profiling", None, None),
    "Profile": ("rag_instrument.profiling", None, None),
    "watch_event_loop": ("rag_instrument.eventloop", None, None),
    "EventLoopWatch": ("rag_instrument.eventloop", None, None),
    "RequestMiddleware": ("rag_instrument.web", None, None),
    "inject_headers": ("rag_instrument.propagation", None, None),
    "extract_context": ("rag_instrument.propagation", None, None),
}


def __getattr__(name: str) -> _typing.Any:
    """Resolve names that live in heavier or extra-backed modules on first use."""
    try:
        module_name, needs, extra = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'rag_instrument' has no attribute {name!r}") from None
    if needs is not None and _importlib_util.find_spec(needs) is None:
        raise ImportError(
            f"rag_instrument.{name} needs {needs!r}: pip install 'rag_instrument[{extra}]'"
        )
    value = getattr(_importlib.import_module(module_name), name)
    globals()[name] = value  # resolve once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
