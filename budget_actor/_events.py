"""Budget events on ``NERVE_EVENTS``: what each call cost, and every breaker trip.

* :class:`CostEvents` on ``nerve.events.budget.cost.<tenant>``: ``Ledger.settle`` records a
  :class:`CostEvent` for every charge and publishes them in batches, so whoever settles
  through a ledger feeds the breaker with nothing more.
* :class:`TripEvent` on ``nerve.events.budget.trip``: a runaway-breaker trip, with the
  evidence that made it (the window and what was in it, or the repeated step and where).
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, Field

from actors import new_id
from budget_actor._usage import Usage

Detector = Literal["tenant_burn_rate", "run_burn_rate", "tenant_call_rate", "run_call_rate",
                   "repeated_tool_call", "repeated_llm_call"]
TripAction = Literal["kill_tenant", "pause_tenant", "cancel_run", "pause_run"]


class CostEvent(BaseModel):
    """One charge to a tenant's ledger."""

    tenant: str
    run_id: str | None = None
    model: str = ""
    reservation_id: str = ""
    cost_nanos: int
    tokens: int = 0
    usage: Usage = Field(default_factory=Usage)
    status: Literal["settled", "late", "unreserved"] = "settled"
    at: float = Field(default_factory=time.time)

    @property
    def cost_usd(self) -> float:
        return self.cost_nanos / 1e9


class CostEvents(BaseModel):
    """Charges to one tenant, published together: a ledger sends one message per tenant per
    event-loop turn (all the settles of one group commit) rather than one per call, so cost
    events cost the events stream one write per batch, not one per call."""

    tenant: str
    events: list[CostEvent]


class TripEvent(BaseModel):
    """The runaway breaker tripped. ``evidence`` holds what it saw."""

    trip_id: str = Field(default_factory=lambda: new_id("trip-"))
    tenant: str
    run_id: str | None = None
    detector: Detector
    action: TripAction
    reason: str
    evidence: dict[str, Any] = Field(default_factory=dict)
    at: float = Field(default_factory=time.time)
