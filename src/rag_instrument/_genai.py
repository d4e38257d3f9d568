"""One GenAI call's telemetry: span, log line, metrics and breakdown, shared by every client.

:class:`LLMProvider <rag_instrument.llm.LLMProvider>` and the OpenAI / Anthropic integrations
all describe a model call the same way, so that a dashboard built on one works for all:

- a CLIENT span ``"{gen_ai.operation.name} {model}"`` with the OpenTelemetry GenAI
  semantic-convention attributes and ``openinference.span.kind``;
- one log line, ``"llm call completed"`` (info) or ``"llm call failed"`` (error), with
  ``execution_time_ms``;
- the histograms ``gen_ai.client.operation.duration`` (s) and ``gen_ai.client.token.usage``;
- the call reported to the enclosing stage's breakdown (``llm`` or ``embedding``).

Prompt and response text are recorded only when ``capture_content`` is on, and then
redacted and cut to ``max_content_chars``. Without it, a failed call's span status,
``exception.message`` and log ``error_message`` carry only the error type, its HTTP status
and a short provider error code (``"BadRequestError (HTTP 400, code context_length)"``):
never the SDK's message text, which may echo the prompt in any form (one message of
several, ``repr``-escaped, JSON-encoded...). With capture on, the message is kept, redacted.
Either way, the literal secrets a call was started with (an SDK client's own ``api_key``,
whatever its shape) are replaced in every text recorded for it.
"""

from __future__ import annotations

import contextvars
import re
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import orjson
from opentelemetry.metrics import NoOpHistogram
from opentelemetry.trace import SpanKind, Status, StatusCode

from rag_instrument import _breakdown
from rag_instrument import attributes as attr
from rag_instrument._context import attach_span, current_frame, detach_span, note_content
from rag_instrument._errors import remember_exception
from rag_instrument._sanitize import (
    REDACTED,
    exported_name,
    redact_text,
    redact_then_truncate,
    register_literal_secrets,
    safe_str,
    stack_trace,
)
from rag_instrument._utils import http_status, internal_error, user_code_error
from rag_instrument.attributes import (
    EVENT_LLM_CANCELLED,
    EVENT_LLM_COMPLETED,
    EVENT_LLM_FAILED,
    GEN_AI_INPUT_MESSAGES,
    GEN_AI_OPERATION_NAME,
    GEN_AI_OUTPUT_MESSAGES,
    GEN_AI_PROVIDER_NAME,
    GEN_AI_REQUEST_MODEL,
    GEN_AI_RESPONSE_FINISH_REASONS,
    GEN_AI_RESPONSE_MODEL,
    GEN_AI_TOKEN_TYPE,
    GEN_AI_USAGE_INPUT_TOKENS,
    GEN_AI_USAGE_OUTPUT_TOKENS,
    METRIC_OPERATION_DURATION,
    METRIC_TIME_TO_FIRST_CHUNK,
    METRIC_TOKEN_USAGE,
    RAG_CACHE_HIT,
    RAG_LLM_TTFT_MS,
    RAG_RETRY_ATTEMPTS,
    RAG_RETRY_BACKOFF_MS,
    RAG_STREAM_CHUNKS,
)
from rag_instrument.logs import LineHead, emit, emit_head

if TYPE_CHECKING:
    from opentelemetry.metrics import Histogram
    from opentelemetry.trace import Span

    from rag_instrument._runtime import Runtime

__all__ = [
    "GenAICall",
    "RetryScope",
    "Secrets",
    "current_call",
    "error_summary",
    "numeric_params",
    "retry_scope",
    "start_call",
    "usable_secrets",
]

# --- names (to move to attributes.py) -----------------------------------------------------

#: Request parameters recorded as ``gen_ai.request.<name>``: numbers only, never free text.
_NUMERIC_PARAMS: Final = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "max_tokens": "max_tokens",
    "max_completion_tokens": "max_tokens",
    "max_output_tokens": "max_tokens",
    "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty",
    "seed": "seed",
    "n": "choice.count",
}

#: A provider error code short and plain enough to record without content capture.
_ERROR_CODE: Final = re.compile(r"[A-Za-z][A-Za-z0-9_.:-]{0,47}")

#: Secrets shorter than this are not scrubbed literally (too likely to hit ordinary text).
_MIN_SECRET_CHARS: Final = 8

