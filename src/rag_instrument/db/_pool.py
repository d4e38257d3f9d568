"""Connection pool telemetry: checkout wait, slow checkouts, timeouts and pool gauges.

SQLAlchemy has no event *before* a checkout, so the wait is timed around the pool's public
``connect()`` method, through an attribute set on that one pool instance (the class is not
touched) and removed again by ``uninstrument()``. When ``engine.dispose()`` replaces the
pool, the new pool is wrapped too (``engine_disposed`` event). The wait includes opening a
new DBAPI connection when the pool had none to give.

Gauges (observable up-down counters, read when metrics are collected):

* ``db.client.connection.count`` with ``db.client.connection.state`` = ``idle`` / ``used``;
* ``db.client.connection.max`` (pool size plus overflow, for queue pools);
* ``db.client.connection.pending_requests`` (callers waiting for a connection).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from opentelemetry import trace as trace_api
from opentelemetry.metrics import CallbackOptions, Observation
from sqlalchemy import event
from sqlalchemy import exc as sa_exc

from rag_instrument._context import current_stage
from rag_instrument._runtime import Runtime, get_runtime
from rag_instrument._utils import internal_error
from rag_instrument.attributes import (
    DB_CONNECTION_POOL_NAME as POOL_NAME,
)
from rag_instrument.attributes import (
    DB_CONNECTION_STATE as STATE,
)
from rag_instrument.attributes import (
    METRIC_DB_CONNECTION_COUNT as METRIC_COUNT,
)
from rag_instrument.attributes import (
    METRIC_DB_CONNECTION_MAX as METRIC_MAX,
)
from rag_instrument.attributes import (
    METRIC_DB_CONNECTION_PENDING as METRIC_PENDING,
)
from rag_instrument.attributes import (
    METRIC_DB_CONNECTION_TIMEOUTS as METRIC_TIMEOUTS,
)
from rag_instrument.attributes import (
    METRIC_DB_CONNECTION_WAIT_TIME as METRIC_WAIT,
)
from rag_instrument.logs import emit

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine
    from sqlalchemy.pool import Pool

__all__ = ["PoolInstrumentation"]


_live: weakref.WeakSet[PoolInstrumentation] = weakref.WeakSet()
_observed_meter: list[Any] = [None]
_observe_lock = threading.Lock()


def _observations(kind: str) -> Iterable[Observation]:
    for pool_inst in list(_live):
        try:
            yield from pool_inst.observe(kind)
        except Exception as exc:
            internal_error("pool metrics", exc)


def _callback(kind: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def callback(_options: CallbackOptions) -> Iterable[Observation]:
        return list(_observations(kind))

    return callback


def ensure_observers(rt: Runtime) -> None:
    """Register the pool gauges on the configuration's meter (once per configuration)."""
    meter = rt.meter
    if _observed_meter[0] is meter:
        return
    with _observe_lock:
        if _observed_meter[0] is meter:
            return
        meter.create_observable_up_down_counter(
            METRIC_COUNT,
            callbacks=[_callback("count")],
            unit="{connection}",
            description="Connections in the pool, by state (idle, used).",
        )
        meter.create_observable_up_down_counter(
            METRIC_MAX,
            callbacks=[_callback("max")],
            unit="{connection}",
            description="The most connections the pool allows.",
        )
        meter.create_observable_up_down_counter(
            METRIC_PENDING,
            callbacks=[_callback("pending")],
            unit="{request}",
            description="Callers waiting for a connection from the pool.",
        )
        _observed_meter[0] = meter



def _add_stage(fields: dict[str, Any]) -> None:
    """``pipeline_stage`` when a stage is running; outside one the key is absent, not null."""
    stage = current_stage()
    if stage:
        fields["pipeline_stage"] = stage

