"""Retries with exponential backoff and jitter, built on tenacity, and visible in telemetry.

Two front ends share one policy: :class:`RetryMixin` for an
:class:`~rag_instrument.llm.LLMProvider`, and :func:`retry` for any function::

    @ri.retry(attempts=4, wait_max=5.0)
    async def ask(question: str) -> str: ...

A first-attempt success never touches tenacity: the function is called directly and the
``Retrying`` machinery is built only after a retryable failure, so the happy path costs a
``try`` block. Each retry adds a ``"retry"`` span event (``attempt``, ``error_type``,
``wait_s``), one to the ``rag.retry.count`` counter (and, for a model call, to
``rag.llm.retries``) and one warning log line; the call's span
gets ``rag.retry.attempts`` and ``rag.retry.backoff_ms`` (time slept, so backoff is not
mistaken for model latency).

What is never retried: ``asyncio.CancelledError``, ``KeyboardInterrupt``, ``SystemExit``,
``GeneratorExit`` (whatever ``is_retryable`` says, they never reach it), and a generator
that already yielded an item. Out of attempts, the last exception is raised as itself.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import math
import numbers
import ssl
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator, Mapping
from typing import TYPE_CHECKING, Any, Final, TypeVar, overload

from opentelemetry import trace as trace_api
from tenacity import AsyncRetrying, RetryCallState, Retrying, retry_if_exception, stop_after_attempt
from tenacity.wait import wait_base, wait_random_exponential

from rag_instrument._errors import exception_chain
from rag_instrument._genai import retry_scope
from rag_instrument._runtime import get_runtime
from rag_instrument._utils import (
    FunctionKind,
    function_kind,
    http_status,
    internal_error,
    user_code_error,
)
from rag_instrument.attributes import (
    EVENT_RETRY,
    LOG_RETRYING,
    METRIC_LLM_RETRIES,
    METRIC_RETRY_COUNT,
    RAG_RETRY_ATTEMPTS,
    RAG_RETRY_BACKOFF_MS,
)
from rag_instrument.logs import emit

if TYPE_CHECKING:
    from rag_instrument._genai import GenAICall
    from rag_instrument.llm import LLMRequest

__all__ = ["RetryMixin", "is_transient", "retry", "retry_after_s"]

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


#: HTTP statuses worth another attempt (529: Anthropic's "overloaded").
RETRYABLE_STATUSES: Final = frozenset({408, 429, 500, 502, 503, 504, 529})
_NEVER: Final = (asyncio.CancelledError, KeyboardInterrupt, SystemExit, GeneratorExit)
_SDK_TRANSIENT: Final = frozenset({"APIConnectionError", "APITimeoutError"})
# HTTP clients' connection and timeout errors, which are not the builtin ones: (module
# root, class name) of a class in the error's MRO. A provider written on httpx, requests
# or aiohttp gets its network failures retried as the SDKs' are.
_CLIENT_TRANSIENT: Final = frozenset(
    {
        ("httpx", "TimeoutException"),  # ConnectTimeout, ReadTimeout, WriteTimeout, PoolTimeout
        ("httpx", "NetworkError"),  # ConnectError, ReadError, WriteError, CloseError
        ("httpx", "RemoteProtocolError"),  # the server closed the connection mid-response
        ("requests", "ConnectionError"),
        ("requests", "Timeout"),
        ("aiohttp", "ClientConnectionError"),  # ServerDisconnectedError, ClientConnectorError
    }
)


def is_transient(exc: BaseException) -> bool:
    """The default ``is_retryable``: is ``exc`` a failure that may pass if tried again?

    ``TimeoutError``, ``ConnectionError``, the openai / anthropic SDKs' connection and
    timeout errors, httpx's, requests' and aiohttp's connection and timeout errors, and
    errors carrying HTTP status 408, 429, 500, 502, 503, 504 or 529 in ``status_code``,
    ``status`` or ``response.status_code``.
    """
    if not isinstance(exc, Exception):
        return False
    if isinstance(exc, TimeoutError | ConnectionError):
        return True
    if _certificate_failure(exc):
        return False  # an HTTP client's ConnectError for a bad certificate: not transient
    for cls in type(exc).__mro__:
        name = cls.__name__
        root = (cls.__module__ or "").split(".", 1)[0]
        if name in _SDK_TRANSIENT and root in ("openai", "anthropic"):
            return True
        if (root, name) in _CLIENT_TRANSIENT:
            return True
    return http_status(exc) in RETRYABLE_STATUSES


def _certificate_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is (or was raised from) a failed certificate check.

    :class:`ssl.SSLCertVerificationError` in the chain, or a TLS error whose message says
    the certificate failed (requests' ``SSLError``); a connection the peer dropped during
    the handshake (``SSLEOFError``) is transient and retried.
    """
    for link in exception_chain(exc, 8):
        if isinstance(link, ssl.SSLCertVerificationError):
            return True
        if any(cls.__name__ == "SSLError" for cls in type(link).__mro__):
            text = str(link).lower()
            if "certificate" in text or "hostname" in text:
                return True
    return False