_current: contextvars.ContextVar[GenAICall | None] = contextvars.ContextVar(
    "rag_instrument.genai_call", default=None
)
current_call = _current.get

#: The retry layer (``ri.retry``, ``RetryMixin``) around the code running now, as
#: ``(attempts allowed, is_retryable, this attempt)``: a model call failing inside it with a
#: retryable error, attempts left, is logged as a warning (it will be retried), not an error.
RetryScope = tuple[int, Callable[[BaseException], bool], int]
retry_scope: contextvars.ContextVar[RetryScope | None] = contextvars.ContextVar(
    "rag_instrument.retry_scope", default=None
)


def _will_be_retried(exc: BaseException) -> bool:
    scope = retry_scope.get()
    if scope is None:
        return False
    attempts, is_retryable, attempt = scope
    try:
        return attempt < attempts and bool(is_retryable(exc))
    except Exception:
        return False


_NUMERIC_NAMES: Final = frozenset(_NUMERIC_PARAMS)


def numeric_params(params: Mapping[str, Any]) -> dict[str, int | float]:
    """The known numeric request parameters as ``gen_ai.request.*`` attributes."""
    out: dict[str, int | float] = {}
    if _NUMERIC_NAMES.isdisjoint(params):  # the usual call (model and messages): one C call
        return out
    for key, value in params.items():
        name = _NUMERIC_PARAMS.get(key)
        if name is not None and type(value) in (int, float):
            out[f"gen_ai.request.{name}"] = value
    return out


# The last response model name found clean (nothing to redact or cut): a model name
# repeats call after call. Only a clean one, so that no secret is kept alive here.
_LAST_CLEAN_MODEL: list[str] = [""]


def _clean_model(response_model: object) -> str:
    """``response_model`` as the log line records it: redacted, cut to 200 characters."""
    text = str(response_model)
    if text == _LAST_CLEAN_MODEL[0]:
        return text
    clean = redact_then_truncate(text, 200)
    if clean == text:
        _LAST_CLEAN_MODEL[0] = text
    return clean


class Secrets(tuple[str, ...]):
    """Secrets already found long enough to scrub literally (see :func:`usable_secrets`).

    :func:`start_call` takes them as they are, where any other sequence is checked per call.
    """

    __slots__ = ()


def usable_secrets(secrets: Sequence[object]) -> Secrets:
    """The secrets long enough to scrub literally (strings of 8 characters or more)."""
    if type(secrets) is Secrets:
        return secrets
    found = Secrets(s for s in secrets if isinstance(s, str) and len(s) >= _MIN_SECRET_CHARS)
    if found:
        register_literal_secrets(found)  # and out of every log line, the app's own too
    return found


def _without_secrets(text: str, secrets: Sequence[str]) -> str:
    # Before the sanitizer: truncating first could leave half a key behind.
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def _messages_json(
    role: str, text: str | Sequence[tuple[str, str]], rt: Runtime, secrets: Sequence[str] = ()
) -> str:
    """``gen_ai.input.messages`` / ``gen_ai.output.messages`` as JSON text.

    One message of ``role`` with ``text``, or the ``(role, text)`` pairs ``text`` gives
    (each masked and cut).
    """
    pairs = [(role, text)] if isinstance(text, str) else list(text)
    return orjson.dumps(
        [
            {
                "role": str(each_role),
                "parts": [
                    {
                        "type": "text",
                        "content": rt.sanitizer.text(_without_secrets(each_text, secrets)),
                    }
                ],
            }
            for each_role, each_text in pairs
        ]
    ).decode()


def _code_of(exc: BaseException) -> str | None:
    candidates: list[object] = [getattr(exc, "code", None)]
    body = getattr(exc, "body", None)
    if isinstance(body, Mapping):
        error = body.get("error")
        for source in (body, error) if isinstance(error, Mapping) else (body,):
            candidates += [source.get("code"), source.get("type")]
    for value in candidates:
        if isinstance(value, str) and value != "error" and _ERROR_CODE.fullmatch(value):
            return value
    return None


def _exception_line(exc: BaseException) -> str:
    """The exception's own last traceback line (type and message), as Python prints it."""
    return "".join(traceback.format_exception_only(type(exc), exc)).rstrip("\n")


