"""The ledger core: accounts, one function that posts balanced entries, balances, reconciliation.

Every money movement goes through :func:`post_entry`:

1. an entry with the same ``key`` already exists → it is returned (``created=False``) when the
   caller's ``intent`` matches, else :class:`~flplatform.errors.Conflict` (a reused key);
2. the user accounts the entry may touch are locked in sorted id order (``SELECT … FOR UPDATE``
   on PostgreSQL; SQLite has one writer at a time), so concurrent entries serialise per account
   and opposite transfers cannot deadlock; the key is checked again under the locks;
3. the legs are built (a callable may look at the locked balances, e.g. to spend coupons first),
   checked to sum to zero per currency, and every user balance is moved by one conditional
   ``UPDATE … SET balance = balance + d WHERE id = :a AND balance + d >= 0 RETURNING`` — no row
   means insufficient funds: the already-moved balances are moved back and
   :class:`InsufficientFunds` (402) is raised, leaving nothing written;
4. the entry is inserted with ``ON CONFLICT (key) DO NOTHING`` (the arbiter if a same-key entry
   committed meanwhile) and its postings are inserted.

Postings are only ever inserted; nothing here updates or deletes an entry or a posting.
Holder accounts (``available``/``held``) belong to one user or one organisation (:class:`Payer`).

Size: posting, locking, balances and reconciliation are the ledger's invariants; they are kept in
one module so they can be read and reviewed together.
System accounts keep no cached balance (their balance is the sum of their postings), so charges
do not all queue on the revenue row.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, and_, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from flplatform.errors import Conflict, PaymentRequired, Unprocessable
from flplatform.orm.base import utcnow
from flplatform.orm.billing import (
    SYSTEM_ACCOUNT_KINDS,
    USER_ACCOUNT_KINDS,
    AccountKind,
    Currency,
    JournalEntry,
    LedgerAccount,
    Posting,
)


class InsufficientFunds(PaymentRequired):
    code = "insufficient_funds"


@dataclass(frozen=True)
class AccountRef:
    """What the ledger needs to know about an account (ORM rows would carry stale balances)."""

    id: uuid.UUID
    key: str
    kind: AccountKind
    currency: Currency
    owner_id: uuid.UUID | None
    organization_id: uuid.UUID | None = None

    @property
    def is_user(self) -> bool:
        """A holder's account (a user's or an organisation's): cached balance, locked, never < 0."""
        return self.kind in USER_ACCOUNT_KINDS


@dataclass(frozen=True)
class Payer:
    """Whose money an action spends: the acting user's own accounts, or their organisation's
    (``organization_id`` set; ``user_id`` is then the member the spending is attributed to)."""

    user_id: uuid.UUID
    organization_id: uuid.UUID | None = None

    @property
    def holder_id(self) -> uuid.UUID:
        return self.organization_id or self.user_id


@dataclass(frozen=True)
class Leg:
    account: AccountRef
    amount: int


LegsBuilder = Callable[[Mapping[uuid.UUID, int]], Sequence[Leg] | Awaitable[Sequence[Leg]]]


def dialect_name(session: AsyncSession) -> str:
    return session.get_bind().dialect.name


def _insert(session: AsyncSession, table: Any) -> Any:
    return (postgresql.insert if dialect_name(session) == "postgresql" else sqlite.insert)(table)


def account_key(
    kind: AccountKind,
    currency: Currency,
    owner_id: uuid.UUID | None,
    organization_id: uuid.UUID | None = None,
) -> str:
    if kind in SYSTEM_ACCOUNT_KINDS:
        return f"system:{kind.value}:{currency.value}"
    if organization_id is not None:
        return f"org:{organization_id}:{kind.value}:{currency.value}"
    return f"user:{owner_id}:{kind.value}:{currency.value}"


