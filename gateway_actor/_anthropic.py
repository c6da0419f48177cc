"""The ``anthropic`` provider: the official SDK (``AsyncAnthropic``), streaming.

The SDK builds and sends the request (auth, headers, versioning, the typed errors of a non-2xx
answer) over its aiohttp transport (``DefaultAioHttpClient``: aiohttp is a dependency of nerve
anyway, and its C parser makes a call a millisecond cheaper than the default one). The SSE
body is read raw (``with_streaming_response``) and parsed here: one ``json.loads`` per event
instead of a pydantic model per event, the rest of that millisecond.

The SDK's own retries are off (``max_retries=0``): the gateway retries, because it can also
move a call to another upstream and must not charge or stream a retried call twice. Errors
are mapped by :func:`~gateway_actor._provider.classify`, including an ``error`` event that
arrives after HTTP 200 (``overloaded_error`` mid-stream).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import anthropic
import httpx2

from budget_actor import Usage
from gateway_actor._planner import PlannedCall
from gateway_actor._protocol import LLMResponse, TextBlock, ToolUseBlock
from gateway_actor._provider import (
    Attempt,
    TextSink,
    classify,
    connection_error,
    retry_after_of,
)
from gateway_actor._router import Upstream
from nerve import UpstreamError

log = logging.getLogger("nerve.gateway.anthropic")

LOCAL_KEY = "nerve-local"  # sent to upstreams that need no key (the local upstream)
# Above this, the SDK refuses a non-streaming call (it could outlast its 10 minute limit).
_NON_STREAMING_MAX_TOKENS = 16_000


def _usage(raw: Any, into: Usage | None = None) -> Usage:
    """Our :class:`Usage` from the API's usage (a dict from the stream, or the SDK's model).

    Counts on a ``message_delta`` are cumulative and optional: a missing one keeps the value
    ``message_start`` gave.
    """
    if raw is not None and not isinstance(raw, dict):
        raw = raw.model_dump()
    usage = into.model_copy() if into is not None else Usage()
    if not raw:
        return usage
    for name in ("input_tokens", "output_tokens", "cache_creation_input_tokens",
                 "cache_read_input_tokens"):
        if raw.get(name) is not None:
            setattr(usage, name, int(raw[name]))
    creation = raw.get("cache_creation")
    if isinstance(creation, dict):
        usage.cache_creation_5m_input_tokens = int(creation.get("ephemeral_5m_input_tokens")
                                                   or 0)
        usage.cache_creation_1h_input_tokens = int(creation.get("ephemeral_1h_input_tokens")
                                                   or 0)
    elif usage.cache_creation_input_tokens and not (
            usage.cache_creation_5m_input_tokens or usage.cache_creation_1h_input_tokens):
        # No breakdown given: Anthropic's default TTL is 5 minutes.
        usage.cache_creation_5m_input_tokens = usage.cache_creation_input_tokens
    return usage


def _status_error(exc: anthropic.APIStatusError, upstream: str) -> Exception:
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error") if isinstance(body.get("error"), dict) else {}
    return classify(exc.status_code, upstream=upstream,
                     message=str(error.get("message") or exc.message),
                     error_type=error.get("type"),
                     retry_after=retry_after_of(exc.response.headers))


class AnthropicProvider:
    """Calls Anthropic's Messages API (or anything speaking it) through the official SDK."""

    kind = "anthropic"

    def __init__(self, *, timeout: float = 600.0, connect_timeout: float = 5.0,
                 transport: str = "aiohttp") -> None:
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.transport = transport  # "aiohttp" or "httpx" (the SDK's default)
        self._clients: dict[str, anthropic.AsyncAnthropic] = {}

    def client(self, upstream: Upstream) -> anthropic.AsyncAnthropic:
        """One SDK client (and connection pool) per upstream."""
        client = self._clients.get(upstream.name)
        if client is None:
            http_client = (anthropic.DefaultAioHttpClient() if self.transport == "aiohttp"
                           else None)
            client = anthropic.AsyncAnthropic(
                api_key=upstream.api_key or LOCAL_KEY, base_url=upstream.base_url or None,
                max_retries=0, http_client=http_client,
                timeout=httpx2.Timeout(self.timeout, connect=self.connect_timeout),
                # The gateway's own span (GenAI conventions, cache usage) covers the call;
                # the SDK's would be a second one. Trace context still propagates.
                open_telemetry={"traces": {"enabled": False}})
            self._clients[upstream.name] = client
        return client

    async def close(self) -> None:
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await client.close()

    async def call(self, plan: PlannedCall, upstream: Upstream, *, stream: bool,
                   sink: TextSink | None, attempt: Attempt) -> LLMResponse:
        client = self.client(upstream)
        stream = stream or plan.request.max_tokens > _NON_STREAMING_MAX_TOKENS
        started = False
        try:
            if not stream:
                message = await client.messages.create(**plan.body)
                attempt.usage = _usage(message.usage)
                return self._response(message.id, message.model,
                                      [b.to_dict() for b in message.content],
                                      message.stop_reason, message.stop_sequence,
                                      attempt.usage)
            async with client.messages.with_streaming_response.create(
                    **plan.body, stream=True) as raw:
                started = True
                return await self._consume(raw.iter_lines(), upstream, sink, attempt)
        except anthropic.APIStatusError as exc:
            raise _status_error(exc, upstream.name) from None
        except anthropic.APIConnectionError as exc:
            raise connection_error(upstream.name, exc, started=started) from None
        except httpx2.HTTPError as exc:
            # Raised by the stream's iterator when the connection dies mid-answer.
            raise connection_error(upstream.name, exc, started=started) from None

    async def _consume(self, lines: Any, upstream: Upstream, sink: TextSink | None,
                       attempt: Attempt) -> LLMResponse:
        """Assemble the message from the SSE lines, feeding text deltas to ``sink``."""
        msg_id, model = "", ""
        blocks: dict[int, dict[str, Any]] = {}
        json_parts: dict[int, list[str]] = {}
        stop_reason: str | None = None
        stop_sequence: str | None = None
        finished = False
        async for line in lines:
            if not line.startswith("data:"):
                continue  # "event:" names repeat the data's type; blank lines end events
            event = json.loads(line[5:])
            kind = event.get("type")
            if kind == "content_block_delta":
                delta = event["delta"]
                index = event["index"]
                if delta.get("type") == "text_delta":
                    text = delta.get("text", "")
                    block = blocks.get(index)
                    if block is not None and block["type"] == "text":
                        block["text"] += text
                        attempt.saw_text(len(text))
                        if sink is not None and text:
                            sink(text)
                elif delta.get("type") == "input_json_delta":
                    part = delta.get("partial_json", "")
                    json_parts.setdefault(index, []).append(part)
                    attempt.output_chars += len(part)
            elif kind == "content_block_start":
                cb = event["content_block"]
                if cb.get("type") == "text":
                    blocks[event["index"]] = {"type": "text", "text": cb.get("text") or ""}
                elif cb.get("type") == "tool_use":
                    blocks[event["index"]] = {"type": "tool_use", "id": cb["id"],
                                              "name": cb["name"],
                                              "input": dict(cb.get("input") or {})}
                # Other block kinds (thinking, server tools) are not part of nerve's protocol.
            elif kind == "content_block_stop":
                self._finish_block(blocks.get(event["index"]),
                                   json_parts.pop(event["index"], None), upstream)
            elif kind == "message_start":
                message = event["message"]
                msg_id, model = message.get("id", ""), message.get("model", "")
                attempt.usage = _usage(message.get("usage"))
            elif kind == "message_delta":
                delta = event.get("delta") or {}
                stop_reason = delta.get("stop_reason")
                stop_sequence = delta.get("stop_sequence")
                attempt.usage = _usage(event.get("usage"), attempt.usage)
            elif kind == "message_stop":
                finished = True
            elif kind == "error":
                # An error after HTTP 200 (an overloaded_error in the middle of the answer).
                error = event.get("error") or {}
                raise classify(200, upstream=upstream.name,
                               message=str(error.get("message", "")),
                               error_type=error.get("type") or "api_error")
        if not finished:
            raise connection_error(upstream.name, EOFError("the stream ended before "
                                                           "message_stop"), started=True)
        content = [blocks[i] for i in sorted(blocks)]
        return self._response(msg_id, model, content, stop_reason, stop_sequence,
                              attempt.usage or Usage())

    @staticmethod
    def _finish_block(block: dict[str, Any] | None, parts: list[str] | None,
                      upstream: Upstream) -> None:
        if block is None or block["type"] != "tool_use" or not parts:
            return
        raw = "".join(parts)
        if not raw.strip():
            return
        try:
            block["input"] = json.loads(raw)
        except ValueError:
            raise UpstreamError(f"upstream {upstream.name} sent tool input that is not JSON: "
                                f"{raw[:200]!r}", retryable=True, kind="bad_output", status=200,
                                upstream=upstream.name, error_type="",
                                retry_after=None) from None

    @staticmethod
    def _response(msg_id: str, model: str, content: list[dict[str, Any]],
                  stop_reason: str | None, stop_sequence: str | None,
                  usage: Usage) -> LLMResponse:
        blocks: list[TextBlock | ToolUseBlock] = []
        for block in content:
            if block.get("type") == "text":
                blocks.append(TextBlock(text=block.get("text", "")))
            elif block.get("type") == "tool_use":
                blocks.append(ToolUseBlock(id=block["id"], name=block["name"],
                                           input=block.get("input") or {}))
        known = {"end_turn", "max_tokens", "stop_sequence", "tool_use", "pause_turn",
                 "refusal"}
        return LLMResponse(id=msg_id, model=model, content=blocks,
                           stop_reason=stop_reason if stop_reason in known else None,
                           stop_sequence=stop_sequence, usage=usage)
