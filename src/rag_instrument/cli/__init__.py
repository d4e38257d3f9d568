"""The ``rag-instrument`` command line."""
