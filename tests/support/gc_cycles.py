"""Find the library's objects that only the garbage collector can free.

An object caught in a reference cycle is not freed when its last user lets go of it: it
waits for a collection, and everything it refers to waits with it. Under load those
objects outlive young collections and are promoted to the oldest generation, whose full
collections then come more often and take longer (tail latency).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["library_garbage"]


@contextmanager
def library_garbage() -> Iterator[list[str]]:
    """Yield a list that, after the block, names the library's objects left to the collector.

    The collector is off inside the block; what the block made and dropped but reference
    counting could not free is then found by one collection.
    """
    found: list[str] = []
    gc.collect()
    # The library's objects made before the block: one of them let go of during it (an
    # earlier test's engine, or a runtime a worker thread finally drops) is not the
    # block's doing.
    before = {id(obj) for obj in gc.get_objects() if _ours(obj)}
    enabled = gc.isenabled()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield found
    finally:
        try:
            gc.collect()
            found.extend(
                sorted(
                    f"{type(obj).__module__}.{type(obj).__qualname__}"
                    for obj in gc.garbage
                    if _ours(obj) and id(obj) not in before
                )
            )
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            if enabled:
                gc.enable()


def _ours(obj: object) -> bool:
    module = getattr(type(obj), "__module__", None)
    return isinstance(module, str) and module.startswith("rag_instrument")
