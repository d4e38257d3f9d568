"""The library's own worker pools, in one place.

rag_instrument runs some work on threads of its own, never on asyncio's default executor:
synchronous ``LLMProvider._generate`` methods (an attempt abandoned at its ``timeout``
keeps its thread until the vendor call returns, and a shared pool full of those would
starve the application's ``to_thread`` work) and the I/O of out-of-process cache backends
(a slow Redis must not starve model calls). Each pool has a name, is created on first use,
and is forgotten in a forked child (the parent's threads do not exist there).
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from typing import Final

__all__ = ["CACHE_IO", "LLM_CALLS", "PoolSpec", "worker_pool"]


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


def _forget_pools() -> None:  # in a forked child the parent's threads do not exist
    global _lock
    _pools.clear()
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)
