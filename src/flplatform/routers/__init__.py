"""FastAPI routers, one module per domain (HTTP and websocket)."""
