"""``configure()``, ``shutdown()`` and ``force_flush()``: building and retiring runtimes.

``configure()`` validates everything first (:func:`rag_instrument._settings.build_settings`:
a bad value raises ``ValueError`` naming the setting, where it came from and what is
accepted) and only then replaces the previous configuration, so a failed call leaves the
running one intact. The result is one :class:`~rag_instrument._runtime.Runtime`, installed
in :mod:`rag_instrument._runtime`, which every other module reads through
``get_runtime()``.

This module sits above logs, exporters and stages: it is the only one that assembles them.
"""

from __future__ import annotations

import atexit
import math
import os
import re
import sys
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from opentelemetry import metrics as metrics_api
from opentelemetry import trace as trace_api

from rag_instrument import _pools, _runtime, _stagehooks, logs
from rag_instrument._runtime import Runtime, get_runtime
from rag_instrument._settings import (
    Settings,
    bad,
    build_settings,
    docstring_args,
    settings_table,
    take_warnings,
)
from rag_instrument._utils import internal_error, internal_logger, warn_once

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics.export import MetricReader
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = [
    "apply",
    "build_settings",
    "configure",
    "force_flush",
    "global_provider_is_unset",
    "release_global_provider",
    "restore",
    "shutdown",
]

_LOCK = threading.RLock()
_ATEXIT_REGISTERED = False


# --- configure / shutdown -------------------------------------------------------------------


def configure(  # noqa: D417 (the settings' Args are generated from the table)
    service_name: str | None = None,
    *,
    exporter: str | SpanExporter | None = None,
    metrics_exporter: str | None = None,
    otlp_endpoint: str | None = None,
    log_format: str | None = None,
    log_file: str | os.PathLike[str] | None = None,
    log_level: str | int | None = None,
    logs_exporter: str | None = None,
    enabled: bool | None = None,
    capture_content: bool | None = None,
    max_content_chars: int | None = None,
    slow_query_ms: float | None = None,
    n_plus_one_threshold: int | None = None,
    budgets: Mapping[str, float] | None = None,
    sample_ratio: float | None = None,
    parent_based_sampling: bool | None = None,
    redact: bool | None = None,
    capture_logging: bool | None = None,
    capture_logging_level: str | int | None = None,
    shutdown_timeout: float | None = None,
    event_loop_threshold_ms: float | None = None,
    resource_metrics: bool | None = None,
    metric_readers: Sequence[MetricReader] | None = (),
    tracer_provider: trace_api.TracerProvider | None = None,
    meter_provider: metrics_api.MeterProvider | None = None,
) -> Settings:
    """Configure rag_instrument; call it once at start-up (again to reconfigure).

    Every setting left as ``None`` comes from its environment variable
    (``RAG_INSTRUMENT_<NAME>``, then the standard ``OTEL_*`` one listed with it), else from
    its default. The settings below are generated from the settings table
    (``rag_instrument._settings``).

    Args:
        {settings}
        metric_readers: extra SDK metric readers for rag_instrument's metrics.
        tracer_provider: use this provider instead of the global one.
        meter_provider: use this meter provider instead of building one.

    Returns:
        The settings in force.

    Raises:
        ValueError: a setting is invalid; the message names it, its origin and what is
            accepted. The previous configuration is left in place.
        ImportError: ``exporter="otlp"`` without the ``otlp`` extra installed.
    """
    # The settings' arguments, by name (the table in ``_settings`` lists them).
    given = locals()
    settings = build_settings(**{row.name: given[row.name] for row in settings_table()})
    metric_readers = _checked_providers(metric_readers, tracer_provider, meter_provider)
    current = get_runtime().log
    # Only rag_instrument.testing.capture() writes lines to a sink.
    in_capture = current is not None and current.sink is not None
    apply(
        settings,
        metric_readers=metric_readers,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
    )
    if in_capture:
        # An application factory configuring itself inside a capture ended it: say so.
        warnings.warn(
            "rag_instrument.configure() was called inside testing.capture(): the capture "
            "records nothing from here on. Configure before capture(), or pass the settings "
            "to capture(**settings)",
            RuntimeWarning,
            stacklevel=2,
        )
    return settings


