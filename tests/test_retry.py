"""ri.retry and RetryMixin: what is retried, what never is, and how retries show."""

# NB: ``retry`` is imported from its module: importing ``rag_instrument.retry`` before
# ``ri.retry`` was first resolved rebinds the package attribute to the submodule (see the
# handoff note on ``__init__.py``).

from __future__ import annotations

import asyncio
import email.utils
import inspect
import time
import traceback
from typing import Any

import pytest
import tenacity

import rag_instrument as ri
from rag_instrument.retry import is_transient, retry, retry_after_s
from rag_instrument.testing import capture


class HTTPError(Exception):
    def __init__(self, status: int, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"HTTP {status}")
        self.status_code = status
        self.headers = headers or {}


class _Response:
    def __init__(self, status: int, headers: dict[str, str]) -> None:
        self.status_code = status
        self.headers = headers


class ResponseError(Exception):
    def __init__(self, status: int, headers: dict[str, str] | None = None) -> None:
        super().__init__("error")
        self.response = _Response(status, headers or {})


def flaky(failures: list[BaseException], result: Any = "ok") -> Any:
    calls = {"n": 0}

    def fn() -> Any:
        calls["n"] += 1
        if failures:
            raise failures.pop(0)
        return result

    fn.calls = calls  # type: ignore[attr-defined]
    return fn


def test_default_is_retryable() -> None:
    assert is_transient(TimeoutError())
    assert is_transient(ConnectionResetError())
    for status in (408, 429, 500, 502, 503, 504):
        assert is_transient(HTTPError(status))
        assert is_transient(ResponseError(status))
    err = Exception()
    err.status = 503  # type: ignore[attr-defined]
    assert is_transient(err)
    import http

    for value in (http.HTTPStatus.SERVICE_UNAVAILABLE, "503", "429"):
        err = Exception()
        err.status_code = value  # type: ignore[attr-defined]
        assert is_transient(err), value
    for value in (http.HTTPStatus.BAD_REQUEST, "400", "503 ", True, "\uff15\uff10\uff13"):
        err = Exception()
        err.status_code = value  # type: ignore[attr-defined]
        assert not is_transient(err), value
    assert not is_transient(HTTPError(400))
    assert not is_transient(ValueError())
    assert not is_transient(asyncio.CancelledError())
    assert not is_transient(KeyboardInterrupt())


def test_sdk_errors_are_retryable() -> None:
    import httpx2
    import openai

    request = httpx2.Request("POST", "http://x/v1/chat/completions")
    assert is_transient(openai.APIConnectionError(request=request))
    assert is_transient(openai.APITimeoutError(request=request))
    response = httpx2.Response(429, request=request)
    assert is_transient(openai.RateLimitError("slow down", response=response, body=None))
    response = httpx2.Response(400, request=request)
    assert not is_transient(openai.BadRequestError("bad", response=response, body=None))


def test_retry_after_parsing() -> None:
    assert retry_after_s(HTTPError(429, {"Retry-After": "3"})) == 3.0
    assert retry_after_s(ResponseError(429, {"retry-after-ms": "250"})) == 0.25
    future = email.utils.formatdate(time.time() + 30, usegmt=True)
    asked = retry_after_s(HTTPError(503, {"Retry-After": future}))
    assert asked is not None
    assert 25 < asked <= 31
    assert retry_after_s(HTTPError(503, {"Retry-After": "soon"})) is None
    assert retry_after_s(ValueError()) is None


def test_sync_retry_then_success_keeps_metadata() -> None:
    @retry(attempts=3, wait_min=0, wait_max=0)
    def fetch(x: int) -> int:
        """Doc."""
        fetch.calls += 1  # type: ignore[attr-defined]
        if fetch.calls < 3:  # type: ignore[attr-defined]
            raise HTTPError(503)
        return x * 2

    fetch.calls = 0  # type: ignore[attr-defined]
    assert fetch(21) == 42
    assert fetch.calls == 3  # type: ignore[attr-defined]
    assert fetch.__name__ == "fetch"
    assert fetch.__doc__ == "Doc."
    assert inspect.signature(fetch) == inspect.signature(fetch.__wrapped__)  # type: ignore[attr-defined]
    assert list(inspect.signature(fetch).parameters) == ["x"]


@pytest.mark.asyncio
async def test_async_keeps_iscoroutinefunction_and_retries() -> None:
    calls = 0

    @retry(wait_min=0, wait_max=0)
    async def ask() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise TimeoutError
        return "fine"

    assert inspect.iscoroutinefunction(ask)
    assert await ask() == "fine"
    assert calls == 2


