"""Every span attribute, log key and metric name that rag_instrument emits.

Keeping the names in one module lets tests, docs and integrations share them, and makes a
rename a one-line change. OpenTelemetry semantic-convention names are used where one exists
(GenAI, database), OpenInference's span kind so that Phoenix-style backends render the
pipeline natively, and a ``rag.`` prefix for everything that is ours.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "BREAKDOWN_BLOCKED",
    "BREAKDOWN_CACHE",
    "BREAKDOWN_DB",
    "BREAKDOWN_EMBEDDING",
    "BREAKDOWN_KINDS",
    "BREAKDOWN_LLM",
    "BREAKDOWN_VECTOR",
    "CLIENT_ADDRESS",
    "DB_COLLECTION_NAME",
    "DB_CONNECTION_POOL_NAME",
    "DB_CONNECTION_STATE",
    "DB_NAMESPACE",
    "DB_OPERATION_BATCH_SIZE",
    "DB_OPERATION_NAME",
    "DB_QUERY_PARAMETER_PREFIX",
    "DB_QUERY_TEXT",
    "DB_RESPONSE_STATUS_CODE",
    "DB_SESSION_SPAN",
    "DB_SYSTEM_NAME",
    "ERROR_TYPE",
    "EVENT_LLM_CANCELLED",
    "EVENT_LLM_COMPLETED",
    "EVENT_LLM_FAILED",
    "EVENT_REQUEST_COMPLETED",
    "EVENT_RETRY",
    "GEN_AI_INPUT_MESSAGES",
    "GEN_AI_OPERATION_NAME",
    "GEN_AI_OUTPUT_MESSAGES",
    "GEN_AI_PROVIDER_NAME",
    "GEN_AI_REQUEST_MODEL",
    "GEN_AI_RESPONSE_FINISH_REASONS",
    "GEN_AI_RESPONSE_MODEL",
    "GEN_AI_TOKEN_TYPE",
    "GEN_AI_USAGE_INPUT_TOKENS",
    "GEN_AI_USAGE_OUTPUT_TOKENS",
    "HISTOGRAM_BOUNDARIES",
    "HTTP_REQUEST_METHOD",
    "HTTP_REQUEST_METHOD_ORIGINAL",
    "HTTP_RESPONSE_STATUS_CODE",
    "HTTP_ROUTE",
    "LOGGER_NAME",
    "LOG_RETRYING",
    "METRIC_BUDGET_EXCEEDED",
    "METRIC_CACHE_COALESCED",
    "METRIC_CACHE_HITS",
    "METRIC_CACHE_MISSES",
    "METRIC_CACHE_TOKENS_SAVED",
    "METRIC_DB_CONNECTION_COUNT",
    "METRIC_DB_CONNECTION_MAX",
    "METRIC_DB_CONNECTION_PENDING",
    "METRIC_DB_CONNECTION_TIMEOUTS",
    "METRIC_DB_CONNECTION_WAIT_TIME",
    "METRIC_DB_OPERATION_DURATION",
    "METRIC_EVENT_LOOP_BLOCKED",
    "METRIC_HTTP_SERVER_REQUEST_DURATION",
    "METRIC_LLM_RETRIES",
    "METRIC_OPERATION_DURATION",
    "METRIC_RETRY_COUNT",
    "METRIC_SPANS_DROPPED",
    "METRIC_STAGE_DURATION",
    "METRIC_TIME_TO_FIRST_CHUNK",
    "METRIC_TOKEN_USAGE",
    "NETWORK_PROTOCOL_VERSION",
    "OPENINFERENCE_SPAN_KIND",
    "RAG_BREAKDOWN_PREFIX",
    "RAG_BUDGET_EXCEEDED",
    "RAG_BUDGET_MS",
    "RAG_CACHE_HIT",
    "RAG_CANCELLED",
    "RAG_CPU_MS",
    "RAG_DB_SESSION_OUTCOME",
    "RAG_DB_STATEMENT_COUNT",
    "RAG_EMBEDDING_BATCH_COUNT",
    "RAG_EMBEDDING_BATCH_INDEX",
    "RAG_EMBEDDING_BATCH_SIZE",
    "RAG_EMBEDDING_DIMENSIONS",
    "RAG_LLM_TTFT_MS",
    "RAG_REQUEST_ID_REPLACED",
    "RAG_RETRY_ATTEMPTS",
    "RAG_RETRY_BACKOFF_MS",
    "RAG_STAGE",
    "RAG_STREAM_CHUNKS",
    "RAG_STREAM_COMPLETED",
    "RAG_STREAM_ITEMS",
    "RAG_VECTOR_DIMENSIONS",
    "RAG_VECTOR_FIELD",
    "RAG_VECTOR_FILTER",
    "RAG_VECTOR_INDEX_NAME",
    "RAG_VECTOR_INDEX_TYPE",
    "RAG_VECTOR_METRIC",
    "RAG_VECTOR_PARAMS_PREFIX",
    "RAG_VECTOR_QUERY_COUNT",
    "RAG_VECTOR_RESULT_COUNT",
    "RAG_VECTOR_ROW_COUNT",
    "RAG_VECTOR_TOP_K",
    "SERVER_ADDRESS",
    "SERVER_PORT",
    "URL_PATH",
    "URL_QUERY",
    "URL_SCHEME",
    "USER_AGENT_ORIGINAL",
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
RAG_CPU_MS: Final = "rag.cpu_ms"
"""CPU milliseconds the stage's thread used during it (``resource_metrics=True``)."""
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
BREAKDOWN_BLOCKED: Final = "blocked"
"""Time the stage held its event loop past ``event_loop_threshold_ms`` (``count``, ``ms``)."""
BREAKDOWN_KINDS: Final = (BREAKDOWN_DB, BREAKDOWN_LLM, BREAKDOWN_VECTOR, BREAKDOWN_EMBEDDING)
"""The timed kinds of work a stage's ``breakdown`` reports (``cache`` counts hits and misses)."""

