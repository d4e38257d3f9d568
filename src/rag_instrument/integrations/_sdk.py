"""What the SDK integrations share besides streams: every HTTP attempt, and raw responses.

Every HTTP attempt of an instrumented SDK call: the SDK's own retries, made visible.

The openai and anthropic SDKs retry by themselves (``max_retries``, 2 by default, honouring
``Retry-After``) inside one ``create`` call, so a call that took three attempts looks like
one slow call. To see each attempt, the ``send`` method of the SDK client's HTTP client (the
``httpx`` client the SDK keeps as ``client._client``; ``send`` is the public ``httpx`` method
the SDK calls exactly once per attempt) is wrapped on that one client object. The wrapper
does nothing unless an instrumented call is in progress in the same context (thread or
task): requests made by other code through a shared ``httpx`` client are not touched.

``send`` is used rather than ``httpx``'s ``event_hooks`` because a hook never sees an
attempt that failed without a response (a timeout, a refused connection): ``send`` raises
the exact error at the exact moment, so a timeout is told from a refused connection and the
wait before the next attempt is measured from the failure.

For each retry the call records what :class:`~rag_instrument.retry.RetryMixin` records: a
``"retry"`` span event (``attempt``, ``error_type``, ``wait_s``, plus
``http.response.status_code`` when the server answered), one ``"retrying"`` warning line,
one count on ``rag.retry.count`` and on ``rag.llm.retries``; the span gets
``rag.retry.attempts`` (HTTP attempts made) and ``rag.retry.backoff_ms`` (time between a
failure and the next attempt). A retry is recorded when the next attempt starts (the SDK
decides whether to retry, and it does not say so beforehand); the span event carries the
time of the failure.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

import orjson

from rag_instrument._genai import GenAICall, current_call
from rag_instrument._utils import internal_error
from rag_instrument.attributes import (
    ERROR_TYPE,
    EVENT_RETRY,
    HTTP_RESPONSE_STATUS_CODE,
    LOG_RETRYING,
    METRIC_LLM_RETRIES,
    METRIC_RETRY_COUNT,
)
from rag_instrument.logs import emit

__all__ = [
    "Watch",
    "raw_body",
    "status_error_names",
    "watch_http_client",
]

#: Set on an ``httpx`` client whose ``send`` is wrapped.
SEND_MARKER: Final = "_rag_instrument_send"


def status_error_names(module: Any) -> Callable[[int], str]:
    """The SDK error class name a status becomes (``429 -> "RateLimitError"``).

    Read from the SDK's public exception classes, whose ``status_code`` is a class
    attribute (``RateLimitError.status_code == 429``).
    """
    base = getattr(module, "APIStatusError", None)
    names: dict[int, str] = {}
    for value in list(vars(module).values()):
        # type(value), not isinstance(): the SDKs' lazy module proxies (``openai.beta``)
        # answer ``__class__`` by importing what they stand for (seconds of imports).
        if issubclass(type(value), type) and base is not None and issubclass(value, base):
            status = value.__dict__.get("status_code")
            if isinstance(status, int) and status not in names:
                names[status] = value.__name__

    def name(status: int) -> str:
        found = names.get(status)
        if found is not None:
            return found
        return "InternalServerError" if status >= 500 else "APIStatusError"

    return name


def _is_timeout(exc: BaseException) -> bool:
    if isinstance(exc, TimeoutError):
        return True
    return any(cls.__name__ == "TimeoutException" for cls in type(exc).__mro__)


#: What the wrapped ``send`` needs to record a call's attempts: the ``"retrying"`` line's
#: ``target`` and the status -> SDK error name function. Set on the call by
#: :func:`~rag_instrument.integrations._streams.instrumented` (its ``http`` argument).
Watch = tuple[str, Callable[[int], str]]


def _failed(call: GenAICall, status: int | None, error_type: str) -> None:
    """The attempt failed: kept on the call until the next attempt makes it a retry."""
    call.http_failure = (time.perf_counter_ns(), time.time_ns(), status, error_type)


def _answered(call: GenAICall, response: Any) -> None:
    """The attempt got a response (a status >= 400 is a failure)."""
    try:
        status = response.status_code
        if isinstance(status, int) and status >= 400:
            _failed(call, status, call.http[1](status))
    except Exception as exc:
        internal_error("recording an http response", exc)


def _raised(call: GenAICall, exc: BaseException) -> None:
    """The attempt failed without a response."""
    if isinstance(exc, Exception):
        try:
            _failed(call, None, "APITimeoutError" if _is_timeout(exc) else "APIConnectionError")
        except Exception as err:
            internal_error("recording an http failure", err)


def _retried(call: GenAICall) -> None:
    """An attempt starts after a failed one: record the retry (never raises)."""
    try:
        failed_ns, failed_wall_ns, status, error_type = call.http_failure
        call.http_failure = None
        wait_s = (time.perf_counter_ns() - failed_ns) / 1e9
        call.backoff_ms += wait_s * 1000.0
        rt = call.rt
        if not rt.enabled:
            return
        event: dict[str, Any] = {
            "attempt": call.attempts,
            "error_type": error_type,
            "wait_s": round(wait_s, 6),
        }
        if status is not None:
            event[HTTP_RESPONSE_STATUS_CODE] = status
        if call.span.is_recording():
            call.span.add_event(EVENT_RETRY, event, timestamp=failed_wall_ns)
        rt.counter(METRIC_RETRY_COUNT, "{retry}", "Retried calls (one per retry).").add(
            1, {ERROR_TYPE: error_type}
        )
        metric: dict[str, Any] = {**call.metric_attrs, ERROR_TYPE: error_type}
        if status is not None:
            metric[HTTP_RESPONSE_STATUS_CODE] = status
        rt.counter(METRIC_LLM_RETRIES, "{retry}", "Retried model requests (one per retry).").add(
            1, metric
        )
        if rt.log is not None:
            fields: dict[str, Any] = {"target": call.http[0], **event}
            if status is not None:
                del fields[HTTP_RESPONSE_STATUS_CODE]
                fields["http_status"] = status
            emit("warning", LOG_RETRYING, fields, span=call.span, trusted=True, rt=rt)
    except Exception as exc:
        internal_error("recording an http attempt", exc)


def watch_http_client(client: Any, is_async: bool) -> None:
    """Wrap ``send`` on the SDK client's ``httpx`` client (once per ``httpx`` client)."""
    try:
        http = getattr(client, "_client", None)
        send = getattr(http, "send", None)
        if http is None or not callable(send) or getattr(http, SEND_MARKER, False):
            return
        wrapped = _async_send(send) if is_async else _sync_send(send)
        http.send = wrapped
        setattr(http, SEND_MARKER, True)
    except Exception as exc:
        internal_error("watching an SDK's http client", exc)


