"""The brain's contract: what a workflow asks a model for and what it gets back.

The shape follows Anthropic's Messages API (content blocks, tool use, usage with cache
fields), the richest of the providers nerve speaks; other providers are translated to and
from it. A workflow calls ``ctx.llm(LLMRequest(...))`` and gets an :class:`LLMResponse`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from budget_actor import Usage


class TextBlock(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ToolUseBlock(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any] = Field(default_factory=dict)


class ToolResultBlock(BaseModel):
    type: Literal["tool_result"] = "tool_result"
    tool_use_id: str
    content: str | list[dict[str, Any]] = ""
    is_error: bool = False


ContentBlock = TextBlock | ToolUseBlock | ToolResultBlock


class Message(BaseModel):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class ToolSpec(BaseModel):
    """A tool the model may call (JSON Schema for its input)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_\-]{1,64}$")
    description: str = ""
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    requires_approval: bool = False


class LLMRequest(BaseModel):
    """One model call. ``model`` may be empty: the gateway's default model is used."""

    model_config = ConfigDict(extra="forbid")

    model: str = ""
    system: str = ""
    messages: list[Message]
    tools: list[ToolSpec] = Field(default_factory=list)
    max_tokens: int = Field(default=1024, ge=1, le=128_000)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    stop_sequences: list[str] = Field(default_factory=list)
    stream: bool = True
    # Hints for the cache planner: how long until the next call of this run is expected
    # ("short", or "long" before a human wait or a long sandbox step).
    expected_gap: Literal["short", "long"] = "short"
    metadata: dict[str, str] = Field(default_factory=dict)


class LLMResponse(BaseModel):
    """What the model said: content blocks, why it stopped, and what it cost."""

    id: str = ""
    model: str
    content: list[TextBlock | ToolUseBlock]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use", "pause_turn",
                         "refusal"] | None = None
    usage: Usage = Field(default_factory=Usage)
    upstream: str | None = None  # which replica / key served it
    cost_usd: float | None = None

    @property
    def text(self) -> str:
        return "".join(b.text for b in self.content if isinstance(b, TextBlock))

    @property
    def tool_uses(self) -> list[ToolUseBlock]:
        return [b for b in self.content if isinstance(b, ToolUseBlock)]
