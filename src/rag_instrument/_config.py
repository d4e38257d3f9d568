"""Settings, ``configure()`` and ``shutdown()``.

``configure()`` validates everything first (a bad value raises ``ValueError`` naming the
setting, where it came from and what is accepted) and only then replaces the previous
configuration, so a failed call leaves the running one intact. The result is one immutable
:class:`Runtime` that the hot paths read with a single attribute lookup.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import math
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from opentelemetry import metrics as metrics_api
from opentelemetry import trace as trace_api

from rag_instrument import attributes as attr
from rag_instrument._sanitize import Sanitizer
from rag_instrument._utils import internal_error, warn_once

if TYPE_CHECKING:
    from opentelemetry.metrics import Counter, Histogram, Meter
    from opentelemetry.sdk.metrics.export import MetricReader
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Tracer

    from rag_instrument.exporters import Pipelines
    from rag_instrument.logs import LogOutput

__all__ = ["Runtime", "Settings", "configure", "force_flush", "restore", "runtime", "shutdown"]

EXPORTERS: Final = ("none", "console", "otlp", "memory")
LOG_FORMATS: Final = ("json", "console")
LOG_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off", ""})


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """The validated configuration in force (returned by :func:`configure`).

    Attributes mirror the arguments of :func:`configure`; ``budgets`` maps stage names to
    milliseconds.
    """

    service_name: str = "rag-service"
    exporter: str = "none"
    otlp_endpoint: str | None = None
    log_format: str = "json"
    log_file: str | None = None
    log_level: str = "info"
    enabled: bool = True
    capture_content: bool = False
    max_content_chars: int = 2000
    slow_query_ms: float = 1000.0
    n_plus_one_threshold: int = 5
    budgets: Mapping[str, float] = dataclasses.field(default_factory=dict)
    sample_ratio: float = 1.0
    redact: bool = True
    capture_logging: bool = True
    span_exporter: SpanExporter | None = dataclasses.field(default=None, repr=False)

    @property
    def log_level_no(self) -> int:
        """The standard-library level number of :attr:`log_level`."""
        return LOG_LEVELS[self.log_level]


class Runtime:
    """Everything the hot paths need, resolved once per ``configure()``."""

    __slots__ = (
        "__weakref__",
        "_instruments",
        "budget_counter",
        "budgets",
        "configured",
        "enabled",
        "log",
        "meter",
        "pipelines",
        "sanitizer",
        "settings",
        "stage_duration",
        "tracer",
    )

    def __init__(
        self,
        settings: Settings,
        *,
        configured: bool,
        tracer: Tracer,
        meter: Meter,
        log: LogOutput | None,
        pipelines: Pipelines | None,
    ) -> None:
        self.settings = settings
        self.configured = configured
        self.enabled = settings.enabled
        self.tracer = tracer
        self.meter = meter
        self.log = log
        self.pipelines = pipelines
        self.sanitizer = Sanitizer(settings.max_content_chars, redact=settings.redact)
        self.budgets = dict(settings.budgets)
        self._instruments: dict[tuple[str, str], Any] = {}
        self.stage_duration: Histogram = self.histogram(
            attr.METRIC_STAGE_DURATION, "s", "Duration of rag_instrument pipeline stages."
        )
        self.budget_counter: Counter = self.counter(
            attr.METRIC_BUDGET_EXCEEDED, "{stage}", "Stages that ran over their budget."
        )

    def _instrument(self, kind: str, name: str, unit: str, description: str) -> Any:
        key = (kind, name)
        found = self._instruments.get(key)
        if found is None:
            factory = getattr(self.meter, f"create_{kind}")
            found = self._instruments[key] = factory(name, unit=unit, description=description)
        return found

    def histogram(self, name: str, unit: str, description: str = "") -> Histogram:
        """A histogram on the current meter, created once per configuration."""
        result: Histogram = self._instrument("histogram", name, unit, description)
        return result

    def counter(self, name: str, unit: str, description: str = "") -> Counter:
        """A counter on the current meter, created once per configuration."""
        result: Counter = self._instrument("counter", name, unit, description)
        return result


def _unconfigured() -> Runtime:
    # Before configure(): spans go to whatever the global OpenTelemetry API provides (a no-op
    # unless the application installed an SDK), no log lines are written, metrics are no-ops
    # unless a global meter provider exists.
    from rag_instrument import __name__ as lib

    return Runtime(
        Settings(),
        configured=False,
        tracer=trace_api.get_tracer(lib),
        meter=metrics_api.get_meter(lib),
        log=None,
        pipelines=None,
    )


_RUNTIME: Runtime = _unconfigured()
_LOCK = threading.RLock()
_ATEXIT_REGISTERED = False


def runtime() -> Runtime:
    """The runtime in force."""
    return _RUNTIME


# --- parsing and validation ---------------------------------------------------------------


class _Source:
    """Where a value came from, for error messages."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def pick(self, name: str, explicit: Any, *env_names: str) -> tuple[Any, str] | None:
        if explicit is not None:
            return explicit, f"configure({name}=...)"
        for env_name in env_names:
            value = self.env.get(env_name)
            if value is not None and value.strip() != "":
                return value.strip(), f"environment variable {env_name}"
        return None


