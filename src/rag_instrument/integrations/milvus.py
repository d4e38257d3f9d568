"""Instrument a pymilvus ``MilvusClient`` or ``AsyncMilvusClient`` in place.

::

    from pymilvus import MilvusClient

    client = ri.instrument_milvus(MilvusClient("http://localhost:19530"))
    hits = client.search("docs", data=[vector], limit=10, filter='lang == "en"',
                         search_params={"params": {"nprobe": 16}})

``search``, ``hybrid_search``, ``query``, ``get``, ``insert``, ``upsert`` and ``delete`` each
become one ``CLIENT`` span (``search docs``) and one ``vector`` entry in the enclosing
stage's breakdown, with:

* ``db.system.name = "milvus"``, ``db.operation.name``, ``db.collection.name``;
* ``rag.vector.top_k`` (``limit``), ``rag.vector.query_count`` and ``rag.vector.dimensions``
  (from the query vectors' shape), ``rag.vector.result_count`` (hits over all queries, or
  rows returned), ``rag.vector.row_count`` (rows written, deleted or asked for by id);
* ``rag.vector.filter``: the filter expression's *shape*, literal values replaced by ``?``
  as in SQL (``lang == ? and year > ?``; ``id in [?]``);
* ``rag.vector.params.<name>`` from ``search_params`` (``nprobe``, ``ef``, ...);
* ``rag.vector.index_type`` and ``rag.vector.metric`` of the searched vector field, and
  ``openinference.span.kind = "RETRIEVER"`` on searches.

The collection's schema and indexes are read once per collection, the first time it is
used, before that call's span starts (never an extra round trip per search). They are
remembered until the collection is dropped, renamed or re-indexed (``create_index``,
``drop_index``, ``alter_index_properties``) or the database is switched *through the same
client*; changes made elsewhere are picked up by :func:`uninstrument_milvus` followed by
:func:`instrument_milvus`. A collection found missing is looked for again 30 s later (or at
once after ``create_collection`` through the client).

Filter advice, after the guide's "filter on indexed fields": when a search's or query's
filter names a scalar field that has no scalar index, one warning ``"unindexed filter
field"`` is logged per collection and field (the primary key counts as indexed). This needs a
Milvus that lists scalar indexes through ``list_indexes`` / ``describe_index`` (Milvus 2.4+;
Milvus Lite 3.x, which the tests run on); where reading the indexes fails, no such warning
is ever logged.

Stored documents and vectors never go into spans or logs: counts, ids' count and
dimensions only. Server errors (``MilvusException``) are recorded on the span with their
``code`` as ``db.response.status_code`` and re-raised unchanged.

Supported: ``pymilvus>=2.4`` (``MilvusClient``; ``AsyncMilvusClient`` from 2.5).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar

try:
    import pymilvus
except ImportError as _exc:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "rag_instrument.integrations.milvus needs 'pymilvus': pip install 'rag_instrument[milvus]'"
    ) from _exc

from opentelemetry.trace import SpanKind

from rag_instrument import _operation, _registry
from rag_instrument import attributes as attr
from rag_instrument._runtime import get_runtime
from rag_instrument._utils import internal_error
from rag_instrument.integrations._milvus_expr import filter_shape, sanitize_error
from rag_instrument.logs import emit
from rag_instrument.vector import query_shape, result_count

__all__ = ["filter_shape", "instrument_milvus", "sanitize_error", "uninstrument_milvus"]

C = TypeVar("C")

SYSTEM: Final = "milvus"
MARKER: Final = "_rag_instrument_milvus"
_OPERATIONS: Final = ("search", "hybrid_search", "query", "get", "insert", "upsert", "delete")
_SEARCHES: Final = frozenset({"search", "hybrid_search"})
#: Calls after which what we remember of a collection may be wrong.
_INVALIDATING: Final = (
    "drop_collection",
    "create_collection",
    "rename_collection",
    "create_index",
    "drop_index",
    "alter_index_properties",
    "using_database",
    "use_database",
)
_MISSING_TTL_S: Final = 30.0
_ASYNC_CLIENT: Any = getattr(pymilvus, "AsyncMilvusClient", None)

_registry.register_error_formatter("pymilvus", sanitize_error)


# --- what we remember of a collection -----------------------------------------------------


class _Collection:
    """A collection's vector fields (index type, metric) and which fields are indexed."""

    __slots__ = ("indexed", "primary", "scalar", "vectors")

    def __init__(self) -> None:
        self.vectors: dict[str, tuple[str | None, str | None]] = {}
        self.primary: str | None = None
        self.scalar: set[str] = set()
        #: Fields with an index; ``None`` when the server could not tell us.
        self.indexed: set[str] | None = None

    def vector_field(self, requested: Any) -> str | None:
        if isinstance(requested, str) and requested:
            return requested
        if len(self.vectors) == 1:
            return next(iter(self.vectors))
        return None


