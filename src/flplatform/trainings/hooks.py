"""Hook points of the round lifecycle, for other domains (billing) to take part in it.

Hooks are async callables ``(session, training, round)`` called inside the transaction of the
state change; one may raise an ``AppError`` (billing's ``PaymentRequired``) to refuse it.
:data:`ROUND_STARTED` runs at each ``UPDATE_ROUND_START``, :data:`ROUND_AGGREGATED` when an
aggregation is committed. Nothing adds itself at import time: ``flplatform.jobs.install()``
adds billing's hooks in every entry point (server, worker, tests).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from sqlalchemy.ext.asyncio import AsyncSession

from flplatform.orm import Training

RoundHook = Callable[[AsyncSession, Training, int], Awaitable[None]]


class RoundHooks:
    """An ordered set of round hooks (adding one twice keeps one)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._hooks: list[RoundHook] = []

    def add(self, hook: RoundHook) -> None:
        if hook not in self._hooks:
            self._hooks.append(hook)

    def remove(self, hook: RoundHook) -> None:
        self._hooks.remove(hook)

    def __contains__(self, hook: object) -> bool:
        return hook in self._hooks

    async def __call__(self, session: AsyncSession, training: Training, round_: int) -> None:
        for hook in list(self._hooks):
            await hook(session, training, round_)


ROUND_STARTED = RoundHooks("round started")
ROUND_AGGREGATED = RoundHooks("round aggregated")
