"""The library's own worker pools, in one place.

rag_instrument runs some work on threads of its own, never on asyncio's default executor:
synchronous ``LLMProvider._generate`` methods (an attempt abandoned at its ``timeout``
keeps its thread until the vendor call returns, and a shared pool full of those would
starve the application's ``to_thread`` work) and the I/O of out-of-process cache backends
(a slow Redis must not starve model calls). Each pool has a name, is created on first use,
and is forgotten in a forked child (the parent's threads do not exist there).

One more thread waits, idle, from ``configure()`` on: :data:`EXIT_WORKER`, which runs the
bounded flush at interpreter exit. Python 3.12.0 and 3.12.1 refuse to start any thread
once the interpreter has begun to exit (``atexit`` handlers included), so that flush
cannot start its thread then; a forked child starts its own.
"""

from __future__ import annotations

import concurrent.futures
import os
import queue
import threading
from collections.abc import Callable
from typing import Final

__all__ = ["CACHE_IO", "EXIT_WORKER", "LLM_CALLS", "PoolSpec", "StandbyThread", "worker_pool"]


class PoolSpec:
    """A named pool: its thread-name prefix and size (computed when first created)."""

    __slots__ = ("max_workers", "thread_name_prefix")

    def __init__(self, thread_name_prefix: str, max_workers: int) -> None:
        self.thread_name_prefix = thread_name_prefix
        self.max_workers = max_workers


#: Synchronous ``_generate`` calls: ``max(32, 4 x CPUs)`` workers.
LLM_CALLS: Final = PoolSpec("rag_instrument-llm", max(32, (os.cpu_count() or 1) * 4))
#: Out-of-process cache backends' I/O (Redis).
CACHE_IO: Final = PoolSpec("rag_instrument-cache", 8)

_pools: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
_lock = threading.Lock()


def worker_pool(spec: PoolSpec) -> concurrent.futures.ThreadPoolExecutor:
    """The pool for ``spec``, created on first use (thread-safe, one per process)."""
    pool = _pools.get(spec.thread_name_prefix)
    if pool is None:
        with _lock:
            pool = _pools.get(spec.thread_name_prefix)
            if pool is None:
                pool = _pools[spec.thread_name_prefix] = concurrent.futures.ThreadPoolExecutor(
                    max_workers=spec.max_workers, thread_name_prefix=spec.thread_name_prefix
                )
    return pool


class StandbyThread:
    """A daemon thread started ahead of need, which runs the jobs handed to it in order.

    For work that must run on a thread of its own at a moment when starting one may be
    refused (interpreter exit). :meth:`submit` returns ``False`` when no thread is waiting
    (never started, or this is a forked child that has not started its own), so the
    caller can fall back.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread unless it is already waiting (cheap when it is)."""
        if self._alive():
            return
        with self._lock:
            if self._alive():
                return
            thread = threading.Thread(
                target=self._serve, args=(self._jobs,), name=self.name, daemon=True
            )
            thread.start()
            self._thread = thread

    def submit(self, job: Callable[[], object]) -> bool:
        """Hand ``job`` to the waiting thread; ``False`` (job not taken) when none waits."""
        if not self._alive():
            return False
        self._jobs.put(job)
        return True

    def _alive(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    @staticmethod
    def _serve(jobs: queue.SimpleQueue[Callable[[], object]]) -> None:
        while True:
            job = jobs.get()
            try:
                job()
            except Exception:  # a job reports its own failures; the thread keeps waiting
                pass

    def after_fork_in_child(self) -> None:
        """Forget the parent's thread; start this process's own if the parent had one."""
        had_thread = self._thread is not None
        self._lock = threading.Lock()
        self._jobs = queue.SimpleQueue()
        self._thread = None
        if had_thread:
            try:
                self.start()
            except RuntimeError:  # the child is already exiting: callers fall back
                pass


#: Runs the flush at interpreter exit (started by ``configure()``).
EXIT_WORKER: Final = StandbyThread("rag_instrument-exit")


def _forget_pools() -> None:  # in a forked child the parent's threads do not exist
    global _lock
    _pools.clear()
    _lock = threading.Lock()
    EXIT_WORKER.after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)