def _checked_providers(
    metric_readers: Any, tracer_provider: Any, meter_provider: Any
) -> tuple[MetricReader, ...]:
    """``configure()``'s object arguments, checked before anything is built."""

    def refuse(name: str, value: Any, accepted: str) -> ValueError:
        return bad(name, f"configure({name}=...)", value, accepted)

    if tracer_provider is not None and not callable(getattr(tracer_provider, "get_tracer", None)):
        raise refuse("tracer_provider", tracer_provider, "a TracerProvider (with get_tracer)")
    if meter_provider is not None and not callable(getattr(meter_provider, "get_meter", None)):
        raise refuse("meter_provider", meter_provider, "a MeterProvider (with get_meter)")
    accepted = "a sequence of OpenTelemetry SDK MetricReader instances"
    if metric_readers is None:  # as the other provider arguments: None is "none given"
        metric_readers = ()
    if isinstance(metric_readers, str | bytes) or not hasattr(metric_readers, "__iter__"):
        raise refuse("metric_readers", metric_readers, accepted)
    readers = tuple(metric_readers)
    if readers:
        from opentelemetry.sdk.metrics.export import MetricReader as SDKMetricReader

        for reader in readers:
            if not isinstance(reader, SDKMetricReader):
                raise refuse("metric_readers", metric_readers, accepted)
    return readers


def apply(
    settings: Settings,
    *,
    metric_readers: Sequence[MetricReader] = (),
    tracer_provider: trace_api.TracerProvider | None = None,
    meter_provider: metrics_api.MeterProvider | None = None,
    log_sink: Any = None,
    retire: bool = True,
) -> Runtime:
    """Install validated ``settings`` (the second half of :func:`configure`).

    With ``retire=False`` the configuration in force is only set aside, not closed, so that
    :func:`restore` can put it back (``rag_instrument.testing.capture``).
    """
    global _ATEXIT_REGISTERED
    # Late: the SDK is loaded by configure(), never by ``import rag_instrument``.
    from rag_instrument import exporters

    with _LOCK:
        # Build the new pieces first: an exporter that cannot be built (missing extra)
        # must leave the running configuration alone.
        pipelines = (
            exporters.build(
                settings,
                metric_readers=metric_readers,
                tracer_provider=tracer_provider,
                meter_provider=meter_provider,
            )
            if settings.enabled
            else None
        )
        writes = log_sink is not None or settings.logs_exporter != "none"
        output = logs.LogOutput(settings, sink=log_sink) if writes else None
        old = get_runtime()
        if pipelines is not None:
            tracer = pipelines.tracer
            meter = pipelines.meter
        else:
            tracer = trace_api.NoOpTracer()
            meter = metrics_api.NoOpMeter("rag_instrument")
        new = Runtime(
            settings,
            configured=True,
            tracer=tracer,
            meter=meter,
            log=output,
            pipelines=pipelines,
            tools=pipelines,
            instruments=pipelines.instruments if pipelines is not None else None,
        )
        _switch(new)
        warn_once.reset()
        logs.reset_repeated_sdk_warnings()
        for message in take_warnings():  # now that the new output takes them as lines
            internal_logger.warning(message)
        if retire:
            _retire(old, timeout=5.0, successor=new)
        if pipelines is not None:
            _pools.EXIT_WORKER.start()  # the exit flush's thread, while threads can start
        if not _ATEXIT_REGISTERED:
            atexit.register(_at_exit)
            _ATEXIT_REGISTERED = True
        if pipelines is not None:
            _flush_at_child_exit()
        return new


def _switch(new: Runtime) -> None:
    old = get_runtime()
    _runtime.install(new)
    logs.install_stdlib_handler(new)
    _stagehooks.switched(old, new)
    if new.pipelines is not None:
        new.pipelines.activate()


def restore(previous: Runtime) -> None:
    """Put back a runtime set aside by ``apply(..., retire=False)``; close the current one."""
    with _LOCK:
        current = get_runtime()
        if current is previous:
            return
        _switch(previous)
        _retire(current, timeout=5.0, successor=previous)


def retire_set_aside(runtime: Runtime) -> None:
    """Close a runtime that ``apply(..., retire=False)`` made and that is no longer in force.

    (A capture that ended while a later one was still open: the later one is in force.)
    """
    with _LOCK:
        current = get_runtime()
        if current is not runtime:
            _retire(runtime, timeout=5.0, successor=current)