def _headers_of(exc: BaseException) -> Mapping[str, str] | None:
    for headers in (
        getattr(getattr(exc, "response", None), "headers", None),
        getattr(exc, "headers", None),
    ):
        if headers is not None and hasattr(headers, "items"):
            return {str(k).lower(): str(v) for k, v in headers.items()}
    return None


def retry_after_s(exc: BaseException) -> float | None:
    """The wait the server asked for, from ``retry-after-ms`` or ``Retry-After``, if any.

    ``Retry-After`` may be seconds or an HTTP date; headers are looked up on
    ``exc.response.headers`` or ``exc.headers``. A value that is not a finite number
    (``nan``, ``inf``) is ignored, as an unparseable one is.
    """
    try:
        headers = _headers_of(exc)
        if not headers:
            return None
        ms = headers.get("retry-after-ms")
        if ms is not None:
            seconds = float(ms) / 1000.0
            if math.isfinite(seconds):
                return max(seconds, 0.0)
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            seconds = float(value)
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)
            seconds = when.timestamp() - time.time()
        return max(seconds, 0.0) if math.isfinite(seconds) else None
    except Exception:
        return None  # an unparseable header: fall back to our own backoff


class _Backoff(wait_base):
    """Exponential backoff with full jitter, or the server's ``Retry-After`` (capped)."""

    def __init__(self, wait_min: float, wait_max: float) -> None:
        self.wait_max = wait_max
        self.jitter = wait_random_exponential(multiplier=wait_min, min=wait_min, max=wait_max)

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None else None
        if exc is not None:
            asked = retry_after_s(exc)
            if asked is not None:
                return min(asked, self.wait_max)
        return float(self.jitter(retry_state))


def _policy_problem(attempts: object, wait_min: object, wait_max: object) -> str | None:
    """What is wrong with these settings, as a template naming ``{0}``, ``{1}``, ``{2}``."""
    if not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 1:
        return f"{{0}} must be an int >= 1, got {attempts!r}"
    for slot, value in (("{1}", wait_min), ("{2}", wait_max)):
        if (
            type(value) is bool
            or not isinstance(value, numbers.Real)
            or not math.isfinite(value)
            or value < 0
        ):
            return f"{slot} must be a finite number >= 0, got {value!r}"
    if wait_min > wait_max:  # type: ignore[operator]
        return f"need {{1}} <= {{2}}, got {wait_min!r} > {wait_max!r}"
    return None


class RetryPolicy:
    """How many attempts, how long to wait between them, and which errors to retry."""

    __slots__ = ("attempts", "name", "predicate", "wait")

    def __init__(
        self,
        attempts: int,
        wait_min: float,
        wait_max: float,
        predicate: Callable[[BaseException], bool],
        name: str,
    ) -> None:
        problem = _policy_problem(attempts, wait_min, wait_max)
        if problem is not None:
            raise ValueError(f"retry: {problem.format('attempts', 'wait_min', 'wait_max')}")
        self.attempts = attempts
        self.wait = _Backoff(wait_min, wait_max)
        self.predicate = predicate
        self.name = name

    def should_retry(self, exc: BaseException) -> bool:
        """Whether ``exc`` deserves another attempt (control flow never does)."""
        if isinstance(exc, _NEVER) or not isinstance(exc, Exception):
            return False
        try:
            return bool(self.predicate(exc))
        except Exception as err:
            user_code_error("is_retryable", err)
            return False


_TOTALS_LOCK: Final = threading.Lock()  # read-add-write of a span's retry totals


