"""Who is calling: credentials (passwords, tokens, the secret), the request guard that authenticates
before any body is read, login throttling, and the FastAPI dependencies that resolve the requester."""
