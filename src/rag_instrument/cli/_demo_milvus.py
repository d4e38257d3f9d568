"""The demo's vector index in Milvus Lite (``rag-instrument demo --milvus``).

A real, embedded Milvus behind an instrumented ``AsyncMilvusClient``: every insert and search
is a span with the collection, index type, metric and counts, and counts as ``vector`` in
the enclosing stage's breakdown. It has the demo's ``add`` / ``search`` interface, and is
built synchronously (before the demo's event loop starts), opening its async client on
first use inside the loop::

    index = MilvusIndex(dimensions=64)          # Milvus Lite in a temporary directory
    await index.add([1, 2], [vector_1, vector_2])
    ids = await index.search(query_vector, k=5)
    await index.close()                         # also removes the temporary directory
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

from rag_instrument.integrations.milvus import instrument_milvus, uninstrument_milvus

__all__ = ["MilvusIndex"]


class MilvusIndex:
    """Inner-product search over vectors stored in a Milvus Lite collection.

    Args:
        path: the Milvus Lite database file (``.db``); ``None`` for a temporary one, removed
            by :meth:`close` (or when the object is collected, or at exit).
        dimensions: the vectors' dimension.
        collection: the collection to (re)create.
        index_type: the vector index (``FLAT`` suits the demo's few dozen documents).
        metric: the distance metric.
    """

    def __init__(
        self,
        path: str | None = None,
        *,
        dimensions: int = 64,
        collection: str = "demo_documents",
        index_type: str = "FLAT",
        metric: str = "IP",
    ) -> None:
        from pymilvus import DataType, MilvusClient

        self._directory: Path | None = None
        if path is None:
            self._directory = Path(tempfile.mkdtemp(prefix="rag-instrument-milvus-"))
            path = str(self._directory / "demo.db")
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._directory or ""), True)
        if self._directory is None:
            self._cleanup.detach()
        self.path = path
        self.collection = collection
        self._client: Any = None
        # The collection is made through the sync client: Milvus Lite does not implement
        # the async client's wait for index creation.
        setup = MilvusClient(path)
        try:
            if setup.has_collection(collection):
                setup.drop_collection(collection)
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dimensions)
            params = setup.prepare_index_params()
            params.add_index("vector", index_type=index_type, metric_type=metric)
            setup.create_collection(collection, schema=schema, index_params=params)
        except BaseException:
            self._cleanup()
            raise
        finally:
            setup.close()

    def _async_client(self) -> Any:
        if self._client is None:
            from pymilvus import AsyncMilvusClient

            self._client = instrument_milvus(AsyncMilvusClient(self.path))
        return self._client

    async def add(self, ids: list[int], vectors: list[list[float]]) -> None:
        """Store vectors under ids."""
        rows = [{"id": i, "vector": v} for i, v in zip(ids, vectors, strict=True)]
        await self._async_client().insert(self.collection, rows)

    async def search(self, vector: list[float], k: int) -> list[int]:
        """The ids of the ``k`` nearest vectors."""
        hits = await self._async_client().search(self.collection, data=[vector], limit=k)
        return [int(hit["id"]) for hit in hits[0]]

    async def close(self) -> None:
        """Close the client (and remove the temporary database, if it was ours)."""
        client, self._client = self._client, None
        try:
            if client is not None:
                uninstrument_milvus(client)
                await client.close()
        finally:
            self._cleanup()