class _Recorder:
    """Telemetry for one retried call: span events, counter, log lines, time slept."""

    __slots__ = ("attempts", "backoff_ms", "call", "name", "span")

    def __init__(self, name: str, call: GenAICall | None) -> None:
        self.name = name
        self.call = call
        self.span = trace_api.get_current_span() if call is None else call.span
        self.attempts = 1
        self.backoff_ms = 0.0

    def before_sleep(self, state: RetryCallState) -> None:
        rt = get_runtime()
        if not rt.enabled:
            return
        try:
            outcome = state.outcome
            exc = outcome.exception() if outcome is not None else None
            wait_s = float(state.upcoming_sleep)
            error_type = type(exc).__qualname__ if exc is not None else "unknown"
            if self.call is not None and exc is not None:
                self.call.add_retry(state.attempt_number, exc, wait_s)
            elif self.span.is_recording():
                self.span.add_event(
                    EVENT_RETRY,
                    {"attempt": state.attempt_number, "error_type": error_type, "wait_s": wait_s},
                )
            rt.counter(METRIC_RETRY_COUNT, "{retry}", "Retried calls (one per retry).").add(
                1, {"error.type": error_type}
            )
            if self.call is not None:  # a model call: also counted as such, with its model
                rt.counter(
                    METRIC_LLM_RETRIES, "{retry}", "Retried model requests (one per retry)."
                ).add(1, {**self.call.metric_attrs, "error.type": error_type})
            if rt.log is not None:
                fields = {
                    "target": self.name,
                    "attempt": state.attempt_number,
                    "error_type": error_type,
                    "wait_s": round(wait_s, 6),
                }
                emit("warning", LOG_RETRYING, fields, span=self.span, trusted=True, rt=rt)
        except Exception as err:
            internal_error("recording a retry", err)

    def sleep(self, seconds: float) -> None:
        start = time.perf_counter_ns()
        try:
            time.sleep(seconds)
        finally:
            self.backoff_ms += (time.perf_counter_ns() - start) / 1e6

    async def asleep(self, seconds: float) -> None:
        start = time.perf_counter_ns()
        try:
            await asyncio.sleep(seconds)
        finally:
            self.backoff_ms += (time.perf_counter_ns() - start) / 1e6

    def done(self) -> None:
        """Put the totals on the call (or on the enclosing span for :func:`retry`)."""
        if self.call is not None:
            self.call.attempts = self.attempts
            self.call.backoff_ms = self.backoff_ms
            return
        try:
            span = self.span
            if span.is_recording():
                # Several retried calls in one span (a stage's): their totals add up (under
                # a lock: calls retried in several threads of one stage).
                with _TOTALS_LOCK:
                    attempts, backoff_ms = self.attempts, self.backoff_ms
                    before = getattr(span, "attributes", None)
                    if isinstance(before, Mapping):
                        made = before.get(RAG_RETRY_ATTEMPTS)
                        slept = before.get(RAG_RETRY_BACKOFF_MS)
                        if type(made) is int:
                            attempts += made
                        if type(slept) is float or type(slept) is int:
                            backoff_ms += slept
                    span.set_attributes(
                        {RAG_RETRY_ATTEMPTS: attempts, RAG_RETRY_BACKOFF_MS: round(backoff_ms, 3)}
                    )
        except Exception as err:
            user_code_error("recording retry totals", err)


def _retrying(policy: RetryPolicy, recorder: _Recorder) -> dict[str, Any]:
    return {
        "stop": stop_after_attempt(policy.attempts),
        "wait": policy.wait,
        "retry": retry_if_exception(policy.should_retry),
        "reraise": True,
        "before_sleep": recorder.before_sleep,
    }


def _again_sync(
    policy: RetryPolicy, first: BaseException, fn: Callable[..., T], args: Any, kwargs: Any
) -> T:
    """Attempts 2..N after ``first`` failed, through tenacity's ``Retrying``."""
    recorder = _Recorder(policy.name, None)
    pending: list[BaseException] = [first]
    result: Any = None
    try:
        for attempt in Retrying(sleep=recorder.sleep, **_retrying(policy, recorder)):
            with attempt:
                if pending:
                    raise pending.pop()  # attempt 1 already happened: let tenacity see it
                # Counted when made (not before the backoff: a cancelled wait makes none).
                recorder.attempts = number = attempt.retry_state.attempt_number
                token = retry_scope.set((policy.attempts, policy.should_retry, number))
                try:
                    result = fn(*args, **kwargs)
                finally:
                    retry_scope.reset(token)
    finally:
        recorder.done()
    return result  # type: ignore[no-any-return]


