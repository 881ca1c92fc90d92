"""Topic availability, one definition (dasf-protocol.md §3), and the injectable clock."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from flplatform.orm.base import utcnow

PING_WINDOW = dt.timedelta(minutes=2)
PONG_GRACE = dt.timedelta(seconds=10)


class Clock:
    """Wall clock in UTC; tests swap in a ``FakeClock`` (``broker.clock = FakeClock(...)``)."""

    def now(self) -> dt.datetime:
        return utcnow()


@dataclass
class FakeClock(Clock):
    current: dt.datetime = field(default_factory=utcnow)

    def now(self) -> dt.datetime:
        return self.current

    def advance(self, seconds: float) -> dt.datetime:
        self.current += dt.timedelta(seconds=seconds)
        return self.current


def availability(
    supports_dasf: bool, last_ping: dt.datetime | None, last_pong: dt.datetime | None, now: dt.datetime
) -> bool | None:
    """None: not DASF, never pinged, or last ping older than 2 minutes; False: no pong, or the
    last pong more than 10 s before the last ping; True otherwise."""
    if not supports_dasf or last_ping is None or now - last_ping > PING_WINDOW:
        return None
    if last_pong is None or last_pong < last_ping - PONG_GRACE:
        return False
    return True


STATUS_TEXT = {
    True: (200, "Consumer connected"),
    None: (503, "Status unknown"),
    False: (503, "Consumer could not be reached"),
}
