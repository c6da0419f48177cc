"""A local LLM upstream that speaks the real wire protocols: a test fixture and a bench tool.

Each replica is an HTTP server on its own port with its own prompt cache, serving

* ``POST /v1/messages``: the Anthropic Messages API, JSON or SSE (``message_start``,
  ``content_block_start``, ``ping``, ``content_block_delta`` with ``text_delta`` /
  ``input_json_delta``, ``content_block_stop``, ``message_delta`` with cumulative usage,
  ``message_stop``; ``error`` events after HTTP 200), ``cache_control`` honoured (see
  :mod:`._cache`), errors in Anthropic's shape (``{"type": "error", "error": {...}}``) with a
  ``request-id`` header;
* ``POST /v1/chat/completions``: OpenAI chat completions, JSON or SSE (``data:`` chunks,
  ``stream_options.include_usage``, ``data: [DONE]``), with automatic prefix caching reported
  as ``usage.prompt_tokens_details.cached_tokens``;
* ``/_nerve/faults`` (POST a list of faults to serve next), ``/_nerve/stats``,
  ``/_nerve/reset``: the control surface for tests and benchmarks.

Answers come from the scripted model (:mod:`gateway_actor._script`). Latency grows with the
tokens the replica has to compute: ``base_latency + uncached_tokens * prefill_per_token`` to
the first token, ``decode_per_token`` per output token after it, and at most
``max_concurrency`` requests are served at once (the rest queue).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from aiohttp import web

from gateway_actor._openai_wire import STOP_TO_FINISH, from_openai
from gateway_actor._script import ScriptedTurn, script_reply
from gateway_actor._tokens import canonical_json, chain, prompt_blocks
from gateway_actor._upstream._cache import CacheResult, PrefixCache

log = logging.getLogger("nerve.upstream")

FaultKind = Literal["429", "529", "500", "400", "401", "midstream", "drop"]
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                429: "rate_limit_error", 500: "api_error", 529: "overloaded_error"}
_WORD = re.compile(r"\S+\s*|\s+")


@dataclass(slots=True)
class Fault:
    """A failure a replica serves to one of its next requests.

    ``429``/``529``/``500``/``400``/``401``: an HTTP error before any byte of the answer
    (``retry_after`` seconds in ``retry-after`` for 429/529). ``midstream``: HTTP 200, then
    ``after_events`` SSE events, then an ``error`` event of ``error_type`` (an
    ``overloaded_error`` by default). ``drop``: HTTP 200, then the connection is cut after
    ``after_events`` events. ``match``: only requests whose body contains this text.
    """

    kind: FaultKind
    retry_after: float | None = None
    after_events: int = 3
    error_type: str = "overloaded_error"
    match: str | None = None


@dataclass(slots=True)
class UpstreamConfig:
    """How the local upstream behaves (every replica the same)."""

    replicas: int = 1
    host: str = "127.0.0.1"
    port: int = 0  # first replica's port; replica i listens on port + i (0: random ports)
    api_key: str | None = None  # when set, requests must carry it (x-api-key or Bearer)
    models: list[str] | None = None  # accepted model names (None: any)
    min_cacheable_tokens: int = 1024
    capacity_tokens: int = 2_000_000
    lookback_blocks: int = 20
    base_latency: float = 0.0  # seconds before the first token
    prefill_per_token: float = 0.0  # seconds per uncached input token
    decode_per_token: float = 0.0  # seconds per output token
    max_concurrency: int | None = None
    words_per_delta: int = 2


@dataclass(slots=True)
class ReplicaStats:
    requests: int = 0
    streams: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    faults: int = 0
    disconnects: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    input_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_5m_tokens: int = 0
    cache_write_1h_tokens: int = 0
    output_tokens: int = 0
    breakpoints_max: int = 0


class _Reject(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None,
                 error_type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
        self.error_type = error_type or _ERROR_TYPES.get(status, "api_error")


def _request_id() -> str:
    return "req_" + os.urandom(12).hex()


class Replica:
    """One upstream replica: an aiohttp server with its own prefix cache."""

    def __init__(self, index: int, config: UpstreamConfig, port: int = 0) -> None:
        self.index = index
        self.config = config
        self.port = port
        self.cache = PrefixCache(config.capacity_tokens)
        self.stats = ReplicaStats()
        self.faults: collections.deque[Fault] = collections.deque()
        # (message id, server-side milliseconds to the end, and to the first token) of recent
        # answers, for the benchmark; the time to first token includes queueing for a slot.
        self.timings: collections.deque[tuple[str, float, float]] = collections.deque(
            maxlen=200_000)
        self._slots = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency \
            else None
        self._runner: web.AppRunner | None = None
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        self.app.router.add_post("/v1/messages", self._anthropic)
        self.app.router.add_post("/v1/chat/completions", self._openai)
        self.app.router.add_post("/_nerve/faults", self._post_faults)
        self.app.router.add_get("/_nerve/stats", self._get_stats)
        self.app.router.add_post("/_nerve/reset", self._post_reset)

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._runner is not None

    async def start(self) -> None:
        """Listen (again) on this replica's port; its cache survives a stop/start."""
        if self._runner is not None:
            return
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                               shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, self.port, reuse_address=True)
        await site.start()
        if not self.port:
            server = site._server  # the asyncio server, for the port the OS chose
            assert server is not None and server.sockets
            self.port = server.sockets[0].getsockname()[1]
        self._runner = runner

    async def stop(self) -> None:
        """Stop listening and cut open connections (a dead replica)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def inject(self, *faults: Fault) -> None:
        self.faults.extend(faults)

    def reset(self) -> None:
        self.cache.clear()
        self.stats = ReplicaStats()
        self.faults.clear()
        self.timings.clear()

    # -- control -------------------------------------------------------------------------
    async def _post_faults(self, request: web.Request) -> web.Response:
        data = await request.json()
        faults = [Fault(**f) for f in (data.get("faults", []) if isinstance(data, dict)
                                       else data)]
        self.inject(*faults)
        return web.json_response({"queued": len(self.faults)})

    async def _get_stats(self, request: web.Request) -> web.Response:
        body = {"replica": self.index, "url": self.url, **asdict(self.stats),
                "cache_entries": len(self.cache), "cache_used_tokens": self.cache.used_tokens,
                "cache_evictions": self.cache.evictions}
        if request.query.get("timings"):
            body["timings"] = list(self.timings)
        return web.json_response(body)

    async def _post_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"reset": True})

    # -- shared --------------------------------------------------------------------------
    def _take_fault(self, raw: bytes) -> Fault | None:
        for i, fault in enumerate(self.faults):
            if fault.match is None or fault.match.encode() in raw:
                del self.faults[i]
                self.stats.faults += 1
                return fault
        return None

    def _check_auth(self, request: web.Request) -> None:
        if self.config.api_key is None:
            return
        key = request.headers.get("x-api-key") or ""
        auth = request.headers.get("authorization") or ""
        if auth.lower().startswith("bearer "):
            key = key or auth[7:]
        if key != self.config.api_key:
            raise _Reject(401, "invalid x-api-key")

    def _check_model(self, model: Any) -> None:
        if not isinstance(model, str) or not model:
            raise _Reject(400, "model: Field required")
        if self.config.models is not None and model not in self.config.models:
            raise _Reject(404, f"model: {model}")

    def _fault_error(self, fault: Fault) -> _Reject:
        status = int(fault.kind)
        headers: dict[str, str] = {}
        if fault.retry_after is not None:
            headers["retry-after"] = f"{fault.retry_after:g}"
            headers["retry-after-ms"] = f"{fault.retry_after * 1000:g}"
        message = {429: "Number of request tokens has exceeded your per-minute rate limit",
                   529: "Overloaded", 500: "Internal server error",
                   401: "invalid x-api-key", 400: "injected bad request"}[status]
        return _Reject(status, message, headers)

    def _latency(self, uncached: int) -> float:
        return self.config.base_latency + uncached * self.config.prefill_per_token

    def _account(self, usage: CacheResult, output_tokens: int) -> None:
        s = self.stats
        s.input_tokens += usage.input_tokens
        s.cache_read_tokens += usage.read
        s.cache_write_5m_tokens += usage.write_5m
        s.cache_write_1h_tokens += usage.write_1h
        s.output_tokens += output_tokens

    def _error_stat(self, status: int) -> None:
        self.stats.errors[str(status)] = self.stats.errors.get(str(status), 0) + 1

    @contextlib.asynccontextmanager
    async def _serving(self) -> Any:
        if self._slots is not None:
            await self._slots.acquire()
        self.stats.in_flight += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
        try:
            yield
        finally:
            self.stats.in_flight -= 1
            if self._slots is not None:
                self._slots.release()

    def _chunks(self, text: str) -> list[str]:
        words = _WORD.findall(text)
        n = max(1, self.config.words_per_delta)
        return ["".join(words[i:i + n]) for i in range(0, len(words), n)] or [""]

    async def _decode_pause(self, text: str) -> None:
        if self.config.decode_per_token > 0:
            await asyncio.sleep(self.config.decode_per_token * max(1, len(text) // 4))

    # -- Anthropic Messages --------------------------------------------------------------
    async def _anthropic(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        rid = _request_id()
        self.stats.requests += 1
        try:
            self._check_auth(request)
            if not request.headers.get("anthropic-version"):
                raise _Reject(400, "anthropic-version: header is required")
            raw = await request.read()
            try:
                body = json.loads(raw)
            except ValueError:
                raise _Reject(400, "There was an error parsing the body of your request: "
                              "invalid JSON") from None
            if not isinstance(body, dict):
                raise _Reject(400, "request body must be a JSON object")
            fault = self._take_fault(raw)
            if fault is not None and fault.kind not in ("midstream", "drop"):
                raise self._fault_error(fault)
            self._check_model(body.get("model"))
            breakpoints = _validate_anthropic(body)
            stream = bool(body.get("stream"))
            if fault is not None and not stream:
                # Without a stream there is no "after 200": an overload is a 529 and a
                # dropped connection is cut before the answer.
                if fault.kind == "drop" and request.transport is not None:
                    request.transport.abort()
                raise self._fault_error(Fault("529"))
        except _Reject as exc:
            self._error_stat(exc.status)
            return _anthropic_error(exc, rid)

        digests, cum = chain([block for _, block in prompt_blocks(body)])
        self.stats.breakpoints_max = max(self.stats.breakpoints_max, len(breakpoints))
        msg_id = "msg_" + rid[4:]
        async with self._serving():
            usage = self.cache.process(digests, cum, breakpoints,
                                       min_tokens=self.config.min_cacheable_tokens,
                                       lookback=self.config.lookback_blocks)
            turn = script_reply(body)
            wait = self._latency(usage.uncached)
            if wait > 0:
                await asyncio.sleep(wait)
            ttft = (time.perf_counter() - started) * 1000
            if not stream:
                await self._decode_pause("x" * 4 * turn.output_tokens)
                self._account(usage, turn.output_tokens)
                self.stats.ok += 1
                self.timings.append((msg_id, (time.perf_counter() - started) * 1000, ttft))
                return web.json_response(
                    _anthropic_message(msg_id, body["model"], turn, usage, final=True),
                    headers={"request-id": rid})
            self.stats.streams += 1
            resp = web.StreamResponse(headers={
                "content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache",
                "request-id": rid})
            await resp.prepare(request)
            try:
                done = await self._anthropic_sse(resp, msg_id, body["model"], turn, usage, fault,
                                                 request)
            except (ConnectionError, asyncio.CancelledError) as exc:
                self.stats.disconnects += 1
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return resp
            if done:
                self._account(usage, turn.output_tokens)
                self.stats.ok += 1
            self.timings.append((msg_id, (time.perf_counter() - started) * 1000, ttft))
            return resp

    async def _anthropic_sse(self, resp: web.StreamResponse, msg_id: str, model: str,
                             turn: ScriptedTurn, usage: CacheResult, fault: Fault | None,
                             request: web.Request) -> bool:
        sent = 0

        async def send(event: str, data: dict[str, Any]) -> bool:
            nonlocal sent
            if fault is not None and sent >= fault.after_events:
                if fault.kind == "midstream":
                    err = {"type": "error", "error": {"type": fault.error_type,
                                                      "message": "Overloaded"
                                                      if fault.error_type == "overloaded_error"
                                                      else "Internal server error"}}
                    await resp.write(_sse("error", err))
                    await resp.write_eof()
                elif request.transport is not None:
                    request.transport.abort()  # a dropped connection, no goodbye
                return False
            await resp.write(_sse(event, data))
            sent += 1
            return True

        start = _anthropic_message(msg_id, model, turn, usage, final=False)
        if not await send("message_start", {"type": "message_start", "message": start}):
            return False
        for index, block in enumerate(turn.content):
            if block["type"] == "text":
                opening = {"type": "text", "text": ""}
            else:
                opening = {"type": "tool_use", "id": block["id"], "name": block["name"],
                           "input": {}}
            if not await send("content_block_start", {"type": "content_block_start",
                                                      "index": index,
                                                      "content_block": opening}):
                return False
            if index == 0 and not await send("ping", {"type": "ping"}):
                return False
            if block["type"] == "text":
                for piece in self._chunks(block["text"]):
                    await self._decode_pause(piece)
                    if not await send("content_block_delta", {
                            "type": "content_block_delta", "index": index,
                            "delta": {"type": "text_delta", "text": piece}}):
                        return False
            else:
                payload = json.dumps(block["input"], ensure_ascii=False)
                pieces = [""] + [payload[i:i + 24] for i in range(0, len(payload), 24)]
                for piece in pieces:
                    await self._decode_pause(piece)
                    if not await send("content_block_delta", {
                            "type": "content_block_delta", "index": index,
                            "delta": {"type": "input_json_delta", "partial_json": piece}}):
                        return False
            if not await send("content_block_stop", {"type": "content_block_stop",
                                                     "index": index}):
                return False
        delta_usage = {"input_tokens": usage.input_tokens,
                       "cache_creation_input_tokens": usage.written,
                       "cache_read_input_tokens": usage.read,
                       "output_tokens": turn.output_tokens}
        if not await send("message_delta", {
                "type": "message_delta",
                "delta": {"stop_reason": turn.stop_reason, "stop_sequence": turn.stop_sequence},
                "usage": delta_usage}):
            return False
        if not await send("message_stop", {"type": "message_stop"}):
            return False
        await resp.write_eof()
        return True

    # -- OpenAI chat completions ---------------------------------------------------------
    async def _openai(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        rid = _request_id()
        self.stats.requests += 1
        try:
            self._check_auth(request)
            raw = await request.read()
            try:
                oa = json.loads(raw)
            except ValueError:
                raise _Reject(400, "invalid JSON body") from None
            if not isinstance(oa, dict) or not isinstance(oa.get("messages"), list) \
                    or not oa["messages"]:
                raise _Reject(400, "messages: a non-empty list is required")
            fault = self._take_fault(raw)
            if fault is not None and fault.kind not in ("midstream", "drop"):
                raise self._fault_error(fault)
            self._check_model(oa.get("model"))
            body = from_openai(oa)
            if not body["messages"]:
                raise _Reject(400, "messages: no user or assistant message")
            if fault is not None and not oa.get("stream"):
                if fault.kind == "drop" and request.transport is not None:
                    request.transport.abort()
                raise self._fault_error(Fault("529"))
        except _Reject as exc:
            self._error_stat(exc.status)
            return _openai_error(exc, rid)

        # Automatic prefix caching: every message (and the tools) is a cache boundary.
        units: list[Any] = []
        if oa.get("tools"):
            units.append({"tools": oa["tools"]})
        units.extend(oa["messages"])
        digests, cum = chain(units)
        chat_id = "chatcmpl-" + rid[4:]
        async with self._serving():
            usage = self.cache.process(digests, cum, [(i, "1h") for i in range(len(units))],
                                       min_tokens=0, lookback=None)
            turn = script_reply(body)
            wait = self._latency(usage.uncached)
            if wait > 0:
                await asyncio.sleep(wait)
            ttft = (time.perf_counter() - started) * 1000
            oa_usage = {"prompt_tokens": usage.total, "completion_tokens": turn.output_tokens,
                        "total_tokens": usage.total + turn.output_tokens,
                        "prompt_tokens_details": {"cached_tokens": usage.read}}
            model = oa["model"]
            created = int(time.time())
            if not oa.get("stream"):
                await self._decode_pause("x" * 4 * turn.output_tokens)
                self._account(usage, turn.output_tokens)
                self.stats.ok += 1
                self.timings.append((chat_id, (time.perf_counter() - started) * 1000, ttft))
                message: dict[str, Any] = {"role": "assistant",
                                           "content": "".join(b["text"] for b in turn.content
                                                              if b["type"] == "text") or None}
                calls = _openai_calls(turn)
                if calls:
                    message["tool_calls"] = calls
                return web.json_response({
                    "id": chat_id, "object": "chat.completion", "created": created,
                    "model": model, "choices": [{
                        "index": 0, "message": message,
                        "finish_reason": STOP_TO_FINISH.get(turn.stop_reason, "stop")}],
                    "usage": oa_usage}, headers={"x-request-id": rid})
            self.stats.streams += 1
            resp = web.StreamResponse(headers={
                "content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache",
                "x-request-id": rid})
            await resp.prepare(request)
            include_usage = bool((oa.get("stream_options") or {}).get("include_usage"))
            try:
                done = await self._openai_sse(resp, chat_id, model, created, turn, oa_usage,
                                              include_usage, fault, request)
            except (ConnectionError, asyncio.CancelledError) as exc:
                self.stats.disconnects += 1
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return resp
            if done:
                self._account(usage, turn.output_tokens)
                self.stats.ok += 1
            self.timings.append((chat_id, (time.perf_counter() - started) * 1000, ttft))
            return resp

    async def _openai_sse(self, resp: web.StreamResponse, chat_id: str, model: str,
                          created: int, turn: ScriptedTurn, usage: dict[str, Any],
                          include_usage: bool, fault: Fault | None,
                          request: web.Request) -> bool:
        sent = 0

        async def send(data: dict[str, Any] | str) -> bool:
            nonlocal sent
            if fault is not None and sent >= fault.after_events:
                if fault.kind == "midstream":
                    await resp.write(b"data: " + json.dumps({"error": {
                        "object": "error", "message": "Overloaded", "type": fault.error_type,
                        "code": 503}}).encode() + b"\n\n")
                    await resp.write_eof()
                elif request.transport is not None:
                    request.transport.abort()
                return False
            payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
            await resp.write(b"data: " + payload.encode() + b"\n\n")
            sent += 1
            return True

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {"id": chat_id, "object": "chat.completion.chunk", "created": created,
                    "model": model, "choices": [{"index": 0, "delta": delta,
                                                 "finish_reason": finish}]}

        if not await send(chunk({"role": "assistant", "content": ""})):
            return False
        for block in turn.content:
            if block["type"] == "text":
                for piece in self._chunks(block["text"]):
                    await self._decode_pause(piece)
                    if not await send(chunk({"content": piece})):
                        return False
        for i, call in enumerate(_openai_calls(turn)):
            args = call["function"]["arguments"]
            first = {"index": i, "id": call["id"], "type": "function",
                     "function": {"name": call["function"]["name"], "arguments": ""}}
            if not await send(chunk({"tool_calls": [first]})):
                return False
            for j in range(0, len(args), 24):
                if not await send(chunk({"tool_calls": [
                        {"index": i, "function": {"arguments": args[j:j + 24]}}]})):
                    return False
        if not await send(chunk({}, STOP_TO_FINISH.get(turn.stop_reason, "stop"))):
            return False
        if include_usage:
            if not await send({"id": chat_id, "object": "chat.completion.chunk",
                               "created": created, "model": model, "choices": [],
                               "usage": usage}):
                return False
        if not await send("[DONE]"):
            return False
        await resp.write_eof()
        return True


def _openai_calls(turn: ScriptedTurn) -> list[dict[str, Any]]:
    return [{"id": "call_" + b["id"].removeprefix("toolu_"), "type": "function",
             "function": {"name": b["name"], "arguments": canonical_json(b["input"])}}
            for b in turn.content if b["type"] == "tool_use"]


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def _anthropic_usage(usage: CacheResult, output_tokens: int) -> dict[str, Any]:
    return {"input_tokens": usage.input_tokens,
            "cache_creation_input_tokens": usage.written,
            "cache_read_input_tokens": usage.read,
            "cache_creation": {"ephemeral_5m_input_tokens": usage.write_5m,
                               "ephemeral_1h_input_tokens": usage.write_1h},
            "output_tokens": output_tokens, "service_tier": "standard"}


def _anthropic_message(msg_id: str, model: str, turn: ScriptedTurn, usage: CacheResult,
                       final: bool) -> dict[str, Any]:
    return {"id": msg_id, "type": "message", "role": "assistant", "model": model,
            "content": turn.content if final else [],
            "stop_reason": turn.stop_reason if final else None,
            "stop_sequence": turn.stop_sequence if final else None,
            "usage": _anthropic_usage(usage, turn.output_tokens if final else 1)}


def _anthropic_error(exc: _Reject, rid: str) -> web.Response:
    body = {"type": "error", "error": {"type": exc.error_type, "message": exc.message},
            "request_id": rid}
    return web.json_response(body, status=exc.status, headers={"request-id": rid, **exc.headers})


def _openai_error(exc: _Reject, rid: str) -> web.Response:
    body = {"error": {"message": exc.message, "type": exc.error_type, "param": None,
                      "code": str(exc.status)}}
    return web.json_response(body, status=exc.status,
                             headers={"x-request-id": rid, **exc.headers})


_BLOCK_TYPES = {"text", "tool_use", "tool_result", "image", "document", "thinking",
                "redacted_thinking"}


def _validate_anthropic(body: dict[str, Any]) -> list[tuple[int, str]]:
    """Check a Messages body as the API does; return its breakpoints ``(position, ttl)``."""
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
        raise _Reject(400, "max_tokens: Field required (an integer >= 0)")
    temperature = body.get("temperature")
    if temperature is not None and not (isinstance(temperature, int | float)
                                        and 0.0 <= temperature <= 1.0):
        raise _Reject(400, "temperature: range: 0..1")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _Reject(400, "messages: at least one message is required")
    system = body.get("system")
    if system is not None and not isinstance(system, str | list):
        raise _Reject(400, "system: Input should be a valid string or list of text blocks")
    for i, tool in enumerate(body.get("tools") or []):
        if not isinstance(tool, dict) or not tool.get("name") or (
                "input_schema" not in tool and "type" not in tool):
            raise _Reject(400, f"tools.{i}: name and input_schema are required")
    pending: set[str] = set()
    for m, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise _Reject(400, f"messages.{m}.role: Input should be 'user' or 'assistant'")
        content = message.get("content")
        if isinstance(content, str):
            blocks: list[Any] = []
        elif isinstance(content, list) and content:
            blocks = content
        else:
            raise _Reject(400, f"messages.{m}.content: a string or a non-empty list")
        answered: set[str] = set()
        calls: set[str] = set()
        for c, block in enumerate(blocks):
            if not isinstance(block, dict) or block.get("type") not in _BLOCK_TYPES:
                raise _Reject(400, f"messages.{m}.content.{c}.type: unknown block type")
            if block["type"] == "tool_use":
                calls.add(str(block.get("id")))
            elif block["type"] == "tool_result":
                if block.get("tool_use_id") not in pending:
                    raise _Reject(400, f"messages.{m}.content.{c}: unexpected `tool_use_id` "
                                  "found in `tool_result` blocks. Each `tool_result` block "
                                  "must have a corresponding `tool_use` block in the "
                                  "previous message.")
                answered.add(block["tool_use_id"])
        if pending - answered:
            raise _Reject(400, f"messages.{m}: `tool_use` ids were found without "
                          f"`tool_result` blocks immediately after: {sorted(pending - answered)}")
        pending = calls

    positions: list[tuple[int, str]] = []
    for pos, (_, block) in enumerate(prompt_blocks(body)):
        marker = block.get("cache_control")
        if marker is None:
            continue
        if not isinstance(marker, dict) or marker.get("type") != "ephemeral":
            raise _Reject(400, "cache_control.type: Input should be 'ephemeral'")
        ttl = marker.get("ttl", "5m")
        if ttl not in ("5m", "1h"):
            raise _Reject(400, "cache_control.ttl: Input should be '5m' or '1h'")
        positions.append((pos, ttl))
    auto = body.get("cache_control")
    if auto is not None:
        # Automatic caching: a marker on the last cacheable block, counted like the others.
        if not isinstance(auto, dict) or auto.get("type") != "ephemeral":
            raise _Reject(400, "cache_control.type: Input should be 'ephemeral'")
        last = len(prompt_blocks(body)) - 1
        if all(pos != last for pos, _ in positions):
            positions.append((last, auto.get("ttl", "5m")))
    if len(positions) > 4:
        raise _Reject(400, "A maximum of 4 blocks with cache_control may be provided. "
                      f"Found {len(positions)}.")
    seen_5m = False
    for _, ttl in positions:
        if ttl == "5m":
            seen_5m = True
        elif seen_5m:
            raise _Reject(400, "a ttl='1h' cache_control block must not come after a "
                          "ttl='5m' cache_control block")
    return positions


class LocalUpstream:
    """Several replicas of the local upstream, started and stopped together.

    ``async with LocalUpstream(UpstreamConfig(replicas=4)) as up: up.urls`` gives one base
    URL per replica; :meth:`replica` reaches one (its stats, faults, stop/start).
    """

    def __init__(self, config: UpstreamConfig | None = None) -> None:
        self.config = config or UpstreamConfig()
        self.replicas = [Replica(i, self.config, self.config.port + i if self.config.port
                                 else 0) for i in range(self.config.replicas)]

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    def replica(self, index: int) -> Replica:
        return self.replicas[index]

    async def start(self) -> LocalUpstream:
        for replica in self.replicas:
            await replica.start()
        return self

    async def stop(self) -> None:
        errors: list[BaseException] = []
        for replica in reversed(self.replicas):
            try:
                await replica.stop()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    async def __aenter__(self) -> LocalUpstream:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def stats(self) -> list[ReplicaStats]:
        return [r.stats for r in self.replicas]


def load_ratio(counts: list[float]) -> float:
    """max / mean of per-replica loads (1.0 is perfectly even)."""
    mean = sum(counts) / len(counts) if counts else 0
    return max(counts) / mean if mean else math.nan