# --- metrics -----------------------------------------------------------------------------
METRIC_STAGE_DURATION: Final = "rag.stage.duration"
"""Histogram, seconds, attribute ``rag.stage``: the duration of every stage."""
METRIC_BUDGET_EXCEEDED: Final = "rag.budget.exceeded"
"""Counter, attribute ``rag.stage``: stages that ran over their budget."""
METRIC_EVENT_LOOP_BLOCKED: Final = "rag.event_loop.blocked"
"""Counter, attribute ``rag.stage`` when known: event-loop blocks past the watch's threshold."""
METRIC_SPANS_DROPPED: Final = "rag.spans.dropped"
"""Counter: finished spans that could not be queued for export (queue full) or failed export."""

# --- LLM calls (OpenTelemetry GenAI semantic conventions), retries, caches -----------------
GEN_AI_OPERATION_NAME: Final = "gen_ai.operation.name"
GEN_AI_PROVIDER_NAME: Final = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL: Final = "gen_ai.request.model"
GEN_AI_RESPONSE_MODEL: Final = "gen_ai.response.model"
GEN_AI_USAGE_INPUT_TOKENS: Final = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS: Final = "gen_ai.usage.output_tokens"
GEN_AI_RESPONSE_FINISH_REASONS: Final = "gen_ai.response.finish_reasons"
GEN_AI_TOKEN_TYPE: Final = "gen_ai.token.type"  # noqa: S105 - a name, not a secret
GEN_AI_INPUT_MESSAGES: Final = "gen_ai.input.messages"
GEN_AI_OUTPUT_MESSAGES: Final = "gen_ai.output.messages"
RAG_RETRY_ATTEMPTS: Final = "rag.retry.attempts"
"""Attempts made by a retried call (1 when the first succeeded)."""
RAG_RETRY_BACKOFF_MS: Final = "rag.retry.backoff_ms"
"""Milliseconds slept between attempts (so backoff is not mistaken for latency)."""
RAG_CACHE_HIT: Final = "rag.cache.hit"
"""``True`` when a call was answered from the response cache."""
RAG_LLM_TTFT_MS: Final = "rag.llm.time_to_first_token_ms"
"""Milliseconds from the request to the first streamed chunk."""
RAG_STREAM_CHUNKS: Final = "rag.llm.stream.chunks"
"""How many chunks a streamed LLM response had."""
METRIC_OPERATION_DURATION: Final = "gen_ai.client.operation.duration"
METRIC_TOKEN_USAGE: Final = "gen_ai.client.token.usage"  # noqa: S105 - a name, not a secret
METRIC_TIME_TO_FIRST_CHUNK: Final = "gen_ai.client.operation.time_to_first_chunk"
EVENT_LLM_COMPLETED: Final = "llm call completed"
EVENT_LLM_FAILED: Final = "llm call failed"
EVENT_LLM_CANCELLED: Final = "llm call cancelled"
METRIC_RETRY_COUNT: Final = "rag.retry.count"
METRIC_LLM_RETRIES: Final = "rag.llm.retries"
"""Counter: retried model requests (GenAI attributes, ``error.type``, HTTP status if any)."""
EVENT_RETRY: Final = "retry"
LOG_RETRYING: Final = "retrying"
METRIC_CACHE_HITS: Final = "rag.cache.hits"
METRIC_CACHE_MISSES: Final = "rag.cache.misses"
METRIC_CACHE_COALESCED: Final = "rag.cache.coalesced"
METRIC_CACHE_TOKENS_SAVED: Final = "rag.cache.tokens_saved"