def test_bare_decorator_form() -> None:
    fn = flaky([ConnectionError()])

    @retry
    def call() -> str:
        return fn()  # type: ignore[no-any-return]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(time, "sleep", lambda s: None)
        assert call() == "ok"
    assert fn.calls["n"] == 2


def test_out_of_attempts_raises_the_last_exception_itself() -> None:
    errors = [HTTPError(503), HTTPError(503), HTTPError(503)]
    last = errors[-1]

    @retry(attempts=3, wait_min=0, wait_max=0)
    def always() -> None:
        raise errors.pop(0)

    with pytest.raises(HTTPError) as info:
        always()
    assert info.value is last
    assert not isinstance(info.value, tenacity.RetryError)
    frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
    assert "always" in frames  # the traceback reaches user code


def test_non_retryable_is_raised_at_once() -> None:
    fn = flaky([HTTPError(400)])
    wrapped = retry(attempts=5, wait_min=0, wait_max=0)(fn)
    with pytest.raises(HTTPError):
        wrapped()
    assert fn.calls["n"] == 1


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit, GeneratorExit])
def test_control_flow_is_never_retried_even_with_a_catch_all_predicate(
    exc_type: type[BaseException],
) -> None:
    fn = flaky([exc_type()])
    wrapped = retry(attempts=5, wait_min=0, wait_max=0, is_retryable=lambda e: True)(fn)
    with pytest.raises(exc_type):
        wrapped()
    assert fn.calls["n"] == 1


@pytest.mark.asyncio
async def test_cancellation_during_attempt_and_backoff_is_not_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    attempts = 0
    real_sleep = asyncio.sleep
    in_backoff = asyncio.Event()

    async def signalling_sleep(seconds: float, *args: Any) -> Any:
        if seconds == 5:
            in_backoff.set()
        return await real_sleep(seconds, *args)

    monkeypatch.setattr(asyncio, "sleep", signalling_sleep)

    @retry(attempts=5, wait_min=5, wait_max=5,
              is_retryable=lambda e: not isinstance(e, ValueError))  # a negated predicate
    async def slow() -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise ConnectionError
        await asyncio.sleep(10)

    async def in_a_stage() -> None:
        with ri.stage("outer"):
            await slow()

    with capture() as cap:
        task = asyncio.create_task(in_a_stage())
        await in_backoff.wait()  # attempt 1 failed and its 5 s backoff began
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert attempts == 1
    assert cap.span("outer").attributes["rag.retry.attempts"] == 1  # the next one never ran

    attempts = 0
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(retry(wait_min=0, wait_max=0)(_sleeper)(), 0.05)


async def _sleeper() -> None:
    await asyncio.sleep(10)


@pytest.mark.asyncio
async def test_async_backoff_does_not_block_the_loop() -> None:
    ticks = 0

    async def heartbeat() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    fn_calls = 0
    ticks_at_failure = 0
    ticks_during_backoff = 0

    @retry(attempts=2, wait_min=0.2, wait_max=0.2)
    async def once_flaky() -> str:
        nonlocal fn_calls, ticks_at_failure, ticks_during_backoff
        fn_calls += 1
        if fn_calls == 1:
            ticks_at_failure = ticks
            raise HTTPError(503)
        ticks_during_backoff = ticks - ticks_at_failure
        return "ok"

    beat = asyncio.create_task(heartbeat())
    assert await once_flaky() == "ok"
    beat.cancel()
    # The heartbeat's 5 ms timers fall due before the 200 ms backoff's: a blocking sleep
    # would have let none of them run in between.
    assert ticks_during_backoff >= 1


def test_retry_after_is_honoured_and_capped() -> None:
    slept: list[float] = []
    fn = flaky([HTTPError(429, {"Retry-After": "0.3"}), HTTPError(429, {"Retry-After": "60"})])
    wrapped = retry(attempts=3, wait_min=0, wait_max=1.0)(fn)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(time, "sleep", slept.append)
        assert wrapped() == "ok"
    assert slept == [pytest.approx(0.3), pytest.approx(1.0)]


