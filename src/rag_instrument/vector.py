"""Vector searches, embeddings in batches, and index-tuning sweeps with recall.

::

    @ri.vector_search(db_system="milvus", index_type="IVF_FLAT", metric="L2",
                      params={"nprobe": 16})
    def search(vectors: list[list[float]], limit: int = 10) -> list[list[dict]]: ...

    embeddings = ri.embed_in_batches(texts, model.embed, batch_size=64)

    rows = ri.sweep(search_with, "nprobe", [1, 4, 16, 64], queries, ground_truth=exact, k=10)
    print(ri.format_table(rows))

A ``@vector_search`` call is one ``RETRIEVER`` span and one ``vector`` entry in the enclosing
stage's breakdown; an embedding batch is one ``EMBEDDING`` span and one ``embedding`` entry.
Instrumented clients called inside them (``instrument_milvus``, ``instrument_openai``) add
their own spans underneath but are not counted twice. Query vectors, documents and
embeddings never go into spans or logs: only counts and dimensions.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import numbers
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Final, ParamSpec, TypeVar

from rag_instrument import _operation
from rag_instrument import attributes as attr
from rag_instrument._errors import remember_exception
from rag_instrument._genai import error_summary
from rag_instrument._runtime import get_runtime
from rag_instrument._sanitize import to_attribute_value
from rag_instrument._sweep import SweepRow, format_table, sweep
from rag_instrument._utils import internal_error

__all__ = [
    "EmbeddingBatchError",
    "SweepRow",
    "aembed_in_batches",
    "embed_in_batches",
    "format_table",
    "sweep",
    "vector_search",
]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
V = TypeVar("V")

_TOP_K_NAMES: Final = ("limit", "top_k")
#: Argument names that hold the query vector(s) (or query texts) of a search, in priority order.
_QUERY_NAMES: Final = (
    "data",
    "vectors",
    "query_vectors",
    "queries",
    "embeddings",
    "query_vector",
    "vector",
    "embedding",
    "query",
)


# --- shapes: how many queries, hits and dimensions, without reading the values -----------


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_vector(value: Any) -> bool:
    """A single vector: a 1-D array, or a non-empty list / tuple of numbers."""
    ndim = getattr(value, "ndim", None)
    if isinstance(ndim, int):
        return ndim == 1
    return isinstance(value, list | tuple) and bool(value) and _is_number(value[0])


def query_shape(value: Any) -> tuple[int | None, int | None, bool]:
    """``(query_count, dimensions, batched)`` of a search's query argument.

    A 2-D array or a list of vectors is a batch; one vector, or one query text, is a single
    query; a list of texts is a batch of text queries (no dimensions).
    """
    if type(value) is list:  # the common case first: no attribute look-ups
        if not value:
            return 0, None, True
        first = value[0]
        if type(first) is float or type(first) is int:
            return 1, len(value), False
        if type(first) is list and first and type(first[0]) is float:
            return len(value), len(first), True
    ndim = getattr(value, "ndim", None)
    shape = getattr(value, "shape", None)
    if isinstance(ndim, int) and isinstance(shape, tuple):
        if ndim == 1:
            return 1, int(shape[0]), False
        if ndim == 2:
            return int(shape[0]), int(shape[1]), True
        return None, None, False
    if isinstance(value, str | bytes):
        return 1, None, False
    if isinstance(value, list | tuple):
        if not value:
            return 0, None, True
        first = value[0]
        if _is_number(first):
            return 1, len(value), False
        if _is_vector(first):
            return len(value), len(first), True
        if isinstance(first, str | bytes | dict):
            return len(value), None, True
    return None, None, False


def result_count(result: Any, batched: bool | None) -> int | None:
    """Hits in a search's return value: a list of hits, or a list of lists for a batch."""
    if result is None or isinstance(result, str | bytes | Mapping):
        return None
    try:
        size = len(result)
    except TypeError:
        return None
    if batched is False or size == 0:
        return size
    first = result[0]
    if batched or isinstance(first, list):
        # A batch: one list of hits per query (pymilvus' SearchResult is such a list).
        total = 0
        for hits in result:
            try:
                total += len(hits)
            except TypeError:
                return size
        return total
    return size


# --- vector_search --------------------------------------------------------------------------


