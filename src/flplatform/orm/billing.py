"""Billing: a double-entry, multi-currency ledger and its metering records (seed 004). The audit
log is in ``orm/audit.py``, the worker bookkeeping (``Server``, ``Work``) in ``orm/workqueue.py``.

Money is **integer minor units** (``BigInteger``), one declared scale for every currency:
``MINOR_PER_UNIT = 10**8`` (the seed's ``Decimal(20, 8)``). Never float.

* ``LedgerAccount``: one per (owner, kind, currency) for users (``available``, ``held``), one per
  (kind, currency) for the platform's system accounts (``revenue``, ``promotions``,
  ``external_payments``, ``market_payouts``, ``exchange``). User accounts carry a cached
  ``balance`` (CHECK ≥ 0) kept equal to the sum of their postings in the same transaction;
  system accounts have ``balance`` NULL: their balance is derived from postings, so no hot row
  serialises every charge.
* ``JournalEntry`` + ``Posting``: append-only; an entry's postings sum to zero per currency.
  ``JournalEntry.key`` is unique (the idempotency key of internal charges).
* ``Operation``: the business fact (seed kinds: training, inference, …) with its counts and the
  amounts, pointing at the entry that moved the money.
* ``Hold``: a two-phase reservation (open → settled | released, at most once).

History rows (operations, entries, postings, audit) reference users and models by plain UUID
columns, not foreign keys: deleting a model or user must never rewrite or cascade into history
(seed defect: ``SET_NULL``/``CASCADE`` on ledger rows). Accounts do reference their owner with
``ON DELETE RESTRICT``: a user holding money cannot silently disappear.
"""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from flplatform.orm.base import Base, IDMixin, str_enum, utcnow

MINOR_PER_UNIT = 10**8
"""Every amount is an integer number of 10⁻⁸ units of its currency."""


class Currency(enum.StrEnum):
    USD = "USD"
    TOKEN = "TOKEN"  # the platform token (seed: IXIOO / EAML) for premium features
    COUPON = "COUPON"  # promotional credit, spent before USD where an operation allows it


class AccountKind(enum.StrEnum):
    AVAILABLE = "available"  # a user's spendable money
    HELD = "held"  # a user's money reserved by open holds (not spendable)
    REVENUE = "revenue"
    PROMOTIONS = "promotions"  # issues coupons; funds the USD side of coupon spending
    EXTERNAL_PAYMENTS = "external_payments"  # money entering from a payment provider / admin
    MARKET_PAYOUTS = "market_payouts"  # money leaving to model owners (withdrawals)
    EXCHANGE = "exchange"  # the other side of USD <-> TOKEN conversions


USER_ACCOUNT_KINDS = frozenset({AccountKind.AVAILABLE, AccountKind.HELD})
SYSTEM_ACCOUNT_KINDS = frozenset(set(AccountKind) - USER_ACCOUNT_KINDS)


class OperationKind(enum.StrEnum):
    """Seed 004's nine ``is_*_operation`` booleans as one enum, plus the ledger's own kinds."""

    TRAINING = "training"
    INFERENCE = "inference"  # seed: solving
    INFERENCE_API = "inference_api"  # seed: solving with API
    INFERENCE_MARKET = "inference_market"  # seed: solving a public model of another owner
    MODEL_COPY = "model_copy"
    MODEL_COPY_UPDATE = "model_copy_update"
    TOP_UP = "top_up"  # seed: credit from user
    PAY_BILL = "pay_bill"
    COUPON_REDEMPTION = "coupon_redemption"
    CONVERSION = "conversion"
    REFUND = "refund"
    PAYOUT = "payout"


class HoldStatus(enum.StrEnum):
    OPEN = "open"
    SETTLED = "settled"
    RELEASED = "released"


class BillStatus(enum.StrEnum):
    OPEN = "open"
    PAID = "paid"
    #: A monthly bill of usage the organisation already paid from its balance as it went (the
    #: operations it lists): an invoice with nothing left to pay.
    SETTLED = "settled"


