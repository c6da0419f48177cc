"""The built-in ``agent`` workflow: model -> tool calls (in parallel) -> results -> model.

It runs until the model stops asking for tools, or a cap is hit: turns, total tokens, wall
time (all recorded, so a replay stops at the same place), or the same tool call with the
same arguments for the third time (a loop that spends without progress). Tool errors go
back to the model as values; tools marked ``requires_approval`` wait for a human signal
bound to the digest of that exact call.

Sandbox tools (``write_file``, ``run``, ``read_file``, ``list_files``) run in the run's
sandbox; any other tool goes to the tool gateway (``nerve.work.tool``).
"""

from __future__ import annotations

import asyncio
import collections
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator

from gateway_actor import LLMRequest, Message, ToolResultBlock, ToolSpec, ToolUseBlock
from nerve import StepError
from persistence import args_digest
from workflow._context import RunContext
from workflow._definition import workflow

SYSTEM_PROMPT = (
    "You are an agent working in an isolated Linux sandbox. Use the tools to do the task: "
    "write files, run commands, read their output. When you are done, answer in plain text."
)

SANDBOX_TOOLS: dict[str, ToolSpec] = {
    "write_file": ToolSpec(
        name="write_file", description="Write a text file in the sandbox workspace.",
        input_schema={"type": "object", "required": ["path", "content"], "properties": {
            "path": {"type": "string"}, "content": {"type": "string"}}}),
    "run": ToolSpec(
        name="run", description="Run a shell command in the sandbox; returns exit code, "
                                "stdout and stderr.",
        input_schema={"type": "object", "required": ["command"], "properties": {
            "command": {"type": "string"}, "timeout": {"type": "number"}}}),
    "read_file": ToolSpec(
        name="read_file", description="Read a text file from the sandbox workspace.",
        input_schema={"type": "object", "required": ["path"], "properties": {
            "path": {"type": "string"}}}),
    "list_files": ToolSpec(
        name="list_files", description="List files in a directory of the sandbox workspace.",
        input_schema={"type": "object", "properties": {"path": {"type": "string"}}}),
}

MAX_TOOL_OUTPUT = 16_000
REPEAT_LIMIT = 3


class ApprovalPayload(BaseModel):
    """What a person sends to decide a tool call that ``requires_approval`` (the payload of
    the ``approval`` signal, bound to the call by its digest in ``approves``)."""

    model_config = ConfigDict(extra="forbid")

    approved: StrictBool  # "yes" or 1 is not a decision a person made
    reason: str | None = Field(default=None, max_length=2000)


class AgentInput(BaseModel):
    """What the ``agent`` workflow takes (``nats pub nerve.tasks.acme '{"task": "..."}'``).

    Strict: a misspelt key (``requires_approvals``) or a tool nobody offers would otherwise
    run the agent without the gate or the tool the sender meant.
    """

    model_config = ConfigDict(extra="forbid")

    task: str
    model: str = ""
    system: str = SYSTEM_PROMPT
    tools: list[str] | None = None  # default: the sandbox tools
    extra_tools: list[ToolSpec] = Field(default_factory=list)
    requires_approval: list[str] = Field(default_factory=list)
    approval_timeout: float = 3600.0
    max_turns: int = Field(default=30, ge=1, le=10_000)
    max_tokens: int = Field(default=400_000, ge=1)  # input + output, over the whole run
    max_seconds: float = Field(default=6 * 3600.0, gt=0)
    max_tokens_per_call: int = Field(default=4096, ge=1, le=128_000)

    @model_validator(mode="after")
    def _known_tools(self) -> AgentInput:
        offered = set(SANDBOX_TOOLS) | {t.name for t in self.extra_tools}
        unknown = [n for n in self.tools or [] if n not in offered]
        if unknown:
            raise ValueError(f"unknown tools {unknown}; the tools are "
                             f"{sorted(offered)} (extra_tools adds more)")
        enabled = set(self.tools) if self.tools is not None else offered
        ungated = [n for n in self.requires_approval if n not in enabled]
        if ungated:
            raise ValueError(f"requires_approval names {ungated}, which this run does not "
                             f"have; its tools are {sorted(enabled)}")
        return self


def _tool_specs(inp: AgentInput) -> list[ToolSpec]:
    names = inp.tools if inp.tools is not None else list(SANDBOX_TOOLS)
    specs = [SANDBOX_TOOLS[n] for n in names if n in SANDBOX_TOOLS]
    specs += [t for t in inp.extra_tools if t.name in names or inp.tools is None]
    approval = set(inp.requires_approval)
    return [t.model_copy(update={"requires_approval": t.requires_approval or t.name in approval})
            for t in specs]


def call_digest(use: ToolUseBlock) -> str:
    """What an approval is bound to: this tool, with exactly these arguments."""
    return args_digest({"tool": use.name, "input": use.input})


