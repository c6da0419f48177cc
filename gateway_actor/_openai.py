"""The ``openai`` provider: OpenAI-compatible chat completions over aiohttp.

For self-hosted replica pools (vLLM, SGLang) whose prefix caches live per replica, so
routing decides the hit rate. Usage maps to nerve's: ``prompt_tokens_details.cached_tokens``
becomes ``cache_read_input_tokens`` and the rest of ``prompt_tokens`` ``input_tokens``.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from budget_actor import Usage
from gateway_actor._openai_wire import FINISH_TO_STOP, to_openai
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


def _usage(raw: dict[str, Any] | None) -> Usage | None:
    if not raw:
        return None
    prompt = int(raw.get("prompt_tokens") or 0)
    cached = int((raw.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    return Usage(input_tokens=max(0, prompt - cached), cache_read_input_tokens=cached,
                 output_tokens=int(raw.get("completion_tokens") or 0))


def _endpoint(base_url: str) -> str:
    base = base_url.rstrip("/")
    return base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")


class OpenAIProvider:
    """Calls ``/v1/chat/completions`` on OpenAI-compatible servers."""

    kind = "openai"

    def __init__(self, *, timeout: float = 600.0, connect_timeout: float = 5.0,
                 max_connections: int = 256) -> None:
        self.timeout = aiohttp.ClientTimeout(total=timeout, connect=connect_timeout)
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self.timeout,
                connector=aiohttp.TCPConnector(limit=self.max_connections))
        return self._session

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def call(self, plan: PlannedCall, upstream: Upstream, *, stream: bool,
                   sink: TextSink | None, attempt: Attempt) -> LLMResponse:
        payload = to_openai(plan.body)
        payload["stream"] = stream
        if stream:
            payload["stream_options"] = {"include_usage": True}
        headers = {"content-type": "application/json"}
        if upstream.api_key:
            headers["authorization"] = f"Bearer {upstream.api_key}"
        started = False
        try:
            async with self.session().post(_endpoint(upstream.base_url), json=payload,
                                           headers=headers) as resp:
                if resp.status != 200:
                    raise await self._http_error(resp, upstream)
                started = True
                if stream:
                    return await self._consume(resp, upstream, sink, attempt)
                data = await resp.json()
                return self._from_completion(data, attempt)
        except (TimeoutError, aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError,
                aiohttp.ClientPayloadError, aiohttp.ClientOSError) as exc:
            raise connection_error(upstream.name, exc, started=started) from None

    @staticmethod
    async def _http_error(resp: aiohttp.ClientResponse, upstream: Upstream) -> Exception:
        text = await resp.text()
        message, error_type = text[:500], None
        try:
            error = json.loads(text).get("error") or {}
            if isinstance(error, dict):
                message = str(error.get("message") or message)
                error_type = error.get("type")
        except (ValueError, AttributeError):
            pass
        return classify(resp.status, upstream=upstream.name, message=message,
                        error_type=error_type, retry_after=retry_after_of(resp.headers))

    def _from_completion(self, data: dict[str, Any], attempt: Attempt) -> LLMResponse:
        choice = (data.get("choices") or [{}])[0]
        message = choice.get("message") or {}
        calls = [(c.get("id", ""), (c.get("function") or {}).get("name", ""),
                  (c.get("function") or {}).get("arguments") or "")
                 for c in message.get("tool_calls") or []]
        attempt.usage = _usage(data.get("usage")) or Usage()
        return self._response(data, message.get("content") or "", calls,
                              choice.get("finish_reason"), attempt.usage)

    async def _consume(self, resp: aiohttp.ClientResponse, upstream: Upstream,
                       sink: TextSink | None, attempt: Attempt) -> LLMResponse:
        text_parts: list[str] = []
        calls: dict[int, list[str]] = {}  # index -> [id, name, arguments]
        finish: str | None = None
        head: dict[str, Any] = {}
        done = False
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                error = chunk["error"] if isinstance(chunk["error"], dict) else {}
                raise classify(200, upstream=upstream.name,
                               message=str(error.get("message", "")),
                               error_type=error.get("type") or "api_error")
            head = head or chunk
            if chunk.get("usage"):
                attempt.usage = _usage(chunk["usage"])
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                piece = delta.get("content")
                if piece:
                    text_parts.append(piece)
                    attempt.saw_text(len(piece))
                    if sink is not None:
                        sink(piece)
                for call in delta.get("tool_calls") or []:
                    slot = calls.setdefault(int(call.get("index", 0)), ["", "", ""])
                    fn = call.get("function") or {}
                    slot[0] = call.get("id") or slot[0]
                    slot[1] = fn.get("name") or slot[1]
                    slot[2] += fn.get("arguments") or ""
                    attempt.output_chars += len(fn.get("arguments") or "")
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
        if not done or finish is None:
            raise connection_error(upstream.name, EOFError("the stream ended before [DONE]"),
                                   started=True)
        return self._response(head, "".join(text_parts),
                              [tuple(calls[i]) for i in sorted(calls)],  # type: ignore[misc]
                              finish, attempt.usage or Usage())

    @staticmethod
    def _response(head: dict[str, Any], text: str, calls: list[tuple[str, str, str]],
                  finish: str | None, usage: Usage) -> LLMResponse:
        blocks: list[TextBlock | ToolUseBlock] = []
        if text:
            blocks.append(TextBlock(text=text))
        for call_id, name, arguments in calls:
            try:
                args = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                raise UpstreamError(f"tool arguments are not JSON: {arguments[:200]!r}",
                                    retryable=True, kind="bad_output", status=200,
                                    upstream="", error_type="", retry_after=None) from None
            blocks.append(ToolUseBlock(id=call_id, name=name,
                                       input=args if isinstance(args, dict) else {}))
        return LLMResponse(id=str(head.get("id", "")), model=str(head.get("model", "")),
                           content=blocks, stop_reason=FINISH_TO_STOP.get(finish or "", None),
                           usage=usage)
