"""The seam between the gateway and the budget actor.

The gateway reserves the worst case of a call before it starts and settles the real usage
after it (or releases the reservation when nothing was consumed). It codes against these
protocols, which ``budget_actor.Ledger`` and ``budget_actor.PRICES`` satisfy, so the two
parts can be built, tested and deployed apart.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from budget_actor import Usage
from nerve import NerveError

log = logging.getLogger("nerve.gateway.budget")


class BudgetLedger(Protocol):
    """Per-tenant reservations (``budget_actor.Ledger``).

    ``reserve`` raises :class:`~nerve.BudgetExceeded`, :class:`~nerve.TenantKilled` or
    :class:`~nerve.LedgerUnavailable`; it is idempotent per ``key`` (the step's key), so a
    redelivered step does not reserve twice. Its result has an ``id``; ``settle``'s result a
    ``cost_usd``.
    """

    async def reserve(self, tenant: str, *, run_id: str, model: str, input_tokens: int,
                      max_output_tokens: int, key: str) -> Any: ...

    async def settle(self, reservation_id: str, *, tenant: str, model: str, usage: Usage,
                     run_id: str | None = None) -> Any: ...

    async def release(self, reservation_id: str, *, tenant: str) -> Any: ...


class PriceTable(Protocol):
    """A versioned price table (``budget_actor.PRICES``): USD for a call's usage."""

    def cost(self, model: str, usage: Usage) -> float: ...


def default_prices() -> PriceTable | None:
    """The budget actor's price table, when this deployment has it."""
    try:
        from budget_actor import PRICES  # type: ignore[attr-defined]
    except ImportError:
        return None
    return PRICES  # type: ignore[no-any-return]


def price_version(prices: PriceTable | None) -> str | None:
    version = getattr(prices, "version", None)
    return str(version) if version is not None else None


def cost_of(prices: PriceTable | None, model: str, usage: Usage) -> float | None:
    """``prices.cost`` or ``None`` when the table has no price for ``model``."""
    if prices is None:
        return None
    try:
        return float(prices.cost(model, usage))
    except (KeyError, LookupError, ValueError, NerveError) as exc:  # UnknownModel, say
        log.debug("no price for %s: %r", model, exc)
        return None
