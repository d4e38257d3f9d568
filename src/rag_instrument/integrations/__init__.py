"""Integrations with third-party clients; each module needs its extra installed."""

__all__: list[str] = []