async def _sandbox_tool(ctx: RunContext, use: ToolUseBlock) -> str:
    args = use.input
    if use.name == "write_file":
        await ctx.sandbox.write_file(str(args["path"]), str(args.get("content", "")))
        return f"wrote {args['path']}"
    if use.name == "read_file":
        res = await ctx.sandbox.read_file(str(args["path"]))
        return str(res.get("content", ""))[:MAX_TOOL_OUTPUT]
    if use.name == "list_files":
        res = await ctx.sandbox.list_files(str(args.get("path", ".")))
        return json.dumps(res.get("files", res))[:MAX_TOOL_OUTPUT]
    res = await ctx.sandbox.exec(str(args["command"]), timeout=float(args.get("timeout", 60)))
    return json.dumps({"exit_code": res.get("exit_code"), "stdout": res.get("stdout", "")
                       [:MAX_TOOL_OUTPUT], "stderr": res.get("stderr", "")[:4000],
                       "timed_out": res.get("timed_out", False)})


async def _run_tool(ctx: RunContext, use: ToolUseBlock, spec: ToolSpec | None,
                    approval_timeout: float) -> ToolResultBlock:
    ctx.emit("tool_call_started", id=use.id, name=use.name, args=use.input)
    if spec is None:
        return _result(ctx, use, f"error: unknown tool {use.name!r}", True)
    if spec.requires_approval:
        digest = call_digest(use)
        ctx.emit("approval_requested", id=use.id, tool=use.name, args=use.input, digest=digest,
                 timeout=approval_timeout)
        decision = await ctx.wait_signal("approval", timeout=approval_timeout,
                                         default={"approved": False}, approves=digest)
        value = decision.value if isinstance(decision.value, dict) else {}
        if decision.timed_out or not value.get("approved"):
            why = "the approval timed out" if decision.timed_out else (
                f"denied by {decision.sender or 'a human'}: {value.get('reason', '')}".strip())
            return _result(ctx, use, f"error: not run, {why}", True)
    try:
        if use.name in SANDBOX_TOOLS:
            text = await _sandbox_tool(ctx, use)
        else:
            out = await ctx.tool(use.name, use.input)
            text = out if isinstance(out, str) else json.dumps(out, default=str)
        return _result(ctx, use, text[:MAX_TOOL_OUTPUT], False)
    except StepError as exc:
        return _result(ctx, use, f"error: {exc.message}", True)


def _result(ctx: RunContext, use: ToolUseBlock, text: str, is_error: bool) -> ToolResultBlock:
    ctx.emit("tool_call_finished", id=use.id, name=use.name, is_error=is_error,
             result=text[:2000])
    return ToolResultBlock(tool_use_id=use.id, content=text, is_error=is_error)


@workflow(name="agent", version="1")
async def agent(ctx: RunContext, inp: AgentInput) -> dict[str, Any]:
    """The built-in agent loop (see the module docstring)."""
    specs = _tool_specs(inp)
    by_name = {s.name: s for s in specs}
    messages: list[Message] = [Message(role="user", content=inp.task)]
    started = ctx.now()
    used_tokens = 0
    seen: collections.Counter[str] = collections.Counter()
    answer = ""
    waits_for_human = any(s.requires_approval for s in specs)

    def finish(reason: str, turns: int) -> dict[str, Any]:
        ctx.emit("progress", stop=reason, turns=turns)
        return {"answer": answer, "stop": reason, "turns": turns, "tokens": used_tokens}

    for turn in range(1, inp.max_turns + 1):
        if ctx.now() - started > inp.max_seconds:
            return finish("max_seconds", turn - 1)
        response = await ctx.llm(LLMRequest(
            model=inp.model, system=inp.system, messages=messages, tools=specs,
            max_tokens=inp.max_tokens_per_call,
            expected_gap="long" if waits_for_human else "short",
            # Nothing run-specific in the request: a fork replays these steps under its own
            # run id and must issue byte-identical requests (the gateway knows the run
            # from the work item).
            metadata={"turn": str(turn)}))
        u = response.usage
        used_tokens += (u.input_tokens + u.output_tokens + u.cache_read_input_tokens
                        + u.cache_creation_input_tokens)
        answer = response.text or answer
        messages.append(Message(role="assistant", content=list(response.content)))
        uses = response.tool_uses
        if not uses:
            return finish("end_turn", turn)
        if used_tokens >= inp.max_tokens:
            return finish("max_tokens", turn)
        for use in uses:
            seen[args_digest({"tool": use.name, "input": use.input})] += 1
        results = await asyncio.gather(*(
            _run_tool(ctx, use, by_name.get(use.name), inp.approval_timeout) for use in uses))
        messages.append(Message(role="user", content=list(results)))
        if any(n >= REPEAT_LIMIT for n in seen.values()):
            return finish("repeated_tool_call", turn)
    return finish("max_turns", inp.max_turns)


__all__ = ["SANDBOX_TOOLS", "AgentInput", "ApprovalPayload", "agent", "call_digest"]
