"""The ``rag-instrument`` command line (see ``rag_instrument.cli.__main__``)."""

__all__: list[str] = []