async def get_account(
    session: AsyncSession,
    kind: AccountKind,
    currency: Currency,
    owner_id: uuid.UUID | None = None,
    *,
    organization_id: uuid.UUID | None = None,
) -> AccountRef:
    """The account, created on first use (concurrent creators agree through the unique key).
    Holder accounts name one user (``owner_id``) or one organisation (``organization_id``)."""
    holders = (owner_id is not None) + (organization_id is not None)
    if (kind in SYSTEM_ACCOUNT_KINDS) != (holders == 0) or holders > 1:
        raise ValueError(f"{kind} accounts {'have no' if holders else 'need one'} holder")
    key = account_key(kind, currency, owner_id, organization_id)
    columns = (
        LedgerAccount.id,
        LedgerAccount.key,
        LedgerAccount.kind,
        LedgerAccount.currency,
        LedgerAccount.owner_id,
        LedgerAccount.organization_id,
    )
    row = (await session.execute(select(*columns).where(LedgerAccount.key == key))).one_or_none()
    if row is None:
        await session.execute(
            _insert(session, LedgerAccount)
            .values(
                id=uuid.uuid4(),
                key=key,
                kind=kind,
                currency=currency,
                owner_id=owner_id,
                organization_id=organization_id,
                balance=None if holders == 0 else 0,
                created_at=utcnow(),
            )
            .on_conflict_do_nothing(index_elements=["key"])
        )
        row = (await session.execute(select(*columns).where(LedgerAccount.key == key))).one()
    return AccountRef(*row)


async def user_account(
    session: AsyncSession, owner_id: uuid.UUID, currency: Currency, *, held: bool = False
) -> AccountRef:
    return await get_account(session, AccountKind.HELD if held else AccountKind.AVAILABLE, currency, owner_id)


async def system_account(session: AsyncSession, kind: AccountKind, currency: Currency) -> AccountRef:
    return await get_account(session, kind, currency)


async def org_account(
    session: AsyncSession, organization_id: uuid.UUID, currency: Currency, *, held: bool = False
) -> AccountRef:
    kind = AccountKind.HELD if held else AccountKind.AVAILABLE
    return await get_account(session, kind, currency, organization_id=organization_id)


async def payer_of(session: AsyncSession, user: Any) -> Payer:
    """Who pays for what ``user`` (a user row or id) does: a member of an organisation spends
    from the organisation's accounts, an organisation-less user from their own."""
    if hasattr(user, "organization_id") and "organization_id" in vars(user):
        return Payer(user.id, user.organization_id)
    from flplatform.orm.user import User

    user_id = getattr(user, "id", user)
    org = (await session.execute(select(User.organization_id).where(User.id == user_id))).scalar_one_or_none()
    return Payer(user_id, org)


async def payer_account(
    session: AsyncSession, payer: Payer, currency: Currency, *, held: bool = False
) -> AccountRef:
    """The account a payer spends from: their organisation's when they act for it."""
    if payer.organization_id is not None:
        return await org_account(session, payer.organization_id, currency, held=held)
    return await user_account(session, payer.user_id, currency, held=held)


def fingerprint(intent: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(intent, sort_keys=True, default=str).encode()).hexdigest()


async def entry_by_key(session: AsyncSession, key: str) -> JournalEntry | None:
    return (await session.execute(select(JournalEntry).where(JournalEntry.key == key))).scalar_one_or_none()


def _existing(entry: JournalEntry, digest: str) -> JournalEntry:
    if entry.fingerprint != digest:
        raise Conflict(
            f"Key {entry.key!r} was already used for a different request.", code="idempotency_key_reused"
        )
    return entry


async def lock_balances(session: AsyncSession, accounts: Iterable[AccountRef]) -> dict[uuid.UUID, int]:
    """Lock user accounts in id order (PostgreSQL row locks) and return their balances."""
    ids = sorted({a.id for a in accounts if a.is_user})
    if not ids:
        return {}
    stmt = (
        select(LedgerAccount.id, LedgerAccount.balance)
        .where(LedgerAccount.id.in_(ids))
        .order_by(LedgerAccount.id)
    )
    if dialect_name(session) == "postgresql":
        stmt = stmt.with_for_update()
    return {row.id: row.balance for row in await session.execute(stmt)}


