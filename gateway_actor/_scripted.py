"""The ``scripted`` provider: the scripted model in-process, for the offline demo and tests.

It answers with :func:`~gateway_actor._script.script_reply` (real ``tool_use`` blocks for the
request's tools), streams the text a couple of words at a time (``token_delay`` seconds
apart), and reports usage from its own prompt cache, which follows the same rules as the
local upstream's, so cache planning shows up in its numbers too. Each upstream of a scripted
pool has its own cache.
"""

from __future__ import annotations

import asyncio
import re

from budget_actor import Usage
from gateway_actor._planner import PlannedCall
from gateway_actor._protocol import LLMResponse, TextBlock, ToolUseBlock
from gateway_actor._provider import Attempt, TextSink
from gateway_actor._router import Upstream
from gateway_actor._script import script_reply
from gateway_actor._upstream._cache import PrefixCache

_PIECE = re.compile(r"\S+\s*\S*\s*|\s+")


class ScriptedProvider:
    """The deterministic offline model (see :mod:`gateway_actor._script`)."""

    kind = "scripted"

    def __init__(self, *, token_delay: float = 0.0, min_cacheable_tokens: int = 1024,
                 capacity_tokens: int = 2_000_000) -> None:
        self.token_delay = token_delay
        self.min_cacheable_tokens = min_cacheable_tokens
        self.capacity_tokens = capacity_tokens
        self._caches: dict[str, PrefixCache] = {}
        self.calls = 0

    async def close(self) -> None:
        self._caches.clear()

    async def call(self, plan: PlannedCall, upstream: Upstream, *, stream: bool,
                   sink: TextSink | None, attempt: Attempt) -> LLMResponse:
        self.calls += 1
        cache = self._caches.setdefault(upstream.name, PrefixCache(self.capacity_tokens))
        ttl = plan.ttl or "5m"
        cached = cache.process(plan.digests, plan.cum_tokens,
                               [(p, ttl) for p in plan.breakpoints],
                               min_tokens=self.min_cacheable_tokens)
        turn = script_reply(plan.body)
        usage = Usage(input_tokens=cached.input_tokens, output_tokens=turn.output_tokens,
                      cache_creation_input_tokens=cached.written,
                      cache_read_input_tokens=cached.read,
                      cache_creation_5m_input_tokens=cached.write_5m,
                      cache_creation_1h_input_tokens=cached.write_1h)
        attempt.usage = usage.model_copy(update={"output_tokens": 0})
        blocks: list[TextBlock | ToolUseBlock] = []
        for block in turn.content:
            if block["type"] == "text":
                if stream:
                    for piece in _PIECE.findall(block["text"]):
                        if self.token_delay:
                            await asyncio.sleep(self.token_delay)
                        attempt.saw_text(len(piece))
                        if sink is not None:
                            sink(piece)
                blocks.append(TextBlock(text=block["text"]))
            else:
                blocks.append(ToolUseBlock(id=block["id"], name=block["name"],
                                           input=block["input"]))
        attempt.usage = usage
        return LLMResponse(id=f"msg_scripted_{plan.digests[-1].hex()[:24]}", model=plan.model,
                           content=blocks, stop_reason=turn.stop_reason,  # type: ignore[arg-type]
                           stop_sequence=turn.stop_sequence, usage=usage)
