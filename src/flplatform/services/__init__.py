"""Business logic. Services flush but never commit: the request or job commits once."""