def check_balanced(legs: Sequence[Leg]) -> None:
    totals: dict[Currency, int] = defaultdict(int)
    for leg in legs:
        if not isinstance(leg.amount, int) or isinstance(leg.amount, bool):
            raise TypeError("ledger amounts are integers of minor units")
        totals[leg.account.currency] += leg.amount
    unbalanced = {c.value: t for c, t in totals.items() if t != 0}
    if unbalanced:
        raise ValueError(f"entry does not balance per currency: {unbalanced}")


#: Largest balance a user account may hold: its 64-bit column (credits beyond it are refused, 422).
MAX_BALANCE = 2**63 - 1


class BalanceTooLarge(Unprocessable):
    code = "balance_too_large"


async def _move_user_balance(session: AsyncSession, account_id: uuid.UUID, delta: int) -> bool:
    # Credits compare against MAX_BALANCE - delta, never compute balance + delta past int64
    # (PostgreSQL: "bigint out of range"; SQLite: silently a float).
    room = LedgerAccount.balance <= MAX_BALANCE - delta if delta > 0 else LedgerAccount.balance + delta >= 0
    stmt = (
        update(LedgerAccount)
        .where(and_(LedgerAccount.id == account_id, room))
        .values(balance=LedgerAccount.balance + delta)
        .returning(LedgerAccount.balance)
        .execution_options(synchronize_session=False)
    )
    return (await session.execute(stmt)).first() is not None


async def post_entry(
    session: AsyncSession,
    *,
    key: str,
    kind: str,
    legs: Sequence[Leg] | LegsBuilder,
    intent: Mapping[str, Any],
    lock: Iterable[AccountRef] = (),
    actor_id: uuid.UUID | None = None,
    description: str = "",
) -> tuple[JournalEntry, bool]:
    """Post one balanced entry at most once per ``key``; see the module docstring.

    ``legs`` is a list of legs or a callable receiving the locked balances of ``lock`` (plus the
    user accounts of a static list); every user account a built leg touches must be in ``lock``.
    Returns ``(entry, created)``.
    """
    digest = fingerprint({"kind": kind, **intent})
    existing = await entry_by_key(session, key)
    if existing is not None:
        return _existing(existing, digest), False

    to_lock = list(lock) + ([leg.account for leg in legs] if not callable(legs) else [])
    balances = await lock_balances(session, to_lock)
    existing = await entry_by_key(session, key)  # a same-key entry may have committed while we waited
    if existing is not None:
        return _existing(existing, digest), False

    built = legs(balances) if callable(legs) else legs
    if isinstance(built, Awaitable):
        built = await built
    merged: dict[uuid.UUID, int] = defaultdict(int)
    refs: dict[uuid.UUID, AccountRef] = {}
    for leg in built:
        merged[leg.account.id] += leg.amount
        refs[leg.account.id] = leg.account
    final = [Leg(refs[i], amount) for i, amount in merged.items() if amount != 0]
    check_balanced(final)
    if not final:
        raise ValueError("an entry needs at least one non-zero posting")
    unlocked = [leg.account.key for leg in final if leg.account.is_user and leg.account.id not in balances]
    if unlocked:
        raise RuntimeError(f"user accounts moved without being locked: {unlocked}")

    moved: list[tuple[uuid.UUID, int]] = []
    # Debits first, so a refused debit leaves fewer moves to undo.
    for leg in sorted(
        (leg for leg in final if leg.account.is_user), key=lambda entry: (entry.amount > 0, entry.account.id)
    ):
        if not await _move_user_balance(session, leg.account.id, leg.amount):
            await _undo(session, moved)
            if leg.amount > 0:
                raise BalanceTooLarge(
                    f"This would take the {leg.account.currency.value} balance past its maximum "
                    f"({_fmt(MAX_BALANCE)})."
                )
            raise InsufficientFunds(
                f"Insufficient {leg.account.currency.value} balance: this needs "
                f"{_fmt(-leg.amount)} more than is available.",
                code="insufficient_funds",
            )
        moved.append((leg.account.id, leg.amount))

    entry_id = uuid.uuid4()
    now = utcnow()
    inserted = (
        await session.execute(
            _insert(session, JournalEntry)
            .values(
                id=entry_id,
                key=key,
                kind=kind,
                description=description[:500],
                actor_id=actor_id,
                fingerprint=digest,
                created_at=now,
            )
            .on_conflict_do_nothing(index_elements=["key"])
            .returning(JournalEntry.id)
        )
    ).first()
    if inserted is None:
        await _undo(session, moved)
        other = await entry_by_key(session, key)
        assert other is not None
        return _existing(other, digest), False
    await session.execute(
        cast(Table, Posting.__table__).insert(),
        [
            {
                "id": uuid.uuid4(),
                "entry_id": entry_id,
                "account_id": leg.account.id,
                "currency": leg.account.currency,
                "amount": leg.amount,
                "created_at": now,
            }
            for leg in final
        ],
    )
    entry = await session.get(JournalEntry, entry_id)
    assert entry is not None
    return entry, True


