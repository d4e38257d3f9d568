"""Runnable examples of rag_instrument."""
