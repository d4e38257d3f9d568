"""The demo's vector index in Milvus (``rag-instrument demo --milvus [URI]``).

A real Milvus (Milvus Lite in a local file, or a server URI) behind an instrumented
``MilvusClient``: every insert and search is a span with the collection, index type,
metric and counts, and counts as ``vector`` in the enclosing stage's breakdown. It has the
demo's ``add`` / ``search`` / ``close`` interface; the blocking client calls run in a worker
thread (``asyncio.to_thread`` carries the request's context there), so the demo's event
loop keeps serving the other requests meanwhile::

    index = MilvusIndex("milvus-demo.db")       # or None: a temporary Milvus Lite file
    await index.add([1, 2], [vector_1, vector_2])
    ids = await index.search(query_vector, k=5)
    index.close()                               # drops the run's collection
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path

from rag_instrument.integrations.milvus import instrument_milvus, uninstrument_milvus

__all__ = ["MilvusIndex"]


class MilvusIndex:
    """Inner-product search over the demo's vectors in a collection made for the run.

    Args:
        uri: a Milvus Lite file (``.db``) or a server URI; ``None`` for a temporary Milvus
            Lite file, removed by :meth:`close` (or when the object is collected).
        dimensions: the vectors' dimension.
        index_type: the vector index (``FLAT`` suits the demo's few dozen documents).
        metric: the distance metric.
    """

    def __init__(
        self,
        uri: str | None = None,
        *,
        dimensions: int = 64,
        index_type: str = "FLAT",
        metric: str = "IP",
    ) -> None:
        from pymilvus import DataType, MilvusClient

        directory = None
        if uri is None:
            directory = Path(tempfile.mkdtemp(prefix="rag-instrument-milvus-"))
            uri = str(directory / "demo.db")
        self._directory = directory
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(directory or ""), True)
        if directory is None:
            self._cleanup.detach()
        self.collection = f"rag_demo_{os.getpid()}_{int(time.time() * 1000) % 10**9}"
        client = MilvusClient(uri)
        try:
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dimensions)
            params = client.prepare_index_params()
            params.add_index("vector", index_type=index_type, metric_type=metric)
            client.create_collection(self.collection, schema=schema, index_params=params)
        except BaseException:
            client.close()
            self._cleanup()
            raise
        self._client = instrument_milvus(client)

    async def add(self, ids: list[int], vectors: list[list[float]]) -> None:
        """Store vectors under ids."""
        rows = [{"id": i, "vector": v} for i, v in zip(ids, vectors, strict=True)]
        await asyncio.to_thread(self._client.insert, self.collection, rows)

    async def search(self, vector: list[float], k: int) -> list[int]:
        """The ids of the ``k`` nearest vectors."""
        hits = await asyncio.to_thread(
            self._client.search, self.collection, data=[vector], limit=k
        )
        return [int(hit["id"]) for hit in hits[0]]

    def close(self) -> None:
        """Drop the run's collection, close the client, remove a temporary database."""
        client = self._client
        try:
            client.drop_collection(self.collection)
        finally:
            uninstrument_milvus(client)
            client.close()
            self._cleanup()