def _fmt(minor: int) -> str:
    from flplatform.billing.money import to_decimal

    return str(to_decimal(minor))


async def _undo(session: AsyncSession, moved: Sequence[tuple[uuid.UUID, int]]) -> None:
    for account_id, delta in moved:
        await session.execute(
            update(LedgerAccount)
            .where(LedgerAccount.id == account_id)
            .values(balance=LedgerAccount.balance - delta)
            .execution_options(synchronize_session=False)
        )


async def balances_of(
    session: AsyncSession, owner_id: uuid.UUID, *, organization: bool = False
) -> dict[tuple[Currency, AccountKind], int]:
    """A user's (or with ``organization=True`` an organisation's) cached balances."""
    column = LedgerAccount.organization_id if organization else LedgerAccount.owner_id
    rows = await session.execute(
        select(LedgerAccount.currency, LedgerAccount.kind, LedgerAccount.balance).where(column == owner_id)
    )
    return {(r.currency, r.kind): r.balance for r in rows}


async def has_billing_history(session: AsyncSession, user_id: uuid.UUID) -> bool:
    """Whether the user owns ledger accounts or bills (history that is never deleted)."""
    from flplatform.orm.billing import Bill

    return await _has_history(session, user_id, LedgerAccount.owner_id, Bill.user_id)


async def organization_has_billing_history(session: AsyncSession, organization_id: uuid.UUID) -> bool:
    """Whether the organisation owns ledger accounts or bills (deleting it is then refused)."""
    from flplatform.orm.billing import Bill

    return await _has_history(session, organization_id, LedgerAccount.organization_id, Bill.organization_id)


async def _has_history(session: AsyncSession, holder_id: uuid.UUID, *columns: Any) -> bool:
    for column in columns:
        if (await session.execute(select(column).where(column == holder_id).limit(1))).first() is not None:
            return True
    return False


async def account_balance(session: AsyncSession, account: AccountRef) -> int:
    """Cached balance for user accounts, the sum of postings for system accounts."""
    if account.is_user:
        stmt = select(LedgerAccount.balance).where(LedgerAccount.id == account.id)
    else:
        stmt = select(func.coalesce(func.sum(Posting.amount), 0)).where(Posting.account_id == account.id)
    return int((await session.execute(stmt)).scalar_one() or 0)  # user accounts' balance is never NULL


