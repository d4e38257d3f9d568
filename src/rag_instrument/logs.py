"""The log pipeline: one JSON object per line, with trace ids and the pipeline stage.

Every line, whether it comes from a stage, from :func:`get_logger` or from the standard
library's :mod:`logging`, has this shape (``log_format="json"``)::

    {"timestamp": "2026-11-25T15:33:19.123456Z", "level": "info",
     "event": "retrieval completed", "logger": "rag_instrument",
     "trace_id": "<32 hex>", "span_id": "<16 hex>",
     "context": {"pipeline_stage": "retrieval", "request_id": "r-1"},
     "execution_time_ms": 1234.8, ...}

``log_format="console"`` renders the same events for people, one line each, with values
that contain spaces, quotes or control characters quoted and escaped.

Loggers returned by :func:`get_logger` are structlog bound loggers whose processor chain is
rag_instrument's; they look the configuration up at each call, so a module-level logger
honours a later ``configure()``.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, Final, cast

import orjson
import structlog
from opentelemetry import trace as trace_api
from structlog.tracebacks import ExceptionDictTransformer

from rag_instrument._context import bound, current_frame, seen_contents
from rag_instrument._errors import (
    exception_chain,
    exception_message,
    hide_content,
    is_database_error,
)
from rag_instrument._runtime import get_runtime
from rag_instrument._sanitize import LITERAL_SECRETS, mask_literal_secrets, safe_repr
from rag_instrument._utils import internal_error, renew_after_fork
from rag_instrument.attributes import LOGGER_NAME

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from rag_instrument._runtime import Runtime
    from rag_instrument._settings import Settings

__all__ = [
    "BoundLogger",
    "LineHead",
    "LogOutput",
    "bridge_while_flushing",
    "emit",
    "emit_head",
    "get_logger",
]

_LEVEL_NO: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
_METHOD_LEVEL: Final = {
    "debug": "debug",
    "info": "info",
    "msg": "info",
    "warning": "warning",
    "warn": "warning",
    "error": "error",
    "exception": "error",
    "critical": "critical",
    "fatal": "critical",
}
_RESERVED: Final = frozenset(
    {"timestamp", "level", "event", "logger", "trace_id", "span_id", "context"}
)
_DUMP_OPTIONS: Final = orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS

# --- timestamps ---------------------------------------------------------------------------

# The second last rendered and its text, one tuple replaced whole (threads never pair one
# second with another's text).
_ts_cache: list[tuple[int, str]] = [(-1, "")]


def _timestamp(ns: int | None = None) -> str:
    """UTC ISO 8601 with microseconds and ``Z``, of now or of ``ns``.

    The seconds part is cached (hot path).
    """
    if ns is None:
        ns = time.time_ns()  # integers: a float's int() and a format spec cost a microsecond
    whole = ns // 1_000_000_000
    cached = _ts_cache[0]
    if whole != cached[0]:
        cached = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
        _ts_cache[0] = cached
    return cached[1] + "." + str(ns // 1000 % 1_000_000).zfill(6) + "Z"


# --- rendering ----------------------------------------------------------------------------


def _default(value: Any) -> Any:
    # Reached only for values that bypassed sanitising (our own fields never do).
    return safe_repr(value)


# Characters that some line-splitting readers (Python's str.splitlines(), JavaScript,
# editors) take as a line end although JSON does not: escaped, so every reader agrees that
# one event is one line. JSON already escapes the C0 controls (\n, \r, \v, \f, \x1c-\x1e).
_LINE_BREAKS: Final = (
    (b"\xe2\x80\xa8", b"\\u2028"),  # LINE SEPARATOR
    (b"\xe2\x80\xa9", b"\\u2029"),  # PARAGRAPH SEPARATOR
    (b"\xc2\x85", b"\\u0085"),  # NEXT LINE (NEL)
)


def _escape_line_breaks(data: bytes) -> bytes:
    # Every rendered line passes here: instrumented clients' credentials are masked too.
    if LITERAL_SECRETS:
        data = mask_literal_secrets(data)
    if data.isascii():  # one C pass; the characters above are all non-ASCII
        return data
    for raw, escaped in _LINE_BREAKS:
        if raw in data:
            data = data.replace(raw, escaped)
    return data


def render_json(event: dict[str, Any]) -> bytes:
    """Render one event as a JSON line (newline included); never raises."""
    return _escape_line_breaks(_render_json(event))


def _render_json(event: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(event, default=_default, option=_DUMP_OPTIONS)
    except Exception:
        # Lone surrogates, integers over 64 bits, cycles smuggled past sanitising ...
        clean = get_runtime().sanitizer.mapping(event)
        try:
            return orjson.dumps(clean, default=_default, option=_DUMP_OPTIONS)
        except Exception:
            fallback = {
                "timestamp": event.get("timestamp"),
                "level": event.get("level"),
                "event": safe_repr(event.get("event")),
                "logger": LOGGER_NAME,
                "rendering_error": True,
            }
            return orjson.dumps(fallback, default=_default, option=_DUMP_OPTIONS)


_SAFE_BARE: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:/@+"
)


def _console_value(value: Any) -> str:
    if isinstance(value, str):
        if value and all(ch in _SAFE_BARE for ch in value):
            return value
        return orjson.dumps(value).decode()  # quoted, control characters escaped
    try:
        return orjson.dumps(value, default=_default, option=orjson.OPT_NON_STR_KEYS).decode()
    except Exception:
        return orjson.dumps(safe_repr(value)).decode()


def render_console(event: dict[str, Any]) -> bytes:
    """Render one event for people: ``time [level] event key=value ...`` on one line."""
    try:
        message = orjson.dumps(str(event.get("event", ""))).decode()[1:-1]
        head = f"{event.get('timestamp', '')} [{event.get('level', ''):<8}] {message}"
        parts = [head]
        context = event.get("context") or {}
        for key, value in event.items():
            if key in ("timestamp", "level", "event", "context"):
                continue
            parts.append(f"{_console_value(key)}={_console_value(value)}")
        parts.extend(f"{_console_value(k)}={_console_value(v)}" for k, v in context.items())
        return _escape_line_breaks((" ".join(parts) + "\n").encode("utf-8", "backslashreplace"))
    except Exception:
        return render_json(event)


# --- output -------------------------------------------------------------------------------


class LogOutput:
    """Where rendered lines go.

    A file (appended with one ``write`` per line), standard error, or a capture sink
    (``rag_instrument.testing``).
    """

    def __init__(self, settings: Settings, sink: Callable[[bytes], None] | None = None) -> None:
        self.level_no = settings.log_level_no
        self.render: Callable[[dict[str, Any]], bytes] = (
            render_json if settings.log_format == "json" or sink is not None else render_console
        )
        self.sink = sink
        self._fd: int | None = None
        self._closed = False
        #: Where lines still written after close() go: the next configuration's output.
        self._successor: LogOutput | None = None
        #: The unwritten end of a line cut short by a failed write (disk full).
        self._rest = b""
        #: Lines that could not be written whole (disk full).
        self.dropped = 0
        # Re-entrant: a signal handler that logs runs on the thread that may be holding it
        # (mid-line); a plain lock would wait for itself forever.
        self._lock = threading.RLock()
        renew_after_fork(self)  # a thread logging at a fork would leave it locked there
        #: The file's path, and when to check next that it is still the file written to.
        self._path: str | None = None
        self._check_at = 0.0
        #: When lost lines may be reported again on standard error (see _lost).
        self._lost_notice_at = 0.0
        if sink is None and settings.log_file is not None:
            # O_APPEND: each line is one write(2), so lines from threads and from forked
            # workers sharing the file never interleave, without a lock.
            # Absolute: a relative path checked after the process changed directory would
            # seem deleted, and a second file would be started there.
            self._path = os.path.abspath(settings.log_file)
            self._fd = os.open(self._path, _FILE_FLAGS, 0o644)
            self._check_at = time.monotonic() + _REOPEN_CHECK_S

    def write(self, data: bytes) -> None:
        """Write one rendered line.

        Once the output is closed (a reconfiguration), a line still written to it (by a
        thread that started its work under the previous configuration) goes to the next
        configuration's output, or is dropped when there is none (shutdown).
        """
        if self._closed:
            self._forward(data)
            return
        if self.sink is not None:
            self.sink(data)
            return
        if self._fd is not None:
            # Under the lock so that close() cannot free the descriptor (for the OS to
            # reuse for another file) between reading it and writing, and so that a line
            # finished after a short write is not interleaved with another thread's.
            with self._lock:
                fd = cast("int | None", self._fd)  # close() may have cleared it meanwhile
                if fd is not None:
                    if time.monotonic() >= self._check_at:
                        fd = self._follow(fd)
                    if not self._rest:  # the usual case, inline: the whole line, one write
                        try:
                            written = os.write(fd, data)
                        except OSError as exc:
                            self._lost(exc.strerror or type(exc).__name__)
                            return
                        if written != len(data):  # cut short (disk full): as _write_fd does
                            self._kept(data, _write_rest(fd, data, written))
                        return
                    self._write_fd(fd, data)
                    return
            self._forward(data)  # closed meanwhile: a file's line never goes to stderr
            return
        stream = sys.stderr
        if stream is None:
            return
        with self._lock:
            stream.write(data.decode("utf-8", "replace"))
            stream.flush()

    def _follow(self, fd: int) -> int:
        """The descriptor to write to: a new one if the file was moved or deleted.

        Log rotation (logrotate's default ``create`` mode) renames the file and expects
        the writer to open a new one at the same path, as ``logging``'s
        ``WatchedFileHandler`` does: checked at most once every :data:`_REOPEN_CHECK_S`
        seconds (one ``stat`` then), under the lock.
        """
        self._check_at = time.monotonic() + _REOPEN_CHECK_S
        path = self._path
        if path is None:
            return fd
        try:
            current = os.stat(path)
        except FileNotFoundError:
            moved = True
        except OSError:
            return fd
        else:
            try:
                own = os.fstat(fd)
            except OSError:
                return fd
            moved = (current.st_ino, current.st_dev) != (own.st_ino, own.st_dev)
        if not moved:
            return fd
        try:
            new = os.open(path, _FILE_FLAGS, 0o644)
        except OSError:
            return fd  # the folder went too, or no space: keep the old file
        if self._rest:  # a line cut short ends in the old file, as well as it can
            if _write_all(fd, self._rest):
                _write_all(fd, b"\n")
            self._rest = b""
        try:
            os.close(fd)
        except OSError:
            pass
        self._fd = new
        return new

    def _write_fd(self, fd: int, data: bytes) -> None:
        # A full disk (or a signal) can make write(2) take only part of a line. The rest
        # is kept and written before anything else once the disk takes it again; until
        # then new lines are dropped rather than glued onto the partial one. So every
        # line in the file ends up whole (only a disk that stays full until exit leaves
        # one cut line, ended by close()).
        if self._rest:
            self._rest = _write_all(fd, self._rest)
            if self._rest:
                self._lost("the file takes no more (disk full?)")
                return
        self._kept(data, _write_all(fd, data))

    def _kept(self, data: bytes, rest: bytes) -> None:
        # ``rest``: what could not be written of ``data``.
        if rest:
            if len(rest) < len(data):
                self._rest = rest  # part of the line is in the file: finish it later
            self._lost("the file takes no more (disk full?)")

    def _lost(self, why: str) -> None:
        """Count a line the file did not take; say so on standard error, once a minute.

        Not as a log line: the log is what fails. Under the lock, on the failing path only.
        """
        self.dropped += 1
        now = time.monotonic()
        if now < self._lost_notice_at:
            return
        self._lost_notice_at = now + 60.0
        stream = sys.stderr
        if stream is None:
            return
        try:
            stream.write(
                f"rag_instrument: log lines are being lost: cannot write to {self._path}: "
                f"{why} ({self.dropped} so far)\n"
            )
            stream.flush()
        except Exception:  # nowhere left to say it
            pass

    def _forward(self, data: bytes) -> None:
        successor = self._successor
        if successor is not None and successor is not self:
            successor.write(data)

    def close(self, successor: LogOutput | None = None) -> None:
        """Close the file, if any; lines written after this go to ``successor`` (or none)."""
        if successor is not None and successor is not self:
            self._successor = successor
        self._closed = True
        with self._lock:
            fd, self._fd = self._fd, None
            if fd is not None and self._rest:
                if _write_all(fd, self._rest):
                    _write_all(fd, b"\n")  # cannot finish it: at least end the line
                self._rest = b""
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


#: How a log file is opened: appended to, created if missing.
_FILE_FLAGS: Final = os.O_WRONLY | os.O_APPEND | os.O_CREAT
#: How often (seconds, at most) a log file is checked for having been moved or deleted.
_REOPEN_CHECK_S: Final = 1.0


def _write_all(fd: int, data: bytes) -> bytes:
    """Write ``data`` to ``fd``; return what could not be written (``b""`` when all was)."""
    try:
        written = os.write(fd, data)
    except OSError:
        return data
    if written == len(data):  # the usual case: the whole line in one write(2)
        return b""
    return _write_rest(fd, data, written)


def _write_rest(fd: int, data: bytes, written: int) -> bytes:
    """Go on writing ``data`` after a first ``write`` took ``written`` bytes; return the rest."""
    view = memoryview(data)[max(written, 0) :]
    try:
        while view and written > 0:
            written = os.write(fd, view)
            view = view[max(written, 0) :]
    except OSError:
        pass
    return bytes(view)


class _Local(threading.local):
    # A class-level default: reading the flag in a thread that never logged through
    # emit() (only pre-rendered lines) finds it here instead of raising AttributeError
    # inside getattr(), which costs a microsecond per line.
    emitting = False


_local = _Local()


def _trace_ids(out: dict[str, Any], span: Span | None) -> None:
    if span is None:
        span = trace_api.get_current_span()
    ctx = span.get_span_context()
    if ctx.is_valid:
        # bytes.hex() is twice as fast as format(..., "032x"), with the same digits.
        out["trace_id"] = ctx.trace_id.to_bytes(16, "big").hex()
        out["span_id"] = ctx.span_id.to_bytes(8, "big").hex()


def emit(
    level: str,
    event: str,
    fields: dict[str, Any] | None = None,
    *,
    logger: str = LOGGER_NAME,
    span: Span | None = None,
    stage: str | None = None,
    trusted: bool = False,
    exc_info: Any = None,
    rt: Runtime | None = None,
    measures: bool = False,
    own_stage: bool = False,
    app: bool = False,
    created_ns: int | None = None,
) -> None:
    """Write one event through the pipeline; never raises.

    Args:
        level: ``debug``, ``info``, ``warning``, ``error`` or ``critical``.
        event: the message.
        fields: extra top-level keys; sanitised (redacted, truncated, made JSON-safe)
            unless ``trusted``.
        logger: the ``logger`` field.
        span: whose ids to report (default: the current span).
        stage: the pipeline stage (default: the current task's; ``""`` for none).
        trusted: ``fields`` were built by rag_instrument and need no sanitising.
        exc_info: an exception (or ``True`` for the one being handled) to render as a
            structured ``exception`` field, without local variables.
        rt: the runtime (looked up when omitted).
        measures: kept for callers; library lines are placed as described below anyway.
        own_stage: the line is the stage's own completion, failure or cancellation line:
            the stage goes in ``context.pipeline_stage`` (the jq one-liner's key).
        app: the line is the application's (structlog or standard ``logging``): inside a
            stage it keeps ``context.pipeline_stage``, as the contract says.
        created_ns: when the event happened (a ``logging`` record's creation time, which
            a ``QueueListener`` hands over later), if not now.

    One stage run, one line: every other line, i.e. every line the library writes inside a
    stage (LLM calls, retries, slow queries, N+1 and budget warnings ...), names the stage
    in a top-level ``stage`` field and leaves ``context.pipeline_stage`` out, so per-stage
    aggregations of ``execution_time_ms`` count each run exactly once.
    """
    if rt is None:
        rt = get_runtime()
    out = rt.log
    if out is None or _LEVEL_NO.get(level, logging.INFO) < out.level_no:
        return
    if getattr(_local, "emitting", False):
        return  # a handler or renderer logged while we were logging: drop, do not recurse
    _local.emitting = True
    try:
        line: dict[str, Any] = {
            "timestamp": _timestamp(created_ns),
            "level": level,
            "event": event if type(event) is str else rt.sanitizer.value(event),
            "logger": logger,
        }
        _trace_ids(line, span)
        if stage is None:
            frame = current_frame()
            stage = frame.stage if frame is not None else None
        context = bound().log
        if own_stage or app:
            line["context"] = {"pipeline_stage": stage, **context} if stage else context
        else:
            line["context"] = context
            if stage:
                line["stage"] = stage
        if fields:
            if trusted:
                line.update(fields)
            else:
                clean = rt.sanitizer.mapping(fields)
                for key, value in clean.items():
                    line[key if key not in _RESERVED else f"field_{key}"] = value
        if exc_info:
            exception = _exception_dict(exc_info, rt)
            if exception is not None:
                line["exception"] = exception
        if not trusted and type(line["event"]) is str:
            line["event"] = rt.sanitizer.text(line["event"])
        out.write(out.render(line))
    except Exception as exc:
        internal_error("emit", exc)
    finally:
        _local.emitting = False


class LineHead:
    """The fixed part of a line the library writes often (a stage's completion line).

    ``level``, ``event`` and ``logger`` rendered once, so that :func:`emit_head` only
    renders what changes per line.
    """

    __slots__ = ("event", "head", "level", "level_no", "tail", "tail_fields")

    def __init__(self, level: str, event: str, tail: dict[str, Any] | None = None) -> None:
        self.level = level
        self.level_no = _LEVEL_NO[level]
        self.event = event
        fixed = orjson.dumps({"level": level, "event": event, "logger": LOGGER_NAME})
        self.head = b'","' + fixed[2:-1]  # ...","level":"info","event":"x","logger":"y"
        #: Fields after ``execution_time_ms`` that never change (``operation``).
        self.tail_fields = dict(tail or {})
        self.tail = orjson.dumps(tail)[1:-1] if tail else b""

    def fields(self, ms: float) -> dict[str, Any]:
        """The line's fields, for :func:`emit`."""
        return {"execution_time_ms": ms, **self.tail_fields}


def emit_head(
    rt: Runtime,
    head: LineHead,
    span: Span,
    stage: str,
    ms: float,
    *,
    own_stage: bool,
    extra: dict[str, Any] | None = None,
    ended_ns: int | None = None,
) -> None:
    """Write the line ``emit()`` would write for ``head``, assembled from its rendered part.

    That is ``emit(level, event, {"execution_time_ms": ms, **tail, **extra}, span=span,
    stage=stage, trusted=True, rt=rt, own_stage=own_stage)``, byte for byte; never raises.
    ``extra``: fields that change per line (a model call's tokens), written after the
    tail; trusted as ``emit`` trusts them: the caller made them safe (redacted what needs
    it). For JSON lines to a file or standard error; anything else (console format, a
    capture sink, a value orjson refuses) goes through :func:`emit`. ``ended_ns``: when
    the measured work ended (``time.time_ns()``), the line's timestamp: its start is then
    the timestamp minus ``ms``, however long the line took to be made.
    """
    out = rt.log
    if out is None or head.level_no < out.level_no:
        return
    if out.render is not render_json or out.sink is not None or getattr(_local, "emitting", False):
        _emit_fields(rt, head, span, stage, ms, own_stage, extra, ended_ns)
        return
    try:
        context = bound().log
        if own_stage:  # the stage's own line: context.pipeline_stage
            rendered = orjson.dumps(
                {"pipeline_stage": stage, **context} if stage else context,
                option=_CONTEXT_OPTIONS,
            )
        else:  # another line inside a stage: a top-level "stage" after the context
            rendered = orjson.dumps(context, option=_CONTEXT_OPTIONS)
            if stage:
                rendered += b',"stage":' + orjson.dumps(stage)
        ctx = span.get_span_context()
        # bytes formatting: half the cost of to_bytes().hex().encode(), the same digits.
        ids = (
            b',"trace_id":"%032x","span_id":"%016x"' % (ctx.trace_id, ctx.span_id)
            if ctx.is_valid
            else b""
        )
        line = b'{"timestamp":"%s%s%s,"context":%s,"execution_time_ms":%s%s%s}\n' % (
            _timestamp(ended_ns).encode(),
            head.head,
            ids,
            rendered,
            orjson.dumps(ms),
            b"," + head.tail if head.tail else b"",
            b"," + orjson.dumps(extra)[1:-1] if extra else b"",
        )
        line = _escape_line_breaks(line)  # as render_json: one event, one line, any reader
    except Exception:  # a value orjson refuses: the general path copes
        _emit_fields(rt, head, span, stage, ms, own_stage, extra, ended_ns)
        return
    try:
        out.write(line)
    except Exception as exc:
        internal_error("emit", exc)


def _emit_fields(
    rt: Runtime,
    head: LineHead,
    span: Span,
    stage: str,
    ms: float,
    own_stage: bool,
    extra: dict[str, Any] | None = None,
    ended_ns: int | None = None,
) -> None:
    fields = head.fields(ms)
    if extra:
        fields.update(extra)
    emit(
        head.level,
        head.event,
        fields,
        span=span,
        stage=stage,
        trusted=True,
        rt=rt,
        own_stage=own_stage,
        created_ns=ended_ns,
    )


_CONTEXT_OPTIONS: Final = orjson.OPT_NON_STR_KEYS


_transform = ExceptionDictTransformer(show_locals=False, max_frames=20, use_rich=False)


def _exception_dict(exc_info: Any, rt: Runtime) -> Any:
    if exc_info is True:
        exc_info = sys.exc_info()
    if isinstance(exc_info, BaseException):
        exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    if not isinstance(exc_info, tuple) or len(exc_info) != 3 or exc_info[1] is None:
        return None
    exc = exc_info[1]
    try:
        stacks = _transform(exc_info)
    except Exception:
        stacks = [{"exc_type": type(exc).__name__, "exc_value": ""}]
    _safe_messages(stacks, exc, rt, seen_contents(), ())
    _drop_source_text(stacks)
    return rt.sanitizer.value(stacks)


def _safe_messages(
    stacks: Any,
    exc: BaseException,
    rt: Runtime,
    hide: tuple[str, ...],
    groups: tuple[BaseException, ...],
) -> None:
    # Exception messages can carry secrets, prompt text, SQL parameters and a driver's
    # DETAIL line: each message is replaced by its safe form. The stacks follow the same
    # cause/context chain as exception_chain(), and a group's members nest under
    # "exceptions"; ``groups`` are the groups the chain is a member of, outermost last.
    # A member quoting the error its group was raised from has the quote hidden too.
    if not isinstance(stacks, list):
        return
    chain = exception_chain(exc, len(stacks))
    capture = rt.settings.capture_content
    below_database = False  # past a database error: its driver's own causes follow
    for index, stack in enumerate(stacks):
        if not isinstance(stack, dict):
            continue
        link = chain[index] if index < len(chain) else None
        if link is None:  # cannot tell whose message it is: say nothing of it
            stack["exc_value"] = ""
            stack.pop("exceptions", None)
            continue
        stack["exc_value"] = exception_message(
            link, rt.sanitizer, capture, hide, related=groups, from_driver=below_database
        )
        below_database = below_database or is_database_error(link)
        notes = stack.get("exc_notes")
        if notes:
            stack["exc_notes"] = [_exception_note(str(n), rt, hide) for n in notes]
        members = stack.get("exceptions")
        if members:
            group = getattr(link, "exceptions", None)
            if len(groups) < 8 and isinstance(group, tuple) and len(group) == len(members):
                for sub, member in zip(members, group, strict=True):
                    _safe_messages(sub, member, rt, hide, (link, *groups))
            else:
                stack["exceptions"] = []


def _exception_note(note: str, rt: Runtime, hide: tuple[str, ...]) -> str:
    """An exception note (``add_note``) as it may be logged: content hidden, redacted."""
    if not rt.settings.capture_content and hide:
        note = hide_content(note, hide)
    return rt.sanitizer.text(note)


def _drop_source_text(stacks: Any) -> None:
    # Frames are file, line and function already; a SyntaxError also carries the text it
    # failed on, which can be runtime data (a compiled template, a user's expression).
    if not isinstance(stacks, list):
        return
    for stack in stacks:
        if isinstance(stack, list):  # an exception group's members
            _drop_source_text(stack)
        elif isinstance(stack, dict):
            syntax = stack.get("syntax_error")
            if isinstance(syntax, dict):
                syntax.pop("line", None)
            _drop_source_text(stack.get("exceptions"))


# --- structlog front end ------------------------------------------------------------------


def _process(_logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> bytes:
    rt = get_runtime()
    level = _METHOD_LEVEL.get(method_name, "info")
    out = rt.log
    if out is None or _LEVEL_NO[level] < out.level_no:
        raise structlog.DropEvent
    fields = dict(event_dict)
    event = fields.pop("event", "")
    exc_info = fields.pop("exc_info", None)
    if method_name == "exception" and exc_info is None:
        exc_info = True
    name = fields.pop("_logger_name", LOGGER_NAME)
    if "stack_info" in fields and fields["stack_info"] is True:  # as logging's stack_info
        del fields["stack_info"]
        fields["stack"] = _caller_stack()
    emit(level, event, fields, logger=name, exc_info=exc_info, rt=rt, app=True)
    raise structlog.DropEvent  # emit() wrote it: nothing left for structlog to do


_STACK_HEAD: Final = "Stack (most recent call last):\n"
#: Where the frames of the logging call itself come from (left out of a ``stack``).
_LOGGING_FILES: Final = (structlog.__file__.rsplit("/", 1)[0], __file__)


def _caller_stack() -> str:
    """The stack of the code that logged, as ``logging``'s ``stack_info`` gives it.

    Each frame is its file, line and function, never its source text (as in recorded
    exceptions: source can hold literals).
    """
    frames = [
        f'  File "{frame.filename}", line {frame.lineno}, in {frame.name}'
        for frame in traceback.extract_stack(sys._getframe(1))
        if not frame.filename.startswith(_LOGGING_FILES)
    ]
    return _innermost(_STACK_HEAD.rstrip("\n"), frames)


def _frames_only(stack: str) -> str:
    """``logging``'s ``stack_info`` text without the source lines under each frame."""
    lines = [line for line in stack.splitlines() if line.strip() and not line.startswith("    ")]
    if lines and lines[0].startswith("Stack"):
        return _innermost(lines[0], lines[1:])
    return _innermost(_STACK_HEAD.rstrip("\n"), lines)


#: Frames kept in a ``stack`` field: the innermost (where the call was made), so that the
#: field's cut to ``max_content_chars`` never loses them.
_STACK_FRAMES: Final = 16


def _innermost(head: str, frames: list[str]) -> str:
    if len(frames) > _STACK_FRAMES:
        left_out = len(frames) - _STACK_FRAMES
        frames = [f"  ... {left_out} outer frame(s) left out", *frames[-_STACK_FRAMES:]]
    return "\n".join([head, *frames])


class _Sink:
    """The wrapped logger: never reached, since :func:`_process` writes and drops."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


class BoundLogger(structlog.BoundLoggerBase):
    """A structlog bound logger on rag_instrument's pipeline (see :func:`get_logger`).

    It has the methods of structlog's own loggers: one per level (``debug`` ... ``critical``,
    ``warn``, ``fatal``, ``msg``, ``exception``), ``log(level, event)``, their ``a``-prefixed
    async forms (``await log.ainfo(...)``), and positional arguments formatted the
    ``%``-way: ``log.info("hello %s", name)``.
    """

    def debug(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        """Log at debug level."""
        return self._proxy_to_logger("debug", event, *args, **kw)

    def info(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        """Log at info level."""
        return self._proxy_to_logger("info", event, *args, **kw)

    msg = info

    def warning(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        """Log at warning level."""
        return self._proxy_to_logger("warning", event, *args, **kw)

    warn = warning

    def error(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        """Log at error level."""
        return self._proxy_to_logger("error", event, *args, **kw)

    def exception(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        """Log at error level with the exception being handled, as a structured dict."""
        return self._proxy_to_logger("exception", event, *args, **kw)

    def critical(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        """Log at critical level."""
        return self._proxy_to_logger("critical", event, *args, **kw)

    fatal = critical

    def log(self, level: int | str, event: str | None = None, *args: Any, **kw: Any) -> Any:
        """Log at ``level``: a ``logging`` level number or a level name."""
        return self._proxy_to_logger(_method_for(level), event, *args, **kw)

    async def adebug(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        """Log at debug level (async form; the line is written before it returns)."""
        return self._proxy_to_logger("debug", event, *args, **kw)

    async def ainfo(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        """Log at info level (async form)."""
        return self._proxy_to_logger("info", event, *args, **kw)

    async def awarning(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        """Log at warning level (async form)."""
        return self._proxy_to_logger("warning", event, *args, **kw)

    awarn = awarning

    async def aerror(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        """Log at error level (async form)."""
        return self._proxy_to_logger("error", event, *args, **kw)

    async def aexception(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        """Log at error level with the exception being handled (async form)."""
        return self._proxy_to_logger("exception", event, *args, **kw)

    async def acritical(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        """Log at critical level (async form)."""
        return self._proxy_to_logger("critical", event, *args, **kw)

    afatal = acritical

    async def alog(self, level: int | str, event: str | None = None, *args: Any, **kw: Any) -> Any:
        """Log at ``level`` (async form)."""
        return self._proxy_to_logger(_method_for(level), event, *args, **kw)

    def new(self, **new_values: Any) -> BoundLogger:
        """A logger with only ``new_values`` bound (it keeps its name)."""
        name = self._context.get("_logger_name", LOGGER_NAME)
        return BoundLogger(self._logger, self._processors, {**new_values, "_logger_name": name})

    def _proxy_to_logger(
        self, method_name: str, event: str | None = None, *args: Any, **event_kw: Any
    ) -> Any:
        try:
            if args:
                event = _formatted(event, args)
            return super()._proxy_to_logger(method_name, event, **event_kw)
        except Exception as exc:  # e.g. a non-str key in event_kw
            internal_error("logger call", exc)
            return None


def _formatted(event: Any, args: tuple[Any, ...]) -> str:
    """``event % args``, as structlog and ``logging`` format positional arguments."""
    values: Any = args
    if len(args) == 1 and isinstance(args[0], Mapping) and args[0]:
        values = args[0]  # "%(name)s" with a mapping, as logging does
    try:
        return str(str(event) % values)
    except Exception:
        return f"{event!s} (unformattable arguments)"


def _method_for(level: int | str) -> str:
    """The method that logs at ``level`` (a number as in ``logging``, or a name)."""
    if isinstance(level, str):
        name = level.lower()
        return name if name in _METHOD_LEVEL else "info"
    try:
        number = float(level)  # numpy's and Decimal's numbers too
    except OverflowError:  # an integer beyond a float
        number = math.inf if level > 0 else -math.inf
    except Exception:  # None, an object: logging never raises into the caller
        return "info"
    if math.isnan(number):
        return "info"
    if number >= logging.CRITICAL:
        return "critical"
    if number >= logging.ERROR:
        return "error"
    if number >= logging.WARNING:
        return "warning"
    if number >= logging.INFO:
        return "info"
    return "debug"


def get_logger(name: str | None = None, **initial_values: Any) -> BoundLogger:
    """A structlog logger whose lines go through rag_instrument's pipeline.

    Args:
        name: the ``logger`` field of its lines (default ``"rag_instrument"``).
        **initial_values: keys bound to every line of this logger.

    Example:
        >>> import rag_instrument as ri
        >>> log = ri.get_logger("app.search")
        >>> log.info("cache warmed", entries=12)
    """
    values = dict(initial_values)
    values["_logger_name"] = name or LOGGER_NAME
    return BoundLogger(_Sink(), [_process], values)


# --- standard-library logging -------------------------------------------------------------

_RECORD_KEYS: Final = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "", (), None)).keys()
) | {"message", "asctime", "taskName"}


#: The prefix of the library's own standard-library loggers (``rag_instrument.internal``).
_OWN_LOGGERS: Final = LOGGER_NAME + "."


#: OpenTelemetry's own loggers: their warnings below error are written once per window
#: per message (its template), since a request can trigger them at will (a malformed
#: ``baggage`` header makes the propagator warn on every request).
_OTEL_LOGGERS: Final = "opentelemetry."
_OTEL_WINDOW_S: Final = 20.0
_otel_last: dict[tuple[str, str], float] = {}
_otel_lock = threading.Lock()


def _otel_record_due(record: logging.LogRecord) -> bool:
    """Whether an OpenTelemetry record is written: errors always, the rest once a window."""
    if record.levelno >= logging.ERROR:
        return True
    key = (record.name, str(record.msg))
    now = time.monotonic()
    with _otel_lock:
        last = _otel_last.get(key)
        if last is not None and now - last < _OTEL_WINDOW_S:
            return False
        if len(_otel_last) >= 1024:
            _otel_last.clear()
        _otel_last[key] = now
    return True


def reset_repeated_sdk_warnings() -> None:
    """Forget which OpenTelemetry warnings were written (a new configuration writes them)."""
    with _otel_lock:
        _otel_last.clear()


class _StdlibHandler(logging.Handler):
    """Routes ``logging`` records through the pipeline, with trace ids and context."""

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(_local, "emitting", False):
            return
        try:
            if record.name.startswith(_OTEL_LOGGERS) and not _otel_record_due(record):
                return  # the same SDK warning again (a client's bad baggage header, each time)
            try:
                message = record.getMessage()
            except Exception:
                message = f"{record.msg!s} (unformattable arguments)"
            extra = {k: v for k, v in record.__dict__.items() if k not in _RECORD_KEYS}
            if record.stack_info:  # logging's stack_info=True: the caller's stack
                extra["stack"] = _frames_only(record.stack_info)
            level = _method_for(record.levelno)  # by number, whatever its name
            name = record.name
            emit(
                level,
                message,
                extra,
                logger=name,
                exc_info=record.exc_info if record.exc_info else None,
                # The library's own warnings (a cache backend down, a span exporter
                # failing) are library lines: inside a stage they name it in ``stage``,
                # not ``context.pipeline_stage``, so they never count as another run.
                app=not (name == LOGGER_NAME or name.startswith(_OWN_LOGGERS)),
                created_ns=_created_ns(record),
            )
        except Exception as exc:
            internal_error("logging handler", exc)


def _created_ns(record: logging.LogRecord) -> int | None:
    """The record's creation time in nanoseconds (``created``, to the microsecond)."""
    created = getattr(record, "created", None)
    if type(created) is not float:
        return None
    return int(created * 1_000_000) * 1000


_HANDLER: _StdlibHandler | None = None
_LOWERED_ROOT: int | None = None


def install_stdlib_handler(rt: Runtime) -> None:
    """Add (or remove) the root-logger handler for the configuration in force."""
    global _HANDLER, _LOWERED_ROOT
    root = logging.getLogger()
    if _HANDLER is not None:
        root.removeHandler(_HANDLER)
        _HANDLER = None
    if _LOWERED_ROOT is not None:
        root.setLevel(_LOWERED_ROOT)
        _LOWERED_ROOT = None
    if rt.log is None or not rt.settings.capture_logging:
        return
    _HANDLER = _StdlibHandler(level=rt.log.level_no)
    root.addHandler(_HANDLER)
    # The application's logger levels decide what reaches the handler: a root logger left
    # at WARNING keeps every library's INFO chatter (an HTTP client's line per request)
    # out of the log. Only the explicit capture_logging_level lowers the root logger.
    wanted = rt.settings.capture_logging_level
    if wanted is not None:
        level = max(_LEVEL_NO[wanted], rt.log.level_no)
        if root.level > level or root.level == logging.NOTSET:
            _LOWERED_ROOT = root.level
            root.setLevel(level)


class _FlushBridge(logging.Handler):
    """Routes the OpenTelemetry SDK's messages to a retiring configuration's output."""

    def __init__(self, rt: Runtime) -> None:
        super().__init__(level=logging.WARNING)
        self.rt = rt

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(_local, "emitting", False):
            return
        try:
            try:
                message = record.getMessage()
            except Exception:
                message = f"{record.msg!s} (unformattable arguments)"
            level = _method_for(record.levelno)  # by number, whatever its name
            emit(level, message, None, logger=record.name, rt=self.rt)
        except Exception as exc:
            internal_error("logging bridge", exc)


def bridge_while_flushing(rt: Runtime) -> Callable[[], None]:
    """Send the SDK's warnings (export errors) to ``rt``'s log output while it flushes.

    At a worker's exit the configuration is uninstalled before its last flush, so without
    this the exporters' errors would reach Python's last-resort handler: raw text on
    standard error, outside the log. Returns the function that detaches the bridge.
    """
    if rt.log is None or not rt.settings.capture_logging:
        return lambda: None
    handler = _FlushBridge(rt)
    # The SDK's loggers, and the library's own (a span exporter that raised, a refused
    # metrics export: reported by rag_instrument.internal).
    loggers = [logging.getLogger("opentelemetry"), logging.getLogger(LOGGER_NAME)]
    for logger in loggers:
        logger.addHandler(handler)

    def detach() -> None:
        for logger in loggers:
            logger.removeHandler(handler)

    return detach
