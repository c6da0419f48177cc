"""The brain: the LLM gateway actor, its providers, cache planner and router."""

from gateway_actor._protocol import (
    ContentBlock,
    LLMRequest,
    LLMResponse,
    Message,
    TextBlock,
    ToolResultBlock,
    ToolSpec,
    ToolUseBlock,
)

__all__ = [
    "ContentBlock",
    "LLMRequest",
    "LLMResponse",
    "Message",
    "TextBlock",
    "ToolResultBlock",
    "ToolSpec",
    "ToolUseBlock",
]
