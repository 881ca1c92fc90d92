"""Training notifications: a transactional outbox and its dispatcher.

A state change writes its notifications into the ``notifications`` table **in the same
transaction** (:func:`enqueue`); after the commit the dispatcher delivers them (at least once,
each recipient's notifications in order) as JSON POSTs to the recipient's
``message_endpoint``::

    {"notification_type": "UPDATE_ROUND_START", "training_uuid": "…", "body": {"round": 1, …}}

Headers: ``Content-Type: application/json``, ``X-FLP-Notification-Id`` (outbox id, for
de-duplication), ``X-FLP-Timestamp`` (unix seconds), ``X-FLP-Signature: sha256=<hex>`` =
HMAC-SHA256 over ``f"{timestamp}.".encode() + body`` keyed with the recipient's notification
key (``GET /api/users/myself/notification-key/``; derived from the server secret with
``security.sign``, so every client has its own key).

Outcomes: 2xx → sent. Non-2xx → rejected: for round-driving ("critical") notifications the
client is removed from the training and gets ``CLIENT_REMOVED``. Transport failure → retried
with linear back-off (``FLP_NOTIFICATION_BACKOFF_SECONDS`` × attempt) up to
``FLP_NOTIFICATION_MAX_ATTEMPTS``; then a critical notification puts the training into Error
with the reason recorded. Sending never blocks the event loop (``httpx.AsyncClient``, short
timeouts) and rows are claimed with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so several
processes can share one outbox.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import httpx
from sqlalchemy import delete, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from flplatform.orm import Notification, NotificationStatus, Training, TrainingState, User
from flplatform.orm.base import utcnow
from flplatform.orm.training import training_participants
from flplatform.security import sign
from flplatform.settings import Settings

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-FLP-Signature"
TIMESTAMP_HEADER = "X-FLP-Timestamp"
ID_HEADER = "X-FLP-Notification-Id"
ATTEMPT_HEADER = "X-FLP-Delivery-Attempt"

TRAINING_START = "TRAINING_START"
UPDATE_ROUND_START = "UPDATE_ROUND_START"
MODEL_TEST_ROUND = "MODEL_TEST_ROUND"
SWAG_ROUND_START = "SWAG_ROUND_START"
TRAINING_FINISHED = "TRAINING_FINISHED"
CLIENT_REMOVED = "CLIENT_REMOVED"

# Notifications whose loss would stall a round: rejection removes the client, undeliverable → Error.
CRITICAL_TYPES = frozenset({UPDATE_ROUND_START, MODEL_TEST_ROUND, SWAG_ROUND_START})
_CLAIM_SECONDS = 120


def notification_key(user_id: uuid.UUID) -> str:
    """The per-recipient HMAC key (hex); clients fetch theirs from the API."""
    return sign(b"flplatform-notification-key:" + str(user_id).encode())


def signature(user_id: uuid.UUID, timestamp: str, body: bytes) -> str:
    mac = hmac.new(notification_key(user_id).encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify_signature(key: str, timestamp: str, body: bytes, header: str) -> bool:
    """What a client does: recompute the HMAC with its key and compare in constant time."""
    mac = hmac.new(key.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return hmac.compare_digest("sha256=" + mac.hexdigest(), header)


def payload(notification_type: str, training_id: uuid.UUID, body: dict[str, Any]) -> str:
    return json.dumps(
        {"notification_type": notification_type, "training_uuid": str(training_id), "body": body},
        default=str,
        separators=(",", ":"),
    )


def enqueue(
    session: AsyncSession,
    training_id: uuid.UUID,
    recipients: Iterable[User],
    notification_type: str,
    body: dict[str, Any] | Callable[[User], dict[str, Any]],
) -> int:
    """Write notifications into the outbox (same transaction as the caller's state change)."""
    count = 0
    for user in recipients:
        data = body(user) if callable(body) else body
        session.add(
            Notification(
                training_id=training_id,
                recipient_id=user.id,
                endpoint=user.message_endpoint,
                notification_type=notification_type,
                payload=payload(notification_type, training_id, data),
                critical=notification_type in CRITICAL_TYPES,
                status=NotificationStatus.PENDING,
                attempts=0,
                next_attempt_at=utcnow(),
            )
        )
        count += 1
    session.info["notifications_enqueued"] = session.info.get("notifications_enqueued", 0) + count
    return count


# Called by the dispatcher when a critical notification is rejected or undeliverable:
# (session, training_id, user_id, reason). Set by services.trainings to keep this module free
# of lifecycle rules.
RejectionHandler = Callable[[AsyncSession, uuid.UUID, uuid.UUID, str], Awaitable[None]]
FailureHandler = Callable[[AsyncSession, uuid.UUID, str], Awaitable[None]]


class Dispatcher:
    """Delivers the outbox. ``kick()`` after a commit wakes it; a sweep also runs periodically."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        settings: Settings,
        *,
        on_rejected: RejectionHandler,
        on_failed: FailureHandler,
        after_change: Callable[[uuid.UUID], None],
    ) -> None:
        self.sessionmaker = sessionmaker
        self.settings = settings
        self.on_rejected = on_rejected
        self.on_failed = on_failed
        self.after_change = after_change
        self._wake = asyncio.Event()
        self._http: httpx.AsyncClient | None = None
        self._is_postgres = not settings.is_sqlite

    def kick(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        timeout = self.settings.notification_timeout_seconds
        async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0))) as http:
            self._http = http
            while True:
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=self.settings.training_sweep_interval_seconds)
                except TimeoutError:
                    pass
                self._wake.clear()
                try:
                    while await self.dispatch_once():
                        pass
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("notification dispatch failed; retrying on the next sweep")

    async def dispatch_once(self, limit: int = 200) -> int:
        """Claim due notifications, deliver them; returns how many were claimed."""
        rows = await self._claim(limit)
        if not rows:
            return 0
        by_recipient: dict[tuple[Any, Any], list[Notification]] = defaultdict(list)
        for row in rows:
            by_recipient[(row.recipient_id, row.endpoint)].append(row)
        await asyncio.gather(*(self._deliver_in_order(group) for group in by_recipient.values()))
        return len(rows)

    async def _claim(self, limit: int) -> list[Notification]:
        now = utcnow()
        async with self.sessionmaker() as session:
            stmt = (
                select(Notification)
                .where(
                    or_(
                        (Notification.status == NotificationStatus.PENDING) & (Notification.next_attempt_at <= now),
                        (Notification.status == NotificationStatus.SENDING) & (Notification.claimed_until < now),
                    )
                )
                .order_by(Notification.id)
                .limit(limit)
            )
            if self._is_postgres:
                stmt = stmt.with_for_update(skip_locked=True)
            rows = list((await session.execute(stmt)).scalars())
            for row in rows:
                row.status = NotificationStatus.SENDING
                row.claimed_until = now + dt.timedelta(seconds=_CLAIM_SECONDS)
            await session.commit()
            return rows

    async def _deliver_in_order(self, group: Sequence[Notification]) -> None:
        for index, row in enumerate(group):
            delivered = await self._deliver(row)
            if not delivered:
                # Keep this recipient's order: later notifications wait behind the retried one.
                rest = [r.id for r in group[index + 1 :]]
                if rest:
                    async with self.sessionmaker() as session:
                        await session.execute(
                            update(Notification)
                            .where(Notification.id.in_(rest))
                            .values(status=NotificationStatus.PENDING, claimed_until=None)
                        )
                        await session.commit()
                return

    async def _deliver(self, row: Notification) -> bool:
        """True when the row reached a final state (sent/rejected/failed/dropped)."""
        if not row.endpoint or row.recipient_id is None:
            await self._finish(row.id, NotificationStatus.DROPPED, error="recipient has no message_endpoint")
            return True
        body = row.payload.encode()
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            ID_HEADER: str(row.id),
            ATTEMPT_HEADER: str(row.attempts + 1),
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: signature(row.recipient_id, timestamp, body),
        }
        assert self._http is not None
        try:
            response = await self._http.post(row.endpoint, content=body, headers=headers)
        except (httpx.HTTPError, ValueError, OSError) as exc:
            return await self._transport_failure(row, f"{type(exc).__name__}: {exc}"[:500])
        if 200 <= response.status_code < 300:
            await self._finish(row.id, NotificationStatus.SENT, status_code=response.status_code)
            return True
        reason = f"{row.notification_type} rejected by {row.endpoint} with HTTP {response.status_code}"
        log.warning("notification %s: %s", row.id, reason)
        async with self.sessionmaker() as session:
            await self._set_final(session, row.id, NotificationStatus.REJECTED, error=reason, status_code=response.status_code)
            if row.critical and row.training_id is not None:
                await self.on_rejected(session, row.training_id, row.recipient_id, reason)
            await session.commit()
        if row.critical and row.training_id is not None:
            self.after_change(row.training_id)
        self.kick()
        return True

    async def _transport_failure(self, row: Notification, error: str) -> bool:
        attempts = row.attempts + 1
        async with self.sessionmaker() as session:
            if attempts >= self.settings.notification_max_attempts:
                reason = (
                    f"Client {row.recipient_id} unreachable at {row.endpoint} after {attempts} attempts "
                    f"({row.notification_type}): {error}"
                )
                log.warning("notification %s failed: %s", row.id, reason)
                await self._set_final(session, row.id, NotificationStatus.FAILED, error=error, attempts=attempts)
                if row.critical and row.training_id is not None:
                    await self.on_failed(session, row.training_id, reason)
                await session.commit()
                return True
            delay = self.settings.notification_backoff_seconds * attempts
            await session.execute(
                update(Notification)
                .where(Notification.id == row.id)
                .values(
                    status=NotificationStatus.PENDING,
                    attempts=attempts,
                    last_error=error,
                    claimed_until=None,
                    next_attempt_at=utcnow() + dt.timedelta(seconds=delay),
                )
            )
            await session.commit()
        return False

    async def _finish(self, row_id: int, status: NotificationStatus, *, error: str | None = None,
                      status_code: int | None = None) -> None:
        async with self.sessionmaker() as session:
            await self._set_final(session, row_id, status, error=error, status_code=status_code)
            await session.commit()

    @staticmethod
    async def _set_final(session: AsyncSession, row_id: int, status: NotificationStatus, *, error: str | None = None,
                         status_code: int | None = None, attempts: int | None = None) -> None:
        values: dict[str, Any] = {"status": status, "claimed_until": None, "last_error": error,
                                  "response_status": status_code}
        if status == NotificationStatus.SENT:
            values["sent_at"] = utcnow()
        if attempts is not None:
            values["attempts"] = attempts
        await session.execute(update(Notification).where(Notification.id == row_id).values(**values))


async def drop_pending_for(session: AsyncSession, training_id: uuid.UUID, user_id: uuid.UUID | None = None) -> None:
    """Pending round notifications that no longer make sense (client removed, training stopped)."""
    stmt = delete(Notification).where(
        Notification.training_id == training_id,
        Notification.status == NotificationStatus.PENDING,
        Notification.critical.is_(True),
    )
    if user_id is not None:
        stmt = stmt.where(Notification.recipient_id == user_id)
    await session.execute(stmt)


async def is_participant(session: AsyncSession, training_id: uuid.UUID, user_id: uuid.UUID) -> bool:
    row = await session.execute(
        select(training_participants.c.user_id).where(
            training_participants.c.training_id == training_id, training_participants.c.user_id == user_id
        )
    )
    return row.first() is not None


ACTIVE_STATES = (TrainingState.ONGOING, TrainingState.SWAG_ROUND)
