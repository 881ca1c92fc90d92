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
client is removed from the training and gets ``CLIENT_REMOVED``. Transport failure (including a
refusal by the SSRF guard and the total deadline ``FLP_NOTIFICATION_TIMEOUT_SECONDS``) → retried
with linear back-off (``FLP_NOTIFICATION_BACKOFF_SECONDS`` × attempt) up to
``FLP_NOTIFICATION_MAX_ATTEMPTS``; then a critical notification puts the training into Error
with a generic reason (the transport detail goes to the server log only). Sending never blocks
the event loop, each recipient is served by its own lane (see :class:`Dispatcher`), and rows are
claimed head-of-line per recipient with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so several
processes can share one outbox without reordering a recipient's notifications.
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
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol

import httpx
from sqlalchemy import delete, exists, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import aliased

from flplatform.auth.credentials import sign
from flplatform.orm import Notification, NotificationStatus
from flplatform.orm.base import utcnow
from flplatform.orm.training import training_participants
from flplatform.settings import Settings
from flplatform.trainings import outbound

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


def client_removed_body(model_id: uuid.UUID, round_: int, reason: str) -> dict[str, Any]:
    """CLIENT_REMOVED's body: the keys of the other notifications (``global_model_uuid``,
    ``round``) plus ``notification_type`` and ``data``, which the reference client's handler
    reads for a type it does not know (``body["data"]``; without them it fails with 500)."""
    details = {"global_model_uuid": str(model_id), "round": round_, "reason": reason}
    return {**details, "notification_type": CLIENT_REMOVED, "data": details}


NO_ENDPOINT = "recipient has no message_endpoint"


class Recipient(Protocol):
    """What the outbox reads of a recipient: a ``User`` or a participant column tuple."""

    @property
    def id(self) -> uuid.UUID: ...
    @property
    def message_endpoint(self) -> str | None: ...


async def enqueue(
    session: AsyncSession,
    training_id: uuid.UUID,
    recipients: Iterable[Recipient],
    notification_type: str,
    body: dict[str, Any] | Callable[[Any], dict[str, Any]],
) -> int:
    """Write notifications into the outbox (same transaction as the caller's state change), all
    of them in one multi-row INSERT: notifying 5,000 participants is one statement, not 5,000
    ORM objects flushed one by one. A shared ``body`` is serialised once.

    A recipient without a ``message_endpoint`` cannot be reached: its row is written already
    final (``dropped``, "recipient has no message_endpoint"), which is what the dispatcher would
    make of it after claiming it, two transactions per row later (issue 18: 6.6–15 ms each, a
    minute for a fleet of 5,000 such clients). Returns how many rows wait for delivery."""
    now, critical = utcnow(), notification_type in CRITICAL_TYPES
    shared = None if callable(body) else payload(notification_type, training_id, body)
    rows = []
    for user in recipients:
        reachable = bool(user.message_endpoint)
        rows.append(
            {
                "training_id": training_id,
                "recipient_id": user.id,
                "endpoint": user.message_endpoint,
                "notification_type": notification_type,
                "payload": shared
                if shared is not None
                else payload(notification_type, training_id, body(user)),  # type: ignore[operator]
                "critical": critical,
                "status": NotificationStatus.PENDING if reachable else NotificationStatus.DROPPED,
                "last_error": None if reachable else NO_ENDPOINT,
                "attempts": 0,
                "next_attempt_at": now,
                "created_at": now,
            }
        )
    if rows:
        await session.execute(insert(Notification), rows)
    pending = sum(1 for r in rows if r["status"] == NotificationStatus.PENDING)
    session.info["notifications_enqueued"] = session.info.get("notifications_enqueued", 0) + pending
    return pending


# Called by the dispatcher when a critical notification is rejected or undeliverable:
# (session, training_id, user_id, reason). Set by trainings.sweeper to keep this module free
# of lifecycle rules.
RejectionHandler = Callable[[AsyncSession, uuid.UUID, uuid.UUID, str], Awaitable[None]]
FailureHandler = Callable[[AsyncSession, uuid.UUID, str], Awaitable[None]]