_SYSTEM_KINDS_SQL = ", ".join(f"'{k.value}'" for k in sorted(SYSTEM_ACCOUNT_KINDS))


class LedgerAccount(IDMixin, Base):
    __tablename__ = "ledger_accounts"
    __table_args__ = (
        # User accounts have an owner and a cached non-negative balance; system accounts neither.
        # Holder accounts belong to exactly one user or one organisation.
        CheckConstraint(
            f"(kind IN ({_SYSTEM_KINDS_SQL}) AND owner_id IS NULL AND organization_id IS NULL "
            f"AND balance IS NULL) OR (kind NOT IN ({_SYSTEM_KINDS_SQL}) AND "
            "((owner_id IS NOT NULL AND organization_id IS NULL) OR "
            "(owner_id IS NULL AND organization_id IS NOT NULL)) AND balance IS NOT NULL AND balance >= 0)",
            name="holder_and_balance",
        ),
        UniqueConstraint("owner_id", "kind", "currency"),
        UniqueConstraint("organization_id", "kind", "currency"),
    )

    # "user:<uuid>:available:USD" or "system:revenue:USD": one arbitrated unique key for
    # INSERT … ON CONFLICT DO NOTHING (NULL owners would not collide in a composite key).
    key: Mapped[str] = mapped_column(String(120), unique=True)
    kind: Mapped[AccountKind] = mapped_column(str_enum(AccountKind, "account_kind"))
    currency: Mapped[Currency] = mapped_column(str_enum(Currency, "currency"))
    owner_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="RESTRICT"), index=True
    )
    # An organisation's own money (``org:<uuid>:available:USD``): members spend from it.
    organization_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("collections.id", ondelete="RESTRICT"), index=True
    )
    balance: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class JournalEntry(IDMixin, Base):
    """One balanced movement of money. Never updated or deleted; corrections are new entries."""

    __tablename__ = "ledger_entries"

    key: Mapped[str] = mapped_column(String(255), unique=True)
    kind: Mapped[str] = mapped_column(String(40), index=True)
    description: Mapped[str] = mapped_column(String(500), default="")
    actor_id: Mapped[uuid.UUID | None] = mapped_column(index=True)
    # What the entry was asked to do, to tell a replay from a different request with a reused key.
    fingerprint: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)


class Posting(IDMixin, Base):
    __tablename__ = "ledger_postings"
    __table_args__ = (CheckConstraint("amount <> 0", name="nonzero"),)

    entry_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("ledger_entries.id", ondelete="RESTRICT"), index=True
    )
    account_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("ledger_accounts.id", ondelete="RESTRICT"), index=True
    )
    currency: Mapped[Currency] = mapped_column(str_enum(Currency, "currency"))
    amount: Mapped[int] = mapped_column(BigInteger)  # signed: + increases the account's balance
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Operation(IDMixin, Base):
    """A billed business fact (seed ``Operation``) and what it cost, linked to its entry."""

    __tablename__ = "billing_operations"
    __table_args__ = (
        Index("ix_billing_operations_payer_id_created_at", "payer_id", "created_at"),
        Index("ix_billing_operations_model_id_kind", "model_id", "kind"),
        Index("ix_billing_operations_org_payer_created", "organization_id", "payer_id", "created_at"),
    )

    key: Mapped[str] = mapped_column(String(255), unique=True)
    kind: Mapped[OperationKind] = mapped_column(str_enum(OperationKind, "operation_kind"))
    entry_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("ledger_entries.id", ondelete="RESTRICT"), index=True
    )
    actor_id: Mapped[uuid.UUID | None]  # who asked for it (seed: operation_user)
    payer_id: Mapped[uuid.UUID | None]  # whose money moved (the credited user for top-ups)
    # The organisation whose account paid (or was credited): payer_id is then the member who
    # spent. None for personal money.
    organization_id: Mapped[uuid.UUID | None]
    # The organisation credited with the owner's share of a market sale or copy.
    model_organization_id: Mapped[uuid.UUID | None] = mapped_column(index=True)
    model_id: Mapped[uuid.UUID | None]  # seed: machine
    model_owner_id: Mapped[uuid.UUID | None]  # seed: machine_owner
    training_id: Mapped[uuid.UUID | None] = mapped_column(index=True)
    round: Mapped[int | None] = mapped_column(Integer)
    count_of_lines: Mapped[int | None] = mapped_column(Integer)  # samples trained on / inferred
    count_of_training_epoch: Mapped[int | None] = mapped_column(Integer)
    currency: Mapped[Currency] = mapped_column(str_enum(Currency, "currency"))
    # Total value moved for the payer (coupons included), and the model owner's share (market).
    amount: Mapped[int] = mapped_column(BigInteger)
    owner_income: Mapped[int] = mapped_column(BigInteger, default=0)
    # NO ACTION rather than RESTRICT: SQLite checks RESTRICT row by row, even within one statement.
    refunds_operation_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("billing_operations.id"), unique=True
    )
    description: Mapped[str] = mapped_column(String(500), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)