def error_summary(exc: BaseException, secrets: Sequence[str] = ()) -> str:
    """What may be said of a failed call without content capture: never the message text.

    The exception's type name, its HTTP status and a short provider error code, e.g.
    ``"RateLimitError (HTTP 429, code rate_limit_exceeded)"``; just ``"ValueError"`` for
    an error that carries neither.
    """
    parts: list[str] = []
    try:
        status = http_status(exc)
        if status is not None:
            parts.append(f"HTTP {status}")
        code = _code_of(exc)
        if code is not None and not any(s in code or code in s for s in secrets):
            parts.append(f"code {code}")
    except Exception:
        pass  # a property that raises: say less
    name = type(exc).__name__
    return f"{name} ({', '.join(parts)})" if parts else name


class GenAICall:
    """The telemetry state of one model call, from :func:`start_call` to :meth:`finish`.

    Attributes:
        span: the call's span (ended by :meth:`finish`).
        attempts: attempts made (set by the retry layer).
        backoff_ms: milliseconds slept between attempts.
        cache_hit: ``True``/``False`` when a cache answered or missed, ``None`` if uncached.
        ttft_ms: time to the first streamed chunk, for streams.
        chunks: streamed chunks seen, for streams.
        http: for an SDK call whose HTTP attempts are recorded, what the SDK integration
            needs to record them (set by it; ``None`` otherwise): each attempt adds one to
            ``attempts``.
        http_failure: the last HTTP attempt's failure, until the next attempt records it
            as a retry (set by the SDK integration).
    """

    __slots__ = (
        "_token",
        "attempts",
        "backoff_ms",
        "breakdown_kind",
        "cache_hit",
        "chunks",
        "finished",
        "http",
        "http_failure",
        "line",
        "metric_attrs",
        "operation",
        "rt",
        "secrets",
        "span",
        "start_ns",
        "ttft_ms",
        "usage_attrs",
    )

    def __init__(
        self,
        rt: Runtime,
        span: Span,
        operation: str,
        breakdown_kind: str,
        secrets: Sequence[str] = (),
        described: _Described | None = None,
    ) -> None:
        self.rt = rt
        self.span = span
        self.operation = operation
        self.breakdown_kind = breakdown_kind
        self.secrets = secrets
        #: The metric attributes; token usage's (input, output), ``None``: made from them;
        #: the completed line's rendered fixed part (``None``: built field by field).
        self.metric_attrs: dict[str, str]
        self.usage_attrs: tuple[dict[str, str], dict[str, str]] | None
        self.line: LineHead | None
        if described is not None:
            self.metric_attrs = described.metric_attrs
            self.usage_attrs = described.usage_attrs
            self.line = described.line
        else:
            self.metric_attrs, self.usage_attrs, self.line = {}, None, None
        self.attempts = 0
        self.backoff_ms = 0.0
        self.cache_hit: bool | None = None
        self.ttft_ms: float | None = None
        self.chunks: int | None = None
        self.finished = False
        self.http: Any = None
        self.http_failure: Any = None
        self._token: tuple[object, contextvars.Token[GenAICall | None]] | None = None
        self.start_ns = time.perf_counter_ns()

    # --- context ------------------------------------------------------------------------
    def attach(self) -> None:
        """Make the span current (children nest under it) until :meth:`detach`."""
        self._token = (attach_span(self.span), _current.set(self))

    def detach(self) -> None:
        """Undo :meth:`attach`; safe to call twice or from another context."""
        token, self._token = self._token, None
        if token is None:
            return
        try:
            _current.reset(token[1])
            detach_span(token[0])
        except Exception:
            pass  # detached in another context (a dropped stream): restore nothing

    # --- during the call ----------------------------------------------------------------
    def add_retry(self, attempt: int, exc: BaseException, wait_s: float) -> None:
        """Record one retry as a ``"retry"`` span event."""
        try:
            if self.span.is_recording():
                self.span.add_event(
                    "retry",
                    {
                        "attempt": attempt,
                        "error_type": type(exc).__qualname__,
                        "wait_s": round(wait_s, 6),
                    },
                )
        except Exception as err:
            user_code_error("recording a retry event", err)

    def first_chunk(self) -> None:
        """Note that the first streamed chunk arrived now."""
        ms = (time.perf_counter_ns() - self.start_ns) / 1e6
        self.ttft_ms = ms
        try:
            instruments = _instruments(self.rt)
            if instruments is not None:  # None: the API's no-op meter
                instruments[2].record(ms / 1000.0, self.metric_attrs)
        except Exception as exc:
            internal_error("recording time to first chunk", exc)

    # --- the end ------------------------------------------------------------------------
    def finish(
        self,
        exc: BaseException | None = None,
        *,
        response_model: str | None = None,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        finish_reasons: Sequence[str] | None = None,
        output_text: str | None = None,
        completed: bool = True,
    ) -> None:
        """End the span and write the log line and metrics (once; never raises)."""
        if self.finished:
            return
        self.finished = True
        try:
            elapsed_s = (time.perf_counter_ns() - self.start_ns) / 1e9
            ms = elapsed_s * 1000.0
            rt = self.rt
            span = self.span
            cancelled = exc is not None and not isinstance(exc, Exception)
            hit = self.cache_hit is True
            if hit:  # nothing was asked of the provider
                input_tokens = output_tokens = 0
            if span.is_recording():
                values: dict[str, Any] = {}
                # Text from the provider, masked here as export would: the span may be
                # marked sanitised at the source (export then leaves it as it is).
                if response_model:
                    values[GEN_AI_RESPONSE_MODEL] = (
                        redact_text(response_model)
                        if type(response_model) is str
                        else response_model
                    )
                if input_tokens is not None:
                    values[GEN_AI_USAGE_INPUT_TOKENS] = input_tokens
                if output_tokens is not None:
                    values[GEN_AI_USAGE_OUTPUT_TOKENS] = output_tokens
                if finish_reasons:
                    values[GEN_AI_RESPONSE_FINISH_REASONS] = tuple(
                        map(redact_text, map(str, finish_reasons))
                    )
                if self.attempts:
                    values[RAG_RETRY_ATTEMPTS] = self.attempts
                    values[RAG_RETRY_BACKOFF_MS] = round(self.backoff_ms, 3)
                if self.cache_hit is not None:
                    values[RAG_CACHE_HIT] = hit
                if self.ttft_ms is not None:
                    values[RAG_LLM_TTFT_MS] = round(self.ttft_ms, 3)
                if self.chunks is not None:
                    values[RAG_STREAM_CHUNKS] = self.chunks
                    values[attr.RAG_STREAM_COMPLETED] = completed
                if output_text is not None and not rt.settings.capture_content:
                    note_content(output_text)
                if output_text is not None and rt.settings.capture_content:
                    values[GEN_AI_OUTPUT_MESSAGES] = _messages_json(
                        "assistant", output_text, rt, self.secrets
                    )
                if exc is not None:
                    values[attr.ERROR_TYPE] = redact_text(type(exc).__qualname__)
                    if cancelled:
                        values[attr.RAG_CANCELLED] = True
                    else:
                        self._record_exception(exc)
            else:
                values = {}
            try:
                rt.end_span(span, None, values)
            except Exception as end_exc:
                user_code_error("ending a span", end_exc)
            metric_attrs: dict[str, str] = self.metric_attrs
            instruments = _instruments(rt)
            if instruments is not None:  # None: the meter is the API's no-op one
                duration, usage, _ = instruments
                if exc is not None:
                    metric_attrs = {**metric_attrs, attr.ERROR_TYPE: type(exc).__qualname__}
                duration.record(elapsed_s, metric_attrs)
                if not hit and (input_tokens or output_tokens):
                    usage_in, usage_out = self.usage_attrs or (
                        {**self.metric_attrs, GEN_AI_TOKEN_TYPE: "input"},
                        {**self.metric_attrs, GEN_AI_TOKEN_TYPE: "output"},
                    )
                    if input_tokens:
                        usage.record(input_tokens, usage_in)
                    if output_tokens:
                        usage.record(output_tokens, usage_out)
            frame = current_frame()
            if not hit and frame is not None:
                _breakdown.record_in(frame, self.breakdown_kind, ms)
            if rt.log is None:
                return
            # What changes per call; the fixed fields (operation, provider, model) come first.
            fields: dict[str, Any] = {}
            if response_model:
                fields["response_model"] = _clean_model(response_model)
            if input_tokens is not None:
                fields["input_tokens"] = input_tokens
            if output_tokens is not None:
                fields["output_tokens"] = output_tokens
            if self.attempts > 1:
                fields["retry_attempts"] = self.attempts
                fields["retry_backoff_ms"] = round(self.backoff_ms, 3)
            if self.cache_hit is not None:
                fields["cache_hit"] = hit
            if self.ttft_ms is not None:
                fields["time_to_first_token_ms"] = round(self.ttft_ms, 3)
            line = self.line
            if exc is None and line is not None:
                # The usual line, from its pre-rendered fixed part: the bytes emit() writes.
                stage = frame.stage if frame is not None else None
                emit_head(rt, line, span, stage or "", round(ms, 3), own_stage=False, extra=fields)
                return
            fields = {
                "execution_time_ms": round(ms, 3),
                "operation": self.operation,
                "provider": self.metric_attrs.get(GEN_AI_PROVIDER_NAME),
                "model": self.metric_attrs.get(GEN_AI_REQUEST_MODEL),
                **fields,
            }
            if exc is None:
                event, level = EVENT_LLM_COMPLETED, "info"
            elif cancelled:
                event, level = EVENT_LLM_CANCELLED, "warning"
                fields["error_type"] = type(exc).__name__
            else:
                event, level = EVENT_LLM_FAILED, "error"
                if _will_be_retried(exc):  # an attempt, not the call's outcome
                    level = "warning"
                    fields["will_retry"] = True
                fields["error_type"] = type(exc).__name__
                fields["error_message"] = self._error_text(exc)
            emit(level, event, fields, span=span, trusted=True, rt=rt, measures=True)
        except Exception as err:
            internal_error("finishing an llm call", err)

    def _scrub(self, text: str) -> str:
        return self.rt.sanitizer.text(_without_secrets(text, self.secrets))

    def _error_text(self, exc: BaseException) -> str:
        """The error message as recorded: the SDK's text only with content capture on."""
        if self.rt.settings.capture_content:
            return self._scrub(safe_str(exc))
        return self._scrub(error_summary(exc, self.secrets))

    def _record_exception(self, exc: BaseException) -> None:
        exc_type = type(exc)
        module = exc_type.__module__
        qualname = (
            exc_type.__qualname__ if module == "builtins" else f"{module}.{exc_type.__qualname__}"
        )
        message = self._error_text(exc)
        # The stages this exception propagates through say no more than this span does.
        remember_exception(
            exc,
            summary=None if self.rt.settings.capture_content else message,
            secrets=tuple(self.secrets),
        )
        # Frames without source text; the chained exceptions' messages only with content capture.
        if self.rt.settings.capture_content:
            stack = stack_trace(exc, _exception_line, chain=True)
        else:
            stack = stack_trace(exc, lambda _exc: f"{qualname}: {message}")
        if self.rt.settings.capture_content:
            description = f"{exc_type.__name__}: {message}"
        else:
            description = message  # already "Type (HTTP n, code c)"
        self.span.set_status(Status(StatusCode.ERROR, description))
        self.span.add_event(
            "exception",
            {
                "exception.type": qualname,
                "exception.message": message,
                "exception.stacktrace": self._scrub(stack),
                "exception.escaped": True,
            },
        )