def _is_vector_type(data_type: Any) -> bool:
    name = getattr(data_type, "name", None) or str(data_type)
    return "VECTOR" in name.upper()


def _describe(collection: _Collection, description: Any) -> None:
    for field in (description or {}).get("fields", ()):
        name = field.get("name")
        if not isinstance(name, str):
            continue
        if _is_vector_type(field.get("type")):
            collection.vectors.setdefault(name, (None, None))
        elif field.get("is_primary"):
            collection.primary = name
        else:
            collection.scalar.add(name)


def _index(collection: _Collection, info: Any) -> None:
    if not isinstance(info, Mapping):
        return
    field = info.get("field_name")
    if not isinstance(field, str):
        return
    assert collection.indexed is not None
    collection.indexed.add(field)
    if field in collection.vectors:
        index_type, metric = info.get("index_type"), info.get("metric_type")
        collection.vectors[field] = (
            str(index_type) if index_type else None,
            str(metric) if metric and metric != "NONE" else None,
        )


class _State:
    """One instrumented client: what was patched, and what it knows of each collection."""

    def __init__(self, is_async: bool) -> None:
        self.is_async = is_async
        #: name -> what the instance itself held under that name before (``None``: nothing).
        self.patched: dict[str, Any] = {}
        self.collections: dict[str, _Collection] = {}
        self.missing: dict[str, float] = {}
        self.warned: set[tuple[str, str]] = set()
        self.lock = threading.Lock()
        self.read_lock = threading.Lock()  # one first read at a time (sync clients)
        self.loading: dict[str, asyncio.Future[_Collection | None]] = {}

    def forget(self, *names: Any) -> None:
        with self.lock:
            if not names:
                self.collections.clear()
                self.missing.clear()
                self.warned.clear()
                return
            for name in names:
                self.collections.pop(name, None)
                self.missing.pop(name, None)
                self.warned = {w for w in self.warned if w[0] != name}

    def known(self, name: str) -> tuple[bool, _Collection | None]:
        """``(True, info)`` when nothing needs to be read for ``name`` now."""
        found = self.collections.get(name)
        if found is not None:
            return True, found
        missing = self.missing.get(name)
        if missing is not None and time.monotonic() - missing < _MISSING_TTL_S:
            return True, None
        return False, None

    def remember(self, name: str, info: _Collection | None) -> None:
        with self.lock:
            if info is None:
                self.missing[name] = time.monotonic()
            else:
                if len(self.collections) > 4096:
                    self.collections.clear()
                self.collections[name] = info

    # Reading is split in steps so that the sync and async clients share everything but
    # the awaiting. pymilvus logs a failed call at ERROR with its traceback (a collection
    # that does not exist, say): for the library's own reads, which the application did not
    # make, that line is dropped (the application's call then fails and logs for itself).
    def read_sync(self, client: Any, name: str) -> _Collection | None:
        done, info = self.known(name)
        if done:
            return info
        with self.read_lock:
            done, info = self.known(name)
            if done:
                return info
            return self._read_sync(client, name)

    def _read_sync(self, client: Any, name: str) -> _Collection | None:
        token = _READING.set(True)
        try:
            return self._read_sync_quietly(client, name)
        finally:
            _READING.reset(token)

    def _read_sync_quietly(self, client: Any, name: str) -> _Collection | None:
        info = _Collection()
        try:
            _describe(info, client.describe_collection(name))
        except Exception:
            self.remember(name, None)  # the call itself will fail and say why
            return None
        try:
            indexed: set[str] = set()
            info.indexed = indexed
            for index_name in client.list_indexes(name) or ():
                _index(info, client.describe_index(name, index_name))
        except Exception:
            info.indexed = None
        self.remember(name, info)
        return info

    async def read_async(self, client: Any, name: str) -> _Collection | None:
        done, info = self.known(name)
        if done:
            return info
        loading = self.loading.get(name)
        if loading is not None:
            return await asyncio.shield(loading)
        future: asyncio.Future[_Collection | None] = asyncio.get_running_loop().create_future()
        self.loading[name] = future
        try:
            info = await self._read_async(client, name)
            future.set_result(info)
        except BaseException as exc:
            future.set_result(None)
            if not isinstance(exc, Exception):
                raise
            info = None
        finally:
            self.loading.pop(name, None)
        return info

    async def _read_async(self, client: Any, name: str) -> _Collection | None:
        token = _READING.set(True)
        try:
            return await self._read_async_quietly(client, name)
        finally:
            _READING.reset(token)

    async def _read_async_quietly(self, client: Any, name: str) -> _Collection | None:
        info = _Collection()
        try:
            _describe(info, await client.describe_collection(name))
        except Exception:
            self.remember(name, None)
            return None
        try:
            indexed: set[str] = set()
            info.indexed = indexed
            names = client.list_indexes(name)
            if inspect.isawaitable(names):
                names = await names
            for index_name in names or ():
                _index(info, await client.describe_index(name, index_name))
        except Exception:
            info.indexed = None
        self.remember(name, info)
        return info


