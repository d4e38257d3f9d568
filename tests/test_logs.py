"""The JSON log line: shape, ids, context, stdlib logging, safety of values, console format."""

from __future__ import annotations

import json
import logging
import re
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import trace

import rag_instrument as ri
from rag_instrument.testing import Capture, capture

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")

# A logger made at import time, before any configure(): it must honour later configuration.
module_logger = ri.get_logger("app.module")


def _lines(path: Path) -> list[dict[str, Any]]:
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    return [json.loads(line) for line in raw.splitlines()]


def test_stage_line_has_exactly_the_documented_shape(tmp_path: Path) -> None:
    log = tmp_path / "rag.jsonl"
    ri.configure(log_file=str(log), exporter="memory")
    with ri.request_context(request_id="r-1"), ri.stage("retrieval"):
        pass
    (line,) = _lines(log)
    assert list(line) == [
        "timestamp",
        "level",
        "event",
        "logger",
        "trace_id",
        "span_id",
        "context",
        "execution_time_ms",
    ]
    assert TIMESTAMP.match(line["timestamp"])
    assert line["level"] == "info"
    assert line["event"] == "retrieval completed"
    assert line["logger"] == "rag_instrument"
    assert re.fullmatch(r"[0-9a-f]{32}", line["trace_id"])
    assert re.fullmatch(r"[0-9a-f]{16}", line["span_id"])
    assert line["context"] == {"pipeline_stage": "retrieval", "request_id": "r-1"}


def test_get_logger_lines_carry_current_span_and_stage(rag_capture: Capture) -> None:
    log = ri.get_logger("app.search", component="api")
    with ri.stage("reranking") as span:
        log.info("scored", candidates=12)
    (line,) = rag_capture.find_logs("scored")
    assert line["logger"] == "app.search"
    assert line["component"] == "api"
    assert line["candidates"] == 12
    assert line["span_id"] == format(span.get_span_context().span_id, "016x")
    assert line["context"] == {"pipeline_stage": "reranking"}


def test_module_level_logger_honours_later_configure(tmp_path: Path) -> None:
    module_logger.info("before configure")  # unconfigured: goes nowhere, does not fail
    log = tmp_path / "late.jsonl"
    ri.configure(log_file=str(log))
    module_logger.warning("after configure", n=1)
    (line,) = _lines(log)
    assert (line["event"], line["level"], line["logger"], line["n"]) == (
        "after configure",
        "warning",
        "app.module",
        1,
    )


def test_level_filtering(tmp_path: Path) -> None:
    log = tmp_path / "rag.jsonl"
    ri.configure(log_file=str(log), log_level="warning")
    logger = ri.get_logger()
    logger.debug("d")
    logger.info("i")
    logger.warning("w")
    logger.error("e")
    with ri.stage("retrieval"):
        pass  # its info line is filtered
    assert [line["event"] for line in _lines(log)] == ["w", "e"]