class Dispatcher:
    """Delivers the outbox. ``kick()`` after a commit wakes it; a sweep also runs periodically.

    Each recipient has its own *lane*: a task that delivers that recipient's notifications one
    after another, in id order, while other lanes run independently (up to
    ``FLP_NOTIFICATION_MAX_IN_FLIGHT`` per process). Only a recipient's *head of line* (its
    oldest unfinished notification) is ever claimed, by any process, so order holds across
    processes too: a later notification waits until every earlier one reached a final state.
    A slow or hostile endpoint therefore delays its own notifications only, never another
    recipient's, and each attempt is bounded by one total deadline and a response-size cap
    (:func:`flplatform.trainings.outbound.post_bounded`).
    """

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
        self._policy = outbound.EndpointPolicy.from_settings(settings)
        self._is_postgres = not settings.is_sqlite
        self._lanes: dict[Any, asyncio.Task[None]] = {}
        self._exchanges: set[asyncio.Future[outbound.Outcome]] = set()
        self._stopping = False
        # A claim outlives any attempt (deadline + bookkeeping); then another process may retry.
        self._claim_seconds = max(_CLAIM_SECONDS, 4 * settings.notification_timeout_seconds)

    def kick(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        """Ask :meth:`run` to finish: HTTP exchanges in flight are abandoned (their rows stay
        claimed and are retried once the claim expires), database work is completed, so no
        database call is ever cut off mid-way (aiosqlite does not survive that well)."""
        self._stopping = True
        for exchange in list(self._exchanges):
            exchange.cancel()
        self.kick()

    async def run(self) -> None:
        async with outbound.guarded_client(self.settings) as http:
            self._http = http
            try:
                while not self._stopping:
                    try:
                        await asyncio.wait_for(
                            self._wake.wait(), timeout=self.settings.training_sweep_interval_seconds
                        )
                    except TimeoutError:
                        pass
                    self._wake.clear()
                    if self._stopping:
                        break
                    try:
                        await self.fill()
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        log.exception("notification dispatch failed; retrying on the next sweep")
            finally:
                self.stop()
                await asyncio.gather(*list(self._lanes.values()), return_exceptions=True)

    async def fill(self) -> int:
        """Start a lane for each recipient whose next notification is due; returns how many."""
        free = self.settings.notification_max_in_flight - len(self._lanes)
        if free <= 0 or self._stopping:
            return 0
        rows = await self._claim(limit=free, busy=[k for k in self._lanes if isinstance(k, uuid.UUID)])
        for row in rows:
            key = _lane_key(row)
            self._lanes[key] = asyncio.get_running_loop().create_task(
                self._lane(key, row), name=f"notify-{key}"
            )
        return len(rows)

    async def dispatch_once(self) -> int:
        """Claim what is due and wait until those lanes are idle (tests, tools)."""
        started = await self.fill()
        while self._lanes:
            await asyncio.gather(*list(self._lanes.values()), return_exceptions=True)
        return started

    async def _lane(self, key: Any, row: Notification | None) -> None:
        try:
            while row is not None:
                if not await self._deliver(row):
                    return  # retry scheduled: the recipient's later notifications wait behind it
                if self._stopping or row.recipient_id is None:
                    return
                row = await self._claim_next(row.recipient_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("notification lane %s failed; its claim expires and it is retried", key)
        finally:
            self._lanes.pop(key, None)
            self.kick()  # a slot is free

    def _due(self, now: dt.datetime, table: Any = Notification) -> Any:
        return or_(
            (table.status == NotificationStatus.PENDING) & (table.next_attempt_at <= now),
            (table.status == NotificationStatus.SENDING) & (table.claimed_until < now),
        )

    def _head_of_line(self) -> Any:
        earlier = aliased(Notification)
        return ~exists().where(
            earlier.recipient_id == Notification.recipient_id,
            earlier.id < Notification.id,
            earlier.status.in_((NotificationStatus.PENDING, NotificationStatus.SENDING)),
        )

    async def _claim(self, limit: int, busy: Sequence[uuid.UUID] = ()) -> list[Notification]:
        """Claim due head-of-line notifications of recipients without a lane here."""
        now = utcnow()
        stmt = select(Notification).where(self._due(now), self._head_of_line())
        if busy:
            stmt = stmt.where(Notification.recipient_id.not_in(busy))
        return await self._claim_rows(stmt.order_by(Notification.id).limit(limit), now)

    async def _claim_next(self, recipient_id: uuid.UUID) -> Notification | None:
        now = utcnow()
        stmt = (
            select(Notification)
            .where(Notification.recipient_id == recipient_id, self._due(now), self._head_of_line())
            .order_by(Notification.id)
            .limit(1)
        )
        rows = await self._claim_rows(stmt, now)
        return rows[0] if rows else None

    async def _claim_rows(self, stmt: Any, now: dt.datetime) -> list[Notification]:
        if self._is_postgres:
            stmt = stmt.with_for_update(skip_locked=True, of=Notification)
        until = now + dt.timedelta(seconds=self._claim_seconds)
        claimed = []
        async with self.sessionmaker() as session:
            for row in (await session.execute(stmt)).scalars():
                # Conditional update: on SQLite (no row locks) two processes that read the same
                # row cannot both claim it.
                result = await session.execute(
                    update(Notification)
                    .where(Notification.id == row.id, self._due(now))
                    .values(status=NotificationStatus.SENDING, claimed_until=until)
                    .execution_options(synchronize_session=False)
                )
                if result.rowcount == 1:  # type: ignore[attr-defined]
                    claimed.append(row)
            await session.commit()
        return claimed

    async def _deliver(self, row: Notification) -> bool:
        """True when the row reached a final state (sent/rejected/failed/dropped)."""
        if not row.endpoint or row.recipient_id is None:
            await self._finish(row.id, NotificationStatus.DROPPED, error=NO_ENDPOINT)
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
        exchange: asyncio.Future[outbound.Outcome] | None = None
        try:
            self._policy.check_url(row.endpoint)  # rows written before the guard, or settings changed since
            exchange = asyncio.ensure_future(
                outbound.post_bounded(
                    self._http,
                    row.endpoint,
                    content=body,
                    headers=headers,
                    deadline_seconds=self.settings.notification_timeout_seconds,
                    max_response_bytes=self.settings.notification_max_response_bytes,
                )
            )
            self._exchanges.add(exchange)
            outcome = await exchange
        except asyncio.CancelledError:
            if self._stopping and exchange is not None and exchange.cancelled():
                return False  # shutting down: the row stays claimed and is retried after the claim expires
            raise
        except (TimeoutError, httpx.HTTPError, ValueError, OSError) as exc:
            detail = "deadline exceeded" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
            return await self._transport_failure(row, detail[:500])
        finally:
            if exchange is not None:
                self._exchanges.discard(exchange)
        if 200 <= outcome.status_code < 300:
            await self._finish(row.id, NotificationStatus.SENT, status_code=outcome.status_code)
            return True
        reason = f"{row.notification_type} rejected by {row.endpoint} with HTTP {outcome.status_code}"
        log.warning("notification %s: %s; answer starts %r", row.id, reason, outcome.body_prefix[:200])
        async with self.sessionmaker() as session:
            await self._set_final(
                session, row.id, NotificationStatus.REJECTED, error=reason, status_code=outcome.status_code
            )
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
                # The detail (refused, timed out, policy) stays in the log and last_error: shown to
                # users it would tell a closed port from an open one on hosts they choose.
                log.warning(
                    "notification %s (%s to client %s at %s) failed after %d attempts: %s",
                    row.id,
                    row.notification_type,
                    row.recipient_id,
                    row.endpoint,
                    attempts,
                    error,
                )
                await self._set_final(
                    session, row.id, NotificationStatus.FAILED, error=error, attempts=attempts
                )
                if row.critical and row.training_id is not None:
                    await self.on_failed(session, row.training_id, undeliverable_reason(row, attempts))
                await session.commit()
                return True
            log.info("notification %s attempt %d failed: %s", row.id, attempts, error)
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
        # Wake up when the retry is due (the sweep would also find it, later).
        asyncio.get_running_loop().call_later(delay, self.kick)
        return False

    async def _finish(
        self,
        row_id: int,
        status: NotificationStatus,
        *,
        error: str | None = None,
        status_code: int | None = None,
    ) -> None:
        async with self.sessionmaker() as session:
            await self._set_final(session, row_id, status, error=error, status_code=status_code)
            await session.commit()

    @staticmethod
    async def _set_final(
        session: AsyncSession,
        row_id: int,
        status: NotificationStatus,
        *,
        error: str | None = None,
        status_code: int | None = None,
        attempts: int | None = None,
    ) -> None:
        values: dict[str, Any] = {
            "status": status,
            "claimed_until": None,
            "last_error": error,
            "response_status": status_code,
        }
        if status == NotificationStatus.SENT:
            values["sent_at"] = utcnow()
        if attempts is not None:
            values["attempts"] = attempts
        await session.execute(update(Notification).where(Notification.id == row_id).values(**values))


def undeliverable_reason(row: Notification, attempts: int) -> str:
    """The user-visible reason: the same words whatever went wrong on the wire."""
    return (
        f"Client {row.recipient_id} unreachable: {row.notification_type} could not be delivered to its "
        f"message_endpoint after {attempts} attempts."
    )


def _lane_key(row: Notification) -> Any:
    return row.recipient_id if row.recipient_id is not None else ("row", row.id)


async def drop_pending_for(
    session: AsyncSession, training_id: uuid.UUID, user_id: uuid.UUID | None = None
) -> None:
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
