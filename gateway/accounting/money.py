"""Money as integer nano-USD (see :mod:`gateway.accounting`)."""

from __future__ import annotations

NANO_PER_USD = 1_000_000_000


def to_nano(usd: float) -> int:
    """USD (as configured or asked for) to nano-USD, rounded to the nearest."""
    return round(usd * NANO_PER_USD)


def to_usd(nano: int) -> float:
    return nano / NANO_PER_USD
