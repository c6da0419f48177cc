"""The budget: per-tenant ledgers, reservations, runaway breaker, kill-switch, prices."""

from budget_actor._usage import Usage

__all__ = ["Usage"]