def test_stdlib_logging_comes_through_with_ids_and_extras(rag_capture: Capture) -> None:
    app_logger = logging.getLogger("app.service")
    with ri.stage("generation") as span:
        app_logger.warning("model %s slow", "gpt", extra={"execution_ms": 12.5})
    (line,) = rag_capture.find_logs("model gpt slow")
    assert line["logger"] == "app.service"
    assert line["level"] == "warning"
    assert line["execution_ms"] == 12.5
    assert line["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert line["context"] == {"pipeline_stage": "generation"}


def test_stdlib_records_are_levelled_by_number_not_name() -> None:
    app_logger = logging.getLogger("app.levels")
    logging.addLevelName(logging.ERROR, "ERR")
    try:
        with capture(log_level="warning") as cap:
            app_logger.error("db down")  # named "ERR" now
            app_logger.log(35, "between warning and error")
            app_logger.log(45, "between error and critical")
            app_logger.log(25, "below the level: dropped")
    finally:
        logging.addLevelName(logging.ERROR, "ERROR")
    assert [(line["event"], line["level"]) for line in cap.logs] == [
        ("db down", "error"),
        ("between warning and error", "warning"),
        ("between error and critical", "error"),
    ]


def test_stdlib_logging_can_be_left_alone(tmp_path: Path) -> None:
    log = tmp_path / "rag.jsonl"
    ri.configure(log_file=str(log), capture_logging=False)
    logging.getLogger("app").warning("not ours")
    ri.get_logger().warning("ours")
    assert [line["event"] for line in _lines(log)] == ["ours"]


def test_stdlib_exception_is_structured_without_locals(rag_capture: Capture) -> None:
    api_key = "sk-live-secretvalue1234567890"  # a local that must never be logged

    def fail() -> None:
        raise RuntimeError(f"upstream rejected key {api_key}")

    try:
        fail()
    except RuntimeError:
        logging.getLogger("app").exception("call failed")
    (line,) = rag_capture.find_logs("call failed")
    text = json.dumps(line)
    assert "secretvalue1234567890" not in text
    (stack,) = line["exception"]
    assert all("locals" not in frame for frame in stack["frames"])
    assert stack["exc_type"] == "RuntimeError"
    assert "[REDACTED]" in stack["exc_value"]
    assert stack["frames"][-1]["name"] == "fail"


def test_logged_tracebacks_hold_no_source_text(rag_capture: Capture) -> None:
    """Frames are file, line and function; a SyntaxError's failing text is not logged."""
    expression = "total = 'opal-harbour-7' +"  # runtime data, e.g. a user's formula

    try:
        compile(expression, "<formula>", "exec")
    except SyntaxError:
        ri.get_logger().exception("formula rejected")
    (line,) = rag_capture.find_logs("formula rejected")
    assert "opal-harbour-7" not in json.dumps(line)
    (stack,) = line["exception"]
    assert stack["exc_type"] == "SyntaxError"
    assert stack["syntax_error"]["lineno"] == 1  # where it failed is kept
    assert "line" not in stack["syntax_error"]
    for frame in stack["frames"]:
        assert set(frame) == {"filename", "lineno", "name"}


def test_structlog_exception_method(rag_capture: Capture) -> None:
    log = ri.get_logger()
    try:
        {}["missing"]
    except KeyError:
        log.exception("lookup failed")
    log.exception("no exception being handled")  # outside except: no crash, no exception key
    lines = {line["event"]: line for line in rag_capture.logs}
    assert lines["lookup failed"]["level"] == "error"
    assert lines["lookup failed"]["exception"][0]["exc_type"] == "KeyError"
    assert "exception" not in lines["no exception being handled"]


def test_secrets_are_masked_by_key_and_by_value(rag_capture: Capture) -> None:
    log = ri.get_logger()
    log.info(
        "calling",
        api_key="abc123",
        headers={"Authorization": "Bearer abcdef123456", "x-api-key": "k-1"},
        url="postgresql://user:hunter2@db:5432/app",
        note="key sk-proj-abcdefghijklmnopqrstuvwxyz in text",
        max_tokens=256,
    )
    (line,) = rag_capture.find_logs("calling")
    text = json.dumps(line)
    for secret in ("abc123", "abcdef123456", "k-1", "hunter2", "sk-proj-abcdefghij"):
        assert secret not in text
    assert line["api_key"] == "[REDACTED]"
    assert line["url"] == "postgresql://user:[REDACTED]@db:5432/app"
    assert line["max_tokens"] == 256  # not a secret


def test_redaction_can_be_turned_off() -> None:
    with capture(redact=False) as cap:
        ri.get_logger().info("raw", api_key="abc123")
    assert cap.find_logs("raw")[0]["api_key"] == "abc123"


def test_one_line_per_event_whatever_the_values(tmp_path: Path) -> None:
    log = tmp_path / "rag.jsonl"
    ri.configure(log_file=str(log))
    hostile = 'q\n{"level":"info","event":"admin_login"}\r\x1b[31mred\x00 a=1 b=2'
    ri.get_logger().info(hostile, prompt=hostile)
    logging.getLogger("app").warning(hostile)
    raw = log.read_bytes()
    assert raw.count(b"\n") == 2
    lines = _lines(log)
    assert [line["event"] for line in lines] == [hostile, hostile]
    assert lines[0]["prompt"] == hostile


class _Evil:
    def __repr__(self) -> str:
        raise RuntimeError("no repr for you")


def test_unserialisable_values_become_placeholders(rag_capture: Capture) -> None:
    import socket
    import uuid

    cyclic: dict[str, Any] = {"a": 1}
    cyclic["self"] = cyclic
    lock = threading.Lock()
    sock = socket.socket()
    try:
        ri.get_logger().info(
            "odd values",
            module=re,
            lock=lock,
            sock=sock,
            cyclic=cyclic,
            uuid_keys={uuid.UUID(int=1): "x"},
            evil=_Evil(),
            raw=b"\x00\xff",
            nan=float("nan"),
            surrogate="bad \ud800 text",
            big=2**80,
        )
    finally:
        sock.close()
    (line,) = rag_capture.find_logs("odd values")
    assert line["cyclic"] == {"a": 1, "self": "<cycle>"}
    assert line["evil"] == "<unrepresentable _Evil>"
    assert line["raw"] == "<bytes len=2>"
    assert line["nan"] == "nan"
    assert line["uuid_keys"] == {"00000000-0000-0000-0000-000000000001": "x"}
    assert "\\ud800" in line["surrogate"]
    assert line["big"] == str(2**80)
    assert line["module"].startswith("<module 're'")


def test_long_strings_are_truncated_with_marker(rag_capture: Capture) -> None:
    ri.get_logger().info("long", prompt="x" * 5000)
    (line,) = rag_capture.find_logs("long")
    assert line["prompt"] == "x" * 2000 + "...[truncated, 5000 chars]"


def test_reserved_keys_cannot_be_overwritten(rag_capture: Capture) -> None:
    ri.get_logger().info("mine", level="fake", trace_id="forged", context="x")
    (line,) = rag_capture.find_logs("mine")
    assert line["level"] == "info"
    assert line["field_level"] == "fake"
    assert line["field_trace_id"] == "forged"
    assert "trace_id" not in line  # no span: no forged id either


def test_console_format_one_escaped_line(tmp_path: Path) -> None:
    log = tmp_path / "rag.txt"
    ri.configure(log_file=str(log), log_format="console")
    with ri.request_context(request_id="r-1"), ri.stage("retrieval"):
        ri.get_logger().info("got\nnewline", value="two words", n=3)
    lines = log.read_text().splitlines()
    assert len(lines) == 2
    assert "[info    ] got\\nnewline" in lines[0]
    assert 'value="two words"' in lines[0]
    assert "n=3" in lines[0]
    assert "pipeline_stage=retrieval" in lines[0]
    assert "request_id=r-1" in lines[0]
    assert "retrieval completed" in lines[1]
    assert "execution_time_ms=" in lines[1]


def test_logging_never_raises_into_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAG_INSTRUMENT_RAISE_INTERNAL_ERRORS")
    with capture() as cap:
        from rag_instrument import logs

        def broken(_event: dict[str, Any]) -> bytes:
            raise RuntimeError("renderer broke")

        runtime_log = ri.get_runtime().log
        assert runtime_log is not None
        monkeypatch.setattr(runtime_log, "render", broken)
        ri.get_logger().info("dropped")
        with ri.stage("retrieval"):
            pass
        logging.getLogger("x").warning("also dropped")
        assert logs.emit is not None
    assert cap.logs == []


def test_logger_that_logs_from_a_handler_does_not_deadlock(rag_capture: Capture) -> None:
    class Echo(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.name != "echo":
                logging.getLogger("echo").warning("echo of %s", record.getMessage())
                trace.get_current_span().set_attribute("echo", True)

    handler = Echo()
    logging.getLogger().addHandler(handler)
    try:
        done = threading.Event()

        def work() -> None:
            with ri.stage("retrieval"):
                logging.getLogger("app").warning("hello")
            done.set()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        assert done.wait(2.0)
    finally:
        logging.getLogger().removeHandler(handler)
    events = [line["event"] for line in rag_capture.logs]
    assert "hello" in events
    assert "echo of hello" in events


def test_rendered_bytes_parse_with_the_standard_json_module(tmp_path: Path) -> None:
    log = tmp_path / "rag.jsonl"
    ri.configure(log_file=str(log))
    ri.get_logger().info("unicode ✓ \u2028 sep", emoji="🙂", nested={"k": [1, 2.5, None]})
    raw = log.read_bytes()
    assert raw.count(b"\n") == 1
    (line,) = (json.loads(chunk) for chunk in raw.splitlines())
    assert line["event"] == "unicode ✓ \u2028 sep"
    assert orjson.loads(raw) == line
    assert line["nested"] == {"k": [1, 2.5, None]}


def test_more_secret_shapes_are_masked(rag_capture: Capture) -> None:
    log = ri.get_logger()
    log.info("h1", text="Authorization: bearer 9f8e7d6c5b4a3210opaque")
    log.info("h2", url="postgresql://app:p@ss/w#rd@db.internal/rag")
    log.info("h3", text="GET https://api.example.com/v1?api_key=abc123verysecret&q=x: 401")
    log.info("h4", headers=[("Authorization", "abc123opaque"), ("Accept", "json")])
    log.info("h5", jwt="opaque-session-token-value")
    text = json.dumps(rag_capture.logs)
    for secret in ("9f8e7d6c5b4a3210opaque", "p@ss/w#rd", "abc123verysecret", "abc123opaque",
                   "opaque-session-token-value"):
        assert secret not in text
    assert rag_capture.find_logs("h2")[0]["url"] == "postgresql://app:[REDACTED]@db.internal/rag"
    assert rag_capture.find_logs("h4")[0]["headers"][1] == ["Accept", "json"]


def test_logged_statement_errors_hide_parameters(rag_capture: Capture, sqlite_engine) -> None:
    sqlalchemy = pytest.importorskip("sqlalchemy")
    engine = sqlite_engine()
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT * FROM missing WHERE ssn = :s"), {"s": "123-45-6789"})
    except sqlalchemy.exc.OperationalError:
        logging.getLogger("app.db").exception("query failed")
    (line,) = rag_capture.find_logs("query failed")
    assert "123-45-6789" not in json.dumps(line)
    assert line["exception"][0]["exc_type"] == "OperationalError"


def test_library_lines_name_the_stage_outside_context(rag_capture: Capture) -> None:
    from rag_instrument.logs import emit

    with ri.request_context(request_id="r-1"), ri.stage("generation"):
        emit("info", "llm call completed", {"execution_time_ms": 5.0}, measures=True)
        emit("warning", "retrying", {"attempt": 1})
        ri.get_logger("app").info("app line")
    (line,) = rag_capture.find_logs("llm call completed")
    assert line["stage"] == "generation"
    assert "pipeline_stage" not in line
    assert line["context"] == {"request_id": "r-1"}
    (retry,) = rag_capture.find_logs("retrying")
    assert retry["stage"] == "generation"
    assert retry["context"] == {"request_id": "r-1"}
    # The application's own lines keep the contract's context.pipeline_stage.
    (app,) = rag_capture.find_logs("app line")
    assert app["context"] == {"pipeline_stage": "generation", "request_id": "r-1"}
    assert "stage" not in app


# --- lines assembled from a rendered head (a stage's completion line) ----------------------

_BOUND_VALUES = st.one_of(
    st.text(max_size=30),
    st.integers(-(2**53), 2**53),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False, allow_infinity=False),
)
# A stage's rendered breakdown, as its completion line carries it after execution_time_ms.
_BREAKDOWNS = st.dictionaries(
    st.sampled_from(["db", "llm", "vector"]),
    st.fixed_dictionaries({"count": st.integers(0, 10**6), "ms": st.floats(0, 1e9)}),
    max_size=3,
)


@settings(max_examples=40, deadline=None)
@given(
    bound_values=st.dictionaries(
        st.text(min_size=1, max_size=12).filter(lambda k: k != "pipeline_stage"),
        _BOUND_VALUES,
        max_size=4,
    ),
    stage=st.sampled_from(["retrieval", "", 'stage "quoted" \u00e9']),
    own_stage=st.booleans(),
    operation=st.one_of(st.none(), st.text(max_size=20)),
    ms=st.floats(min_value=0, max_value=1e6, allow_nan=False),
    extra=st.dictionaries(
        st.sampled_from(
            ["response_model", "input_tokens", "cache_hit", "ttft_ms", "cpu_ms", "breakdown"]
        ),
        st.one_of(_BOUND_VALUES, _BREAKDOWNS),
        max_size=3,
    ),
)
def test_emit_head_writes_the_bytes_emit_writes(
    tmp_path_factory: pytest.TempPathFactory,
    bound_values: dict[str, Any],
    stage: str,
    own_stage: bool,
    operation: str | None,
    ms: float,
    extra: dict[str, Any],
) -> None:
    from opentelemetry.sdk.trace import TracerProvider

    from rag_instrument import _runtime
    from rag_instrument.logs import LineHead, emit, emit_head

    path = tmp_path_factory.mktemp("head") / "lines.jsonl"
    ri.configure(exporter=None, log_file=str(path), capture_logging=False)
    rt = _runtime.get_runtime()
    tail = {"operation": operation} if operation is not None else None
    head = LineHead("info", f"{stage or 'x'} completed", tail)
    span = TracerProvider().get_tracer("t").start_span("s")
    with ri.request_context(**bound_values):
        emit_head(rt, head, span, stage, ms, own_stage=own_stage, extra=extra)
        emit(
            "info",
            head.event,
            {**head.fields(ms), **extra},
            span=span,
            stage=stage,
            trusted=True,
            rt=rt,
            own_stage=own_stage,
        )
    ri.shutdown()
    fast, general = path.read_bytes().splitlines()
    # The timestamps differ (two calls); everything else is the same, byte for byte.
    assert fast[:14] == general[:14] == b'{"timestamp":"'
    assert fast[41:] == general[41:]
    assert json.loads(fast)["timestamp"].endswith("Z")


def test_emit_head_goes_through_emit_for_console_lines(capsys: pytest.CaptureFixture[str]) -> None:
    from rag_instrument import _runtime
    from rag_instrument.logs import LineHead, emit_head

    ri.configure(exporter=None, log_format="console", capture_logging=False)
    span = trace.INVALID_SPAN
    emit_head(
        _runtime.get_runtime(),
        LineHead("info", "retrieval completed"),
        span,
        "retrieval",
        1.5,
        own_stage=True,
    )
    err = capsys.readouterr().err
    assert "[info    ] retrieval completed" in err
    assert "execution_time_ms=1.5" in err
    assert "pipeline_stage=retrieval" in err


def test_the_librarys_own_warnings_in_a_stage_do_not_count_as_runs(tmp_path: Path) -> None:
    # A cache backend that is down warns inside the stage; the per-stage jq one-liner and
    # analyze read context.pipeline_stage, so that warning must name the stage elsewhere.
    path = tmp_path / "app.jsonl"
    ri.configure(log_file=str(path))

    @ri.cached(ttl=60, backend=ri.RedisCache("redis://127.0.0.1:1/0"))
    def lookup(x: int) -> int:
        return x * 2

    with ri.stage("retrieval"):
        assert lookup(1) == 2
    ri.shutdown()
    lines = _lines(path)
    runs = [line for line in lines if line["context"].get("pipeline_stage") == "retrieval"]
    assert [line["event"] for line in runs] == ["retrieval completed"]
    warnings = [line for line in lines if line["level"] == "warning"]
    assert warnings, lines
    assert all(line["stage"] == "retrieval" for line in warnings)


def test_export_errors_at_shutdown_are_log_lines_not_raw_stderr(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class Broken(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            raise RuntimeError("collector down")

    path = tmp_path / "app.jsonl"
    ri.configure(exporter=Broken(), log_file=str(path))
    with ri.stage("retrieval"):
        pass
    assert ri.shutdown() is False  # the span was lost
    failures = [line for line in _lines(path) if "collector down" in line["event"]]
    assert failures
    assert failures[0]["level"] == "warning"
    assert "collector down" not in capfd.readouterr().err


def test_get_logger_takes_structlogs_calls(rag_capture: Capture) -> None:
    import asyncio

    log = ri.get_logger("app.calls", tenant="t1")
    log.info("hello %s from %d", "world", 7)
    log.info("%(who)s said hi", {"who": "alice"})
    log.info("100% done")  # no arguments: a lone % is not a format
    log.info("bad %d", "x")  # never raises into the caller
    log.log(logging.WARNING, "by number %s", "w")
    log.log("error", "by name")
    for odd in (None, object(), float("nan"), [1]):
        log.log(odd, "odd level")  # never raises into the caller: info
    log.log(10**400, "huge level")
    log.log(Decimal(40), "decimal level")
    log.msg("as msg")
    log.fatal("as fatal")

    async def main() -> None:
        await log.ainfo("async %s", "info")
        await log.awarning("async warning")
        try:
            int("boom")
        except ValueError:
            await log.aexception("async exception")
        await log.alog(logging.DEBUG, "async debug")  # below the level: dropped

    asyncio.run(main())
    events = {line["event"]: line for line in rag_capture.logs}
    assert "hello world from 7" in events
    assert "alice said hi" in events
    assert "100% done" in events
    assert events["bad %d (unformattable arguments)"]["level"] == "info"
    assert events["by number w"]["level"] == "warning"
    assert events["by name"]["level"] == "error"
    assert events["odd level"]["level"] == "info"
    assert events["huge level"]["level"] == "critical"
    assert events["decimal level"]["level"] == "error"
    assert events["as msg"]["level"] == "info"
    assert events["as fatal"]["level"] == "critical"
    assert events["async info"]["level"] == "info"
    assert events["async warning"]["level"] == "warning"
    assert events["async exception"]["exception"]
    assert all(line["logger"] == "app.calls" for line in events.values())
    assert all(line["tenant"] == "t1" for line in events.values())


def test_get_logger_new_keeps_the_loggers_name(rag_capture: Capture) -> None:
    log = ri.get_logger("app.named", tenant="t1")
    fresh = log.new(request="r-1")
    fresh.info("fresh")
    log.info("original")
    (line,) = rag_capture.find_logs("fresh")
    assert line["logger"] == "app.named"
    assert line["request"] == "r-1"
    assert "tenant" not in line
    (original,) = rag_capture.find_logs("original")
    assert original["logger"] == "app.named"
    assert original["tenant"] == "t1"


def test_stdlib_records_keep_their_creation_time_and_stack() -> None:
    # Records handed over later (a QueueListener) were stamped with the time of writing,
    # and stack_info=True was dropped.
    import logging
    import time

    logger = logging.getLogger("app.queued")
    record = logger.makeRecord("app.queued", logging.WARNING, __file__, 1, "queued", (), None)
    record.created -= 3600.0
    with capture() as cap:
        logger.handle(record)
        logger.warning("with stack", stack_info=True)
    queued, stacked = cap.find_logs("queued")[0], cap.find_logs("with stack")[0]
    expected = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    assert queued["timestamp"].startswith(expected)
    assert stacked["stack"].startswith("Stack (most recent call last)")


def _log_with_a_literal() -> None:
    secret_literal = "hunter2-in-source"  # noqa: F841 - source text must not be recorded
    logging.getLogger("app.stack").warning("stdlib stack", stack_info=True)
    ri.get_logger("app.stack").warning("structlog stack", stack_info=True)


def test_stack_info_gives_frames_without_source_text() -> None:
    with capture() as cap:
        _log_with_a_literal()
    for event in ("stdlib stack", "structlog stack"):
        (line,) = cap.find_logs(event)
        stack = line["stack"]
        assert stack.startswith("Stack (most recent call last):\n"), event
        assert "stack_info" not in line
        innermost = stack.splitlines()[-1]
        assert innermost.endswith(", in _log_with_a_literal"), innermost
        assert innermost.startswith(f'  File "{__file__}", line ')
        assert "outer frame(s) left out" in stack  # pytest's own frames: the cut ones
        assert "getLogger" not in stack
        assert "get_logger" not in stack
        assert "hunter2" not in stack
        assert "structlog" not in stack.split("\n")[-1]  # the logging call's own frames: out
