"""What the ledger hands back: a :class:`Reservation` before a call, a :class:`Settlement`
after it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class Reservation(BaseModel):
    """Budget held for one call's worst case until it is settled, released or expires.

    ``guarded`` is False only for a reservation admitted while the ledger was unreachable
    with fail-open configured: nothing was held, and settling it charges the ledger then.
    """

    model_config = ConfigDict(frozen=True)

    id: str
    tenant: str
    run_id: str | None = None
    model: str
    amount_nanos: int
    tokens: int
    expires_at: float
    key: str | None = None
    guarded: bool = True
    reused: bool = False  # an open reservation with the same key was returned

    @property
    def amount_usd(self) -> float:
        return self.amount_nanos / 1e9


class Settlement(BaseModel):
    """The outcome of settling a reservation with what the call really used.

    ``status``: ``settled`` (charged, the rest released), ``late`` (the reservation had
    expired; charged anyway), ``duplicate`` (already settled or released: nothing charged
    now), ``unreserved`` (a fail-open or foreign reservation: charged without one),
    ``unrecorded`` (fail-open and the ledger is still unreachable).
    """

    model_config = ConfigDict(frozen=True)

    reservation_id: str
    tenant: str
    cost_nanos: int
    tokens: int
    status: Literal["settled", "late", "duplicate", "unreserved", "unrecorded"]
    released_nanos: int = 0
    overrun_nanos: int = 0

    @property
    def cost_usd(self) -> float:
        return self.cost_nanos / 1e9

    @property
    def duplicate(self) -> bool:
        return self.status == "duplicate"

    @property
    def released_usd(self) -> float:
        return self.released_nanos / 1e9

    @property
    def overrun_usd(self) -> float:
        return self.overrun_nanos / 1e9
