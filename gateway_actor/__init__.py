"""The brain: the LLM gateway actor, its providers, cache planner and router."""

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
