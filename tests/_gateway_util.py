"""Shared pieces of the gateway tests: tools, a long system prompt, a tiny agent loop."""

from __future__ import annotations

from gateway_actor import (
    Gateway,
    LLMRequest,
    LLMResponse,
    Message,
    ToolResultBlock,
    ToolSpec,
)

TOOLS = [
    ToolSpec(name="write_file", description="Write a file in the sandbox.",
             input_schema={"type": "object", "required": ["path", "content"],
                           "properties": {"path": {"type": "string"},
                                          "content": {"type": "string"}}}),
    ToolSpec(name="run", description="Run a shell command in the sandbox.",
             input_schema={"type": "object", "required": ["command"],
                           "properties": {"command": {"type": "string"}}}),
    ToolSpec(name="read_file", description="Read a file from the sandbox.",
             input_schema={"type": "object", "required": ["path"],
                           "properties": {"path": {"type": "string"}}}),
]
# Long enough (about 1,800 tokens) to pass the minimum cacheable length on its own.
SYSTEM = ("You are a careful coding agent. Plan, write a script, run it, then answer "
          "from its output. ") * 80


def tool_output(turn: int, words: int = 120) -> str:
    return " ".join(f"line{turn}-{i}" for i in range(words))


async def agent_run(gateway: Gateway, run_id: str, task: str, *, turns: int = 8,
                    system: str = SYSTEM, stream: bool = True) -> list[LLMResponse]:
    """Drive the scripted model through up to ``turns`` calls, answering its tool calls."""
    messages = [Message(role="user", content=task)]
    out: list[LLMResponse] = []
    for turn in range(turns):
        request = LLMRequest(system=system, tools=TOOLS, messages=messages, max_tokens=400,
                             stream=stream)
        response = await gateway.call(request, run_id=run_id)
        out.append(response)
        if response.stop_reason != "tool_use":
            break
        messages.append(Message(role="assistant", content=response.content))
        messages.append(Message(role="user", content=[
            ToolResultBlock(tool_use_id=use.id, content=tool_output(turn))
            for use in response.tool_uses]))
    return out