def _retire(
    old: Runtime,
    timeout: float | None,
    successor: Runtime | None = None,
    *,
    at_exit: bool = False,
) -> bool:
    """Flush and close what ``old`` created, within ``timeout`` seconds.

    Returns ``True`` only if everything ``old`` was given was exported: the flush finished
    in time and no span was dropped (a full queue, a failed export) during its life.
    A span exporter the application passed in and the ``successor`` uses as well is
    flushed, not shut down: reconfiguring must not kill the application's exporter.
    Its log output stays open until the flush is over, and the OpenTelemetry SDK's own
    messages during the flush (export errors at a worker's exit) go to it, not to raw
    standard error.
    """
    # Lines written to the old output after it closed (threads still at work under the old
    # configuration) go to the successor's, not to standard error, nor nowhere.
    next_log = successor.log if successor is not None else None
    if old.pipelines is None:
        if old.log is not None:
            old.log.close(next_log)
        return True
    pipelines = old.pipelines
    if successor is not None and successor.settings.span_exporter is not None:
        pipelines.keep_exporter(successor.settings.span_exporter)
    # At shutdown (no successor whose own handler would take them), the SDK's messages
    # during the flush go to this configuration's log.
    detach = logs.bridge_while_flushing(old) if successor is None else _nothing
    result: list[bool] = []

    def work() -> None:
        try:
            result.append(pipelines.shutdown(timeout_millis=_millis(timeout, 0.9)))
        except Exception as exc:
            internal_error("shutdown", exc)
        finally:
            if not at_exit:
                # At exit the bridge stays: an exporter's thread still retrying when the
                # flush gave up says so later ("Shutdown in progress, aborting retry."),
                # and that must not come out as raw text on standard error.
                detach()
            if old.log is not None:
                old.log.close(next_log)

    finished = _bounded(work, timeout, "rag_instrument-shutdown", at_exit=at_exit)
    return finished and bool(result and result[0])


def _bounded(
    work: Callable[[], None], timeout: float | None, name: str, *, at_exit: bool = False
) -> bool:
    """Run ``work`` on a daemon thread and wait for it at most ``timeout`` seconds.

    Exporters may block (a black-holed collector): that never holds the caller past the
    deadline, and the thread, a daemon, cannot keep the process alive either. At
    interpreter exit the work goes to the thread ``configure()`` started ahead
    (:data:`~rag_instrument._pools.EXIT_WORKER`), since Python 3.12.0 and 3.12.1 refuse
    to start one then. Returns ``True`` when ``work`` finished in time.
    """
    done = threading.Event()

    def job() -> None:
        try:
            work()
        finally:
            done.set()

    if not (at_exit and _pools.EXIT_WORKER.submit(job)):
        try:
            threading.Thread(target=job, name=name, daemon=True).start()
        except RuntimeError:
            # No thread waits and the exiting interpreter refuses a new one: flushing here,
            # bounded only by the exporters' own timeouts, beats losing the spans.
            job()
    return done.wait(None if timeout is None else max(timeout, 0.0))


def _nothing() -> None:
    pass


#: The longest wait in milliseconds handed to an exporter (``None`` / infinity: no limit).
_NO_LIMIT_MS = 2**31 - 1


def _seconds(timeout: object, default: float = 5.0) -> float | None:
    """``timeout`` as seconds to wait: ``None`` for no limit; never raises.

    ``None`` and infinity wait without limit, a negative or NaN value not at all, and
    anything that is not a number is the default (with a warning).
    """
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        warn_once.warning(
            "rag_instrument: a timeout must be a number of seconds, got a "
            f"{type(timeout).__name__}: using {default}"
        )
        return default
    seconds = float(timeout)
    if math.isnan(seconds):
        return 0.0
    if seconds == math.inf:
        return None
    return max(seconds, 0.0)


def _millis(seconds: float | None, share: float = 1.0) -> int:
    if seconds is None:
        return int(_NO_LIMIT_MS)
    return int(min(seconds * 1000 * share, _NO_LIMIT_MS))


def shutdown(timeout: float | None = 5.0) -> bool:
    """Flush and close what :func:`configure` created; ``True`` only if all was exported.

    ``False`` when the flush did not finish within ``timeout`` seconds, or when any span of
    this configuration was lost (a full export queue, a failed export). Returns within
    ``timeout`` seconds even when the collector is down or black-holed.
    Afterwards the library is unconfigured: stages still run, nothing is exported or
    logged. A second call does nothing. Also registered to run at interpreter exit.
    ``None`` (or infinity) waits as long as the flush takes.
    """
    return _shutdown(_seconds(timeout))


