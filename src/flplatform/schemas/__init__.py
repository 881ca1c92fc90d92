"""Pydantic v2 request and response schemas, one module per domain."""
