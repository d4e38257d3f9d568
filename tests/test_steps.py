"""A decision core written once, carried out synchronously (run) or with await (arun)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from rag_instrument._steps import Plan, arun, run


def _plan(log: list[str], double: Callable[[int], Any], fail: Callable[[], Any]) -> Plan[int]:
    value = yield double, (2,)
    log.append(f"doubled {value}")
    try:
        yield fail, ()
    except LookupError as exc:  # the plan sees a step's exception and decides
        log.append(f"recovered {exc.args[0]}")
    value = yield double, (value,)
    return value + 1


def _double(x: int) -> int:
    return 2 * x


def _fail() -> None:
    raise LookupError("gone")


async def _adouble(x: int) -> int:
    await asyncio.sleep(0)
    return 2 * x


async def _afail() -> None:
    await asyncio.sleep(0)
    raise LookupError("gone")


def test_run_and_arun_carry_out_the_same_plan() -> None:
    sync_log: list[str] = []
    async_log: list[str] = []
    assert run(_plan(sync_log, _double, _fail)) == 9
    assert asyncio.run(arun(_plan(async_log, _adouble, _afail))) == 9
    assert sync_log == async_log == ["doubled 4", "recovered gone"]


@pytest.mark.parametrize("use_async", [False, True])
def test_an_exception_the_plan_does_not_catch_comes_out_as_itself(use_async: bool) -> None:
    error = ValueError("boom")
    cleaned: list[bool] = []

    def raise_it() -> None:
        raise error

    async def araise_it() -> None:
        raise error

    def plan() -> Plan[None]:
        try:
            yield (araise_it if use_async else raise_it), ()
        finally:
            cleaned.append(True)

    with pytest.raises(ValueError) as info:
        asyncio.run(arun(plan())) if use_async else run(plan())
    assert info.value is error
    assert cleaned == [True]


def test_arun_lets_cancellation_through_the_plan() -> None:
    seen: list[str] = []

    async def main() -> None:
        started = asyncio.Event()

        async def wait_forever() -> None:
            started.set()
            await asyncio.Event().wait()

        def plan() -> Plan[None]:
            try:
                yield wait_forever, ()
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise

        task = asyncio.create_task(arun(plan()))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert seen == ["cancelled"]
