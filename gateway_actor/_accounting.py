"""Cost events: one per LLM call on ``nerve.events.cost``, for dashboards and audits.

The ledger (budget actor) is the source of truth for spending; these events say where the
money went: which run, tenant, model and upstream, tokens by kind, how much of the input
came from the prompt cache, and what broke the cached prefix when something did.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, Field

from budget_actor import Usage


class CostEvent(BaseModel):
    """What one LLM call cost. ``cache_hit_ratio`` = cache-read tokens / all input tokens."""

    type: Literal["llm_cost"] = "llm_cost"
    run_id: str
    tenant: str
    index: int | None = None
    key: str | None = None
    model: str
    pool: str = ""
    upstream: str | None = None
    ok: bool = True
    error: str | None = None
    usage: Usage
    tokens: dict[str, int] = Field(default_factory=dict)
    cache_hit_ratio: float = 0.0
    cost_usd: float | None = None
    price_version: str | None = None
    attempts: int = 1
    breakpoints: int = 0
    ttft_ms: float | None = None
    latency_ms: float | None = None
    prefix_break: dict[str, Any] | None = None
    at: float = Field(default_factory=time.time)

    @classmethod
    def of(cls, usage: Usage, **fields: Any) -> CostEvent:
        total = usage.total_input_tokens
        return cls(usage=usage, tokens={
            "input": usage.input_tokens, "output": usage.output_tokens,
            "cache_read": usage.cache_read_input_tokens,
            "cache_write_5m": usage.cache_creation_5m_input_tokens,
            "cache_write_1h": usage.cache_creation_1h_input_tokens,
        }, cache_hit_ratio=(usage.cache_read_input_tokens / total) if total else 0.0, **fields)