def test_backoff_is_exponential_with_jitter_within_bounds() -> None:
    import random

    def waits(uniform: Any = None) -> list[float]:
        slept: list[float] = []
        wrapped = retry(attempts=6, wait_min=0.1, wait_max=0.4)(flaky([HTTPError(503)] * 5))
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(time, "sleep", slept.append)
            if uniform is not None:
                mp.setattr(random, "uniform", uniform)
            wrapped()
        return slept

    # The jitter's ceiling doubles each attempt up to wait_max: 0.1, 0.2, 0.4, 0.4, 0.4.
    ceilings = waits(lambda low, high: high)
    assert ceilings == [pytest.approx(w) for w in (0.1, 0.2, 0.4, 0.4, 0.4)]
    assert waits(lambda low, high: low) == [pytest.approx(0.1)] * 5  # full jitter's floor
    runs = [waits() for _ in range(40)]
    for slept in runs:
        assert len(slept) == 5
        assert all(0.1 <= s <= c + 1e-9 for s, c in zip(slept, ceilings, strict=True))
        assert slept[0] == pytest.approx(0.1)
    mean = [sum(r[i] for r in runs) / len(runs) for i in range(5)]
    assert mean[0] < mean[1] < mean[3]  # waits grow across attempts
    assert len({round(r[4], 6) for r in runs}) > 1  # and are jittered


def test_generator_retried_only_before_its_first_item() -> None:
    runs = 0

    @retry(attempts=3, wait_min=0, wait_max=0)
    def stream(fail_after_first: bool) -> Any:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise ConnectionError("before the first chunk")
        yield "a"
        if fail_after_first:
            raise ConnectionError("after the first chunk")
        yield "b"

    assert inspect.isgeneratorfunction(stream)
    assert list(stream(False)) == ["a", "b"]
    assert runs == 2
    runs = 1  # no failure before the first chunk this time
    got = []
    with pytest.raises(ConnectionError, match="after"):
        for item in stream(True):
            got.append(item)
    assert got == ["a"]
    assert runs == 2  # not retried: the consumer already saw "a"


@pytest.mark.asyncio
async def test_async_generator_retried_only_before_its_first_item() -> None:
    runs = 0

    @retry(attempts=3, wait_min=0, wait_max=0)
    async def stream() -> Any:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise TimeoutError
        yield 1
        raise TimeoutError

    got = []
    with pytest.raises(TimeoutError):
        async for item in stream():
            got.append(item)
    assert got == [1]
    assert runs == 2


def test_retries_are_visible_on_the_enclosing_span_and_logs() -> None:
    fn = flaky([HTTPError(503), HTTPError(503)])
    wrapped = retry(attempts=3, wait_min=0.01, wait_max=0.01)(fn)
    with capture() as cap:
        with ri.stage("generation"):
            wrapped()
        metrics = cap.metrics()
    span = cap.span("generation")
    events = [e for e in span.events if e.name == "retry"]
    assert [e.attributes["attempt"] for e in events] == [1, 2]
    assert events[0].attributes["error_type"] == "HTTPError"
    assert events[0].attributes["wait_s"] == pytest.approx(0.01)
    assert span.attributes["rag.retry.attempts"] == 3
    assert span.attributes["rag.retry.backoff_ms"] >= 20
    assert sum(p.value for p in metrics["rag.retry.count"]) == 2
    warnings = cap.find_logs("retrying")
    assert [w["level"] for w in warnings] == ["warning", "warning"]


class _Flaky(ri.RetryMixin, ri.LLMProvider):
    system, model = "acme", "flaky"
    retry_wait_min = 0.0
    retry_wait_max = 0.05

    def __init__(self, failures: list[BaseException]) -> None:
        self.failures = failures
        self.calls = 0

    async def _generate(self, prompt: str, **params: Any) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return "done"


@pytest.mark.asyncio
async def test_mixin_retries_record_on_the_provider_span() -> None:
    provider = _Flaky([HTTPError(429, {"retry-after-ms": "20"}), TimeoutError()])
    with capture() as cap:
        assert await provider.generate("x") == "done"
    span = cap.span("chat flaky")
    assert provider.calls == 3
    assert span.attributes["rag.retry.attempts"] == 3
    assert span.attributes["rag.retry.backoff_ms"] >= 20
    events = [e for e in span.events if e.name == "retry"]
    assert [e.attributes["error_type"] for e in events] == ["HTTPError", "TimeoutError"]
    assert events[0].attributes["wait_s"] == pytest.approx(0.02)
    (line,) = cap.find_logs("llm call completed")
    assert line["retry_attempts"] == 3


@pytest.mark.asyncio
async def test_mixin_first_attempt_success_records_one_attempt() -> None:
    with capture() as cap:
        await _Flaky([]).generate("x")
    assert cap.span("chat flaky").attributes["rag.retry.attempts"] == 1
    assert not [e for e in cap.span("chat flaky").events if e.name == "retry"]


