"""The brain's contract: what a workflow asks a model for and what it gets back.

The shape follows Anthropic's Messages API (content blocks, tool use, usage with cache
fields), the richest of the providers nerve speaks; other providers are translated to and
from it. A workflow calls ``ctx.llm(LLMRequest(...))`` and gets an :class:`LLMResponse`.

A work item on ``nerve.work.llm`` carries ``LLMRequest.model_dump()`` as its ``args``; the
step's result is ``LLMResponse.model_dump()``. :func:`parse_request` is the one place a dict
from the bus becomes a request, and it turns every kind of bad input into
:class:`~nerve.InvalidLLMRequest` (never retried) with a message naming the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from budget_actor import Usage
from nerve import InvalidLLMRequest


class TextBlock(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ToolUseBlock(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str = Field(pattern=r"^[A-Za-z0-9_\-]{1,128}$")
    name: str
    input: dict[str, Any] = Field(default_factory=dict)


class ToolResultBlock(BaseModel):
    type: Literal["tool_result"] = "tool_result"
    tool_use_id: str
    content: str | list[dict[str, Any]] = ""
    is_error: bool = False


ContentBlock = Annotated[TextBlock | ToolUseBlock | ToolResultBlock,
                         Field(discriminator="type")]


class Message(BaseModel):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]

    def blocks(self) -> list[TextBlock | ToolUseBlock | ToolResultBlock]:
        """The content as a list of blocks (a plain string is one text block)."""
        if isinstance(self.content, str):
            return [TextBlock(text=self.content)]
        return list(self.content)


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
    messages: list[Message] = Field(min_length=1)
    tools: list[ToolSpec] = Field(default_factory=list)
    max_tokens: int = Field(default=1024, ge=1, le=128_000)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    stop_sequences: list[str] = Field(default_factory=list, max_length=16)
    stream: bool = True
    # Hints for the cache planner: how long until the next call of this run is expected
    # ("short", or "long" before a human wait or a long sandbox step).
    expected_gap: Literal["short", "long"] = "short"
    # "auto": the planner places cache breakpoints; "off": none (the bench's baseline).
    cache: Literal["auto", "off"] = "auto"
    metadata: dict[str, str] = Field(default_factory=dict)


class LLMResponse(BaseModel):
    """What the model said: content blocks, why it stopped, and what it cost."""

    id: str = ""
    model: str
    content: list[Annotated[TextBlock | ToolUseBlock, Field(discriminator="type")]]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use", "pause_turn",
                         "refusal"] | None = None
    stop_sequence: str | None = None
    usage: Usage = Field(default_factory=Usage)
    upstream: str | None = None  # which replica / key served it
    cost_usd: float | None = None
    attempts: int = 1  # upstream attempts it took (retries and fallbacks included)
    ttft_ms: float | None = None  # time to the first streamed token, as the gateway saw it
    latency_ms: float | None = None

    @property
    def text(self) -> str:
        return "".join(b.text for b in self.content if isinstance(b, TextBlock))

    @property
    def tool_uses(self) -> list[ToolUseBlock]:
        return [b for b in self.content if isinstance(b, ToolUseBlock)]


def parse_request(args: Any) -> LLMRequest:
    """Validate what a workflow sent as an :class:`LLMRequest`.

    Raises :class:`~nerve.InvalidLLMRequest` (not retryable) for a wrong shape and for a
    conversation no provider accepts: the first message not from the user, a tool result
    that answers no tool call, a tool call in a user message, a tool name used twice.
    """
    if isinstance(args, LLMRequest):
        request = args
    else:
        try:
            request = LLMRequest.model_validate(args)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}"
                for e in exc.errors()[:5])
            raise InvalidLLMRequest(
                f"invalid LLM request: {problems}. Build it with gateway_actor.LLMRequest "
                "(Anthropic Messages shape).", errors=exc.error_count()) from None
    _check_conversation(request)
    return request


def _check_conversation(request: LLMRequest) -> None:
    def bad(why: str, **fields: Any) -> InvalidLLMRequest:
        return InvalidLLMRequest(f"invalid LLM request: {why}", **fields)

    names = [t.name for t in request.tools]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise bad(f"tool names must be unique, {dup} appear more than once", tools=dup)
    if request.messages[0].role != "user":
        raise bad("the first message must come from the user", message_index=0)
    pending: list[str] = []  # tool calls of the previous assistant message
    for m, message in enumerate(request.messages):
        blocks = message.blocks()
        if not blocks:
            raise bad(f"messages[{m}] has no content", message_index=m)
        answered: set[str] = set()
        calls: list[str] = []
        for b, block in enumerate(blocks):
            where = f"messages[{m}].content[{b}]"
            if isinstance(block, ToolUseBlock):
                if message.role != "assistant":
                    raise bad(f"{where}: a tool_use block must be in an assistant message",
                              message_index=m, block=b)
                calls.append(block.id)
            elif isinstance(block, ToolResultBlock):
                if message.role != "user":
                    raise bad(f"{where}: a tool_result block must be in a user message",
                              message_index=m, block=b)
                if block.tool_use_id not in pending:
                    raise bad(f"{where}: tool_result for {block.tool_use_id!r} answers no "
                              "tool_use of the previous assistant message",
                              message_index=m, block=b, tool_use_id=block.tool_use_id)
                answered.add(block.tool_use_id)
        missing = [c for c in pending if c not in answered]
        if missing:
            raise bad(f"messages[{m}] must answer every tool_use of messages[{m - 1}] with a "
                      f"tool_result; missing {missing}", message_index=m, missing=missing)
        pending = calls
