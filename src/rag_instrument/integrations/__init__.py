"""Integrations with third-party clients; each module needs its extra installed."""
