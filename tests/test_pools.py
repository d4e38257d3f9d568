"""The library's worker pools: one place, created once, named threads, fresh after fork."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from rag_instrument import _pools, llm
from rag_instrument._pools import CACHE_IO, LLM_CALLS, worker_pool

SRC = Path(__file__).resolve().parent.parent / "src" / "rag_instrument"


def test_each_pool_is_created_once_and_names_its_threads() -> None:
    pool = worker_pool(LLM_CALLS)
    assert worker_pool(LLM_CALLS) is pool
    assert llm.llm_executor() is pool
    assert worker_pool(CACHE_IO) is not pool
    assert (
        pool.submit(lambda: threading.current_thread().name)
        .result()
        .startswith("rag_instrument-llm")
    )
    assert (
        worker_pool(CACHE_IO)
        .submit(lambda: threading.current_thread().name)
        .result()
        .startswith("rag_instrument-cache")
    )


def test_concurrent_first_use_builds_one_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_pools, "_pools", {})
    spec = _pools.PoolSpec("rag_instrument-test", 2)
    barrier = threading.Barrier(8)
    seen: list[object] = []

    def first_use() -> None:
        barrier.wait()
        seen.append(worker_pool(spec))

    threads = [threading.Thread(target=first_use) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(pool) for pool in seen}) == 1
    seen[0].shutdown()  # type: ignore[attr-defined]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.filterwarnings("ignore:This process .* fork:DeprecationWarning")
def test_a_forked_child_gets_pools_of_its_own() -> None:
    parent_pool = worker_pool(LLM_CALLS)
    parent_pool.submit(lambda: None).result()  # the parent has a live worker thread
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the parent's pool (and its threads) must be forgotten
        try:
            child_pool = worker_pool(LLM_CALLS)
            ok = child_pool is not parent_pool and child_pool.submit(lambda: 7).result() == 7
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    assert answer == b"1"


def test_no_other_module_builds_an_executor() -> None:
    owners = {
        path.relative_to(SRC).as_posix()
        for path in SRC.rglob("*.py")
        if "ThreadPoolExecutor(" in path.read_text() and path.name != "_pools.py"
    }
    assert owners == set()
