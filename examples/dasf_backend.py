"""A DASF backend module: two functions that callers reach through flplatform's message broker.

    .venv/bin/python examples/dasf_backend.py -t TOPIC --websocket-url ws://127.0.0.1:8000/ws listen
    .venv/bin/python examples/dasf_backend.py -t TOPIC --websocket-url ws://127.0.0.1:8000/ws \\
        send-request '{"func_name": "add", "a": 2, "b": 40}'

``listen`` serves the functions on the topic; ``send-request`` calls one and prints its answer.
Both sides add ``--header '{"authorization": "Token <key>"}'`` on a private topic. Needs the
``dasf`` extra (demessaging): ``.venv/bin/pip install -c constraints.txt -e '.[dasf]'``.
"""

from demessaging import main

__all__ = ["add", "hello_world"]


def hello_world() -> str:
    """Say hello."""
    return "Hello World!"


def add(a: int, b: int = 1) -> int:
    """Add two integers.

    Parameters
    ----------
    a: int
        The first summand.
    b: int
        The second summand.
    """
    return a + b


if __name__ == "__main__":
    main()
