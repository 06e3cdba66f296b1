"""Sinks the idempotent consumer applies ops to exactly once (``postgres``: a PostgreSQL database)."""