def start_call(
    rt: Runtime,
    *,
    operation: str,
    system: str,
    model: str,
    params: Mapping[str, Any] | None = None,
    prompt: str | Callable[[], str | Sequence[tuple[str, str]]] | None = None,
    breakdown_kind: str = attr.BREAKDOWN_LLM,
    span_kind: str = attr.SpanKind.LLM,
    secrets: Sequence[str] = (),
) -> GenAICall:
    """Open the span of one model call (not yet current: see :meth:`GenAICall.attach`).

    Args:
        rt: the runtime in force.
        operation: ``gen_ai.operation.name`` (``"chat"``, ``"embeddings"``).
        system: ``gen_ai.provider.name``.
        model: ``gen_ai.request.model``.
        params: the request's parameters (only the known numeric ones are recorded).
        breakdown_kind: the stage breakdown entry (``llm`` or ``embedding``).
        span_kind: ``openinference.span.kind``.
        prompt: the prompt text, or a function building it (the text, or ``(role, text)``
            pairs, one per message): called only when content
            capture is on (joining 1,000 embedding inputs is not paid for otherwise).
        secrets: literal strings (a client's API key) to replace in every text recorded
            for this call; those shorter than 8 characters are ignored.
    """
    if secrets and type(secrets) is not Secrets:
        secrets = usable_secrets(secrets)
    key = (operation, system, model, span_kind)
    described = _DESCRIBED.get(key)
    if described is None:
        described = _describe(key)
    attributes = described.attributes  # shared: spans copy before they change it
    numeric = numeric_params(params) if params else None
    capture = prompt is not None and rt.settings.capture_content
    if numeric or capture:
        attributes = {**attributes, **(numeric or {})}
        if capture:
            text = prompt if isinstance(prompt, str) else prompt()  # type: ignore[misc]
            attributes[GEN_AI_INPUT_MESSAGES] = _messages_json("user", text, rt, secrets)
    if prompt is not None and not capture and isinstance(prompt, str):
        note_content(prompt)  # hidden where an exception of the enclosing stage quotes it
    # Sanitised at the source when its name and attributes are as export would leave them
    # (export then skips them); with captured content, export redacts the span as it does
    # any other instrumentation's.
    span = rt.start_span(
        described.name, attributes, kind=SpanKind.CLIENT, sanitized=described.clean and not capture
    )
    return GenAICall(rt, span, operation, breakdown_kind, secrets, described)


