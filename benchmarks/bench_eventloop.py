"""What watching an event loop costs: per loop iteration, and per request.

Rows, in one run, each beside its yardstick (the same work without the watch):

- an idle loop's iterations per second: a callback that reschedules itself with
  ``call_soon`` (the most iterations a loop can do, so the watch's share is the largest it
  can be), with and without ``ri.watch_event_loop(100)``; goal: under 2% fewer;
- a request: an ``async def`` stage awaiting one ``asyncio.sleep(0)``, with
  ``configure(event_loop_threshold_ms=100)`` (which also makes each stage check that its
  loop is watched) and without; goal: nothing measurable.

    python benchmarks/bench_eventloop.py [--seconds S] [--rounds R] [--requests N]

Cases take turns for R rounds and each reports its best round, the one least disturbed by
the rest of the machine. Compare rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import sys
import time
from collections.abc import Callable

import rag_instrument as ri


def iterations_per_second(seconds: float, watch: bool) -> float:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        handle = ri.watch_event_loop(100) if watch else None
        await asyncio.sleep(0.05)  # the watch's first heartbeat
        count = 0
        done = loop.create_future()
        deadline = time.perf_counter() + seconds

        def tick() -> None:
            nonlocal count
            count += 1
            if count % 1000 == 0 and time.perf_counter() >= deadline:
                done.set_result(None)
            else:
                loop.call_soon(tick)

        start = time.perf_counter()
        loop.call_soon(tick)
        await done
        elapsed = time.perf_counter() - start
        if handle is not None:
            handle.stop()
        return count / elapsed

    return asyncio.run(main())


def heartbeat_us(beats: int) -> float:
    """The loop-side cost of one heartbeat: the callback plus the timer it schedules."""

    async def main() -> float:
        watch = ri.watch_event_loop(100)
        await asyncio.sleep(0.05)
        watch.stop()  # only its heartbeat is timed below, on a loop of its own making
        watch._stopped.clear()
        watch.interval_s = 0.0
        loop = asyncio.get_running_loop()
        start = time.perf_counter_ns()
        for _ in range(beats):
            watch._beat()
            handle = watch._handle
            assert handle is not None
            handle.cancel()
        elapsed = (time.perf_counter_ns() - start) / beats / 1000
        loop.call_soon(lambda: None)
        return elapsed

    return asyncio.run(main())


def stage_hooks_ns(calls: int) -> float:
    """What event_loop_threshold_ms adds to each stage: the start and end hooks."""
    from rag_instrument import _context, _runtime, _stagehooks

    ri.configure(exporter="none", log_file="/dev/null", event_loop_threshold_ms=100)

    async def main() -> float:
        rt = _runtime.get_runtime()
        with ri.stage("x"):  # starts the loop's watch
            frame = _context.current_frame()
        assert frame is not None
        start = time.perf_counter_ns()
        for _ in range(calls):
            _stagehooks.begin(frame, rt, True)
            _stagehooks.end(frame, rt)
        return (time.perf_counter_ns() - start) / calls

    try:
        return asyncio.run(main())
    finally:
        ri.shutdown()


def per_request_us(requests: int, rounds: int) -> dict[str, float]:
    """Per-request time with and without the setting, taking turns in one loop (best round)."""

    @ri.stage("search")
    async def request() -> None:
        await asyncio.sleep(0)

    async def timed() -> float:
        start = time.perf_counter_ns()
        for _ in range(requests):
            await request()
        return (time.perf_counter_ns() - start) / requests / 1000

    async def main() -> dict[str, float]:
        best_of: dict[str, float] = {"plain": float("inf"), "watched": float("inf")}
        for _ in range(rounds):
            for case, threshold in (("plain", None), ("watched", 100.0)):
                ri.configure(
                    exporter="none", log_file="/dev/null", event_loop_threshold_ms=threshold
                )
                for _ in range(200):  # warm-up (and the first stage starts the watch)
                    await request()
                best_of[case] = min(best_of[case], await timed())
        return best_of

    try:
        return asyncio.run(main())
    finally:
        ri.shutdown()


def best(cases: dict[str, Callable[[], float]], rounds: int, higher: bool) -> dict[str, float]:
    results: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, case in cases.items():
            results[name].append(case())
    pick = max if higher else min
    return {name: pick(values) for name, values in results.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=inspect.getdoc(sys.modules[__name__]))
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=5000)
    args = parser.parse_args(argv)

    print(f"Python {sys.version.split()[0]}, {args.rounds} rounds, best of each\n")
    ips = best(
        {
            "plain": lambda: iterations_per_second(args.seconds, watch=False),
            "watched": lambda: iterations_per_second(args.seconds, watch=True),
        },
        args.rounds,
        higher=True,
    )
    cost_pct = (1 - ips["watched"] / ips["plain"]) * 100
    per_iteration_ns = (1 / ips["watched"] - 1 / ips["plain"]) * 1e9
    beat = min(heartbeat_us(20_000) for _ in range(args.rounds))
    beats_per_s = 1 / 0.025  # threshold 100 ms: a heartbeat every 25 ms
    share = beat * beats_per_s / 1e6 * 100
    print("idle loop (call_soon chain)           iterations/s")
    print(f"  without a watch (yardstick)         {ips['plain']:>12,.0f}")
    print(f"  watch_event_loop(100)               {ips['watched']:>12,.0f}")
    print(
        f"  measured: {cost_pct:+.2f}% of iterations/s ({per_iteration_ns:+.1f} ns per iteration;"
        " within this machine's noise when near 0)"
    )
    print(
        f"  heartbeat: {beat:.2f} us each, {beats_per_s:.0f}/s = {share:.3f}% of the loop's"
        f" time, {share / 100 * 1e9 / ips['plain']:.2f} ns per iteration   (goal: under 2%)\n"
    )

    per_request = per_request_us(args.requests, args.rounds * 2)
    diff = per_request["watched"] - per_request["plain"]
    hooks = min(stage_hooks_ns(100_000) for _ in range(args.rounds))
    print("request (async stage, one await)      us per request")
    print(f"  without event_loop_threshold_ms     {per_request['plain']:>12.2f}")
    print(f"  event_loop_threshold_ms=100         {per_request['watched']:>12.2f}")
    print(
        f"  measured: {diff:+.2f} us per request ({diff / per_request['plain'] * 100:+.1f}%;"
        " within this machine's noise when near 0)"
    )
    print(
        f"  the stage hooks alone: {hooks:.0f} ns per stage"
        f" ({hooks / 1000 / per_request['plain'] * 100:.2f}% of the request)"
        "   (goal: nothing measurable)"
    )


if __name__ == "__main__":
    main()
