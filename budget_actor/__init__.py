"""The budget: per-tenant ledgers, reservations, runaway breaker, kill-switch, prices."""

from budget_actor._actor import BudgetActor
from budget_actor._api import (
    REQUEST_ADAPTER,
    BudgetReport,
    BudgetRequest,
    KillRequest,
    ResetRequest,
    ResumeRunRequest,
    SetLimitsRequest,
    ShowRequest,
    WindowReport,
)
from budget_actor._breaker import BreakerState, Trip
from budget_actor._events import CostEvent, CostEvents, TripEvent
from budget_actor._ledger import Ledger
from budget_actor._limits import DEFAULT_LIMITS, BreakerPolicy, Limits
from budget_actor._notices import (
    KillNotice,
    KillNotices,
    ResetNotice,
    kill_notices,
    parse_kill_message,
)
from budget_actor._prices import (
    BUILTIN_PRICES,
    NANOS_PER_USD,
    PRICES,
    ModelPrice,
    PriceTable,
)
from budget_actor._reservation import Reservation, Settlement
from budget_actor._usage import Usage

__all__ = [
    "BUILTIN_PRICES",
    "DEFAULT_LIMITS",
    "NANOS_PER_USD",
    "PRICES",
    "REQUEST_ADAPTER",
    "BreakerPolicy",
    "BreakerState",
    "BudgetActor",
    "BudgetReport",
    "BudgetRequest",
    "CostEvent",
    "CostEvents",
    "KillNotice",
    "KillNotices",
    "KillRequest",
    "Ledger",
    "Limits",
    "ModelPrice",
    "PriceTable",
    "Reservation",
    "ResetNotice",
    "ResetRequest",
    "ResumeRunRequest",
    "SetLimitsRequest",
    "Settlement",
    "ShowRequest",
    "Trip",
    "TripEvent",
    "Usage",
    "WindowReport",
    "kill_notices",
    "parse_kill_message",
]
