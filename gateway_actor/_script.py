"""The scripted model: a deterministic offline "LLM" for the demo, the tests and the bench.

It reads an Anthropic Messages request (tools, system, messages as wire dicts) and answers
the way a tool-using agent model would, with real ``tool_use`` blocks for the tools the
request names:

1. The task is the text of the first user message.
2. With ``write_file`` and ``run`` available it writes a script (``write_file(path="main.py",
   content=...)``), runs it (``run(command="python3 main.py")``), then answers from the
   run's output (``"The answer is <stdout>."``, ``end_turn``). With only ``run`` it runs
   ``python3 -c '<script>'``. If the task says ``read the file <path>`` and ``read_file`` is
   available it reads it and answers with the content. Without tools it answers in text.
3. The script: a fenced code block in the task is used verbatim; else an arithmetic
   expression in the task is printed (``print(17 * 23)``); else the script counts the task's
   words and characters.
4. A failed run (``is_error``, a traceback, or a non-zero exit code in a JSON result) is
   reported in the answer, not retried.

Markers in the task change the behaviour (for tests of other parts):

* ``[scripted:loop]``: never finishes; turn n calls ``run(command="echo again n")`` (or the
  first tool there is): a runaway that spends without repeating itself, for the budget's
  burn-rate breaker.
* ``[scripted:repeat]``: never finishes; every turn makes the very same call,
  ``run(command="echo again")``, for repeated-call detection.
* ``[scripted:long N]``: answers at once with a deterministic text of N words (SSE tests).
* ``[scripted:echo]``: answers with the text of the last user message.

The same request always gives the same reply, including tool-use ids.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from dataclasses import dataclass
from typing import Any

from gateway_actor._tokens import estimate_tokens

LOOP_MARKER = "[scripted:loop]"
REPEAT_MARKER = "[scripted:repeat]"
LONG_MARKER = re.compile(r"\[scripted:long\s+(\d+)\]")
ECHO_MARKER = "[scripted:echo]"

TOOL_WRITE = "write_file"
TOOL_RUN = "run"
TOOL_READ = "read_file"

_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)
_ARITH = re.compile(r"[\d(][\d\s+\-*/().%]*[\d)]")
_READ = re.compile(r"\bread (?:the )?file\s+[`'\"]?([\w./\-]+)", re.IGNORECASE)
_WORDS = ("the", "agent", "stream", "token", "cache", "prefix", "replica", "budget", "run",
          "history", "sandbox", "snapshot", "actor", "bus", "message", "tool", "result",
          "latency", "durable", "workflow", "replay", "signal", "tenant", "gateway")


@dataclass(slots=True)
class ScriptedTurn:
    """One reply: Anthropic content blocks (wire dicts), why it stopped, output tokens."""

    content: list[dict[str, Any]]
    stop_reason: str
    stop_sequence: str | None = None

    @property
    def output_tokens(self) -> int:
        n = 0
        for block in self.content:
            if block["type"] == "text":
                n += estimate_tokens(block["text"])
            else:
                n += estimate_tokens(block["name"] + json.dumps(block["input"]))
        return max(1, n)


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for block in content or []:
        if isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
    return "".join(parts)


def _result_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(str(b.get("text", "")) for b in content or [] if isinstance(b, dict))


def _tool_id(task: str, turn: int, name: str) -> str:
    digest = hashlib.blake2b(f"{task}\0{turn}\0{name}".encode(), digest_size=12).hexdigest()
    return f"toolu_{digest}"


def make_script(task: str) -> str:
    """The Python script the scripted model writes for ``task``."""
    fence = _FENCE.search(task)
    if fence:
        return fence.group(1).strip() + "\n"
    for match in sorted(_ARITH.finditer(task), key=lambda m: -len(m.group(0))):
        expr = " ".join(match.group(0).split())
        if any(op in expr for op in "+-*/%") and any(c.isdigit() for c in expr):
            try:
                compile(expr, "<task>", "eval")
            except SyntaxError:
                continue
            return f"print({expr})\n"
    return (f"task = {task!r}\n"
            "print(f\"{len(task.split())} words, {len(task)} characters\")\n")


def _run_output(content: Any, is_error: bool) -> tuple[bool, str]:
    """(ok, text) from a run's tool result: plain text, or JSON with stdout/exit code."""
    text = _result_text(content)
    ok = not is_error
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict) and ("stdout" in data or "exit_code" in data):
        code = data.get("exit_code", 0)
        ok = ok and code in (0, None)
        out = str(data.get("stdout") or "")
        if not ok:
            out = (out + str(data.get("stderr") or "")) or f"exit code {code}"
        text = out
    if "Traceback (most recent call last)" in text:
        ok = False
    return ok, text.strip()


