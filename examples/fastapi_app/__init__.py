"""A small FastAPI RAG service instrumented with rag_instrument (see README.md)."""

from examples.fastapi_app.app import create_app

__all__ = ["create_app"]