# --- databases (OpenTelemetry database semantic conventions), vector searches -------------
DB_COLLECTION_NAME: Final = "db.collection.name"
DB_CONNECTION_POOL_NAME: Final = "db.client.connection.pool.name"
DB_CONNECTION_STATE: Final = "db.client.connection.state"
DB_NAMESPACE: Final = "db.namespace"
DB_OPERATION_BATCH_SIZE: Final = "db.operation.batch.size"
DB_OPERATION_NAME: Final = "db.operation.name"
DB_QUERY_PARAMETER_PREFIX: Final = "db.query.parameter."
DB_QUERY_TEXT: Final = "db.query.text"
DB_RESPONSE_STATUS_CODE: Final = "db.response.status_code"
DB_SESSION_SPAN: Final = "db.session"
DB_SYSTEM_NAME: Final = "db.system.name"
METRIC_DB_CONNECTION_COUNT: Final = "db.client.connection.count"
METRIC_DB_CONNECTION_MAX: Final = "db.client.connection.max"
METRIC_DB_CONNECTION_PENDING: Final = "db.client.connection.pending_requests"
METRIC_DB_CONNECTION_TIMEOUTS: Final = "db.client.connection.timeouts"
METRIC_DB_CONNECTION_WAIT_TIME: Final = "db.client.connection.wait_time"
METRIC_DB_OPERATION_DURATION: Final = "db.client.operation.duration"
RAG_DB_SESSION_OUTCOME: Final = "rag.db.session.outcome"
RAG_DB_STATEMENT_COUNT: Final = "rag.db.statement_count"
RAG_VECTOR_INDEX_TYPE: Final = "rag.vector.index_type"
RAG_VECTOR_METRIC: Final = "rag.vector.metric"
RAG_VECTOR_PARAMS_PREFIX: Final = "rag.vector.params."
RAG_VECTOR_RESULT_COUNT: Final = "rag.vector.result_count"
RAG_VECTOR_TOP_K: Final = "rag.vector.top_k"
RAG_VECTOR_QUERY_COUNT: Final = "rag.vector.query_count"
"""How many query vectors one search call carried (a batch search has more than one)."""
RAG_VECTOR_DIMENSIONS: Final = "rag.vector.dimensions"
"""The dimension of the query vectors (never the vectors themselves)."""
RAG_VECTOR_FIELD: Final = "rag.vector.field"
"""The vector field searched (Milvus ``anns_field``)."""
RAG_VECTOR_FILTER: Final = "rag.vector.filter"
"""The shape of a search's filter expression, literal values replaced by ``?``."""
RAG_VECTOR_INDEX_NAME: Final = "rag.vector.index_name"
"""The index that served a search, when the plan names it (pgvector ``EXPLAIN``)."""
RAG_VECTOR_ROW_COUNT: Final = "rag.vector.row_count"
"""Rows written or deleted by an insert, upsert or delete."""
RAG_EMBEDDING_BATCH_INDEX: Final = "rag.embedding.batch.index"
"""The 0-based position of a batch among the batches of one ``embed_in_batches`` call."""
RAG_EMBEDDING_BATCH_SIZE: Final = "rag.embedding.batch.size"
"""How many inputs one embedding batch carried."""
RAG_EMBEDDING_BATCH_COUNT: Final = "rag.embedding.batch.count"
"""How many batches the ``embed_in_batches`` call was split into."""
RAG_EMBEDDING_DIMENSIONS: Final = "rag.embedding.dimensions"
"""The length of the embeddings a batch returned, when visible."""
SERVER_ADDRESS: Final = "server.address"
SERVER_PORT: Final = "server.port"