# The runtime the model-call histograms were last looked up on, with the histograms (one
# tuple, replaced whole: a reader never mixes two runtimes' instruments); ``None`` for the
# histograms of the API's no-op meter, which record nothing: not called at all.
_INSTRUMENTS: list[tuple[Any, tuple[Histogram, Histogram, Histogram] | None]] = [(None, None)]


def _instruments(rt: Runtime) -> tuple[Histogram, Histogram, Histogram] | None:
    """The model-call histograms on ``rt``: duration, token usage, time to first chunk."""
    entry = _INSTRUMENTS[0]
    if entry[0] is not rt:
        found = (
            rt.histogram(METRIC_OPERATION_DURATION, "s", "GenAI operation duration."),
            rt.histogram(METRIC_TOKEN_USAGE, "{token}", "Number of input and output tokens."),
            rt.histogram(
                METRIC_TIME_TO_FIRST_CHUNK, "s", "Time to the first chunk of a streamed response."
            ),
        )
        noop = all(type(histogram) is NoOpHistogram for histogram in found)
        entry = (rt, None if noop else found)
        _INSTRUMENTS[0] = entry
    return entry[1]


class _Described:
    """What is the same for every call of one operation, provider, model and kind."""

    __slots__ = ("attributes", "clean", "line", "metric_attrs", "name", "usage_attrs")

    def __init__(self, operation: str, system: str, model: str, span_kind: str) -> None:
        self.name = f"{operation} {model}"
        #: The span's name and first attributes are what export's redaction would leave
        #: (the usual model name): the span may be marked sanitised at the source.
        self.clean = exported_name(self.name) == self.name and all(
            redact_text(value) == value for value in (operation, system, model, span_kind)
        )
        self.attributes: dict[str, Any] = {
            GEN_AI_OPERATION_NAME: operation,
            GEN_AI_PROVIDER_NAME: system,
            GEN_AI_REQUEST_MODEL: model,
            attr.OPENINFERENCE_SPAN_KIND: span_kind,
        }
        # The log line and the metrics carry the model name as a log line's response
        # model does: secrets masked, cut to 200 characters.
        line_model = redact_then_truncate(model, 200)
        self.metric_attrs: dict[str, str] = {
            GEN_AI_OPERATION_NAME: operation,
            GEN_AI_PROVIDER_NAME: system,
            GEN_AI_REQUEST_MODEL: line_model,
        }
        self.usage_attrs = (
            {**self.metric_attrs, GEN_AI_TOKEN_TYPE: "input"},
            {**self.metric_attrs, GEN_AI_TOKEN_TYPE: "output"},
        )
        #: The completed line's fixed part, rendered once (the fields emit() would get).
        self.line: LineHead | None
        try:
            tail = {"operation": operation, "provider": system, "model": line_model}
            self.line = LineHead("info", EVENT_LLM_COMPLETED, tail)
        except Exception:  # a name orjson refuses (a lone surrogate): built per line
            self.line = None


# Read-only descriptions, shared by the calls they describe; model names computed at run
# time must not grow it forever.
_DESCRIBED: dict[tuple[str, str, str, str], _Described] = {}


def _describe(key: tuple[str, str, str, str]) -> _Described:
    if len(_DESCRIBED) >= 1024:
        _DESCRIBED.clear()
    described = _DESCRIBED[key] = _Described(*key)
    return described
