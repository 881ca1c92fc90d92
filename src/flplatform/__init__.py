"""flplatform: an async federated-learning platform server.

Layers, top to bottom: entry points (``app``, ``cli``), ``routers`` (HTTP and websocket only),
the domain packages (``users``, ``organizations``, ``models``, ``trainings``, ``inference``,
``billing``, ``broker``, ``auth``), the engines (``permissions``, ``workqueue``, ``sandbox``, and
the pure tensor code of ``aggregation`` and ``uncertainty``; ``client`` is the participants'
SDK), and the foundations (``orm``, ``kit``, ``errors``, ``settings``, ``db``). A layer imports
only the layers below it (``tests/test_architecture.py``); docs/architecture.md is the map.
"""

__version__ = "0.1.0"