class Hold(IDMixin, Base):
    """Funds reserved for a long job (a training round): resolves once, to settled or released."""

    __tablename__ = "ledger_holds"

    key: Mapped[str] = mapped_column(String(255), unique=True)
    owner_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"), index=True)
    # Set when the organisation's accounts hold the money (owner_id is then the member).
    organization_id: Mapped[uuid.UUID | None] = mapped_column(index=True)
    currency: Mapped[Currency] = mapped_column(str_enum(Currency, "currency"))
    amount: Mapped[int] = mapped_column(BigInteger)  # reserved from ``currency``
    coupon_amount: Mapped[int] = mapped_column(BigInteger, default=0)  # reserved from coupons
    status: Mapped[HoldStatus] = mapped_column(str_enum(HoldStatus, "hold_status"), default=HoldStatus.OPEN)
    entry_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("ledger_entries.id", ondelete="RESTRICT"))
    resolution_entry_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("ledger_entries.id", ondelete="RESTRICT")
    )
    training_id: Mapped[uuid.UUID | None] = mapped_column(index=True)
    round: Mapped[int | None] = mapped_column(Integer)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    resolved_at: Mapped[dt.datetime | None]


class IdempotencyKey(IDMixin, Base):
    """Stripe-style ``Idempotency-Key``: the first response is stored and replayed."""

    __tablename__ = "billing_idempotency_keys"
    __table_args__ = (UniqueConstraint("user_id", "key"),)

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(255))
    fingerprint: Mapped[str] = mapped_column(String(64))  # sha256 of method, path and body
    status_code: Mapped[int | None] = mapped_column(Integer)
    response: Mapped[Any | None] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Price(Base):
    """Admin-editable price list; items missing here fall back to the code defaults."""

    __tablename__ = "billing_prices"

    item: Mapped[str] = mapped_column(String(64), primary_key=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    # NULL for dimensionless parameters (a fee in basis points, a conversion rate).
    currency: Mapped[Currency | None] = mapped_column(str_enum(Currency, "currency"))
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    updated_by_id: Mapped[uuid.UUID | None]


class ModelPricing(Base):
    """Seed ``machine_api_solving_is_public`` / ``…_price_usd``: other users may run inference on a
    public model and pay its owner this price per sample (minus the platform fee)."""

    __tablename__ = "billing_model_pricing"

    model_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    inference_public: Mapped[bool] = mapped_column(Boolean, default=False)
    inference_price_per_sample: Mapped[int] = mapped_column(BigInteger, default=0)
    # Copies (``POST /api/models/{id}/copy/``) by other organisations, at this USD price.
    copy_allowed: Mapped[bool] = mapped_column(Boolean, default=False)
    copy_price: Mapped[int] = mapped_column(BigInteger, default=0)
    published_at: Mapped[dt.datetime | None]
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    __table_args__ = (
        CheckConstraint("inference_price_per_sample >= 0", name="price_nonnegative"),
        CheckConstraint("copy_price >= 0", name="copy_price_nonnegative"),
    )


class SpendingLimit(Base):
    """An organisation admin's monthly cap on what one member may spend from the organisation's
    ``currency`` account (settled charges and open holds of the UTC calendar month, net of
    refunds). No row: no cap."""

    __tablename__ = "billing_spending_limits"
    __table_args__ = (CheckConstraint("amount >= 0", name="amount_nonnegative"),)

    organization_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("collections.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    currency: Mapped[Currency] = mapped_column(str_enum(Currency, "currency"), primary_key=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    updated_by_id: Mapped[uuid.UUID | None]
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class ModelCopy(Base):
    """A global model made by copying another one's round (the same blobs, no byte copied):
    where it came from and which round it holds now (``model_copy_update`` moves it on)."""

    __tablename__ = "model_copies"

    model_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    source_model_id: Mapped[uuid.UUID] = mapped_column(index=True)  # history: no foreign key
    source_round: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Coupon(IDMixin, Base):
    __tablename__ = "billing_coupons"
    __table_args__ = (
        CheckConstraint("amount > 0", name="amount_positive"),
        CheckConstraint("redemptions >= 0 AND redemptions <= max_redemptions", name="redemptions_bounded"),
    )

    code: Mapped[str] = mapped_column(String(64), unique=True)
    amount: Mapped[int] = mapped_column(BigInteger)  # COUPON minor units per redemption
    max_redemptions: Mapped[int] = mapped_column(Integer, default=1)
    redemptions: Mapped[int] = mapped_column(Integer, default=0)
    expires_at: Mapped[dt.datetime | None]
    created_by_id: Mapped[uuid.UUID | None]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class CouponRedemption(IDMixin, Base):
    __tablename__ = "billing_coupon_redemptions"
    __table_args__ = (UniqueConstraint("coupon_id", "user_id"),)

    coupon_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("billing_coupons.id", ondelete="RESTRICT"))
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"), index=True)
    operation_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("billing_operations.id", ondelete="RESTRICT"))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Bill(IDMixin, Base):
    """An amount an administrator asks a user to pay ("pay a bill" in seed 004)."""

    __tablename__ = "billing_bills"
    __table_args__ = (
        CheckConstraint("amount > 0", name="amount_positive"),
        CheckConstraint("(status = 'paid') = (operation_id IS NOT NULL)", name="paid_has_operation"),
        CheckConstraint("(user_id IS NULL) <> (organization_id IS NULL)", name="one_addressee"),
        # One automatic monthly bill per organisation and period: the month-end job may run again.
        Index(
            "uq_billing_bills_monthly",
            "organization_id",
            "period",
            unique=True,
            sqlite_where=text("monthly"),
            postgresql_where=text("monthly"),
        ),
    )

    # Addressed to a user, or to an organisation (paid from its account by its admins).
    user_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"), index=True)
    organization_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("collections.id", ondelete="RESTRICT"), index=True
    )
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[Currency] = mapped_column(str_enum(Currency, "currency"), default=Currency.USD)
    description: Mapped[str] = mapped_column(String(500), default="")
    period: Mapped[str | None] = mapped_column(String(7))  # "YYYY-MM" when it bills a statement
    status: Mapped[BillStatus] = mapped_column(str_enum(BillStatus, "bill_status"), default=BillStatus.OPEN)
    operation_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("billing_operations.id", ondelete="RESTRICT")
    )
    created_by_id: Mapped[uuid.UUID | None]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    paid_at: Mapped[dt.datetime | None]
    #: An open bill past this stops the addressee's new paid work (402 ``bill_overdue``); None: no
    #: due date (bills issued before due dates existed, settled monthly bills).
    due_at: Mapped[dt.datetime | None]
    #: Issued by the month-end job (``billing.monthly_bills``), not by an administrator.
    monthly: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    #: The invoice lines (member × kind × currency: user_id, kind, count, amount, currency).
    lines: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
