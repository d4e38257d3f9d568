"""The settings table: every ``configure()`` option declared once.

Each field of :class:`Settings` is one row, made by :func:`setting`: its name and type
(the annotation), default, environment variables, parser (which validates and writes the
error message) and a one-line description. Everything else derives from the rows:
:func:`build_settings` (arguments > environment > default), the ``Args`` section of
``configure()``'s docstring, and the environment table in ``docs/configuration.md``
(``tests/test_settings.py`` checks that the page matches :func:`markdown_table`).

Adding a setting is one row here plus its keyword argument in ``configure()`` (a test
fails until both exist); see ``docs/design.md``.

This module is at the bottom of the house: it imports nothing from rag_instrument but
:mod:`rag_instrument._utils`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, TypeVar

from rag_instrument._sanitize import redact_text

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = [
    "EXPORTERS",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "Setting",
    "Settings",
    "bad",
    "build_settings",
    "docstring_args",
    "markdown_table",
    "setting",
    "settings_table",
    "write_table",
]

T = TypeVar("T")
#: ``parse(value, origin)`` returns the validated value or raises ``ValueError``.
Parser = Callable[[Any, str], Any]
#: Reads a value from standard (non-``RAG_INSTRUMENT_``) variables: ``(value, origin)``.
EnvReader = Callable[[Mapping[str, str]], "tuple[Any, str] | None"]

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
_META: Final = "rag_instrument.setting"


def bad(name: str, origin: str, value: Any, accepted: str) -> ValueError:
    """The error for an invalid setting: its name, value, origin and what is accepted.

    The value is shown redacted: a mistyped endpoint or DSN may carry a password, and the
    error may end in a start-up log.
    """
    return ValueError(
        f"rag_instrument: invalid {name} {redact_text(repr(value))} (from {origin}); "
        f"expected {accepted}"
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Setting:
    """One row of the settings table (made by :func:`setting`)."""

    name: str
    default: Any
    parse: Callable[[str, Any, str], Any]
    doc: str
    env: tuple[str, ...]
    env_reader: EnvReader | None
    env_doc: str
    default_doc: str

    @property
    def env_names(self) -> tuple[str, ...]:
        """``RAG_INSTRUMENT_<NAME>`` followed by the standard variables, in precedence order."""
        return (f"RAG_INSTRUMENT_{self.name.upper()}", *self.env)


def setting(
    default: T,
    parse: Callable[[str, Any, str], Any],
    doc: str,
    *,
    env: tuple[str, ...] = (),
    env_reader: EnvReader | None = None,
    env_doc: str = "",
    default_doc: str | None = None,
) -> T:
    """Declare one setting as a :class:`Settings` field.

    Args:
        default: the value when neither an argument nor the environment gives one.
        parse: ``parse(name, value, origin)`` returns the validated value or raises the
            ``ValueError`` made by :func:`bad`.
        doc: one line, for ``configure()``'s docstring and the documentation table.
        env: standard variables read after ``RAG_INSTRUMENT_<NAME>`` (e.g.
            ``OTEL_SERVICE_NAME``).
        env_reader: reads a standard variable that needs translating (e.g.
            ``OTEL_TRACES_SAMPLER``); consulted last.
        env_doc: how the documentation table lists the variables (default: their names).
        default_doc: how the documentation table shows the default.
    """
    spec = {
        "parse": parse,
        "doc": doc,
        "env": env,
        "env_reader": env_reader,
        "env_doc": env_doc,
        "default_doc": default_doc,
    }
    if isinstance(default, dict):
        factory: Callable[[], Any] = dict
        made: T = dataclasses.field(default_factory=factory, metadata={_META: spec})
        return made
    return dataclasses.field(default=default, metadata={_META: spec})


# --- parsers ----------------------------------------------------------------------------------


def parse_bool(name: str, value: Any, origin: str) -> bool:
    """``True``/``False``, the integers 1/0, or the strings true/false, 1/0, yes/no, on/off."""
    if isinstance(value, bool):
        return value
    if type(value) is int and value in (0, 1):  # as the message below offers
        return value == 1
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise bad(name, origin, value, "a boolean (true/false, 1/0, yes/no, on/off)")


def number(
    *, integer: bool = False, minimum: float, strict: bool = False, maximum: float | None = None
) -> Callable[[str, Any, str], Any]:
    """A parser for a finite number (or integer) of at least ``minimum`` (``strict``: above)."""

    def parse(name: str, value: Any, origin: str) -> Any:
        if maximum is None:
            result = parse_number(
                name, origin, value, integer=integer, minimum=minimum, strict=strict
            )
        else:
            # One message for every bad value of a bounded setting: the whole range.
            between = f"a number between {minimum:g} and {maximum:g}"
            try:
                result = parse_number(
                    name, origin, value, integer=integer, minimum=minimum, strict=strict
                )
            except ValueError:
                raise bad(name, origin, value, between) from None
            if result > maximum:
                raise bad(name, origin, value, between)
        return int(result) if integer else result

    return parse


def parse_number(
    name: str, origin: str, value: Any, *, integer: bool, minimum: float, strict: bool = False
) -> float:
    """Validate a number; the message says integer or number, and the bound."""
    accepted = (
        f"{'an integer' if integer else 'a number'} "
        f"{'greater than' if strict else 'at least'} {minimum:g}"
    )
    if isinstance(value, bool):
        raise bad(name, origin, value, accepted)
    try:
        number = float(value) if not isinstance(value, int | float) else value
        as_float = float(number)  # an integer beyond a float's range: OverflowError
        if not math.isfinite(as_float):
            raise bad(name, origin, value, accepted)
        if integer and as_float != int(number):
            raise bad(name, origin, value, accepted)
    except (TypeError, ValueError, OverflowError):
        raise bad(name, origin, value, accepted) from None
    if number < minimum or (strict and number == minimum):
        raise bad(name, origin, value, accepted)
    return as_float


def choice(
    values: tuple[str, ...], *, aliases: Mapping[str, str] | None = None
) -> Callable[[str, Any, str], str]:
    """A parser for one of ``values`` (case-insensitive; ``aliases`` map to a value)."""

    def parse(name: str, value: Any, origin: str) -> str:
        if not isinstance(value, str) or value.strip().lower() not in values:
            raise bad(name, origin, value, "one of " + ", ".join(repr(v) for v in values))
        chosen = value.strip().lower()
        return (aliases or {}).get(chosen, chosen)

    return parse


def _parse_log_level(name: str, value: Any, origin: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = logging.getLevelName(value)
    return choice(tuple(LOG_LEVELS), aliases={"warn": "warning"})(name, value, origin)


def _parse_service_name(name: str, value: Any, origin: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise bad(name, origin, value, "a non-empty string")
    return value.strip()


_EXPORTER_ACCEPTED: Final = "one of 'none', 'console', 'otlp', 'memory' or a SpanExporter instance"


def _parse_exporter(name: str, value: Any, origin: str) -> Any:
    if isinstance(value, str):
        if value.strip().lower() not in EXPORTERS:
            raise bad(name, origin, value, _EXPORTER_ACCEPTED)
        return value.strip().lower()
    # An instance: checked against the SDK's class only now, so that importing the library
    # does not load the SDK.
    from opentelemetry.sdk.trace.export import SpanExporter

    if not isinstance(value, SpanExporter):
        raise bad(name, origin, value, _EXPORTER_ACCEPTED)
    return value


def _parse_endpoint(name: str, value: Any, origin: str) -> str:
    accepted = "an http:// or https:// URL with a host (and a port from 1 to 65535)"
    if not isinstance(value, str) or not value.strip().startswith(("http://", "https://")):
        raise bad(name, origin, value, accepted)
    text = value.strip()
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port  # ValueError for a port that is not a number or out of range
    except ValueError:
        raise bad(name, origin, value, accepted) from None
    if not parts.hostname or port == 0:
        raise bad(name, origin, value, accepted)
    return text


def _parse_log_file(name: str, value: Any, origin: str) -> str:
    if not isinstance(value, str | os.PathLike):
        raise bad(name, origin, value, "a file path")
    path = Path(os.fspath(value)).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.close(fd)
    except OSError as exc:
        raise ValueError(
            f"rag_instrument: invalid {name} {redact_text(repr(os.fspath(value)))} "
            f"(from {origin}): "
            f"cannot write there ({exc.strerror or exc})"
        ) from None
    return str(path)


def _parse_budgets(name: str, value: Any, origin: str) -> Mapping[str, float]:
    accepted = "a mapping of stage name (or 'METHOD /route') to a positive number of milliseconds"
    if isinstance(value, str):
        text = value.strip()
        try:
            if text.startswith("{"):
                value = json.loads(text)
            else:
                value = dict(part.split("=", 1) for part in text.split(",") if part.strip())
        except ValueError:
            raise bad(
                name, origin, text, accepted + " (e.g. 'retrieval=1500,search=2000')"
            ) from None
    if not isinstance(value, Mapping):
        raise bad(name, origin, value, accepted)
    budgets: dict[str, float] = {}
    for stage_name, ms in value.items():
        raw = getattr(stage_name, "value", stage_name)  # a PipelineStage member
        if not isinstance(raw, str):
            raise bad(name, origin, value, accepted + f"; the stage name {raw!r} is not a string")
        key = raw.strip()
        if not key:
            raise bad(name, origin, value, accepted + "; a stage name is empty")
        budgets[key] = parse_number(
            f"{name}[{key!r}]", origin, ms, integer=False, minimum=0.0, strict=True
        )
    # Read-only, as the rest of the frozen settings: a change would not be in force.
    return MappingProxyType(budgets)


# --- standard variables that need translating ---------------------------------------------------


#: ``OTEL_TRACES_SAMPLER`` values the OpenTelemetry specification lists that rag_instrument
#: does not implement: the SDK environment specification has an implementation warn about
#: such a value and ignore it, so the default sampler (parentbased_always_on) is used.
_UNSUPPORTED_SAMPLERS: Final = ("jaeger_remote", "parentbased_jaeger_remote", "xray")


_PENDING_WARNINGS: list[str] = []


def take_warnings() -> list[str]:
    """The warnings the last :func:`build_settings` found, for configure() to log (once)."""
    found = list(_PENDING_WARNINGS)
    _PENDING_WARNINGS.clear()
    return found


def _sampler_from_otel(env: Mapping[str, str]) -> tuple[Any, str] | None:
    raw = env.get("OTEL_TRACES_SAMPLER", "").strip()
    sampler = raw.lower()
    if not sampler:
        return None
    origin = "environment variable OTEL_TRACES_SAMPLER"
    if sampler in ("always_on", "parentbased_always_on"):
        return 1.0, origin
    if sampler in ("always_off", "parentbased_always_off"):
        return 0.0, origin
    if sampler in ("traceidratio", "parentbased_traceidratio"):
        arg = env.get("OTEL_TRACES_SAMPLER_ARG", "1.0").strip() or "1.0"
        return arg, "environment variable OTEL_TRACES_SAMPLER_ARG"
    if sampler in _UNSUPPORTED_SAMPLERS:
        # Logged by configure() once its log output is in place (a line now would reach
        # standard error as plain text, or miss the log file).
        _PENDING_WARNINGS.append(
            f"rag_instrument: OTEL_TRACES_SAMPLER={raw!r} is not supported; using the "
            "default sampler, parentbased_always_on (sample_ratio 1.0)"
        )
        return None
    raise bad(
        "sampler",
        origin,
        sampler,
        "one of always_on, always_off, traceidratio, parentbased_always_on, "
        "parentbased_always_off, parentbased_traceidratio (jaeger_remote, "
        "parentbased_jaeger_remote and xray fall back to parentbased_always_on)",
    )


def _parent_based_from_otel(env: Mapping[str, str]) -> tuple[Any, str] | None:
    # always_on, always_off and traceidratio decide every span alone, whatever its parent
    # decided (the SDK's samplers of those names); their parentbased_ forms follow it.
    sampler = env.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if sampler in ("always_on", "always_off", "traceidratio"):
        return False, "environment variable OTEL_TRACES_SAMPLER"
    if sampler in ("parentbased_always_on", "parentbased_always_off", "parentbased_traceidratio"):
        return True, "environment variable OTEL_TRACES_SAMPLER"
    return None


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


def _otel_exporter(variable: str, known: Mapping[str, str]) -> EnvReader:
    """A reader of ``OTEL_<SIGNAL>_EXPORTER``: its (first) value, translated by ``known``.

    The standard allows a comma-separated list; rag_instrument sends each signal to one
    place, so a list of more than one, or a value it cannot honour (``zipkin``,
    ``prometheus``), is an error naming the variable rather than silently ignored.
    """

    def read(env: Mapping[str, str]) -> tuple[Any, str] | None:
        raw = env.get(variable, "").strip()
        if not raw:
            return None
        origin = f"environment variable {variable}"
        values = [v.strip().lower() for v in raw.split(",") if v.strip()]
        if len(values) != 1 or values[0] not in known:
            raise bad(variable, origin, raw, "one of " + ", ".join(repr(k) for k in known))
        return known[values[0]], origin

    return read


def _service_name_from_resource(env: Mapping[str, str]) -> tuple[Any, str] | None:
    """``service.name`` in ``OTEL_RESOURCE_ATTRIBUTES`` (``key=value`` pairs, percent-encoded).

    The SDK's rule: ``OTEL_SERVICE_NAME`` wins over it, and it wins over a default.
    """
    raw = env.get("OTEL_RESOURCE_ATTRIBUTES", "")
    for pair in raw.split(","):
        key, sep, value = pair.partition("=")
        if sep and key.strip() == "service.name":
            name = urllib.parse.unquote(value.strip())
            if name.strip():
                return name, "environment variable OTEL_RESOURCE_ATTRIBUTES"
    return None


def _disabled_from_otel(env: Mapping[str, str]) -> tuple[Any, str] | None:
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False, "environment variable OTEL_SDK_DISABLED"
    return None


# --- the table --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """The validated configuration in force (returned by ``configure()``).

    Attributes mirror the arguments of ``configure()``; ``budgets`` maps stage names to
    milliseconds (read-only, as every setting). Each field is one row of the settings
    table (see :func:`setting`).
    """

    def __post_init__(self) -> None:
        if not isinstance(self.budgets, MappingProxyType):  # the default, or a copy's
            object.__setattr__(self, "budgets", MappingProxyType(dict(self.budgets)))

    service_name: str = setting(
        "rag-service",
        _parse_service_name,
        "`service.name` of the spans",
        env=("OTEL_SERVICE_NAME",),
        env_reader=_service_name_from_resource,
        env_doc="`RAG_INSTRUMENT_SERVICE_NAME`, `OTEL_SERVICE_NAME`, `service.name` in "
        "`OTEL_RESOURCE_ATTRIBUTES`",
    )
    exporter: str = setting(
        "none",
        _parse_exporter,
        "where spans and metrics go: `none`, `console`, `otlp` (OTLP/HTTP, extra `otlp`), "
        "`memory` or a `SpanExporter` instance",
        env_reader=_otel_exporter(
            "OTEL_TRACES_EXPORTER", {"otlp": "otlp", "console": "console", "none": "none"}
        ),
        env_doc="`RAG_INSTRUMENT_EXPORTER`, `OTEL_TRACES_EXPORTER`",
    )
    metrics_exporter: str | None = setting(
        None,
        choice(EXPORTERS),
        "where metrics go, if not where spans go (`exporter`): `none`, `console`, `otlp` or "
        "`memory`",
        env_reader=_otel_exporter(
            "OTEL_METRICS_EXPORTER", {"otlp": "otlp", "console": "console", "none": "none"}
        ),
        env_doc="`RAG_INSTRUMENT_METRICS_EXPORTER`, `OTEL_METRICS_EXPORTER`",
        default_doc="as `exporter`",
    )
    otlp_endpoint: str | None = setting(
        None,
        _parse_endpoint,
        "OTLP/HTTP receiver (base URL)",
        env=("OTEL_EXPORTER_OTLP_ENDPOINT",),
        default_doc="`http://localhost:4318`",
    )
    log_format: str = setting(
        "json", choice(LOG_FORMATS), "`json` (one object per line) or `console`"
    )
    log_file: str | None = setting(
        None,
        _parse_log_file,
        "append log lines to this file (a missing folder is created; moved or deleted by "
        "log rotation, it is opened again within a second)",
        default_doc="standard error",
    )
    log_level: str = setting(
        "info",
        _parse_log_level,
        "`debug`, `info`, `warning`, `error` or `critical`",
    )
    logs_exporter: str = setting(
        "console",
        choice(("console", "none")),
        "`console`: log lines go to `log_file` or standard error; `none`: no lines",
        # otlp (the variable's default in the specification, which operators and distros
        # set) keeps the lines: rag_instrument writes JSON lines, not OTLP log records.
        env_reader=_otel_exporter(
            "OTEL_LOGS_EXPORTER", {"otlp": "console", "console": "console", "none": "none"}
        ),
        env_doc="`RAG_INSTRUMENT_LOGS_EXPORTER`, `OTEL_LOGS_EXPORTER`",
    )
    enabled: bool = setting(
        True,
        parse_bool,
        "`false`: every decorator and context manager is a pass-through "
        "(your own log lines are still written)",
        env_reader=_disabled_from_otel,
        env_doc="`RAG_INSTRUMENT_ENABLED`, `OTEL_SDK_DISABLED`",
    )
    capture_content: bool = setting(
        False,
        parse_bool,
        "record prompt and response text",
        env_reader=_capture_from_otel,
        env_doc="`RAG_INSTRUMENT_CAPTURE_CONTENT`, "
        "`OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT`",
    )
    max_content_chars: int = setting(
        2000, number(integer=True, minimum=1), "longer strings are cut, with a marker"
    )
    slow_query_ms: float = setting(
        1000.0, number(minimum=0), "statements slower than this log `slow query`"
    )
    n_plus_one_threshold: int = setting(
        5, number(integer=True, minimum=2), "repeated statement shapes that count as N+1"
    )
    budgets: Mapping[str, float] = setting(
        {},
        _parse_budgets,
        'milliseconds per stage or route, e.g. `{"retrieval": 1500, "POST /api/search": 2000}`',
        env_doc="`RAG_INSTRUMENT_BUDGETS` (`retrieval=1500,POST /api/search=2000` or JSON)",
        default_doc="none",
    )
    sample_ratio: float = setting(
        1.0,
        number(minimum=0, maximum=1),
        "parent-based ratio sampling of new traces",
        env_reader=_sampler_from_otel,
        env_doc="`RAG_INSTRUMENT_SAMPLE_RATIO`, `OTEL_TRACES_SAMPLER` / `_ARG`",
    )
    parent_based_sampling: bool = setting(
        True,
        parse_bool,
        "a span whose parent was sampled (or dropped) is too, and the ratio decides new "
        "traces only; off, the ratio decides every span alone, as the SDK's `always_on`, "
        "`always_off` and `traceidratio` samplers do",
        env_reader=_parent_based_from_otel,
        env_doc="`RAG_INSTRUMENT_PARENT_BASED_SAMPLING`, `OTEL_TRACES_SAMPLER`",
    )
    redact: bool = setting(True, parse_bool, "mask secrets in logs and span attributes")
    capture_logging: bool = setting(
        True,
        parse_bool,
        "route standard-library `logging` through the same pipeline (what the application's "
        "own logger levels let through)",
    )
    capture_logging_level: str | None = setting(
        None,
        _parse_log_level,
        "also bridge standard-library records down to this level, lowering the root "
        "logger's level to it (never done without this setting)",
        default_doc="the application's levels",
    )
    shutdown_timeout: float = setting(
        3.0, number(minimum=0), "seconds the flush at interpreter exit may take"
    )
    event_loop_threshold_ms: float | None = setting(
        None,
        number(minimum=0, strict=True),
        "watch every asyncio loop a stage runs in and log `event loop blocked` when one is "
        "blocked longer than this (see `profiling.md`)",
        default_doc="off",
    )
    resource_metrics: bool = setting(
        False,
        parse_bool,
        "`cpu_ms` on stage lines and spans, and process metrics (CPU, memory, GC, files)",
    )
    #: Set (with ``exporter="custom"``) when ``exporter`` was a ``SpanExporter`` instance.
    span_exporter: SpanExporter | None = dataclasses.field(default=None, repr=False)
    #: Full URLs per signal (``traces``, ``metrics``) from ``OTEL_EXPORTER_OTLP_<SIGNAL>_
    #: ENDPOINT``, used as they are, when ``otlp_endpoint`` was not given to ``configure()``
    #: nor as ``RAG_INSTRUMENT_OTLP_ENDPOINT`` (the OpenTelemetry SDK's precedence).
    otlp_signal_endpoints: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def log_level_no(self) -> int:
        """The standard-library level number of :attr:`log_level`."""
        return LOG_LEVELS[self.log_level]

    def __repr__(self) -> str:
        """The fields as the dataclass shows them, with secrets masked.

        An ``otlp_endpoint`` may carry credentials (``http://user:password@host``): a
        printed or logged configuration must not show them.
        """
        from rag_instrument._sanitize import redact_text

        shown = ", ".join(
            f"{field.name}={getattr(self, field.name)!r}"
            for field in dataclasses.fields(self)
            if field.repr
        )
        return redact_text(f"{type(self).__name__}({shown})")


def _rows() -> tuple[Setting, ...]:
    rows = []
    for field in dataclasses.fields(Settings):
        spec = field.metadata.get(_META)
        if spec is None:
            continue
        default: Any = field.default
        if field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        rows.append(
            Setting(
                name=field.name,
                default=default,
                parse=spec["parse"],
                doc=spec["doc"],
                env=spec["env"],
                env_reader=spec["env_reader"],
                env_doc=spec["env_doc"],
                default_doc=spec["default_doc"] or _show_default(default),
            )
        )
    return tuple(rows)


def _show_default(value: Any) -> str:
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value is None or value == {}:
        return "none"
    return f"`{value}`"


_TABLE: Final = _rows()


def settings_table() -> tuple[Setting, ...]:
    """The rows, in the order they are validated."""
    return _TABLE


def build_settings(env: Mapping[str, str] | None = None, **given: Any) -> Settings:
    """Merge explicit arguments, environment and defaults into validated :class:`Settings`.

    Precedence: explicit argument > ``RAG_INSTRUMENT_<NAME>`` > the standard ``OTEL_*``
    variable > default. An argument given as ``None`` counts as not given.

    Raises:
        ValueError: naming the first invalid setting, its origin and the accepted values.
        TypeError: an argument that is not a setting.
    """
    source = os.environ if env is None else env
    _PENDING_WARNINGS.clear()
    unknown = set(given) - {row.name for row in _TABLE}
    if unknown:
        raise TypeError(f"rag_instrument: unknown setting(s): {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for row in _TABLE:
        picked = _pick(row, given.get(row.name), source)
        if picked is not None:
            values[row.name] = row.parse(row.name, picked[0], picked[1])
            origins[row.name] = picked[1]
    check_export_variables(source)
    sampler = "environment variable OTEL_TRACES_SAMPLER"
    if origins.get("parent_based_sampling") == sampler and not origins.get(
        "sample_ratio", ""
    ).startswith(sampler):
        # The OTEL sampler's kind goes with its ratio: with the ratio from elsewhere
        # (RAG_INSTRUMENT_SAMPLE_RATIO, configure()), the ratio is parent-based as documented.
        del values["parent_based_sampling"]
    endpoint_origin = origins.get("otlp_endpoint", "")
    if not endpoint_origin.startswith(("configure(", "environment variable RAG_INSTRUMENT_")):
        signals = {}
        for signal in ("traces", "metrics"):
            variable = f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT"
            raw = source.get(variable, "").strip()
            if raw:
                signals[signal] = _parse_endpoint(
                    variable, raw, f"environment variable {variable}"
                )
        if signals:
            values["otlp_signal_endpoints"] = signals
    exporter = values.get("exporter")
    if exporter is not None and not isinstance(exporter, str):
        values["exporter"] = "custom"
        values["span_exporter"] = exporter
    if values.get("exporter") == "otlp" and "otlp_endpoint" not in values:
        values["otlp_endpoint"] = "http://localhost:4318"
    metrics_to = values.get("metrics_exporter") or values.get("exporter")
    sent = [
        signal
        for signal, target in (("TRACES", values.get("exporter")), ("METRICS", metrics_to))
        if target == "otlp"
    ]
    if sent:
        _check_otlp_protocol(source, sent)
    return Settings(**values)


#: The OTLP transport rag_instrument sends (``OTEL_EXPORTER_OTLP_PROTOCOL`` and the
#: per-signal variables must say this one, or nothing).
OTLP_PROTOCOL: Final = "http/protobuf"


def _check_otlp_protocol(source: Mapping[str, str], signals: list[str]) -> None:
    """Fail for an OTLP protocol other than HTTP/protobuf: it would be ignored silently.

    Only for the ``signals`` sent over OTLP (``"TRACES"``, ``"METRICS"``), each with the
    value in force for it: its own variable, else ``OTEL_EXPORTER_OTLP_PROTOCOL``.

    Raises:
        ValueError: naming the variable (a gRPC collector's port 4317 would get nothing).
    """
    for signal in signals:
        variable = f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL"
        raw = source.get(variable, "").strip()
        if not raw:
            variable = "OTEL_EXPORTER_OTLP_PROTOCOL"
            raw = source.get(variable, "").strip()
        if raw and raw.lower() != OTLP_PROTOCOL:
            raise ValueError(
                f"rag_instrument: environment variable {variable}={raw[:40]!r} is not "
                f"supported: rag_instrument sends OTLP over HTTP ({OTLP_PROTOCOL!r}, a "
                "collector's port 4318); set it to that, or unset it"
            )


# --- the OpenTelemetry SDK's export variables ------------------------------------------------

#: The span batch processor's defaults (``OTEL_BSP_*`` override them). Large enough that a
#: tight loop of stages does not outrun the export thread; the SDK's default queue of 2048
#: was measured dropping 18-41 % of spans in such a loop (RELIABILITY.md 50).
SPAN_QUEUE_SIZE: Final = 65_536
SPAN_SCHEDULE_DELAY_MS: Final = 1_000
SPAN_EXPORT_BATCH_SIZE: Final = 1_024

#: The standard variables the SDK reads when ``configure()`` builds the export pipelines:
#: name -> (number type, unit, whether zero is allowed).
_EXPORT_VARIABLES: Final[dict[str, tuple[type[int] | type[float], str, bool]]] = {
    "OTEL_BSP_SCHEDULE_DELAY": (int, "milliseconds", False),
    "OTEL_BSP_MAX_QUEUE_SIZE": (int, "spans", False),
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": (int, "spans", False),
    "OTEL_BSP_EXPORT_TIMEOUT": (int, "milliseconds", True),
    "OTEL_METRIC_EXPORT_INTERVAL": (float, "milliseconds", False),
    "OTEL_METRIC_EXPORT_TIMEOUT": (float, "milliseconds", True),
}


#: The longest delay, interval or timeout accepted (about 24.8 days in milliseconds), and
#: the largest size.
_MAX_EXPORT_MS: Final = 2**31 - 1


def check_export_variables(env: Mapping[str, str]) -> dict[str, float]:
    """The standard export variables that are set, read; a value the SDK cannot use raises.

    The SDK itself would log a warning and keep its default for a value it cannot read
    (``OTEL_BSP_SCHEDULE_DELAY=1s``), and fail with a message that names no variable for
    one out of range (``0``, a batch larger than the queue). Delays, intervals and timeouts
    in milliseconds, sizes in spans; the metric interval may be ``inf`` (no periodic
    export).

    Raises:
        ValueError: naming the variable, its value and what is accepted.
    """
    found: dict[str, float] = {}
    for name, (kind, unit, zero) in _EXPORT_VARIABLES.items():
        raw = env.get(name)
        if raw is None or raw.strip() == "":
            continue
        endless = name == "OTEL_METRIC_EXPORT_INTERVAL"  # inf: no periodic export
        accepted = (
            f"{'an integer' if kind is int else 'a number'} of {unit} "
            f"{'>= 0' if zero else '> 0'} and up to {_MAX_EXPORT_MS}"
            f"{' (or inf)' if endless else ''}"
        )
        try:
            value: float = kind(raw.strip())
        except ValueError:
            raise bad(name, f"environment variable {name}", raw, accepted) from None
        if (
            math.isnan(value)
            or value < 0
            or (value == 0 and not zero)
            # Longer waits overflow the SDK's timers (its export thread would die).
            or (value > _MAX_EXPORT_MS and not (endless and value == math.inf))
        ):
            raise bad(name, f"environment variable {name}", raw, accepted)
        found[name] = value
    batch = found.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE")
    queue = found.get("OTEL_BSP_MAX_QUEUE_SIZE", SPAN_QUEUE_SIZE)
    if batch is not None and batch > queue:
        origin = "environment variable OTEL_BSP_MAX_EXPORT_BATCH_SIZE"
        raise bad(
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
            origin,
            env["OTEL_BSP_MAX_EXPORT_BATCH_SIZE"],
            f"at most the span queue's size ({int(queue)}, OTEL_BSP_MAX_QUEUE_SIZE)",
        )
    return found


def _pick(row: Setting, explicit: Any, env: Mapping[str, str]) -> tuple[Any, str] | None:
    if explicit is not None:
        return explicit, f"configure({row.name}=...)"
    for env_name in row.env_names:
        value = env.get(env_name)
        if value is not None and value.strip() != "":
            return value.strip(), f"environment variable {env_name}"
    if row.env_reader is not None:
        return row.env_reader(env)
    return None


# --- derived documentation ----------------------------------------------------------------------


def markdown_table() -> str:
    """The environment table of ``docs/configuration.md``, rendered from the rows."""
    lines = [
        "| argument | environment | default | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for row in _TABLE:
        env_doc = row.env_doc or ", ".join(f"`{name}`" for name in row.env_names)
        lines.append(f"| `{row.name}` | {env_doc} | {row.default_doc} | {row.doc} |")
    return "\n".join(lines) + "\n"


def docstring_args(indent: str = "        ") -> str:
    """The settings as Google-style ``Args`` entries (for ``configure()``'s docstring)."""

    def rst(text: str) -> str:
        return text.replace("`", "``")

    return "".join(
        f"{indent}{row.name}: {rst(row.doc)} (default {rst(row.default_doc)}; "
        f"environment {', '.join(row.env_names)}).\n"
        for row in _TABLE
    )


def write_table(page: Path) -> bool:
    """Replace the settings table in ``page`` (a Markdown file) by :func:`markdown_table`.

    The table is found by its header row. Returns whether the file changed.
    """
    text = page.read_text()
    header = "| argument | environment |"
    start = text.index(header)
    end = text.find("\n\n", start)
    end = len(text) if end == -1 else end + 1
    updated = text[:start] + markdown_table() + text[end:]
    if updated == text:
        return False
    page.write_text(updated)
    return True
