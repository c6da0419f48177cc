"""The brain: the LLM gateway actor, its providers, cache planner and router.

The wire contract (:class:`LLMRequest`, :class:`LLMResponse` and their blocks) is imported at
once; everything else loads on first use, so a process that only speaks the contract (an
orchestrator, a client) does not pay for the provider SDKs (the ``anthropic`` package alone
takes over a second to import).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from gateway_actor._protocol import (
    ContentBlock,
    LLMRequest,
    LLMResponse,
    Message,
    TextBlock,
    ToolResultBlock,
    ToolSpec,
    ToolUseBlock,
    parse_request,
)

if TYPE_CHECKING:
    from gateway_actor._accounting import CostEvent
    from gateway_actor._actor import GatewayActor
    from gateway_actor._anthropic import AnthropicProvider
    from gateway_actor._budget import BudgetLedger, PriceTable
    from gateway_actor._config import GatewayConfig, PoolConfig, RetryPolicy, UpstreamSpec
    from gateway_actor._gateway import CallRecord, Gateway, TokenSink
    from gateway_actor._openai import OpenAIProvider
    from gateway_actor._planner import (
        CachePlanner,
        PlannedCall,
        PlannerConfig,
        PrefixBreak,
        PrefixTracker,
    )
    from gateway_actor._provider import Attempt, Provider
    from gateway_actor._router import BreakerConfig, CircuitBreaker, Router, Upstream
    from gateway_actor._script import (
        LONG_MARKER,
        LOOP_MARKER,
        REPEAT_MARKER,
        TOOL_READ,
        TOOL_RUN,
        TOOL_WRITE,
        script_reply,
    )
    from gateway_actor._scripted import ScriptedProvider
    from gateway_actor._stream import TokenStream
    from gateway_actor._upstream import Fault, LocalUpstream, UpstreamConfig

_LAZY: dict[str, str] = {
    "CostEvent": "_accounting",
    "GatewayActor": "_actor",
    "AnthropicProvider": "_anthropic",
    "BudgetLedger": "_budget", "PriceTable": "_budget",
    "GatewayConfig": "_config", "PoolConfig": "_config", "RetryPolicy": "_config",
    "UpstreamSpec": "_config",
    "CallRecord": "_gateway", "Gateway": "_gateway", "TokenSink": "_gateway",
    "OpenAIProvider": "_openai",
    "CachePlanner": "_planner", "PlannedCall": "_planner", "PlannerConfig": "_planner",
    "PrefixBreak": "_planner", "PrefixTracker": "_planner",
    "Attempt": "_provider", "Provider": "_provider",
    "BreakerConfig": "_router", "CircuitBreaker": "_router", "Router": "_router",
    "Upstream": "_router",
    "LONG_MARKER": "_script", "LOOP_MARKER": "_script", "REPEAT_MARKER": "_script",
    "TOOL_READ": "_script", "TOOL_RUN": "_script", "TOOL_WRITE": "_script",
    "script_reply": "_script",
    "ScriptedProvider": "_scripted",
    "TokenStream": "_stream",
    "Fault": "_upstream", "LocalUpstream": "_upstream", "UpstreamConfig": "_upstream",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gateway_actor' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"gateway_actor.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "LONG_MARKER",
    "LOOP_MARKER",
    "REPEAT_MARKER",
    "TOOL_READ",
    "TOOL_RUN",
    "TOOL_WRITE",
    "AnthropicProvider",
    "Attempt",
    "BreakerConfig",
    "BudgetLedger",
    "CachePlanner",
    "CallRecord",
    "CircuitBreaker",
    "ContentBlock",
    "CostEvent",
    "Fault",
    "Gateway",
    "GatewayActor",
    "GatewayConfig",
    "LLMRequest",
    "LLMResponse",
    "LocalUpstream",
    "Message",
    "OpenAIProvider",
    "PlannedCall",
    "PlannerConfig",
    "PoolConfig",
    "PrefixBreak",
    "PrefixTracker",
    "PriceTable",
    "Provider",
    "RetryPolicy",
    "Router",
    "ScriptedProvider",
    "TextBlock",
    "TokenSink",
    "TokenStream",
    "ToolResultBlock",
    "ToolSpec",
    "ToolUseBlock",
    "Upstream",
    "UpstreamConfig",
    "UpstreamSpec",
    "parse_request",
    "script_reply",
]