async def _again_async(
    policy: RetryPolicy,
    first: BaseException,
    fn: Callable[..., Awaitable[T]],
    args: Any,
    kwargs: Any,
    call: GenAICall | None = None,
) -> T:
    """Attempts 2..N after ``first`` failed, through tenacity's ``AsyncRetrying``."""
    recorder = _Recorder(policy.name, call)
    pending: list[BaseException] = [first]
    result: Any = None
    try:
        async for attempt in AsyncRetrying(sleep=recorder.asleep, **_retrying(policy, recorder)):
            with attempt:
                if pending:
                    raise pending.pop()
                recorder.attempts = number = attempt.retry_state.attempt_number
                token = retry_scope.set((policy.attempts, policy.should_retry, number))
                try:
                    result = await fn(*args, **kwargs)
                finally:
                    retry_scope.reset(token)
    finally:
        recorder.done()
    return result  # type: ignore[no-any-return]


# --- the decorator ----------------------------------------------------------------------------

_DONE: Final = object()


def _wrap_sync(fn: Callable[..., Any], policy: RetryPolicy) -> Callable[..., Any]:
    should_retry = policy.should_retry
    single = policy.attempts <= 1
    first_attempt = (policy.attempts, should_retry, 1)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        token = retry_scope.set(first_attempt)
        try:
            return fn(*args, **kwargs)
        except BaseException as exc:
            if single or not should_retry(exc):
                raise
            first = exc
        finally:
            retry_scope.reset(token)
        return _again_sync(policy, first, fn, args, kwargs)

    return wrapper


def _wrap_async(fn: Callable[..., Awaitable[Any]], policy: RetryPolicy) -> Callable[..., Any]:
    should_retry = policy.should_retry
    single = policy.attempts <= 1
    first_attempt = (policy.attempts, should_retry, 1)

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        token = retry_scope.set(first_attempt)
        try:
            return await fn(*args, **kwargs)
        except BaseException as exc:
            if single or not should_retry(exc):
                raise
            first = exc
        finally:
            retry_scope.reset(token)
        return await _again_async(policy, first, fn, args, kwargs)

    return wrapper


def _wrap_generator(
    fn: Callable[..., Generator[Any, Any, Any]], policy: RetryPolicy
) -> Callable[..., Any]:
    def start(args: Any, kwargs: Any) -> tuple[Generator[Any, Any, Any], Any]:
        gen = fn(*args, **kwargs)
        try:
            return gen, next(gen)
        except StopIteration as stop:
            return gen, (_DONE, stop.value)

    starter = _wrap_sync(start, policy)

    def wrapper(*args: Any, **kwargs: Any) -> Generator[Any, Any, Any]:
        # Only the way to the first item is retried: once a value was yielded, a retry
        # would repeat it to the consumer.
        gen, first = starter(args, kwargs)
        if type(first) is tuple and len(first) == 2 and first[0] is _DONE:
            return first[1]
        yield first
        return (yield from gen)

    return wrapper


def _wrap_async_generator(
    fn: Callable[..., AsyncGenerator[Any, Any]], policy: RetryPolicy
) -> Callable[..., Any]:
    async def start(args: Any, kwargs: Any) -> tuple[AsyncGenerator[Any, Any], Any]:
        agen = fn(*args, **kwargs)
        try:
            return agen, await agen.__anext__()
        except StopAsyncIteration:
            return agen, _DONE

    starter = _wrap_async(start, policy)

    async def wrapper(*args: Any, **kwargs: Any) -> AsyncGenerator[Any, Any]:
        agen, first = await starter(args, kwargs)
        if first is _DONE:
            return
        try:
            yield first
            async for item in agen:
                yield item
        finally:
            await agen.aclose()

    return wrapper


_WRAPPERS: Final[dict[FunctionKind, Callable[[Any, RetryPolicy], Callable[..., Any]]]] = {
    FunctionKind.SYNC: _wrap_sync,
    FunctionKind.ASYNC: _wrap_async,
    FunctionKind.GENERATOR: _wrap_generator,
    FunctionKind.ASYNC_GENERATOR: _wrap_async_generator,
}


@overload
def retry(fn: F, /) -> F: ...


@overload
def retry(
    fn: None = None,
    /,
    *,
    attempts: int = 3,
    wait_min: float = 0.5,
    wait_max: float = 10.0,
    is_retryable: Callable[[BaseException], bool] | None = None,
) -> Callable[[F], F]: ...


