"""A real demessaging backend module for the end-to-end tests (run with ``listen``).

No ``from __future__ import annotations``: demessaging finds progress reporters by their
evaluated type hints."""

from demessaging import main
from deprogressapi import ProgressReport
from deprogressapi.settings import ReportSettings

__all__ = ["hello_world", "add", "count_to", "big"]


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


def count_to(
    n: int,
    reporter: ProgressReport = ProgressReport(
        step_message="Counting",
        settings=ReportSettings(show_method="PRINT"),  # no terminal in tests
    ),
) -> int:
    """Count to n with a progress report per step.

    Parameters
    ----------
    n: int
        Where to stop.
    """
    with reporter:
        for i in range(n):
            with reporter.create_subreport(step_message=f"step {i}"):
                pass
    return n


def big(size: int) -> str:
    """A string of ``size`` characters (large responses are fragmented).

    Parameters
    ----------
    size: int
        Length of the answer.
    """
    return "x" * size


if __name__ == "__main__":
    main()
