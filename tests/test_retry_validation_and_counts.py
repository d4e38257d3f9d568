"""Retry review fixes: non-finite Retry-After, settings validation, attempts actually made."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

import rag_instrument as ri
from rag_instrument.retry import retry, retry_after_s
from rag_instrument.testing import capture


class HTTPError(Exception):
    def __init__(self, status: int, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"HTTP {status}")
        self.status_code = status
        self.headers = headers or {}


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "infinity"])
def test_non_finite_retry_after_is_ignored(value: str) -> None:
    assert retry_after_s(HTTPError(429, {"Retry-After": value})) is None
    assert retry_after_s(HTTPError(429, {"retry-after-ms": value})) is None
    # a non-finite retry-after-ms does not hide a usable Retry-After
    assert retry_after_s(HTTPError(429, {"retry-after-ms": value, "Retry-After": "2"})) == 2.0


def test_nan_retry_after_keeps_the_callers_exception() -> None:
    slept: list[float] = []
    calls = 0

    @retry(attempts=3, wait_min=0.01, wait_max=1.0)
    def limited() -> None:
        nonlocal calls
        calls += 1
        raise HTTPError(429, {"Retry-After": "nan"})

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(time, "sleep", slept.append)
        with pytest.raises(HTTPError):
            limited()
    assert calls == 3
    assert len(slept) == 2
    assert all(0.01 <= s <= 1.0 for s in slept)  # our own backoff, not nan


@pytest.mark.asyncio
async def test_async_nan_retry_after_ms_falls_back_to_backoff() -> None:
    calls = 0

    @retry(attempts=2, wait_min=0, wait_max=0.05)
    async def limited() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise HTTPError(429, {"retry-after-ms": "nan"})
        return "ok"

    assert await asyncio.wait_for(limited(), 2.0) == "ok"


# --- settings validated at definition time --------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "attribute"),
    [
        ({"retry_wait_min": 2.0, "retry_wait_max": 1.0}, "retry_wait_min"),
        ({"retry_attempts": 0}, "retry_attempts"),
        ({"retry_attempts": "3"}, "retry_attempts"),
        ({"retry_attempts": True}, "retry_attempts"),
        ({"retry_wait_min": -1}, "retry_wait_min"),
        ({"retry_wait_max": float("nan")}, "retry_wait_max"),
    ],
)
def test_misconfigured_retry_mixin_fails_at_class_definition(
    settings: dict[str, Any], attribute: str
) -> None:
    with pytest.raises(ValueError, match=rf"Misconfigured: .*{attribute}"):
        type("Misconfigured", (ri.RetryMixin, ri.LLMProvider), dict(settings))


def test_valid_subclasses_are_accepted() -> None:
    class Once(ri.RetryMixin, ri.LLMProvider):
        retry_attempts = 1
        retry_wait_min = retry_wait_max = 0

    class Sub(Once):  # checked again for every subclass
        retry_attempts = 5

    with pytest.raises(ValueError, match=r"Bad: .*retry_wait_min"):

        class Bad(Sub):
            retry_wait_min = 100.0


@pytest.mark.asyncio
async def test_settings_broken_on_an_instance_never_replace_the_applications_error() -> None:
    error = ConnectionError("upstream reset")

    class P(ri.RetryMixin, ri.LLMProvider):
        system, model = "acme", "m"
        calls = 0

        async def _generate(self, prompt: str, **params: Any) -> str:
            P.calls += 1
            raise error

    provider = P()
    provider.retry_wait_min, provider.retry_wait_max = 2.0, 1.0  # type: ignore[misc]
    with capture() as cap:
        with pytest.raises(ConnectionError) as info:
            await provider.generate("q")
    assert info.value is error
    assert info.value.__context__ is None
    assert P.calls == 1  # no retry with settings that make no sense
    assert cap.span("chat m").attributes["rag.retry.attempts"] == 1


def test_retry_arguments_are_validated_where_the_decorator_is_applied() -> None:
    with pytest.raises(ValueError, match="attempts"):
        retry(attempts=0)
    with pytest.raises(ValueError, match="wait_max"):
        retry(wait_max=float("nan"))
    with pytest.raises(ValueError, match="wait_min"):
        retry(wait_min=-0.5)
    with pytest.raises(ValueError, match="attempts"):
        retry(attempts=2.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="is_retryable"):
        retry(is_retryable=3)  # type: ignore[arg-type]


# --- rag.retry.attempts counts attempts made ------------------------------------------------


@pytest.mark.asyncio
async def test_cancelled_backoff_does_not_count_the_next_attempt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class P(ri.RetryMixin, ri.LLMProvider):
        system, model = "acme", "m"
        retry_wait_min = retry_wait_max = 5.0
        calls = 0

        async def _generate(self, prompt: str, **params: Any) -> str:
            P.calls += 1
            raise ConnectionError("reset")

    in_backoff = _signal_backoff(monkeypatch)
    with capture() as cap:
        task = asyncio.create_task(P().generate("q"))
        await in_backoff.wait()  # attempt 1 failed; the task sleeps its 5 s backoff
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert P.calls == 1
    span = cap.span("chat m")
    assert span.attributes["rag.retry.attempts"] == 1
    assert span.attributes["rag.cancelled"] is True


def test_sync_decorator_counts_attempts_made() -> None:
    calls = 0

    @retry(attempts=4, wait_min=0, wait_max=0)
    def twice() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise HTTPError(503)
        return "ok"

    with capture() as cap:
        with ri.stage("s"):
            assert twice() == "ok"
    assert cap.span("s").attributes["rag.retry.attempts"] == calls == 3


def _signal_backoff(monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """An event set when a backoff sleep (1 s or more) begins."""
    started = asyncio.Event()
    real_sleep = asyncio.sleep

    async def sleep(seconds: float, *args: Any) -> Any:
        if seconds >= 1:
            started.set()
        return await real_sleep(seconds, *args)

    monkeypatch.setattr(asyncio, "sleep", sleep)
    return started