# --- describing one call --------------------------------------------------------------------


def _params_of(search_params: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if type(search_params) is not dict and not isinstance(search_params, Mapping):
        return out
    nested = search_params.get("params")
    items = list(search_params.items())
    if type(nested) is dict or isinstance(nested, Mapping):
        items += list(nested.items())
    for key, value in items:
        if key == "params" or key == "metric_type" or type(key) is not str:  # noqa: PLR1714
            continue
        if type(value) in _SCALARS:
            out[f"{attr.RAG_VECTOR_PARAMS_PREFIX}{prefix}{key}"] = value
    return out


_SCALARS: Final = frozenset({bool, int, float, str})


class _Call:
    """The attributes of one call, and the filter fields to check."""

    __slots__ = ("attributes", "batched", "collection", "fields", "shape")

    def __init__(self, operation: str, collection: Any) -> None:
        self.collection = collection if isinstance(collection, str) else None
        self.attributes: dict[str, Any] = {
            attr.DB_SYSTEM_NAME: SYSTEM,
            attr.DB_OPERATION_NAME: operation,
        }
        if self.collection:
            self.attributes[attr.DB_COLLECTION_NAME] = self.collection
        if operation in _SEARCHES:
            self.attributes[attr.OPENINFERENCE_SPAN_KIND] = attr.SpanKind.RETRIEVER
        self.batched: bool | None = None
        self.fields: tuple[str, ...] = ()
        self.shape: str | None = None

    def filter(self, expr: Any) -> None:
        if isinstance(expr, str) and expr.strip():
            shape, fields = filter_shape(expr)
            self.shape = shape
            self.fields = tuple(dict.fromkeys((*self.fields, *fields)))
            self.attributes[attr.RAG_VECTOR_FILTER] = shape


def _describe_call(operation: str, arguments: Mapping[str, Any], info: _Collection | None) -> _Call:
    call = _Call(operation, arguments.get("collection_name"))
    attrs = call.attributes
    if operation == "search":
        limit = arguments.get("limit", 10)
        if isinstance(limit, int):
            attrs[attr.RAG_VECTOR_TOP_K] = limit
        count, dims, call.batched = query_shape(arguments.get("data"))
        if count is not None:
            attrs[attr.RAG_VECTOR_QUERY_COUNT] = count
        if dims is not None:
            attrs[attr.RAG_VECTOR_DIMENSIONS] = dims
        call.filter(arguments.get("filter"))
        search_params = arguments.get("search_params")
        attrs.update(_params_of(search_params))
        field = info.vector_field(arguments.get("anns_field")) if info else None
        field = field or arguments.get("anns_field")
        if isinstance(field, str) and field:
            attrs[attr.RAG_VECTOR_FIELD] = field
        index_type, metric = info.vectors.get(field or "", (None, None)) if info else (None, None)
        if metric is None and isinstance(search_params, Mapping):
            metric = search_params.get("metric_type")
        if index_type:
            attrs[attr.RAG_VECTOR_INDEX_TYPE] = index_type
        if isinstance(metric, str) and metric:
            attrs[attr.RAG_VECTOR_METRIC] = metric
    elif operation == "hybrid_search":
        _describe_hybrid(call, arguments, info)
    elif operation in ("query", "delete"):
        call.filter(arguments.get("filter"))
        ids = arguments.get("ids")
        if ids is not None:
            attrs[attr.RAG_VECTOR_ROW_COUNT] = len(ids) if isinstance(ids, list | tuple) else 1
    elif operation == "get":
        ids = arguments.get("ids")
        attrs[attr.RAG_VECTOR_ROW_COUNT] = len(ids) if isinstance(ids, list | tuple) else 1
    elif operation in ("insert", "upsert"):
        data = arguments.get("data")
        if isinstance(data, Mapping):
            attrs[attr.RAG_VECTOR_ROW_COUNT] = 1
        elif isinstance(data, list | tuple):
            attrs[attr.RAG_VECTOR_ROW_COUNT] = len(data)
    return call


def _describe_hybrid(call: _Call, arguments: Mapping[str, Any], info: _Collection | None) -> None:
    attrs = call.attributes
    limit = arguments.get("limit", 10)
    if isinstance(limit, int):
        attrs[attr.RAG_VECTOR_TOP_K] = limit
    fields: list[str] = []
    index_types: list[str] = []
    metrics: list[str] = []
    dimensions: list[int | None] = []
    for request in arguments.get("reqs") or ():
        field = getattr(request, "anns_field", None)
        if not isinstance(field, str):
            continue
        fields.append(field)
        count, dims, _batched = query_shape(getattr(request, "data", None))
        dimensions.append(dims)
        if count is not None and attr.RAG_VECTOR_QUERY_COUNT not in attrs:
            attrs[attr.RAG_VECTOR_QUERY_COUNT] = count
        index_type, metric = info.vectors.get(field, (None, None)) if info else (None, None)
        index_types.append(index_type or "?")
        param = getattr(request, "param", None)
        if metric is None and isinstance(param, Mapping):
            metric = param.get("metric_type")
        metrics.append(str(metric) if metric else "?")
        attrs.update(_params_of(param, f"{field}."))
        call.filter(getattr(request, "expr", None))
    call.batched = True
    known = {d for d in dimensions if d is not None}
    if len(known) == 1 and None not in dimensions:
        attrs[attr.RAG_VECTOR_DIMENSIONS] = known.pop()
    elif known:  # fields of different sizes: each request's, as the field list names them
        shown = ("?" if d is None else str(d) for d in dimensions)
        attrs[attr.RAG_VECTOR_DIMENSIONS] = ",".join(shown)
    if fields:
        attrs[attr.RAG_VECTOR_FIELD] = ",".join(fields)
        if any(t != "?" for t in index_types):
            attrs[attr.RAG_VECTOR_INDEX_TYPE] = ",".join(index_types)
        if any(m != "?" for m in metrics):
            attrs[attr.RAG_VECTOR_METRIC] = ",".join(metrics)


def _result_attributes(operation: str, result: Any, call: _Call) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if operation in _SEARCHES:
        count = result_count(result, True)
        if count is not None:
            out[attr.RAG_VECTOR_RESULT_COUNT] = count
    elif operation in ("query", "get"):
        try:
            out[attr.RAG_VECTOR_RESULT_COUNT] = len(result)
        except TypeError:
            pass
    elif isinstance(result, Mapping):
        for key in ("insert_count", "upsert_count", "delete_count"):
            value = result.get(key)
            if isinstance(value, int):
                out[attr.RAG_VECTOR_ROW_COUNT] = value
    elif operation == "delete" and isinstance(result, list):
        out[attr.RAG_VECTOR_ROW_COUNT] = len(result)
    return out


# --- the wrappers ---------------------------------------------------------------------------


def _arguments(names: tuple[str, ...], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if not args:
        return kwargs
    bound = dict(zip(names, args, strict=False))
    bound.update(kwargs)
    return bound


def _warn_unindexed(state: _State, call: _Call, info: _Collection | None, span: Any) -> None:
    if not call.fields or info is None or info.indexed is None or call.collection is None:
        return
    for field in call.fields:
        if field in info.indexed or field == info.primary or field in info.vectors:
            continue
        key = (call.collection, field)
        if key in state.warned:
            continue
        with state.lock:
            if key in state.warned:
                continue
            state.warned.add(key)
        dynamic = field not in info.scalar
        emit(
            "warning",
            "unindexed filter field",
            {
                attr.DB_SYSTEM_NAME: SYSTEM,
                attr.DB_COLLECTION_NAME: call.collection,
                "field": field,
                "dynamic_field": dynamic,
                "filter": call.shape,
                "advice": (
                    "add a scalar index on this field (INVERTED, STL_SORT, BITMAP) or "
                    "filter on an indexed field"
                ),
            },
            span=span,
        )


def _begin(
    state: _State, operation: str, arguments: Mapping[str, Any], info: _Collection | None
) -> tuple[_operation.Operation | None, _Call | None]:
    rt = get_runtime()
    try:
        call = _describe_call(operation, arguments, info)
    except Exception as exc:
        internal_error(f"describing a Milvus {operation}", exc)
        call = _Call(operation, arguments.get("collection_name"))
    name = f"{operation} {call.collection}" if call.collection else operation
    op = _operation.start(
        rt, name, call.attributes, attr.BREAKDOWN_VECTOR, span_kind=SpanKind.CLIENT, leaf=True
    )
    if op is not None:
        try:
            _warn_unindexed(state, call, info, op.span)
        except Exception as exc:
            internal_error("the unindexed filter field check", exc)
    return op, call


def _end(
    op: _operation.Operation, call: _Call, operation: str, result: Any, exc: BaseException | None
) -> None:
    try:
        span = op.span
        if exc is None and span.is_recording():
            span.set_attributes(_result_attributes(operation, result, call))
        code = getattr(exc, "code", None)
        if isinstance(code, int | str) and not isinstance(code, bool) and span.is_recording():
            span.set_attribute(attr.DB_RESPONSE_STATUS_CODE, str(code))
    except Exception as error:
        internal_error(f"ending a Milvus {operation}", error)
    ms = _operation.finish(op, exc)
    try:
        metric_attrs: dict[str, Any] = {
            key: call.attributes[key]
            for key in (attr.DB_SYSTEM_NAME, attr.DB_OPERATION_NAME, attr.DB_COLLECTION_NAME)
            if key in call.attributes
        }
        if exc is not None:
            metric_attrs[attr.ERROR_TYPE] = type(exc).__qualname__
        histogram = op.rt.histogram(
            attr.METRIC_DB_OPERATION_DURATION, "s", "Duration of database client operations."
        )
        histogram.record(ms / 1000.0, metric_attrs)
    except Exception as error:
        internal_error("recording a Milvus duration", error)


def _needs_info(operation: str, arguments: Mapping[str, Any]) -> str | None:
    if operation in ("search", "hybrid_search", "query"):
        name = arguments.get("collection_name")
        return name if isinstance(name, str) else None
    return None


def _wrap_sync(
    state: _State, client: Any, operation: str, original: Callable[..., Any]
) -> Callable[..., Any]:
    names = _parameter_names(original, operation)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not get_runtime().enabled:
            return original(*args, **kwargs)
        arguments = _arguments(names, args, kwargs)
        collection = _needs_info(operation, arguments)
        info = state.read_sync(client, collection) if collection else None
        op, call = _begin(state, operation, arguments, info)
        if op is None or call is None:
            return original(*args, **kwargs)
        try:
            result = original(*args, **kwargs)
        except BaseException as exc:
            _end(op, call, operation, None, exc)
            raise
        _end(op, call, operation, result, None)
        return result

    return wrapper


def _wrap_async(
    state: _State, client: Any, operation: str, original: Callable[..., Any]
) -> Callable[..., Any]:
    names = _parameter_names(original, operation)

    @functools.wraps(original)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not get_runtime().enabled:
            return await original(*args, **kwargs)
        arguments = _arguments(names, args, kwargs)
        collection = _needs_info(operation, arguments)
        info = await state.read_async(client, collection) if collection else None
        op, call = _begin(state, operation, arguments, info)
        if op is None or call is None:
            return await original(*args, **kwargs)
        try:
            result = await original(*args, **kwargs)
        except BaseException as exc:
            _end(op, call, operation, None, exc)
            raise
        _end(op, call, operation, result, None)
        return result

    return wrapper


def _wrap_invalidating(state: _State, name: str, original: Callable[..., Any]) -> Any:
    names = _parameter_names(original, name)

    def forget(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if name in ("using_database", "use_database"):
            state.forget()
            return
        arguments = _arguments(names, args, kwargs)
        targets = [arguments.get(key) for key in ("collection_name", "old_name", "new_name")]
        state.forget(*[t for t in targets if isinstance(t, str)])

    if inspect.iscoroutinefunction(original):

        @functools.wraps(original)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return await original(*args, **kwargs)
            finally:
                forget(args, kwargs)

        return async_wrapper

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return original(*args, **kwargs)
        finally:
            forget(args, kwargs)

    return wrapper


#: pymilvus' positional parameters (2.4 to 3.0), for wrapped methods whose signature is hidden.
_POSITIONAL: Final = {
    "search": (
        "collection_name", "data", "filter", "limit", "output_fields", "search_params",
        "timeout", "partition_names", "anns_field",
    ),
    "hybrid_search": ("collection_name", "reqs", "ranker", "limit", "output_fields"),
    "query": ("collection_name", "filter", "output_fields", "timeout", "ids"),
    "get": ("collection_name", "ids", "output_fields"),
    "insert": ("collection_name", "data"),
    "upsert": ("collection_name", "data"),
    "delete": ("collection_name", "ids", "timeout", "filter"),
    "rename_collection": ("old_name", "new_name"),
}  # fmt: skip


def _parameter_names(original: Callable[..., Any], name: str = "") -> tuple[str, ...]:
    try:
        parameters = inspect.signature(original).parameters.values()
        names = tuple(
            p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        )
    except (TypeError, ValueError):
        names = ()
    if names[:1] in (("collection_name",), ("old_name",)):
        return names
    return _POSITIONAL.get(name, ("collection_name",))


# Set while the library reads a collection's description (see _QuietReads).
_READING: Final[contextvars.ContextVar[bool]] = contextvars.ContextVar(
    "rag_instrument.milvus_reading", default=False
)


class _QuietReads(logging.Filter):
    """Drops pymilvus's error lines about the library's own metadata reads."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _READING.get()


_QUIET_READS: Final = _QuietReads()


def _quiet_pymilvus_reads() -> None:
    for name in ("pymilvus.decorators", "pymilvus.client.async_grpc_handler"):
        logger = logging.getLogger(name)
        if _QUIET_READS not in logger.filters:
            logger.addFilter(_QUIET_READS)


def instrument_milvus(client: C) -> C:
    """Instrument a pymilvus ``MilvusClient`` or ``AsyncMilvusClient`` in place.

    Instrumenting twice does nothing the second time; undo with :func:`uninstrument_milvus`.

    Args:
        client: the client.

    Returns:
        The same client, for chaining.

    Raises:
        TypeError: ``client`` is not a pymilvus ``MilvusClient`` / ``AsyncMilvusClient``.
    """
    is_async = _ASYNC_CLIENT is not None and isinstance(client, _ASYNC_CLIENT)
    if not is_async and not isinstance(client, pymilvus.MilvusClient):
        raise TypeError(
            f"instrument_milvus expects a pymilvus MilvusClient or AsyncMilvusClient, "
            f"got {type(client).__name__}"
        )
    if getattr(client, MARKER, None) is not None:
        return client
    _quiet_pymilvus_reads()
    state = _State(is_async)
    wrap = _wrap_async if is_async else _wrap_sync
    own = vars(client)
    for operation in _OPERATIONS:
        original = getattr(client, operation, None)
        if callable(original):
            state.patched[operation] = own.get(operation)
            setattr(client, operation, wrap(state, client, operation, original))
    for name in _INVALIDATING:
        original = getattr(client, name, None)
        if callable(original):
            state.patched[name] = own.get(name)
            setattr(client, name, _wrap_invalidating(state, name, original))
    setattr(client, MARKER, state)
    return client


def uninstrument_milvus(client: Any) -> None:
    """Restore a client instrumented by :func:`instrument_milvus` (no-op otherwise)."""
    state: _State | None = getattr(client, MARKER, None)
    if state is None:
        return
    own = vars(client)
    for name, before in state.patched.items():
        if before is None:
            own.pop(name, None)
        else:
            own[name] = before  # the application's own override comes back
    delattr(client, MARKER)
