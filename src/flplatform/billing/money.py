"""Exact money: amounts are integers of 10⁻⁸ units; the API speaks decimal strings."""

from __future__ import annotations

from decimal import Decimal

from flplatform.orm.billing import MINOR_PER_UNIT

SCALE = 8
_QUANTUM = Decimal(1).scaleb(-SCALE)


def to_minor(value: Decimal | int | str) -> int:
    """``Decimal("1.5")`` → 150000000. More than 8 decimal places is an error, never rounded."""
    amount = Decimal(value)
    if not amount.is_finite():
        raise ValueError("amount must be a finite number")
    minor = amount * MINOR_PER_UNIT
    if minor != minor.to_integral_value():
        raise ValueError(f"amount has more than {SCALE} decimal places")
    return int(minor)


def to_decimal(minor: int) -> Decimal:
    return (Decimal(minor) / MINOR_PER_UNIT).quantize(_QUANTUM)


def basis_points(amount: int, bps: int) -> int:
    """``amount × bps / 10 000``, rounded down (the platform never takes more than its fee)."""
    return amount * bps // 10_000
