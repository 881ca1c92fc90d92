"""flplatform: an async federated-learning platform server.

Sub-packages: ``routers`` (HTTP and websocket endpoints), ``orm`` (SQLAlchemy models),
``services`` (business logic, never commits), ``schemas`` (Pydantic), ``aggregation``
(pure tensor code, no web or database imports).
"""

__version__ = "0.1.0"
