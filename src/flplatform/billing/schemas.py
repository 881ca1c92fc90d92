"""Billing request/response schemas. Amounts are decimal strings with at most 8 decimal places
(stored as integer 10⁻⁸ units); never floats."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, PlainSerializer

from flplatform.billing.money import to_decimal
from flplatform.kit.schemas import PERIOD_PATTERN, RequestSchema, SafeDateTime, Schema
from flplatform.orm.audit import AuditLevel
from flplatform.orm.billing import BillStatus, Currency, HoldStatus, OperationKind


def _minor_to_decimal(value: Any) -> Any:
    return to_decimal(value) if isinstance(value, int) and not isinstance(value, bool) else value


_as_string = PlainSerializer(lambda d: format(d, "f"), return_type=str, when_used="json")

Money = Annotated[Decimal, BeforeValidator(_minor_to_decimal), _as_string]
"""A response amount: stored minor units shown as a decimal string, e.g. ``"12.50000000"``."""

MoneyIn = Annotated[
    Decimal,
    Field(gt=0, max_digits=18, decimal_places=8, examples=["25.00"]),
    _as_string,
]
"""A positive request amount with at most 8 decimal places and 18 digits (a JSON string or
number): below 10¹⁰ units, so its 10⁻⁸ minor units fit the ledger's 64-bit columns."""

PriceIn = Annotated[Decimal, Field(ge=0, max_digits=18, decimal_places=8, examples=["0.05"])]


class BalanceLine(Schema):
    currency: Currency
    available: Money
    held: Money


class BalanceRead(Schema):
    user_id: uuid.UUID
    balances: list[BalanceLine]

    model_config = {
        "json_schema_extra": {
            "examples": [
                {
                    "user_id": "0b7c0c5e-3f0a-4c1e-9a59-0c7f0d1e2a3b",
                    "balances": [
                        {"currency": "USD", "available": "12.50000000", "held": "2.00000000"},
                        {"currency": "TOKEN", "available": "0.00000000", "held": "0.00000000"},
                        {"currency": "COUPON", "available": "5.00000000", "held": "0.00000000"},
                    ],
                }
            ]
        }
    }


class PostingRead(Schema):
    account: str
    amount: Money


class OperationRead(Schema):
    id: uuid.UUID
    key: str
    kind: OperationKind
    created_at: dt.datetime
    currency: Currency
    amount: Money = Field(description="Value paid by the payer (coupons included) or credited by a top-up.")
    owner_income: Money = Field(description="The model owner's share (public-model inference).")
    payer_id: uuid.UUID | None = Field(
        description="Whose money moved; with `organization_id`, the member who spent it."
    )
    organization_id: uuid.UUID | None = Field(
        default=None, description="The organisation whose account paid or was credited."
    )
    model_organization_id: uuid.UUID | None = Field(
        default=None, description="The organisation credited with `owner_income` (a market sale or copy)."
    )
    actor_id: uuid.UUID | None
    model_id: uuid.UUID | None
    model_owner_id: uuid.UUID | None
    training_id: uuid.UUID | None
    round: int | None
    count_of_lines: int | None
    count_of_training_epoch: int | None
    refunds_operation_id: uuid.UUID | None
    entry_id: uuid.UUID
    description: str


class OperationDetail(OperationRead):
    postings: list[PostingRead]


class TopUpCreate(RequestSchema):
    user_id: uuid.UUID | None = None
    organization_id: uuid.UUID | None = Field(
        default=None, description="Credit an organisation instead of a user."
    )
    amount: MoneyIn
    currency: Literal[Currency.USD, Currency.TOKEN] = Currency.USD
    description: str = Field(default="", max_length=500)

    model_config = {
        "json_schema_extra": {
            "examples": [{"user_id": "0b7c0c5e-3f0a-4c1e-9a59-0c7f0d1e2a3b", "amount": "25.00"}]
        }
    }


class PaymentEvent(RequestSchema):
    """A payment provider's notification; ``external_id`` makes re-deliveries harmless."""

    external_id: str = Field(min_length=1, max_length=200, examples=["pi_3Nq…"])
    user_id: uuid.UUID | None = None
    organization_id: uuid.UUID | None = Field(default=None, description="Money paid for an organisation.")
    amount: MoneyIn
    currency: Literal[Currency.USD, Currency.TOKEN] = Currency.USD


class PayoutCreate(RequestSchema):
    user_id: uuid.UUID
    amount: MoneyIn


class ConversionCreate(RequestSchema):
    usd_amount: MoneyIn = Field(description="USD to convert into tokens at the price list's `token_per_usd`.")


class CouponCreate(RequestSchema):
    code: str = Field(min_length=3, max_length=64, pattern=r"^[A-Za-z0-9_-]+$", examples=["WELCOME10"])
    amount: MoneyIn
    max_redemptions: int = Field(default=1, ge=1, le=1_000_000)
    expires_at: SafeDateTime | None = None


class CouponRead(Schema):
    id: uuid.UUID
    code: str
    amount: Money
    max_redemptions: int
    redemptions: int
    expires_at: dt.datetime | None
    created_at: dt.datetime


class CouponRedeem(RequestSchema):
    code: str = Field(min_length=1, max_length=64, examples=["WELCOME10"])


class RefundCreate(RequestSchema):
    reason: str = Field(default="", max_length=500)


class ModelReport(Schema):
    model_id: uuid.UUID
    training_cost: Money
    inference_cost: Money
    api_income: Money
    training_operations: int
    inference_operations: int
    samples_inferred: int


class ModelPricingRead(Schema):
    model_id: uuid.UUID
    inference_public: bool
    inference_price_per_sample: Money
    copy_allowed: bool = False
    copy_price: Money = Decimal(0)
    published_at: dt.datetime | None = None