@pytest.mark.asyncio
async def test_mixin_timeout_is_per_attempt_and_retried() -> None:
    class SlowOnce(ri.RetryMixin, ri.LLMProvider):
        system, model, timeout = "acme", "slow", 0.5
        retry_wait_min = retry_wait_max = 0.0
        calls = 0

        async def _generate(self, prompt: str, **params: Any) -> str:
            SlowOnce.calls += 1
            if SlowOnce.calls == 1:
                await asyncio.sleep(60)  # cut off by the 0.5 s per-attempt timeout
            return "second"

    assert await SlowOnce().generate("x") == "second"
    assert SlowOnce.calls == 2


@pytest.mark.asyncio
async def test_mixin_custom_is_retryable_and_exhaustion() -> None:
    class Picky(_Flaky):
        retry_attempts = 2

        def is_retryable(self, exc: BaseException) -> bool:
            return isinstance(exc, KeyError)

    provider = Picky([KeyError("a"), KeyError("b"), KeyError("c")])
    with pytest.raises(KeyError) as info:
        await provider.generate("x")
    assert info.value.args == ("b",)
    assert provider.calls == 2
    provider = Picky([HTTPError(503)])
    with pytest.raises(HTTPError):
        await provider.generate("x")
    assert provider.calls == 1


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="attempts"):
        retry(attempts=0)
    with pytest.raises(ValueError, match="wait_min"):
        retry(wait_min=2, wait_max=1)


def test_retried_calls_in_one_stage_add_up_on_its_span() -> None:
    def flaky(failures: int) -> Any:
        calls: list[int] = []

        @ri.retry(attempts=5, wait_min=0.001, wait_max=0.001)
        def call() -> int:
            calls.append(1)
            if len(calls) <= failures:
                raise ConnectionError("down")
            return len(calls)

        return call

    with capture() as cap, ri.stage("generation"):
        assert flaky(3)() == 4  # 4 attempts
        assert flaky(1)() == 2  # 2 more
    span = cap.span("generation")
    assert span.attributes["rag.retry.attempts"] == 6
    assert len([e for e in span.events if e.name == "retry"]) == 4
    assert span.attributes["rag.retry.backoff_ms"] > 0


@pytest.mark.parametrize(
    "make",
    [
        lambda: __import__("httpx").ConnectError("connection refused"),
        lambda: __import__("httpx").ReadTimeout("read timed out"),
        lambda: __import__("httpx").RemoteProtocolError("server disconnected"),
    ],
)
def test_http_clients_network_errors_are_retried_by_default(make: Any) -> None:
    # A provider written on httpx gets its network failures retried, as the SDKs' are.
    class Handwritten(ri.RetryMixin, ri.LLMProvider):
        system, model = "acme", "m"
        retry_wait_min = 0.001
        retry_wait_max = 0.001
        calls = 0

        async def _generate(self, prompt: str, **params: Any) -> str:
            Handwritten.calls += 1
            if Handwritten.calls == 1:
                raise make()
            return "fine"

    assert asyncio.run(Handwritten().generate("q")) == "fine"
    assert Handwritten.calls == 2


def test_requests_network_errors_are_transient_and_its_http_errors_are_not() -> None:
    requests = pytest.importorskip("requests")
    from rag_instrument.retry import is_transient

    assert is_transient(requests.ConnectionError("refused"))
    assert is_transient(requests.ReadTimeout("slow"))
    assert not is_transient(requests.HTTPError("404 Not Found"))
    assert not is_transient(ValueError("bad"))


def test_certificate_failures_are_not_retried() -> None:
    import ssl

    import httpx

    from rag_instrument.retry import is_transient

    wrapped = httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED]")
    wrapped.__cause__ = ssl.SSLCertVerificationError("certificate verify failed")
    assert not is_transient(wrapped)
    requests = pytest.importorskip("requests")
    assert not is_transient(requests.exceptions.SSLError("certificate verify failed"))
    assert is_transient(requests.ConnectionError("refused"))
    # A handshake the peer dropped is transient: retried.
    dropped = httpx.ReadError("EOF occurred in violation of protocol")
    dropped.__cause__ = ssl.SSLEOFError("UNEXPECTED_EOF_WHILE_READING")
    assert is_transient(dropped)
    assert is_transient(requests.exceptions.SSLError("UNEXPECTED_EOF_WHILE_READING"))