# --- web requests (OpenTelemetry HTTP semantic conventions) ---------------------------------
HTTP_REQUEST_METHOD: Final = "http.request.method"
HTTP_REQUEST_METHOD_ORIGINAL: Final = "http.request.method_original"
HTTP_RESPONSE_STATUS_CODE: Final = "http.response.status_code"
HTTP_ROUTE: Final = "http.route"
URL_PATH: Final = "url.path"
URL_QUERY: Final = "url.query"
URL_SCHEME: Final = "url.scheme"
CLIENT_ADDRESS: Final = "client.address"
USER_AGENT_ORIGINAL: Final = "user_agent.original"
NETWORK_PROTOCOL_VERSION: Final = "network.protocol.version"
RAG_REQUEST_ID_REPLACED: Final = "rag.request_id.replaced"
"""``True`` when the incoming ``X-Request-ID`` was invalid and a new id was generated."""
EVENT_REQUEST_COMPLETED: Final = "request completed"
"""The one line per request: ``method``, ``route``, ``status``, ``execution_time_ms``."""
METRIC_HTTP_SERVER_REQUEST_DURATION: Final = "http.server.request.duration"

# --- histogram bucket boundaries ------------------------------------------------------------
# The semantic conventions' advice for each histogram (``explicit_bucket_boundaries_advisory``
# in the metrics API), which readers with the default aggregation follow: the SDK's default
# boundaries (0, 5, 10, ... 10000) suit milliseconds, and would put every duration in seconds
# under 5 s in one bucket.
_GENAI_SECONDS: Final = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
_DB_SECONDS: Final = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)
HISTOGRAM_BOUNDARIES: Final[dict[str, tuple[float, ...]]] = {
    METRIC_OPERATION_DURATION: _GENAI_SECONDS,
    METRIC_TIME_TO_FIRST_CHUNK: _GENAI_SECONDS,
    METRIC_TOKEN_USAGE: (
        1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216,
        67108864,
    ),
    METRIC_DB_OPERATION_DURATION: _DB_SECONDS,
    METRIC_DB_CONNECTION_WAIT_TIME: _DB_SECONDS,
    METRIC_HTTP_SERVER_REQUEST_DURATION: (
        0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    ),
    # ours: a stage lasts from milliseconds (a cache hit) to a minute (a long generation)
    METRIC_STAGE_DURATION: (
        0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0,
        60.0,
    ),
}  # fmt: skip
"""Bucket boundaries per histogram name (seconds, or tokens for the token usage)."""