class _SearchSpec:
    """What a ``@vector_search`` function's spans share, computed at decoration time."""

    __slots__ = ("attributes", "name", "query_arg", "top_k_arg")

    def __init__(self, fn: Callable[..., Any], attributes: dict[str, Any]) -> None:
        self.name = str(getattr(fn, "__qualname__", None) or type(fn).__qualname__)
        self.attributes = attributes
        self.top_k_arg = _locate(fn, _TOP_K_NAMES)
        self.query_arg = _locate(fn, _QUERY_NAMES)

    def call_attributes(
        self, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> tuple[dict[str, Any], bool | None]:
        attrs = dict(self.attributes)
        batched: bool | None = None
        top_k = _argument(self.top_k_arg, args, kwargs)
        if not isinstance(top_k, bool) and isinstance(top_k, numbers.Integral):
            attrs[attr.RAG_VECTOR_TOP_K] = int(top_k)  # numpy's integers too
        if self.query_arg is not None:
            count, dimensions, batched = query_shape(_argument(self.query_arg, args, kwargs))
            if count is not None:
                attrs[attr.RAG_VECTOR_QUERY_COUNT] = count
            if dimensions is not None:
                attrs[attr.RAG_VECTOR_DIMENSIONS] = dimensions
        return attrs, batched


_Located = tuple[str, int | None, Any]  # (name, position or None, default)


def _locate(fn: Callable[..., Any], names: Sequence[str]) -> _Located | None:
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    for wanted in names:
        for position, parameter in enumerate(parameters):
            if parameter.name != wanted:
                continue
            if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                continue
            default = None if parameter.default is parameter.empty else parameter.default
            positional = parameter.kind in (
                parameter.POSITIONAL_ONLY,
                parameter.POSITIONAL_OR_KEYWORD,
            )
            return wanted, position if positional else None, default
    return None


def _argument(where: _Located | None, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    if where is None:
        return None
    name, position, default = where
    if name in kwargs:
        return kwargs[name]
    if position is not None and position < len(args):
        return args[position]
    return default


def _search_span(
    spec: _SearchSpec, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> tuple[_operation.Operation | None, bool | None]:
    rt = get_runtime()
    try:
        attrs, batched = spec.call_attributes(args, kwargs)
    except Exception as exc:
        internal_error("vector_search attributes", exc)
        attrs, batched = dict(spec.attributes), None
    return _operation.start(rt, spec.name, attrs, attr.BREAKDOWN_VECTOR), batched


def _end_search(op: _operation.Operation, result: Any, batched: bool | None) -> None:
    try:
        if op.span.is_recording():
            count = result_count(result, batched)
            if count is not None:
                op.span.set_attribute(attr.RAG_VECTOR_RESULT_COUNT, count)
    except Exception as exc:
        internal_error("vector_search result count", exc)
    _operation.finish(op, None)


def vector_search(
    *,
    db_system: str,
    index_type: str | None = None,
    metric: str | None = None,
    params: Mapping[str, Any] | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Trace a vector search function (``def`` or ``async def``) as a ``RETRIEVER`` span.

    The span has ``db.system.name``, ``rag.vector.index_type``, ``rag.vector.metric`` and
    ``rag.vector.params.<name>`` from here; ``rag.vector.top_k`` from the call's ``limit`` or
    ``top_k`` argument; ``rag.vector.query_count`` and ``rag.vector.dimensions`` from its
    query argument (``data``, ``vectors``, ``queries``, ``embeddings``, ``query_vector``,
    ``vector``, ``embedding`` or ``query``: a list of vectors or a 2-D array is a batch);
    and ``rag.vector.result_count`` from the return value (a list of hits, or one list of
    hits per query for a batch). The call counts as ``vector`` in the enclosing stage's
    breakdown. Exceptions are recorded and re-raised unchanged.

    Args:
        db_system: the vector store (``"milvus"``, ``"postgresql"``, ``"qdrant"``, ...).
        index_type: the index serving the search (``"HNSW"``, ``"IVF_FLAT"``, ...).
        metric: the distance metric (``"L2"``, ``"COSINE"``, ``"IP"``).
        params: search parameters (``{"nprobe": 16}``, ``{"ef": 64}``); a ``None`` value
            is left out, a dict or a mixed list recorded as its JSON text.

    Raises:
        ValueError: ``db_system`` is empty.
        TypeError: a decorated object is a generator function or not callable.
    """
    if not isinstance(db_system, str) or not db_system.strip():
        raise ValueError(f"vector_search: db_system must be a non-empty string, got {db_system!r}")
    attrs: dict[str, Any] = {
        attr.DB_SYSTEM_NAME: db_system.strip(),
        attr.DB_OPERATION_NAME: "search",
        attr.OPENINFERENCE_SPAN_KIND: attr.SpanKind.RETRIEVER,
    }
    for key, value in (("index_type", index_type), ("metric", metric)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"vector_search: {key} must be a string, got {value!r}")
    if index_type:
        attrs[attr.RAG_VECTOR_INDEX_TYPE] = index_type
    if metric:
        attrs[attr.RAG_VECTOR_METRIC] = metric
    if params is not None:
        if not isinstance(params, Mapping):
            raise ValueError(f"vector_search: params must be a mapping, got {params!r:.80}")
        sanitizer = get_runtime().sanitizer
        for name, value in params.items():
            # As any attribute: None is left out, a dict or a mixed list becomes its JSON
            # text ({"filters": {...}}), identically on every OpenTelemetry version.
            converted = to_attribute_value(value, sanitizer)
            if converted is not None:
                attrs[f"{attr.RAG_VECTOR_PARAMS_PREFIX}{name}"] = converted

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        if not callable(fn):
            raise TypeError(f"vector_search: cannot decorate {fn!r:.80}: it is not callable")
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            raise TypeError(
                f"vector_search decorates functions that return their hits; "
                f"{getattr(fn, '__qualname__', fn)!r} is a generator function"
            )
        spec = _SearchSpec(fn, attrs)
        if inspect.iscoroutinefunction(fn):
            wrapper: Callable[..., Any] = _wrap_async(fn, spec)
        else:
            wrapper = _wrap_sync(fn, spec)
        functools.update_wrapper(wrapper, fn)
        return wrapper

    return decorate


def _wrap_sync(fn: Callable[P, R], spec: _SearchSpec) -> Callable[P, R]:
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        if not get_runtime().enabled:
            return fn(*args, **kwargs)
        op, batched = _search_span(spec, args, kwargs)
        if op is None:
            return fn(*args, **kwargs)
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            _operation.finish(op, exc)
            raise
        _end_search(op, result, batched)
        return result

    return wrapper


def _wrap_async(fn: Callable[P, Any], spec: _SearchSpec) -> Callable[P, Any]:
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
        if not get_runtime().enabled:
            return await fn(*args, **kwargs)
        op, batched = _search_span(spec, args, kwargs)
        if op is None:
            return await fn(*args, **kwargs)
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:
            _operation.finish(op, exc)
            raise
        _end_search(op, result, batched)
        return result

    return wrapper


# --- embeddings in batches ------------------------------------------------------------------


class EmbeddingBatchError(RuntimeError):
    """A batch of :func:`embed_in_batches` failed; the original exception is ``__cause__``.

    Attributes:
        batch_index: the failed batch's 0-based position.
        batch_count: how many batches the call had.
        embedded: how many texts had been embedded (by batches that completed) by then.
        total: how many texts the call was given.
    """

    def __init__(self, batch_index: int, batch_count: int, embedded: int, total: int) -> None:
        self.batch_index = batch_index
        self.batch_count = batch_count
        self.embedded = embedded
        self.total = total
        super().__init__(
            f"embedding batch {batch_index} (of {batch_count}, 0-based) failed; "
            f"{embedded} of {total} texts were embedded"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.batch_index, self.batch_count, self.embedded, self.total))


def _check_positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _dimensions(embeddings: Any) -> int | None:
    try:
        shape = getattr(embeddings, "shape", None)
        if isinstance(shape, tuple) and len(shape) == 2:
            return int(shape[1])
        first = embeddings[0]
        inner = getattr(first, "embedding", first)  # an SDK object carrying .embedding
        if _is_vector(inner):
            return len(inner)
    except Exception:
        return None
    return None


class _Batches:
    """The batches of one call and the attributes their spans share."""

    def __init__(self, texts: Iterable[Any], batch_size: Any) -> None:
        self.batch_size = _check_positive("batch_size", batch_size)
        self.texts = list(texts)
        size = self.batch_size
        self.batches = [self.texts[i : i + size] for i in range(0, len(self.texts), size)]
        self.results: list[Sequence[Any] | None] = [None] * len(self.batches)

    def start(self, index: int) -> _operation.Operation | None:
        rt = get_runtime()
        if not rt.enabled:
            return None
        attrs = {
            attr.OPENINFERENCE_SPAN_KIND: attr.SpanKind.EMBEDDING,
            attr.RAG_EMBEDDING_BATCH_INDEX: index,
            attr.RAG_EMBEDDING_BATCH_SIZE: len(self.batches[index]),
            attr.RAG_EMBEDDING_BATCH_COUNT: len(self.batches),
        }
        return _operation.start(rt, "embedding batch", attrs, attr.BREAKDOWN_EMBEDDING)

    def finish(self, index: int, op: _operation.Operation | None, embeddings: Any) -> None:
        """Check and keep batch ``index``'s embeddings; end its span."""
        try:
            count: int | None = len(embeddings)
        except TypeError:
            count = None
        expected = len(self.batches[index])
        if count != expected:
            error = ValueError(
                f"embed_batch returned {count if count is not None else 'no sequence of'} "
                f"embeddings for batch {index} of {expected} texts"
            )
            if op is not None:
                _operation.finish(op, error)
            raise error
        if op is not None:
            try:
                if op.span.is_recording():
                    dims = _dimensions(embeddings)
                    if dims is not None:
                        op.span.set_attribute(attr.RAG_EMBEDDING_DIMENSIONS, dims)
            except Exception as exc:
                internal_error("embedding batch dimensions", exc)
            _operation.finish(op, None)
        self.results[index] = embeddings

    def failure(self, index: int) -> EmbeddingBatchError:
        embedded = sum(
            len(batch)
            for i, (batch, result) in enumerate(zip(self.batches, self.results, strict=True))
            if result is not None and i != index
        )
        return EmbeddingBatchError(index, len(self.batches), embedded, len(self.texts))

    def collect(self) -> list[Any]:
        out: list[Any] = []
        for result in self.results:
            assert result is not None
            out.extend(result)
        return out


def _batch_failed(op: _operation.Operation | None, exc: BaseException) -> None:
    """End a failed batch's span; without content capture, the error's text is not shown.

    Not here, nor on the stages it passes through: it may quote the texts being embedded,
    as an LLM error may quote the prompt. Its type, HTTP status and error code are shown.
    """
    if op is None:
        return
    try:
        if isinstance(exc, Exception) and not op.rt.settings.capture_content:
            remember_exception(exc, summary=error_summary(exc))
    except Exception as error:
        internal_error("hiding an embedding error's text", error)
    _operation.finish(op, exc)


def embed_in_batches(
    texts: Iterable[T],
    embed_batch: Callable[[list[T]], Sequence[V]],
    *,
    batch_size: int = 32,
) -> list[V]:
    """Embed ``texts`` with ``embed_batch``, ``batch_size`` at a time; results in input order.

    Each batch is one ``EMBEDDING`` span (``rag.embedding.batch.index``, ``.batch.size``,
    ``.batch.count`` and ``rag.embedding.dimensions`` when the embeddings show it) and one
    ``embedding`` entry in the enclosing stage's breakdown.

    Args:
        texts: what to embed (any iterable; read once).
        embed_batch: embeds a list of texts, returning one embedding per text, in order.
        batch_size: the most texts per call.

    Returns:
        Every embedding, in the order of ``texts``.

    Raises:
        ValueError: ``batch_size`` is not a positive integer, or ``embed_batch`` returned
            the wrong number of embeddings for a batch.
        EmbeddingBatchError: ``embed_batch`` raised; which batch, how many texts were
            embedded before it, and the original exception as ``__cause__``.
    """
    batches = _Batches(texts, batch_size)
    for index, batch in enumerate(batches.batches):
        op = batches.start(index)
        try:
            embeddings = embed_batch(batch)
        except BaseException as exc:
            _batch_failed(op, exc)
            if isinstance(exc, Exception):
                raise batches.failure(index) from exc
            raise
        batches.finish(index, op, embeddings)
    return batches.collect()


async def aembed_in_batches(
    texts: Iterable[T],
    embed_batch: Callable[[list[T]], Awaitable[Sequence[V]]],
    *,
    batch_size: int = 32,
    concurrency: int = 1,
) -> list[V]:
    """The async twin of :func:`embed_in_batches`, with up to ``concurrency`` batches in flight.

    Results are in input order whatever order the batches finish in. When a batch fails,
    the batches still running are cancelled and :class:`EmbeddingBatchError` is raised
    (``embedded`` counts the texts of batches that had completed).

    Args:
        texts: what to embed (any iterable; read once).
        embed_batch: an ``async`` function embedding a list of texts, in order.
        batch_size: the most texts per call.
        concurrency: the most calls in flight at once.

    Raises:
        ValueError: ``batch_size`` or ``concurrency`` is not a positive integer, or
            ``embed_batch`` returned the wrong number of embeddings for a batch.
        EmbeddingBatchError: ``embed_batch`` raised (the original is ``__cause__``).
    """
    batches = _Batches(texts, batch_size)
    workers = min(_check_positive("concurrency", concurrency), max(len(batches.batches), 1))
    pending = iter(range(len(batches.batches)))
    failed: list[tuple[int, Exception]] = []

    async def run(index: int) -> None:
        op = batches.start(index)
        try:
            embeddings = await embed_batch(batches.batches[index])
        except BaseException as exc:
            _batch_failed(op, exc)
            if isinstance(exc, Exception):
                failed.append((index, exc))
            raise
        batches.finish(index, op, embeddings)

    async def worker() -> None:
        for index in pending:
            await run(index)

    if workers == 1:
        try:
            await worker()
        except Exception as exc:
            if failed and failed[0][1] is exc:
                raise batches.failure(failed[0][0]) from exc
            raise
        return batches.collect()

    tasks = [asyncio.ensure_future(worker()) for _ in range(workers)]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    if failed:
        first, cause = min(failed, key=lambda item: item[0])
        raise batches.failure(first) from cause
    for outcome in outcomes:
        if isinstance(outcome, Exception):
            raise outcome  # embed_batch returned the wrong number of embeddings
    return batches.collect()