class PoolInstrumentation:
    """Wait-time and gauge telemetry for one engine's pool."""

    def __init__(self, engine: Engine, pool_name: str, slow_ms: float) -> None:
        self._engine = weakref.ref(engine)
        self.pool_name = pool_name
        self.slow_ms = slow_ms
        self.attributes = {POOL_NAME: pool_name}
        self._pending = 0
        self._used = 0  # for pools that cannot report it (StaticPool, NullPool ...)
        self._lock = threading.Lock()
        # Weak both ways: the wrapper holds the pool (through its bound ``connect``) and
        # the pool holds the engine, so a strong reference here would keep the engine alive
        # from the handle registry.
        self._wrapped: weakref.WeakKeyDictionary[Pool, weakref.ref[Callable[[], Any]]] = (
            weakref.WeakKeyDictionary()
        )

    # --- install / remove ----------------------------------------------------------------

    def install(self, engine: Engine) -> None:
        """Wrap the current pool and follow pool replacement and checkouts."""
        self._wrap(engine.pool)
        event.listen(engine, "engine_disposed", self._on_disposed)
        event.listen(engine, "checkout", self._on_checkout)
        event.listen(engine, "checkin", self._on_checkin)
        _live.add(self)
        ensure_observers(get_runtime())

    def remove(self, engine: Engine) -> None:
        """Undo :meth:`install` (every pool this engine had)."""
        _live.discard(self)
        for target, name, fn in (
            (engine, "engine_disposed", self._on_disposed),
            (engine, "checkout", self._on_checkout),
            (engine, "checkin", self._on_checkin),
        ):
            if event.contains(target, name, fn):
                event.remove(target, name, fn)
        for pool, wrapper_ref in list(self._wrapped.items()):
            wrapper = wrapper_ref()
            if wrapper is not None and pool.__dict__.get("connect") is wrapper:
                del pool.__dict__["connect"]
        self._wrapped.clear()

    def _wrap(self, pool: Pool) -> None:
        if pool in self._wrapped:
            return
        original = pool.connect  # the bound method of the class
        wrapper = self._make_wrapper(original)
        pool.__dict__["connect"] = wrapper
        self._wrapped[pool] = weakref.ref(wrapper)

    def _on_disposed(self, engine: Engine) -> None:
        try:
            self._wrap(engine.pool)
        except Exception as exc:
            internal_error("pool re-instrumentation", exc)

    def _on_checkout(self, dbapi_conn: Any, record: Any, proxy: Any) -> None:
        with self._lock:
            self._used += 1

    def _on_checkin(self, dbapi_conn: Any, record: Any) -> None:
        with self._lock:
            self._used = max(self._used - 1, 0)

    # --- checkout timing -----------------------------------------------------------------

    def _make_wrapper(self, original: Callable[[], Any]) -> Callable[[], Any]:
        def connect() -> Any:
            rt = get_runtime()
            if not rt.enabled:
                return original()
            with self._lock:
                self._pending += 1
            start = time.perf_counter()
            try:
                conn = original()
            except sa_exc.TimeoutError as exc:
                self._timed_out(rt, exc, time.perf_counter() - start)
                raise
            finally:
                with self._lock:
                    self._pending -= 1
            self._checked_out(rt, time.perf_counter() - start)
            return conn

        connect.__wrapped__ = original  # type: ignore[attr-defined]
        return connect

    def _checked_out(self, rt: Runtime, wait_s: float) -> None:
        try:
            ensure_observers(rt)
            rt.histogram(METRIC_WAIT, "s", "Time to obtain a connection from the pool.").record(
                wait_s, self.attributes
            )
            wait_ms = wait_s * 1000.0
            if wait_ms > self.slow_ms and rt.log is not None:
                fields: dict[str, Any] = {
                    POOL_NAME: self.pool_name,
                    "wait_ms": round(wait_ms, 3),
                    "threshold_ms": self.slow_ms,
                }
                _add_stage(fields)
                emit("warning", "pool checkout slow", fields, trusted=True, rt=rt)
        except Exception as exc:
            internal_error("pool checkout", exc)

    def _timed_out(self, rt: Runtime, exc: BaseException, wait_s: float) -> None:
        try:
            error_type = f"{type(exc).__module__}.{type(exc).__qualname__}"
            rt.histogram(METRIC_WAIT, "s", "Time to obtain a connection from the pool.").record(
                wait_s, self.attributes
            )
            rt.counter(METRIC_TIMEOUTS, "{timeout}", "Pool checkouts that timed out.").add(
                1, self.attributes
            )
            span = trace_api.get_current_span()
            if span.is_recording():
                span.add_event(
                    "db.client.connection.timeout",
                    {
                        POOL_NAME: self.pool_name,
                        "db.client.connection.wait_time": wait_s,
                        "error.type": error_type,
                    },
                )
            if rt.log is not None:
                fields: dict[str, Any] = {
                    POOL_NAME: self.pool_name,
                    "wait_ms": round(wait_s * 1000.0, 3),
                    "error_type": error_type,
                }
                _add_stage(fields)
                emit("warning", "pool checkout timeout", fields, trusted=True, rt=rt)
        except Exception as internal:
            internal_error("pool timeout", internal)

    # --- gauges --------------------------------------------------------------------------

    def observe(self, kind: str) -> list[Observation]:
        """Current values for the gauge ``kind`` (``count``, ``max``, ``pending``)."""
        engine = self._engine()
        if engine is None:
            return []
        pool = engine.pool
        attrs = self.attributes
        if kind == "pending":
            return [Observation(self._pending, attrs)]
        checkedin = getattr(pool, "checkedin", None)
        checkedout = getattr(pool, "checkedout", None)
        if kind == "count":
            used = checkedout() if callable(checkedout) else self._used
            idle = checkedin() if callable(checkedin) else 0
            return [
                Observation(idle, {**attrs, STATE: "idle"}),
                Observation(used, {**attrs, STATE: "used"}),
            ]
        size = getattr(pool, "size", None)
        # QueuePool has no public accessor for max_overflow; -1 means unbounded.
        overflow = getattr(pool, "_max_overflow", None)
        if callable(size) and isinstance(overflow, int) and overflow >= 0:
            return [Observation(int(size()) + overflow, attrs)]
        return []