class ModelPricingUpdate(RequestSchema):
    inference_public: bool
    inference_price_per_sample: PriceIn
    copy_allowed: bool | None = Field(
        default=None, description="Whether other organisations may copy the model (omitted: unchanged)."
    )
    copy_price: PriceIn | None = Field(
        default=None, description="USD per copy or update of a copy (omitted: unchanged)."
    )


class StatementCurrency(Schema):
    currency: Currency
    opening: Money
    closing: Money
    money_in: Money
    money_out: Money


class StatementOperations(Schema):
    kind: OperationKind
    count: int
    amount: Money
    currency: Currency


class InvoiceLine(Schema):
    user_id: uuid.UUID | None
    kind: OperationKind
    count: int
    amount: str = Field(description="Decimal string; refunds are negative.")
    currency: Currency


class BillRead(Schema):
    id: uuid.UUID
    user_id: uuid.UUID | None
    organization_id: uuid.UUID | None = None
    amount: Money
    currency: Currency
    description: str
    period: str | None
    status: BillStatus
    operation_id: uuid.UUID | None
    created_at: dt.datetime
    paid_at: dt.datetime | None
    due_at: dt.datetime | None = Field(
        default=None, description="An open bill past this stops new paid work (402 `bill_overdue`)."
    )
    monthly: bool = Field(default=False, description="Issued by the month-end job.")
    lines: list[InvoiceLine] | None = Field(
        default=None, description="A monthly bill's invoice lines (member × kind × currency)."
    )


class BillCreate(RequestSchema):
    user_id: uuid.UUID | None = None
    organization_id: uuid.UUID | None = Field(
        default=None, description="Bill an organisation instead of a user."
    )
    amount: MoneyIn
    description: str = Field(default="", max_length=500)
    period: str | None = Field(default=None, pattern=PERIOD_PATTERN, examples=["2026-11"])
    due_at: SafeDateTime | None = Field(default=None, description="Default: `FLP_BILL_DUE_DAYS` after issue.")


class StatementRead(Schema):
    user_id: uuid.UUID
    period: str
    start: dt.datetime
    end: dt.datetime
    currencies: list[StatementCurrency]
    operations: list[StatementOperations]
    bills: list[BillRead]


class MemberSpendingLine(Schema):
    user_id: uuid.UUID | None
    kind: OperationKind
    count: int
    amount: Money
    currency: Currency


class EarningsLine(Schema):
    model_id: uuid.UUID | None
    currency: Currency
    sales: int = Field(description="Paid inference requests and copies, net of refunds.")
    gross: Money = Field(description="What buyers paid.")
    earnings: Money = Field(description="The seller's share (gross minus the platform fee).")


class OrganizationStatementRead(Schema):
    organization_id: uuid.UUID
    period: str
    start: dt.datetime
    end: dt.datetime
    currencies: list[StatementCurrency]
    operations: list[StatementOperations]
    members: list[MemberSpendingLine] = Field(description="What each member spent, per operation kind.")
    earnings: list[EarningsLine] = Field(description="What the organisation's models earned on the market.")
    bills: list[BillRead]


class OrganizationBalanceRead(Schema):
    organization_id: uuid.UUID
    balances: list[BalanceLine]


class OrganizationTopUp(RequestSchema):
    amount: MoneyIn
    currency: Literal[Currency.USD, Currency.TOKEN] = Currency.USD
    description: str = Field(default="", max_length=500)


class SpendingLimitRead(Schema):
    organization_id: uuid.UUID
    user_id: uuid.UUID
    currency: Currency
    amount: Money = Field(
        description="The most the member may spend of the organisation's money per UTC month."
    )
    updated_at: dt.datetime


class SpendingLimitUpdate(RequestSchema):
    currency: Literal[Currency.USD, Currency.TOKEN] = Currency.USD
    amount: PriceIn | None = Field(description="The monthly cap; null removes it (no cap).")


class SpendingRead(Schema):
    currency: Currency
    spent: Money = Field(description="This UTC month: charges net of refunds, plus open holds.")
    limit: Money | None
    remaining: Money | None


class MemberSpendingRead(Schema):
    organization_id: uuid.UUID
    user_id: uuid.UUID
    since: dt.datetime
    spending: list[SpendingRead]


class PriceRead(Schema):
    item: str
    amount: Annotated[Decimal, _as_string] = Field(
        description="Money in `currency`, or a plain number when `currency` is null."
    )
    currency: Currency | None
    description: str


class PriceUpdate(RequestSchema):
    amount: PriceIn


class ReconciliationRead(Schema):
    ok: bool
    accounts_checked: int
    entries_checked: int
    totals_by_currency: dict[str, int]
    mismatched_accounts: list[dict[str, Any]]
    unbalanced_entries: list[dict[str, Any]]
    open_hold_mismatches: list[dict[str, Any]]


class HoldRead(Schema):
    id: uuid.UUID
    key: str
    owner_id: uuid.UUID
    currency: Currency
    amount: Money
    coupon_amount: Money
    status: HoldStatus
    training_id: uuid.UUID | None
    round: int | None
    created_at: dt.datetime
    resolved_at: dt.datetime | None


class AuditRead(Schema):
    id: uuid.UUID
    timestamp: dt.datetime
    level: AuditLevel
    action: str
    module: str
    function: str
    message: str
    host: str
    ip: str | None
    actor_id: uuid.UUID | None
    subject_user_id: uuid.UUID | None
    organisation_id: uuid.UUID | None
    count: int = Field(
        default=1,
        description="Occurrences the row stands for (failed logins: one row per "
        "login name, client address and throttling window)",
    )
