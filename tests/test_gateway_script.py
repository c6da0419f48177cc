"""The scripted model drives a real agent loop offline: it writes a script, the script really
runs, and the answer comes from its output. Plus its markers, and the package's public API."""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest

import gateway_actor
from gateway_actor import (
    Gateway,
    GatewayConfig,
    LLMRequest,
    LLMResponse,
    Message,
    ToolResultBlock,
    parse_request,
    script_reply,
)
from nerve import InvalidLLMRequest
from tests._gateway_util import TOOLS


async def sandbox_tool(workdir: Path, name: str, args: dict[str, Any]) -> tuple[str, bool]:
    """The three sandbox tools, performed for real in ``workdir`` (a stand-in for the
    sandbox actor, which is another part)."""
    if name == "write_file":
        (workdir / args["path"]).write_text(args["content"])
        return f"wrote {len(args['content'])} bytes to {args['path']}", False
    if name == "read_file":
        path = workdir / args["path"]
        if not path.exists():
            return f"no such file: {args['path']}", True
        return path.read_text(), False
    argv = shlex.split(args["command"])
    if argv and argv[0] == "python3":
        argv[0] = sys.executable
    proc = await asyncio.create_subprocess_exec(*argv, cwd=workdir,
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    return json.dumps({"exit_code": proc.returncode, "stdout": out.decode(),
                       "stderr": err.decode()}), proc.returncode != 0


async def agent(task: str, workdir: Path, tools: list[Any] = TOOLS,
                turns: int = 6) -> list[LLMResponse]:
    gw = Gateway(GatewayConfig.scripted())
    messages = [Message(role="user", content=task)]
    out = []
    for _ in range(turns):
        response = await gw.call(LLMRequest(tools=tools, messages=messages), run_id="s")
        out.append(response)
        if response.stop_reason != "tool_use":
            break
        messages.append(Message(role="assistant", content=response.content))
        results = []
        for use in response.tool_uses:
            text, failed = await sandbox_tool(workdir, use.name, use.input)
            results.append(ToolResultBlock(tool_use_id=use.id, content=text, is_error=failed))
        messages.append(Message(role="user", content=results))
    await gw.close()
    return out


async def test_it_writes_a_script_runs_it_and_answers_from_the_output(tmp_path: Path) -> None:
    turns = await agent("What is 17 * 23 + 4?", tmp_path)
    assert [t.tool_uses[0].name for t in turns[:2]] == ["write_file", "run"]
    assert turns[0].tool_uses[0].input == {"path": "main.py", "content": "print(17 * 23 + 4)\n"}
    assert turns[1].tool_uses[0].input == {"command": "python3 main.py"}
    assert turns[2].stop_reason == "end_turn" and turns[2].text == "The answer is 395."
    assert (tmp_path / "main.py").exists()


async def test_a_fenced_script_is_used_verbatim_and_failures_are_reported(
        tmp_path: Path) -> None:
    turns = await agent("Run this:\n```python\nimport math\nprint(math.factorial(10))\n```",
                        tmp_path)
    assert turns[-1].text == "The answer is 3628800."
    broken = await agent("Run this:\n```python\nraise SystemExit('boom')\n```", tmp_path)
    assert broken[-1].text.startswith("The script failed:") and "boom" in broken[-1].text


async def test_with_only_run_it_uses_python_c(tmp_path: Path) -> None:
    turns = await agent("compute 2 ** 20", tmp_path, tools=[t for t in TOOLS if t.name == "run"])
    assert turns[0].tool_uses[0].input["command"].startswith("python3 -c ")
    assert turns[-1].text == "The answer is 1048576."


async def test_it_reads_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("remember the milk")
    turns = await agent("Please read the file notes.txt and tell me what it says.", tmp_path)
    assert turns[0].tool_uses[0].input == {"path": "notes.txt"}
    assert turns[-1].text == "The file notes.txt contains:\nremember the milk"


async def test_without_tools_it_answers_in_text(tmp_path: Path) -> None:
    turns = await agent("What is 1 + 1?", tmp_path, tools=[])
    assert len(turns) == 1 and turns[0].stop_reason == "end_turn"
    assert "print(1 + 1)" in turns[0].text


async def test_the_loop_markers_never_finish(tmp_path: Path) -> None:
    turns = await agent("[scripted:loop] spin", tmp_path, turns=12)
    assert len(turns) == 12 and all(t.stop_reason == "tool_use" for t in turns)
    assert [t.tool_uses[0].input["command"] for t in turns] == [
        f"echo again {n}" for n in range(1, 13)]  # spends without repeating itself
    assert len({t.tool_uses[0].id for t in turns}) == 12
    same = await agent("[scripted:repeat] spin", tmp_path, turns=5)
    assert len(same) == 5
    assert all(t.tool_uses[0].input == {"command": "echo again"} for t in same)


def test_the_long_marker_and_limits() -> None:
    def reply(task: str, **kw: Any) -> Any:
        return script_reply({"messages": [{"role": "user", "content": task}], **kw})

    long = reply("[scripted:long 250] go")
    assert len(long.content[0]["text"].split()) == 250 and long.stop_reason == "end_turn"
    assert reply("[scripted:long 250] go") == long  # deterministic
    cut = reply("[scripted:long 250] go", max_tokens=20)
    assert cut.stop_reason == "max_tokens" and len(cut.content[0]["text"]) <= 80
    first_word = long.content[0]["text"].split()[3]
    stopped = reply("[scripted:long 250] go", stop_sequences=[first_word])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == first_word


@pytest.mark.parametrize("bad,why", [
    ({"messages": [{"role": "user", "content": [
        {"type": "tool_use", "id": "t1", "name": "run", "input": {}}]}]}, "assistant message"),
    ({"messages": [{"role": "user", "content": "a"},
                   {"role": "assistant", "content": [
                       {"type": "tool_use", "id": "t1", "name": "run", "input": {}}]},
                   {"role": "user", "content": "forgot the result"}]}, "missing ['t1']"),
    ({"messages": [{"role": "user", "content": "a"}],
      "tools": [{"name": "run"}, {"name": "run"}]}, "unique"),
    ({"messages": [{"role": "user", "content": []}]}, "no content"),
])
def test_bad_conversations_are_invalid_requests(bad: dict[str, Any], why: str) -> None:
    with pytest.raises(InvalidLLMRequest, match=None) as err:
        parse_request(bad)
    assert why in err.value.message and err.value.retryable is False


def test_the_public_api_is_pinned() -> None:
    assert sorted(gateway_actor.__all__) == sorted([
        "LONG_MARKER", "LOOP_MARKER", "REPEAT_MARKER", "TOOL_READ", "TOOL_RUN", "TOOL_WRITE",
        "AnthropicProvider", "Attempt", "BreakerConfig", "BudgetLedger", "CachePlanner",
        "CallRecord", "CircuitBreaker", "ContentBlock", "CostEvent", "Fault", "Gateway",
        "GatewayActor", "GatewayConfig", "LLMRequest", "LLMResponse", "LocalUpstream",
        "Message", "OpenAIProvider", "PlannedCall", "PlannerConfig", "PoolConfig",
        "PrefixBreak", "PrefixTracker", "PriceTable", "Provider", "RetryPolicy", "Router",
        "ScriptedProvider", "TextBlock", "TokenSink", "TokenStream", "ToolResultBlock",
        "ToolSpec", "ToolUseBlock", "Upstream", "UpstreamConfig", "UpstreamSpec",
        "parse_request", "script_reply",
    ])
    for name in gateway_actor.__all__:
        assert getattr(gateway_actor, name) is not None
