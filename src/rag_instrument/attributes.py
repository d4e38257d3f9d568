"""Every span attribute, log key and metric name that rag_instrument emits.

Keeping the names in one module lets tests, docs and integrations share them, and makes a
rename a one-line change. OpenTelemetry semantic-convention names are used where one exists
(GenAI, database), OpenInference's span kind so that Phoenix-style backends render the
pipeline natively, and a ``rag.`` prefix for everything that is ours.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "BREAKDOWN_CACHE",
    "BREAKDOWN_DB",
    "BREAKDOWN_EMBEDDING",
    "BREAKDOWN_KINDS",
    "BREAKDOWN_LLM",
    "BREAKDOWN_VECTOR",
    "ERROR_TYPE",
    "LOGGER_NAME",
    "METRIC_BUDGET_EXCEEDED",
    "METRIC_SPANS_DROPPED",
    "METRIC_STAGE_DURATION",
    "OPENINFERENCE_SPAN_KIND",
    "RAG_BREAKDOWN_PREFIX",
    "RAG_BUDGET_EXCEEDED",
    "RAG_BUDGET_MS",
    "RAG_CANCELLED",
    "RAG_STAGE",
    "RAG_STREAM_COMPLETED",
    "RAG_STREAM_ITEMS",
    "SpanKind",
]

LOGGER_NAME: Final = "rag_instrument"
"""The ``logger`` field of every line the library itself writes."""

# --- spans -------------------------------------------------------------------------------
RAG_STAGE: Final = "rag.stage"
"""The pipeline stage a span or metric point belongs to (``retrieval``, ``generation`` ...)."""
RAG_CANCELLED: Final = "rag.cancelled"
"""``True`` when the operation ended by cancellation, a timeout or an interrupt."""
RAG_STREAM_ITEMS: Final = "rag.stream.items"
"""How many items a wrapped generator yielded before its span ended."""
RAG_STREAM_COMPLETED: Final = "rag.stream.completed"
"""``True`` when a wrapped generator was exhausted, ``False`` when closed or dropped early."""
RAG_BUDGET_EXCEEDED: Final = "rag.budget.exceeded"
"""``True`` on a stage span that took longer than its configured budget."""
RAG_BUDGET_MS: Final = "rag.budget.ms"
"""The budget (milliseconds) that applied to a stage span."""
RAG_BREAKDOWN_PREFIX: Final = "rag.breakdown."
"""Prefix of the breakdown attributes on stage spans, e.g. ``rag.breakdown.db.ms``."""
ERROR_TYPE: Final = "error.type"
"""OpenTelemetry's general attribute for the class of an error."""
OPENINFERENCE_SPAN_KIND: Final = "openinference.span.kind"
"""OpenInference's span kind: ``CHAIN``, ``RETRIEVER``, ``RERANKER``, ``EMBEDDING``, ``LLM``."""


class SpanKind:
    """OpenInference span kinds used by rag_instrument."""

    CHAIN: Final = "CHAIN"
    RETRIEVER: Final = "RETRIEVER"
    RERANKER: Final = "RERANKER"
    EMBEDDING: Final = "EMBEDDING"
    LLM: Final = "LLM"


# --- breakdown kinds ---------------------------------------------------------------------
BREAKDOWN_DB: Final = "db"
BREAKDOWN_LLM: Final = "llm"
BREAKDOWN_VECTOR: Final = "vector"
BREAKDOWN_EMBEDDING: Final = "embedding"
BREAKDOWN_CACHE: Final = "cache"
BREAKDOWN_KINDS: Final = (BREAKDOWN_DB, BREAKDOWN_LLM, BREAKDOWN_VECTOR, BREAKDOWN_EMBEDDING)
"""The timed kinds of work a stage's ``breakdown`` reports (``cache`` counts hits and misses)."""

# --- metrics -----------------------------------------------------------------------------
METRIC_STAGE_DURATION: Final = "rag.stage.duration"
"""Histogram, seconds, attribute ``rag.stage``: the duration of every stage."""
METRIC_BUDGET_EXCEEDED: Final = "rag.budget.exceeded"
"""Counter, attribute ``rag.stage``: stages that ran over their budget."""
METRIC_SPANS_DROPPED: Final = "rag.spans.dropped"
"""Counter: finished spans that could not be queued for export (queue full) or failed export."""
