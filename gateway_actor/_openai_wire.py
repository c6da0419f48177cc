"""Translation between Anthropic Messages bodies and OpenAI chat-completions bodies.

The gateway plans every request in the Anthropic shape; the ``openai`` provider sends it to
OpenAI-compatible servers (vLLM, SGLang) with :func:`to_openai`, and the local upstream reads
chat-completions requests back with :func:`from_openai`. Both directions keep the order and
the bytes stable (sorted-key JSON for tool arguments), which is what a replica's automatic
prefix cache keys on.
"""

from __future__ import annotations

import json
from typing import Any

from gateway_actor._tokens import canonical_json

FINISH_TO_STOP = {"stop": "end_turn", "tool_calls": "tool_use", "length": "max_tokens",
                  "content_filter": "refusal", "function_call": "tool_use"}
STOP_TO_FINISH = {"end_turn": "stop", "tool_use": "tool_calls", "max_tokens": "length",
                  "stop_sequence": "stop", "refusal": "content_filter"}


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(str(b.get("text", "")) for b in content or [] if isinstance(b, dict))


def to_openai(body: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic Messages body as a chat-completions body (cache markers dropped)."""
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        messages.append({"role": "system", "content": _text(system)})
    for message in body["messages"]:
        content = message["content"]
        if isinstance(content, str):
            messages.append({"role": message["role"], "content": content})
            continue
        if message["role"] == "assistant":
            out: dict[str, Any] = {"role": "assistant",
                                   "content": _text(content) or None}
            calls = [{"id": b["id"], "type": "function",
                      "function": {"name": b["name"], "arguments": canonical_json(b["input"])}}
                     for b in content if b.get("type") == "tool_use"]
            if calls:
                out["tool_calls"] = calls
            messages.append(out)
            continue
        text_parts: list[str] = []
        for block in content:
            if block.get("type") == "tool_result":
                result = block.get("content", "")
                text = result if isinstance(result, str) else canonical_json(result)
                messages.append({"role": "tool", "tool_call_id": block["tool_use_id"],
                                 "content": text})
            elif block.get("type") == "text":
                text_parts.append(block["text"])
        if text_parts:
            messages.append({"role": "user", "content": "".join(text_parts)})
    out_body: dict[str, Any] = {"model": body["model"], "messages": messages,
                                "max_tokens": body.get("max_tokens", 1024)}
    if body.get("tools"):
        out_body["tools"] = [
            {"type": "function", "function": {
                "name": t["name"], "description": t.get("description", ""),
                "parameters": t.get("input_schema") or {"type": "object"}}}
            for t in body["tools"]]
    if body.get("temperature") is not None:
        out_body["temperature"] = body["temperature"]
    if body.get("stop_sequences"):
        out_body["stop"] = list(body["stop_sequences"])
    return out_body


def from_openai(body: dict[str, Any]) -> dict[str, Any]:
    """A chat-completions body as an Anthropic Messages body (for the scripted model)."""
    system: list[str] = []
    messages: list[dict[str, Any]] = []

    def add(role: str, block: dict[str, Any]) -> None:
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"].append(block)
        else:
            messages.append({"role": role, "content": [block]})

    for message in body.get("messages") or []:
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            system.append(_text(content))
        elif role == "user":
            add("user", {"type": "text", "text": _text(content)})
        elif role == "assistant":
            if content:
                add("assistant", {"type": "text", "text": _text(content)})
            for call in message.get("tool_calls") or []:
                fn = call.get("function") or {}
                try:
                    args = json.loads(fn.get("arguments") or "{}")
                except ValueError:
                    args = {}
                add("assistant", {"type": "tool_use", "id": call.get("id", ""),
                                  "name": fn.get("name", ""), "input": args})
        elif role == "tool":
            add("user", {"type": "tool_result", "tool_use_id": message.get("tool_call_id", ""),
                         "content": _text(content)})
    out: dict[str, Any] = {"model": body.get("model", ""), "messages": messages,
                           "max_tokens": body.get("max_tokens")
                           or body.get("max_completion_tokens") or 1024}
    if system:
        out["system"] = "\n".join(system)
    tools = []
    for tool in body.get("tools") or []:
        fn = tool.get("function") or {}
        tools.append({"name": fn.get("name", ""), "description": fn.get("description", ""),
                      "input_schema": fn.get("parameters") or {"type": "object"}})
    if tools:
        out["tools"] = tools
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    return out