def _shutdown(timeout: float | None, *, at_exit: bool = False) -> bool:
    with _LOCK:
        old = get_runtime()
        if not old.configured:
            return True
        # After an explicit shutdown(), stage spans have nowhere to go: the first says so
        # (not at exit, where a daemon thread's last stage would print raw text).
        owned = old.pipelines is not None and old.pipelines.owns_tracer_provider
        new = _runtime.install(_runtime.after_shutdown() if owned and not at_exit else None)
        logs.install_stdlib_handler(new)
        _stagehooks.switched(old, new)
    return _retire(old, timeout, at_exit=at_exit)


def force_flush(timeout: float | None = 5.0) -> bool:
    """Export every span that has already ended; ``True`` when done within ``timeout``.

    ``None`` (or infinity) waits as long as the export takes.
    """
    seconds = _seconds(timeout)
    pipelines = get_runtime().pipelines
    if pipelines is None:
        return True
    result: list[bool] = []

    def work() -> None:
        try:
            result.append(pipelines.force_flush(_millis(seconds)))
        except Exception as exc:
            internal_error("force_flush", exc)

    return _bounded(work, seconds, "rag_instrument-flush") and bool(result and result[0])


def _at_exit() -> None:
    try:
        # Validated by configure() (a bad RAG_INSTRUMENT_SHUTDOWN_TIMEOUT fails there, not
        # silently here).
        _shutdown(get_runtime().settings.shutdown_timeout, at_exit=True)
    except Exception:
        pass


# The process that registered the flush at its exit (its registries are its own).
_CHILD_FLUSH_PID: list[int] = [0]


def _flush_at_worker_exit() -> None:
    """In a forked child: flush at its end when multiprocessing ends it.

    A multiprocessing worker started by fork (a pool's, Celery's prefork) ends with
    ``os._exit()``, which runs no ``atexit`` handler: only multiprocessing's own
    finalizers run, so the last task's spans would never be exported (RELIABILITY C21).
    """
    util = sys.modules.get("multiprocessing.util")
    if util is None:
        return
    try:
        # multiprocessing clears its finalizers at the start of a worker, then runs the
        # after-fork callbacks: the flush is registered from one of those.
        util.register_after_fork(_AFTER_FORK_TOKEN, _finalize_at_exit)
        _CHILD_FLUSH_PID[0] = os.getpid()  # configure() in this child: registered already
    except Exception as exc:
        internal_error("registering the flush at a worker's exit", exc)


def _flush_at_child_exit() -> None:
    """In a multiprocessing child configured after it started: flush at its end.

    A child of the ``forkserver`` start method (Linux's default from Python 3.14) imports
    the library after its fork, so the after-fork hook above never ran in it, and it ends
    with ``os._exit()`` too (RELIABILITY C21): its finalizers are what runs. Configured
    while the child imports the main module, before multiprocessing clears the
    finalizers, the flush is registered from an after-fork callback, run after that;
    configured later, inside the child's task, directly.
    """
    pid = os.getpid()
    util = sys.modules.get("multiprocessing.util")
    process = sys.modules.get("multiprocessing.process")
    if _CHILD_FLUSH_PID[0] == pid or util is None or process is None:
        return
    _CHILD_FLUSH_PID[0] = pid
    try:
        util.register_after_fork(_AFTER_FORK_TOKEN, _finalize_at_exit)
        if process.parent_process() is not None:
            util.Finalize(None, _at_exit, exitpriority=0)
    except Exception as exc:
        internal_error("registering the flush at a worker's exit", exc)


def _finalize_at_exit(_token: object) -> None:
    util = sys.modules.get("multiprocessing.util")
    if util is not None:
        util.Finalize(None, _at_exit, exitpriority=0)


class _Token:
    """What multiprocessing's after-fork registry is keyed by (held weakly)."""


_AFTER_FORK_TOKEN: Final = _Token()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_flush_at_worker_exit)


# The settings' Args are generated from the settings table (one declaration per setting).
# The placeholder's own indentation is kept: Python 3.13 strips docstrings' common indent.
if configure.__doc__:
    configure.__doc__ = re.sub(
        r"^([ \t]*)\{settings\}\n",
        lambda match: docstring_args(match.group(1)),
        configure.__doc__,
        count=1,
        flags=re.MULTILINE,
    )


def global_provider_is_unset() -> bool:
    """Whether no tracer provider is installed in the OpenTelemetry API's global slot."""
    from rag_instrument import exporters

    return exporters.global_provider_is_unset()


def release_global_provider() -> None:
    """Take the library's provider out of the global slot (``testing.capture()``'s end)."""
    from rag_instrument import exporters

    exporters.release_global_provider()