async def postings_of(session: AsyncSession, entry_id: uuid.UUID) -> list[tuple[str, int]]:
    """``[(account key, amount)]`` of an entry, for tests and statements."""
    rows = await session.execute(
        select(LedgerAccount.key, Posting.amount)
        .join(LedgerAccount, LedgerAccount.id == Posting.account_id)
        .where(Posting.entry_id == entry_id)
        .order_by(LedgerAccount.key)
    )
    return [(r.key, r.amount) for r in rows]


@dataclass
class Reconciliation:
    ok: bool
    accounts_checked: int
    entries_checked: int
    totals_by_currency: dict[str, int]
    mismatched_accounts: list[dict[str, Any]]
    unbalanced_entries: list[dict[str, Any]]
    open_hold_mismatches: list[dict[str, Any]]


async def reconcile(session: AsyncSession) -> Reconciliation:
    """Cached balances equal their postings, every entry sums to zero per currency, the whole
    ledger sums to zero per currency, and held balances equal the open holds."""
    from flplatform.orm.billing import Hold, HoldStatus

    sums = (
        select(Posting.account_id, func.sum(Posting.amount).label("total"))
        .group_by(Posting.account_id)
        .subquery()
    )
    rows = (
        await session.execute(
            select(LedgerAccount.key, LedgerAccount.balance, func.coalesce(sums.c.total, 0))
            .outerjoin(sums, sums.c.account_id == LedgerAccount.id)
            .where(LedgerAccount.balance.is_not(None))
        )
    ).all()
    mismatched = [
        {"account": key, "cached": balance, "postings": int(total)}
        for key, balance, total in rows
        if balance != int(total)
    ]
    unbalanced = [
        {"entry_id": str(entry_id), "currency": str(currency), "sum": int(total)}
        for entry_id, currency, total in await session.execute(
            select(Posting.entry_id, Posting.currency, func.sum(Posting.amount))
            .group_by(Posting.entry_id, Posting.currency)
            .having(func.sum(Posting.amount) != 0)
        )
    ]
    totals = {
        str(c.value if hasattr(c, "value") else c): int(t)
        for c, t in await session.execute(
            select(Posting.currency, func.sum(Posting.amount)).group_by(Posting.currency)
        )
    }
    entries = int((await session.execute(select(func.count()).select_from(JournalEntry))).scalar_one())
    # Holders: a user, or an organisation (its held accounts and its members' holds).
    held = {
        (org or owner, currency): int(balance or 0)  # held accounts are holder accounts: never NULL
        for owner, org, currency, balance in await session.execute(
            select(
                LedgerAccount.owner_id,
                LedgerAccount.organization_id,
                LedgerAccount.currency,
                LedgerAccount.balance,
            ).where(LedgerAccount.kind == AccountKind.HELD)
        )
    }
    expected: dict[tuple[uuid.UUID, Currency], int] = defaultdict(int)
    for owner, org, currency, amount, coupon in await session.execute(
        select(Hold.owner_id, Hold.organization_id, Hold.currency, Hold.amount, Hold.coupon_amount).where(
            Hold.status == HoldStatus.OPEN
        )
    ):
        expected[(org or owner, currency)] += amount
        expected[(org or owner, Currency.COUPON)] += coupon
    hold_mismatches = [
        {
            "owner_id": str(owner),
            "currency": currency.value,
            "held": held.get((owner, currency), 0),
            "open_holds": amount,
        }
        for (owner, currency), amount in expected.items()
        if held.get((owner, currency), 0) != amount
    ] + [
        {"owner_id": str(owner), "currency": currency.value, "held": balance, "open_holds": 0}
        for (owner, currency), balance in held.items()
        if balance != 0 and (owner, currency) not in expected
    ]
    return Reconciliation(
        ok=not mismatched and not unbalanced and not hold_mismatches and all(t == 0 for t in totals.values()),
        accounts_checked=len(rows),
        entries_checked=entries,
        totals_by_currency=totals,
        mismatched_accounts=mismatched,
        unbalanced_entries=unbalanced,
        open_hold_mismatches=hold_mismatches,
    )