def retry(
    fn: Any = None,
    /,
    *,
    attempts: int = 3,
    wait_min: float = 0.5,
    wait_max: float = 10.0,
    is_retryable: Callable[[BaseException], bool] | None = None,
) -> Any:
    """Retry a function on transient errors, with exponential backoff and jitter.

    Use as ``@ri.retry`` or ``@ri.retry(attempts=5, ...)`` on a ``def``, ``async def``,
    generator or async generator function; name, docstring, signature and
    ``inspect.iscoroutinefunction`` are kept.

    Args:
        fn: the function, when used as ``@ri.retry`` without arguments.
        attempts: the most attempts made in all (1 = no retry).
        wait_min: the shortest wait between attempts, seconds.
        wait_max: the longest wait, seconds; also caps a server's ``Retry-After``.
        is_retryable: which exceptions to retry (default :func:`is_transient`).
            Cancellation and interpreter exits never reach it.

    Returns:
        The decorated function, or a decorator.

    Raises:
        ValueError: invalid ``attempts``, ``wait_min`` or ``wait_max`` (raised where the
            decorator is applied, never at call time).
        TypeError: ``is_retryable`` is not callable.
    """

    def decorate(func: F) -> F:
        name = getattr(func, "__qualname__", None) or type(func).__qualname__
        policy = RetryPolicy(attempts, wait_min, wait_max, is_retryable or is_transient, name)
        wrapper = _WRAPPERS[function_kind(func)](func, policy)
        functools.update_wrapper(wrapper, func)
        return wrapper  # type: ignore[return-value]

    if is_retryable is not None and not callable(is_retryable):
        raise TypeError(f"retry: is_retryable must be callable, got {is_retryable!r}")
    if fn is not None:
        return decorate(fn)
    # Validate now, not at first decoration.
    RetryPolicy(attempts, wait_min, wait_max, is_transient, "retry")
    return decorate


class RetryMixin:
    """Retries for an :class:`~rag_instrument.llm.LLMProvider`; list it before the provider.

    Class attributes:
        retry_attempts: the most attempts per call (default 3).
        retry_wait_min: the shortest wait between attempts in seconds (default 0.5).
        retry_wait_max: the longest wait, also the cap on ``Retry-After`` (default 10.0).

    Override :meth:`is_retryable` to choose which errors are retried. Each attempt gets the
    provider's full ``timeout``; each retry is a ``"retry"`` event on the call's span.
    The settings are checked when a subclass is defined (:class:`ValueError` naming the
    class and the attribute); settings made invalid later, on an instance, disable the
    retries of that call rather than replace its exception.
    """

    retry_attempts: int = 3
    retry_wait_min: float = 0.5
    retry_wait_max: float = 10.0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Check the retry settings when the class is defined, not at its first failure.

        Raises:
            ValueError: ``retry_attempts``, ``retry_wait_min`` or ``retry_wait_max`` is
                invalid (the message names the class and the attribute).
        """
        super().__init_subclass__(**kwargs)
        problem = _policy_problem(cls.retry_attempts, cls.retry_wait_min, cls.retry_wait_max)
        if problem is not None:
            names = ("retry_attempts", "retry_wait_min", "retry_wait_max")
            raise ValueError(f"{cls.__qualname__}: {problem.format(*names)}")

    def is_retryable(self, exc: BaseException) -> bool:
        """Whether ``exc`` is worth another attempt (default: :func:`is_transient`)."""
        return is_transient(exc)

    def _rag_is_retryable(self, exc: BaseException) -> bool:
        """``is_retryable``, never for control flow, and never raising (for the logs)."""
        if isinstance(exc, _NEVER) or not isinstance(exc, Exception):
            return False
        try:
            return bool(self.is_retryable(exc))
        except Exception:
            return False

    def _rag_policy(self) -> RetryPolicy | None:
        """This call's policy; ``None`` for a single attempt or invalid settings."""
        try:
            if self.retry_attempts == 1:
                return None
            return RetryPolicy(
                self.retry_attempts,
                self.retry_wait_min,
                self.retry_wait_max,
                self.is_retryable,
                f"{type(self).__qualname__}.generate",
            )
        except Exception as err:  # settings made invalid after the class was defined
            user_code_error(f"{type(self).__qualname__} retry settings", err)
            return None

    async def _invoke(self, request: LLMRequest) -> Any:
        invoke = super()._invoke  # type: ignore[misc]
        call = request.call
        token = retry_scope.set((self.retry_attempts, self._rag_is_retryable, 1))
        try:
            result = await invoke(request)
        except BaseException as exc:
            if isinstance(exc, _NEVER):
                raise
            policy = self._rag_policy()
            if policy is None:
                if call is not None:
                    call.attempts = 1
                raise
            if not policy.should_retry(exc):
                if call is not None:
                    call.attempts = 1
                raise
            first = exc
        else:
            if call is not None:
                call.attempts = 1
            return result
        finally:
            retry_scope.reset(token)
        return await _again_async(policy, first, invoke, (request,), {}, call)
