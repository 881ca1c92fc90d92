"""Billing: a double-entry, multi-currency ledger (USD, TOKEN, COUPON), metering, audit log.

Money is integer 10⁻⁸ units everywhere (``billing.money.to_minor`` / ``to_decimal``). Every
movement is one balanced journal entry (``ledger.post_entry``), at most once per key, refused
with HTTP 402 and nothing written when a user balance would go negative. Services flush, never
commit: the caller's transaction (the request) commits or rolls back everything together.

Functions other domains call (all ``async``, first argument the request's ``AsyncSession``):

Who pays: a member of an organisation spends from the organisation's accounts (``ledger.payer_of``)
within the monthly limit its admins set (``limits``); a user outside organisations from their own.

Training lifecycle (the training's ``actor`` pays; keys ``training:{id}:round:{n}``)
    ``reserve_round(session, training, round_number, participants) -> Hold | None``
        Call when a round starts, BEFORE notifying participants. Raises ``PaymentRequired`` (402)
        when the actor cannot afford the round: let it propagate so the round does not start.
        Priced at ``training_update`` + ``training_sample_epoch`` × ``training_reserve_samples``
        per participant. None when the price list makes it free.
    ``settle_round(session, training, round_number, updates) -> Operation | None``
        Call after the round's aggregation succeeded, with ``updates = [(participant, sample_size)]``.
        Charges at most the reserved amount (coupons first) and releases the rest. Idempotent.
    ``release_round(session, training, round_number, reason="") -> bool``
        Call on error, cancellation or timeout of a round. Idempotent; False if nothing was held.

    Wired: ``flplatform.jobs.install()`` adds ``hooks.round_started`` / ``hooks.round_aggregated``
    to ``trainings.hooks.ROUND_STARTED`` / ``ROUND_AGGREGATED``; ``billing.hooks.billing_component``
    (a lifespan component) releases holds of ended trainings.

Inference
    ``charge_inference(session, caller, model, samples, *, key=None) -> Operation | None``
        Call BEFORE running the model; a 402 must stop the inference. On another organisation's
        published model (``billing_model_pricing``) the caller pays price × samples and the seller
        gets it minus ``market_fee_bps`` in the same entry (``inference_api``); otherwise the price
        list's inference prices.

Generic
    ``charge(session, payer_id=…, amount=…, kind=…, key=…)``, ``top_up(...)``, ``reserve(...)`` /
    ``settle(...)`` / ``release(...)``, ``refund(...)``, ``convert_to_tokens(...)``,
    ``redeem_coupon(...)``, ``pay_bill(...)``, ``ledger.reconcile(session)``.

Modules: ``operations`` (the operation behind each entry; charges, top-ups, payouts, conversions,
refunds), ``holds``, ``rounds`` (training rounds), ``market`` (inference, model copies, market
pricing), ``coupons``, ``bills``, ``reports`` (balances, statements, per-model reports, history),
``organizations`` (funding an organisation, members' spending), ``limits`` (spending limits),
``ledger`` (accounts, entries, reconciliation), ``monthly`` (month-end bills, the overdue rule),
``prices``, ``audit``, ``idempotency``.

Audit
    ``audit.record(session, action, message, actor=…, request=…, organisation_id=…)`` appends to
    the audit log in the caller's transaction; ``audit.record_detached(sessionmaker, …)`` commits on
    its own (for failures whose request rolls back, e.g. failed logins).

Workers
    ``works.register_server``, ``works.create_work``, ``works.start_work``, ``works.finish_work``.
"""

from flplatform import audit
from flplatform.billing.bills import create_bill, get_bill, list_bills, pay_bill
from flplatform.billing.coupons import create_coupon, list_coupons, redeem_coupon
from flplatform.billing.holds import hold_by_key, release, reserve, settle
from flplatform.billing.ledger import InsufficientFunds, reconcile
from flplatform.billing.market import (
    charge_inference,
    charge_model_copy,
    is_public_for_inference,
    model_pricing,
    set_model_pricing,
)
from flplatform.billing.monthly import BillOverdue, issue_monthly_bills
from flplatform.billing.operations import (
    charge,
    convert_to_tokens,
    get_operation,
    operation_by_key,
    payout,
    refund,
    top_up,
)
from flplatform.billing.reports import available, balances, list_operations, model_report, statement
from flplatform.billing.rounds import release_round, reserve_round, round_key, settle_round

__all__ = [
    "BillOverdue",
    "InsufficientFunds",
    "audit",
    "available",
    "balances",
    "charge",
    "charge_inference",
    "charge_model_copy",
    "convert_to_tokens",
    "create_bill",
    "create_coupon",
    "get_bill",
    "get_operation",
    "hold_by_key",
    "is_public_for_inference",
    "issue_monthly_bills",
    "list_bills",
    "list_coupons",
    "list_operations",
    "model_pricing",
    "model_report",
    "operation_by_key",
    "pay_bill",
    "payout",
    "reconcile",
    "redeem_coupon",
    "refund",
    "release",
    "release_round",
    "reserve",
    "reserve_round",
    "round_key",
    "set_model_pricing",
    "settle",
    "settle_round",
    "statement",
    "top_up",
]