def _long_text(task: str, words: int) -> str:
    seed = int.from_bytes(hashlib.blake2b(task.encode(), digest_size=8).digest(), "big")
    out = []
    for i in range(words):
        seed = (seed * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        out.append(_WORDS[(seed >> 33) % len(_WORDS)])
        if i % 12 == 11:
            out[-1] += "."
    return " ".join(out).capitalize() + "."


def _apply_limits(text: str, max_tokens: int,
                  stop_sequences: list[str]) -> tuple[str, str, str | None]:
    for seq in stop_sequences:
        if seq and seq in text:
            return text[: text.index(seq)], "stop_sequence", seq
    if estimate_tokens(text) > max_tokens:
        return text[: max_tokens * 4], "max_tokens", None
    return text, "end_turn", None


def script_reply(body: dict[str, Any]) -> ScriptedTurn:
    """The scripted model's reply to an Anthropic Messages request body."""
    messages = body.get("messages") or []
    tools = {t.get("name") for t in body.get("tools") or [] if isinstance(t, dict)}
    max_tokens = int(body.get("max_tokens") or 1024)
    stops = list(body.get("stop_sequences") or [])
    task = _text_of(messages[0].get("content")) if messages else ""
    turn = sum(1 for m in messages if m.get("role") == "assistant")

    def answer(text: str) -> ScriptedTurn:
        text, stop, seq = _apply_limits(text, max_tokens, stops)
        return ScriptedTurn([{"type": "text", "text": text}], stop, seq)

    def call(preface: str, name: str, args: dict[str, Any]) -> ScriptedTurn:
        return ScriptedTurn([
            {"type": "text", "text": preface},
            {"type": "tool_use", "id": _tool_id(task, turn, name), "name": name, "input": args},
        ], "tool_use")

    looping, repeating = LOOP_MARKER in task, REPEAT_MARKER in task
    if looping or repeating:
        command = "echo again" if repeating else f"echo again {turn + 1}"
        if TOOL_RUN in tools:
            return call("Trying again.", TOOL_RUN, {"command": command})
        if tools:
            return call("Trying again.", sorted(tools)[0], {})
        return answer("I would loop, but no tool is available.")
    long = LONG_MARKER.search(task)
    if long:
        return answer(_long_text(task, int(long.group(1))))
    if ECHO_MARKER in task:
        return answer(_text_of(messages[-1].get("content")).replace(ECHO_MARKER, "").strip())

    # Where are we? The last tool call and its result, if any.
    last_call: dict[str, Any] | None = None
    last_result: dict[str, Any] | None = None
    if len(messages) >= 2 and messages[-2].get("role") == "assistant":
        content = messages[-2].get("content")
        calls = [b for b in content if b.get("type") == "tool_use"] if isinstance(
            content, list) else []
        if calls:
            last_call = calls[-1]
            results = messages[-1].get("content")
            if isinstance(results, list):
                for block in results:
                    if (block.get("type") == "tool_result"
                            and block.get("tool_use_id") == last_call.get("id")):
                        last_result = block

    read = _READ.search(task)
    if read and TOOL_READ in tools:
        path = read.group(1).rstrip(".")  # a sentence's full stop is not part of it
        if last_call is None:
            return call(f"I'll read {path}.", TOOL_READ, {"path": path})
        text = _result_text((last_result or {}).get("content", ""))
        if (last_result or {}).get("is_error"):
            return answer(f"I could not read {path}: {text}")
        return answer(f"The file {path} contains:\n{text}")

    script = make_script(task)
    if TOOL_WRITE in tools and TOOL_RUN in tools:
        if last_call is None:
            return call("I'll write a script for this and run it.", TOOL_WRITE,
                        {"path": "main.py", "content": script})
        if last_call.get("name") == TOOL_WRITE:
            if (last_result or {}).get("is_error"):
                text = _result_text((last_result or {}).get("content", ""))
                return answer(f"I could not write the script: {text}")
            return call("Now I'll run it.", TOOL_RUN, {"command": "python3 main.py"})
    elif TOOL_RUN in tools:
        if last_call is None:
            return call("I'll compute this with a short script.", TOOL_RUN,
                        {"command": f"python3 -c {shlex.quote(script)}"})
    else:
        return answer(f"I have no tools to run code, so I can only describe the plan: run "
                      f"this script and report its output.\n\n```python\n{script}```")

    if last_call is not None and last_call.get("name") == TOOL_RUN:
        ok, output = _run_output((last_result or {}).get("content", ""),
                                 bool((last_result or {}).get("is_error")))
        if not ok:
            return answer(f"The script failed: {output}")
        return answer(f"The answer is {output}." if output and "\n" not in output
                      else f"The script printed:\n{output}")
    return answer("I am not sure what to do next.")
