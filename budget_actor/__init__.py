"""budget_actor (in progress)."""
