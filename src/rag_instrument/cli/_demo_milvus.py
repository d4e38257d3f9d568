"""The demo's vector index in Milvus Lite (``rag-instrument demo --milvus``).

A real, embedded Milvus behind an instrumented ``AsyncMilvusClient``: every insert and search
is a span with the collection, index type, metric and counts, and counts as ``vector`` in
the enclosing stage's breakdown. It has the demo's ``add`` / ``search`` interface::

    index = await MilvusIndex.open(dimensions=64)
    await index.add([1, 2], [vector_1, vector_2])
    ids = await index.search(query_vector, k=5)
    await index.close()
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import Any

from rag_instrument.integrations.milvus import instrument_milvus, uninstrument_milvus

__all__ = ["MilvusIndex"]


class MilvusIndex:
    """Inner-product search over vectors stored in a Milvus Lite collection."""

    def __init__(self, client: Any, collection: str, directory: Path | None) -> None:
        self._client = client
        self._collection = collection
        self._directory = directory  # a temporary directory we own, removed by close()

    @classmethod
    async def open(
        cls,
        path: str | None = None,
        *,
        dimensions: int = 64,
        collection: str = "demo_documents",
        index_type: str = "FLAT",
        metric: str = "IP",
    ) -> MilvusIndex:
        """Start Milvus Lite on ``path`` (default: a temporary file) with a fresh collection.

        Args:
            path: the Milvus Lite database file (``.db``); ``None`` for a temporary one.
            dimensions: the vectors' dimension.
            collection: the collection to (re)create.
            index_type: the vector index (``FLAT`` suits the demo's few dozen documents).
            metric: the distance metric.
        """
        from pymilvus import AsyncMilvusClient, DataType, MilvusClient

        directory: Path | None = None
        if path is None:
            directory = Path(tempfile.mkdtemp(prefix="rag-instrument-milvus-"))
            path = str(directory / "demo.db")

        def create() -> None:
            # Through the sync client: Milvus Lite does not implement the async client's
            # wait for index creation.
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
            finally:
                setup.close()

        try:
            await asyncio.to_thread(create)
            client = AsyncMilvusClient(path)
        except BaseException:
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)
            raise
        return cls(instrument_milvus(client), collection, directory)

    async def add(self, ids: list[int], vectors: list[list[float]]) -> None:
        """Store vectors under ids."""
        rows = [{"id": i, "vector": v} for i, v in zip(ids, vectors, strict=True)]
        await self._client.insert(self._collection, rows)

    async def search(self, vector: list[float], k: int) -> list[int]:
        """The ids of the ``k`` nearest vectors."""
        hits = await self._client.search(self._collection, data=[vector], limit=k)
        return [int(hit["id"]) for hit in hits[0]]

    async def close(self) -> None:
        """Close the client (and remove the temporary database, if it was ours)."""
        uninstrument_milvus(self._client)
        try:
            await self._client.close()
        finally:
            if self._directory is not None:
                shutil.rmtree(self._directory, ignore_errors=True)