def _env_name(name: str) -> str:
    return f"RAG_INSTRUMENT_{name.upper()}"


def _bad(name: str, origin: str, value: Any, accepted: str) -> ValueError:
    return ValueError(
        f"rag_instrument: invalid {name} {value!r} (from {origin}); expected {accepted}"
    )


def _parse_bool(name: str, origin: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise _bad(name, origin, value, "a boolean (true/false, 1/0, yes/no, on/off)")


def _parse_number(
    name: str, origin: str, value: Any, *, integer: bool, minimum: float, strict: bool = False
) -> float:
    accepted = (
        f"{'an integer' if integer else 'a number'} "
        f"{'greater than' if strict else 'at least'} {minimum:g}"
    )
    if isinstance(value, bool):
        raise _bad(name, origin, value, accepted)
    try:
        number = float(value) if not isinstance(value, int | float) else value
        if isinstance(number, float) and not math.isfinite(number):
            raise _bad(name, origin, value, accepted)
        if integer and float(number) != int(number):
            raise _bad(name, origin, value, accepted)
    except (TypeError, ValueError, OverflowError):
        raise _bad(name, origin, value, accepted) from None
    if number < minimum or (strict and number == minimum):
        raise _bad(name, origin, value, accepted)
    return float(number)


def _parse_budgets(origin: str, value: Any) -> dict[str, float]:
    accepted = "a mapping of stage name to a positive number of milliseconds"
    if isinstance(value, str):
        text = value.strip()
        try:
            if text.startswith("{"):
                value = json.loads(text)
            else:
                value = dict(part.split("=", 1) for part in text.split(",") if part.strip())
        except ValueError:
            raise _bad(
                "budgets", origin, text, accepted + " (e.g. 'retrieval=1500,search=2000')"
            ) from None
    if not isinstance(value, Mapping):
        raise _bad("budgets", origin, value, accepted)
    budgets: dict[str, float] = {}
    for stage_name, ms in value.items():
        key = str(getattr(stage_name, "value", stage_name)).strip()
        if not key:
            raise _bad("budgets", origin, value, accepted + "; a stage name is empty")
        budgets[key] = _parse_number(
            f"budgets[{key!r}]", origin, ms, integer=False, minimum=0.0, strict=True
        )
    return budgets


def _sample_ratio_from_otel(env: Mapping[str, str]) -> tuple[float, str] | None:
    sampler = env.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if not sampler:
        return None
    origin = "environment variable OTEL_TRACES_SAMPLER"
    if sampler in ("always_on", "parentbased_always_on"):
        return 1.0, origin
    if sampler in ("always_off", "parentbased_always_off"):
        return 0.0, origin
    if sampler in ("traceidratio", "parentbased_traceidratio"):
        arg = env.get("OTEL_TRACES_SAMPLER_ARG", "1.0").strip() or "1.0"
        return arg, "environment variable OTEL_TRACES_SAMPLER_ARG"  # type: ignore[return-value]
    raise _bad(
        "sampler",
        origin,
        sampler,
        "one of always_on, always_off, traceidratio, parentbased_always_on, "
        "parentbased_always_off, parentbased_traceidratio",
    )


def _capture_from_otel(env: Mapping[str, str]) -> tuple[Any, str] | None:
    name = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
    raw = env.get(name, "").strip()
    if not raw:
        return None
    value = raw.lower()
    if value in ("span_only", "span_and_event", "event_only"):
        return True, f"environment variable {name}"
    if value == "no_content":
        return False, f"environment variable {name}"
    return raw, f"environment variable {name}"


def _check_log_file(origin: str, value: Any) -> str:
    if not isinstance(value, str | os.PathLike):
        raise _bad("log_file", origin, value, "a file path")
    path = Path(os.fspath(value)).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.close(fd)
    except OSError as exc:
        raise ValueError(
            f"rag_instrument: invalid log_file {os.fspath(value)!r} (from {origin}): "
            f"cannot write there ({exc.strerror or exc})"
        ) from None
    return str(path)


def build_settings(env: Mapping[str, str] | None = None, **given: Any) -> Settings:
    """Merge explicit arguments, environment and defaults into validated :class:`Settings`.

    Precedence: explicit argument > ``RAG_INSTRUMENT_<NAME>`` > the standard ``OTEL_*``
    variable > default.

    Raises:
        ValueError: naming the first invalid setting, its origin and the accepted values.
    """
    src = _Source(os.environ if env is None else env)
    defaults = Settings()
    values: dict[str, Any] = {}

    picked = src.pick(
        "service_name", given.get("service_name"), _env_name("service_name"), "OTEL_SERVICE_NAME"
    )
    if picked is not None:
        name, origin = picked
        if not isinstance(name, str) or not name.strip():
            raise _bad("service_name", origin, name, "a non-empty string")
        values["service_name"] = name.strip()

    picked = src.pick("exporter", given.get("exporter"), _env_name("exporter"))
    if picked is not None:
        exporter, origin = picked
        if isinstance(exporter, str):
            if exporter.strip().lower() not in EXPORTERS:
                raise _bad(
                    "exporter",
                    origin,
                    exporter,
                    "one of 'none', 'console', 'otlp', 'memory' or a SpanExporter instance",
                )
            values["exporter"] = exporter.strip().lower()
        else:
            from opentelemetry.sdk.trace.export import SpanExporter

            if not isinstance(exporter, SpanExporter):
                raise _bad(
                    "exporter",
                    origin,
                    exporter,
                    "one of 'none', 'console', 'otlp', 'memory' or a SpanExporter instance",
                )
            values["exporter"] = "custom"
            values["span_exporter"] = exporter

    picked = src.pick(
        "otlp_endpoint",
        given.get("otlp_endpoint"),
        _env_name("otlp_endpoint"),
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    )
    if picked is not None:
        endpoint, origin = picked
        if not isinstance(endpoint, str) or not endpoint.startswith(("http://", "https://")):
            raise _bad("otlp_endpoint", origin, endpoint, "an http:// or https:// URL")
        values["otlp_endpoint"] = endpoint

    for name, accepted_values in (("log_format", LOG_FORMATS), ("log_level", tuple(LOG_LEVELS))):
        picked = src.pick(name, given.get(name), _env_name(name))
        if picked is not None:
            raw, origin = picked
            if isinstance(raw, int) and name == "log_level":
                raw = logging.getLevelName(raw)
            if not isinstance(raw, str) or raw.strip().lower() not in accepted_values:
                raise _bad(
                    name, origin, raw, "one of " + ", ".join(repr(v) for v in accepted_values)
                )
            values[name] = raw.strip().lower()
    if values.get("log_level") == "warn":
        values["log_level"] = "warning"

    picked = src.pick("log_file", given.get("log_file"), _env_name("log_file"))
    if picked is not None:
        values["log_file"] = _check_log_file(picked[1], picked[0])

    for name in ("enabled", "capture_content", "redact", "capture_logging"):
        if name == "capture_content":
            otel = _capture_from_otel(src.env)
        elif name == "enabled" and src.env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            otel = (False, "environment variable OTEL_SDK_DISABLED")
        else:
            otel = None
        picked = src.pick(name, given.get(name), _env_name(name)) or otel
        if picked is not None:
            values[name] = _parse_bool(name, picked[1], picked[0])

    picked = src.pick(
        "max_content_chars", given.get("max_content_chars"), _env_name("max_content_chars")
    )
    if picked is not None:
        values["max_content_chars"] = int(
            _parse_number("max_content_chars", picked[1], picked[0], integer=True, minimum=1)
        )
    picked = src.pick("slow_query_ms", given.get("slow_query_ms"), _env_name("slow_query_ms"))
    if picked is not None:
        values["slow_query_ms"] = _parse_number(
            "slow_query_ms", picked[1], picked[0], integer=False, minimum=0
        )
    picked = src.pick(
        "n_plus_one_threshold", given.get("n_plus_one_threshold"), _env_name("n_plus_one_threshold")
    )
    if picked is not None:
        values["n_plus_one_threshold"] = int(
            _parse_number("n_plus_one_threshold", picked[1], picked[0], integer=True, minimum=2)
        )

    picked = src.pick("budgets", given.get("budgets"), _env_name("budgets"))
    if picked is not None:
        values["budgets"] = _parse_budgets(picked[1], picked[0])

    picked = src.pick("sample_ratio", given.get("sample_ratio"), _env_name("sample_ratio")) or (
        _sample_ratio_from_otel(src.env)
    )
    if picked is not None:
        ratio = _parse_number("sample_ratio", picked[1], picked[0], integer=False, minimum=0)
        if ratio > 1:
            raise _bad("sample_ratio", picked[1], picked[0], "a number between 0 and 1")
        values["sample_ratio"] = ratio

    if values.get("exporter") == "otlp" and "otlp_endpoint" not in values:
        values["otlp_endpoint"] = "http://localhost:4318"
    return dataclasses.replace(defaults, **values)


# --- configure / shutdown -------------------------------------------------------------------


def configure(
    service_name: str | None = None,
    *,
    exporter: str | SpanExporter | None = None,
    otlp_endpoint: str | None = None,
    log_format: str | None = None,
    log_file: str | os.PathLike[str] | None = None,
    log_level: str | int | None = None,
    enabled: bool | None = None,
    capture_content: bool | None = None,
    max_content_chars: int | None = None,
    slow_query_ms: float | None = None,
    n_plus_one_threshold: int | None = None,
    budgets: Mapping[str, float] | None = None,
    sample_ratio: float | None = None,
    redact: bool | None = None,
    capture_logging: bool | None = None,
    metric_readers: Sequence[MetricReader] = (),
    tracer_provider: trace_api.TracerProvider | None = None,
    meter_provider: metrics_api.MeterProvider | None = None,
) -> Settings:
    """Configure rag_instrument; call it once at start-up (again to reconfigure).

    Every argument left as ``None`` comes from ``RAG_INSTRUMENT_<NAME>`` (or the standard
    ``OTEL_SERVICE_NAME``, ``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_TRACES_SAMPLER`` /
    ``OTEL_TRACES_SAMPLER_ARG``, ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT``,
    ``OTEL_SDK_DISABLED``), else from the default.

    Args:
        service_name: ``service.name`` of the spans (default ``"rag-service"``).
        exporter: ``"none"`` (default), ``"console"``, ``"otlp"`` (OTLP/HTTP, extra
            ``otlp``), ``"memory"`` or a ``SpanExporter`` instance. Metrics follow it.
        otlp_endpoint: base URL of the OTLP/HTTP receiver (default ``http://localhost:4318``).
        log_format: ``"json"`` (one JSON object per line, default) or ``"console"``.
        log_file: write log lines to this file (appending; a missing folder is created)
            instead of standard error.
        log_level: ``debug``, ``info`` (default), ``warning``, ``error`` or ``critical``.
        enabled: ``False`` turns every decorator and context manager into a pass-through.
        capture_content: record prompt and response text (off by default).
        max_content_chars: strings longer than this are cut, with a marker (default 2000).
        slow_query_ms: statements slower than this log ``"slow query"`` (default 1000).
        n_plus_one_threshold: repeated statement shapes that count as N+1 (default 5).
        budgets: milliseconds per stage, e.g. ``{"retrieval": 1500, "search": 2000}``.
        sample_ratio: fraction of new traces to sample, parent-based (default 1.0).
        redact: mask secrets in logs and span attributes (default ``True``).
        capture_logging: route standard-library ``logging`` records through the same
            pipeline (default ``True``).
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
    settings = build_settings(
        service_name=service_name,
        exporter=exporter,
        otlp_endpoint=otlp_endpoint,
        log_format=log_format,
        log_file=log_file,
        log_level=log_level,
        enabled=enabled,
        capture_content=capture_content,
        max_content_chars=max_content_chars,
        slow_query_ms=slow_query_ms,
        n_plus_one_threshold=n_plus_one_threshold,
        budgets=budgets,
        sample_ratio=sample_ratio,
        redact=redact,
        capture_logging=capture_logging,
    )
    apply(
        settings,
        metric_readers=metric_readers,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
    )
    return settings


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
    from rag_instrument import exporters, logs

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
        output = logs.LogOutput(settings, sink=log_sink) if settings.enabled else None
        old = _RUNTIME
        if pipelines is not None:
            tracer = pipelines.tracer
            meter = pipelines.meter
        else:
            tracer = trace_api.NoOpTracer()
            meter = metrics_api.NoOpMeter("rag_instrument")
        new = Runtime(
            settings, configured=True, tracer=tracer, meter=meter, log=output, pipelines=pipelines
        )
        _switch(new)
        warn_once.reset()
        if retire:
            _retire(old, timeout=5.0, successor=new)
        if not _ATEXIT_REGISTERED:
            atexit.register(_at_exit)
            _ATEXIT_REGISTERED = True
        return new


def _switch(new: Runtime) -> None:
    global _RUNTIME
    from rag_instrument import logs

    _RUNTIME = new
    logs.install_stdlib_handler(new)
    if new.pipelines is not None:
        new.pipelines.activate()


def restore(previous: Runtime) -> None:
    """Put back a runtime set aside by ``apply(..., retire=False)``; close the current one."""
    with _LOCK:
        current = _RUNTIME
        if current is previous:
            return
        _switch(previous)
        _retire(current, timeout=5.0, successor=previous)


def _retire(old: Runtime, timeout: float, successor: Runtime | None = None) -> bool:
    """Flush and close what ``old`` created, within ``timeout`` seconds.

    A span exporter the application passed in and the ``successor`` uses as well is
    flushed, not shut down: reconfiguring must not kill the application's exporter.
    """
    if old.log is not None:
        old.log.close()
    if old.pipelines is None:
        return True
    pipelines = old.pipelines
    if successor is not None and successor.settings.span_exporter is not None:
        pipelines.keep_exporter(successor.settings.span_exporter)
    done = threading.Event()

    def work() -> None:
        try:
            pipelines.shutdown(timeout_millis=int(timeout * 900))
        except Exception as exc:
            internal_error("shutdown", exc)
        finally:
            done.set()

    # Exporters may block (a black-holed collector): never let that hold the caller past
    # the deadline. The thread is a daemon, so it cannot keep the process alive either.
    thread = threading.Thread(target=work, name="rag_instrument-shutdown", daemon=True)
    thread.start()
    return done.wait(max(timeout, 0.0))


def shutdown(timeout: float = 5.0) -> bool:
    """Flush and close what :func:`configure` created; return ``True`` if all was flushed.

    Returns within ``timeout`` seconds even when the collector is down or black-holed.
    Afterwards the library is unconfigured: stages still run, nothing is exported or
    logged. A second call does nothing. Also registered to run at interpreter exit.
    """
    global _RUNTIME
    from rag_instrument import logs

    with _LOCK:
        old = _RUNTIME
        if not old.configured:
            return True
        _RUNTIME = _unconfigured()
        logs.install_stdlib_handler(_RUNTIME)
    return _retire(old, timeout)


def force_flush(timeout: float = 5.0) -> bool:
    """Export every span that has already ended; ``True`` when done within ``timeout``."""
    pipelines = _RUNTIME.pipelines
    if pipelines is None:
        return True
    deadline = time.monotonic() + timeout
    result: list[bool] = []

    def work() -> None:
        try:
            result.append(pipelines.force_flush(int(timeout * 1000)))
        except Exception as exc:
            internal_error("force_flush", exc)

    thread = threading.Thread(target=work, name="rag_instrument-flush", daemon=True)
    thread.start()
    thread.join(max(deadline - time.monotonic(), 0.0))
    return bool(result and result[0])


def _at_exit() -> None:
    try:
        shutdown(timeout=float(os.environ.get("RAG_INSTRUMENT_SHUTDOWN_TIMEOUT", "3") or 3))
    except Exception:
        pass