# The two loops around the decisions above. Each attempt of a call whose HTTP attempts are
# watched (``call.http`` set) counts on ``call.attempts``; any other request through the
# same ``httpx`` client (another library's, an unwatched call's) goes straight through.


def _sync_send(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def send(*args: Any, **kwargs: Any) -> Any:
        call = current_call()
        if call is None or call.http is None:
            return original(*args, **kwargs)
        if call.http_failure is not None:
            _retried(call)
        call.attempts += 1
        try:
            response = original(*args, **kwargs)
        except BaseException as exc:
            _raised(call, exc)
            raise
        _answered(call, response)
        return response

    return send


def _async_send(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    async def send(*args: Any, **kwargs: Any) -> Any:
        call = current_call()
        if call is None or call.http is None:
            return await original(*args, **kwargs)
        if call.http_failure is not None:
            _retried(call)
        call.attempts += 1
        try:
            response = await original(*args, **kwargs)
        except BaseException as exc:
            _raised(call, exc)
            raise
        _answered(call, response)
        return response

    return send


# --- raw responses ----------------------------------------------------------------------------


class _View:
    """Attribute access over parsed JSON, so a raw body reads like the SDK's model."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = data

    def __getattr__(self, name: str) -> Any:
        return _view(self._data.get(name))


def _view(value: Any) -> Any:
    if isinstance(value, Mapping):
        return _View(value)
    if isinstance(value, list):
        return [_view(v) for v in value]
    return value


#: Per response class: 0, never a raw response; 1, a raw response class; 2, a class whose
#: instances may carry ``http_response`` themselves. Worked out once per class: a pydantic
#: model's class-level lookup of a missing name raises inside its metaclass (slow).
_RAW_KINDS: dict[type, int] = {}


def _raw_kind(kind: type) -> int:
    if not callable(getattr(kind, "parse", None)):
        found = 0
    elif hasattr(kind, "http_response"):
        found = 1
    else:
        found = 2
    if len(_RAW_KINDS) >= 256:  # classes made at run time must not grow it forever
        _RAW_KINDS.clear()
    _RAW_KINDS[kind] = found
    return found


def raw_body(result: Any) -> Any:
    """For a ``with_raw_response`` result whose body was read: that body, attribute-style.

    ``None`` for anything else (a parsed model, a stream, a ``with_streaming_response``
    result whose body is still unread: reading it here would consume the user's stream).
    """
    kind = type(result)
    found = _RAW_KINDS.get(kind)
    if found is None:
        found = _raw_kind(kind)
    if found == 0:
        return None  # no ``parse`` (looked up on the class: a model's __getattr__ is slow)
    if found == 2 and "http_response" not in getattr(result, "__dict__", ()):
        return None
    http = result.http_response
    if not getattr(http, "is_closed", False):
        return None
    content = getattr(http, "content", None)
    if not isinstance(content, bytes | bytearray) or not content:
        return None
    data = orjson.loads(content)
    return _View(data) if isinstance(data, Mapping) else None
