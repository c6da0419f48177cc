"""The prompt-cache planner: byte-stable requests and where their cache breakpoints go.

Anthropic caches a prompt prefix at each ``cache_control`` breakpoint (at most four per
request). A later request reads the cache when its prefix is byte-identical up to an entry
that was written within 20 blocks before one of its own breakpoints. So the planner:

* serializes deterministically: tools sorted by name, every dict with sorted keys, string
  content as one text block, nothing volatile added;
* places breakpoints: one after tools + system (shared by every run of an agent), one on
  the last block (the growing conversation, read back by the next turn), and anchors at fixed
  positions every ``anchor_every`` blocks so a turn that adds more than 20 blocks still
  finds an earlier entry; never more than four, and never on a prefix shorter than the
  model's minimum cacheable length (such a marker is silently ignored upstream);
* picks the TTL by the expected gap before the next call (1 h before a human wait or a long
  sandbox step, else 5 min);
* computes the digest chain the router hashes on and the stability tracker compares.
"""

from __future__ import annotations

import fnmatch
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway_actor._protocol import (
    LLMRequest,
    TextBlock,
    ToolResultBlock,
    ToolUseBlock,
)
from gateway_actor._tokens import canonical_json, chain, prompt_blocks

MAX_BREAKPOINTS = 4
LOOKBACK_BLOCKS = 20

# Minimum cacheable prefix per model family (tokens); the first matching glob wins.
DEFAULT_MIN_CACHEABLE: tuple[tuple[str, int], ...] = (
    ("claude-haiku-4-5*", 4096),
    ("claude-opus-4-5*", 4096),
    ("claude-opus-4-6*", 4096),
    ("claude-haiku-3*", 2048),
    ("claude-3-haiku*", 2048),
    ("*", 1024),
)

_VOLATILE = (
    ("an ISO timestamp", re.compile(r"\b\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2})?")),
    ("a UUID", re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b",
                          re.IGNORECASE)),
    ("a Unix timestamp", re.compile(r"\b1[6-9]\d{8}(\.\d+)?\b")),
)


@dataclass(slots=True)
class PlannerConfig:
    """Knobs of the cache planner (the defaults follow Anthropic's documented limits)."""

    anchor_every: int = 15
    max_breakpoints: int = MAX_BREAKPOINTS
    min_cacheable: tuple[tuple[str, int], ...] = DEFAULT_MIN_CACHEABLE

    def min_cacheable_tokens(self, model: str) -> int:
        for pattern, tokens in self.min_cacheable:
            if fnmatch.fnmatchcase(model, pattern):
                return tokens
        return 1024


@dataclass(slots=True)
class PlannedCall:
    """A request ready for a provider: the wire body and what the planner knows about it."""

    model: str
    request: LLMRequest
    body: dict[str, Any]  # Anthropic Messages body, without ``stream``
    labels: list[str]  # one per prompt block, in prompt order
    digests: list[bytes]  # hash chain: digests[i] covers blocks 0..i
    cum_tokens: list[int]  # tokens of blocks 0..i
    breakpoints: list[int]  # block positions carrying cache_control
    ttl: Literal["5m", "1h"] | None
    affinity_key: bytes  # the run's stable prefix (tools, system, first message)
    volatile: list[str] = field(default_factory=list)

    @property
    def input_tokens(self) -> int:
        return self.cum_tokens[-1] if self.cum_tokens else 0


def _sorted(value: Any) -> Any:
    """Recursively rebuild dicts with sorted keys, so their JSON is the same every time."""
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


def _wire_block(block: TextBlock | ToolUseBlock | ToolResultBlock) -> dict[str, Any]:
    if isinstance(block, TextBlock):
        return {"type": "text", "text": block.text}
    if isinstance(block, ToolUseBlock):
        return {"type": "tool_use", "id": block.id, "name": block.name,
                "input": _sorted(block.input)}
    out: dict[str, Any] = {"type": "tool_result", "tool_use_id": block.tool_use_id,
                           "content": _sorted(block.content)}
    if block.is_error:
        out["is_error"] = True
    return out


class CachePlanner:
    """Turns an :class:`LLMRequest` into a byte-stable, cache-marked :class:`PlannedCall`."""

    def __init__(self, config: PlannerConfig | None = None) -> None:
        self.config = config or PlannerConfig()
        # Lint results per tools+system prefix: the same agent sends the same prefix on
        # every call, and scanning a long system prompt on each would cost a millisecond.
        self._volatile_seen: OrderedDict[bytes, list[str]] = OrderedDict()

    def plan(self, request: LLMRequest, model: str) -> PlannedCall:
        body: dict[str, Any] = {"model": model, "max_tokens": request.max_tokens}
        if request.tools:
            body["tools"] = [
                {"name": t.name, "description": t.description,
                 "input_schema": _sorted(t.input_schema)}
                for t in sorted(request.tools, key=lambda t: t.name)
            ]
        if request.system:
            body["system"] = [{"type": "text", "text": request.system}]
        body["messages"] = [
            {"role": m.role, "content": [_wire_block(b) for b in m.blocks()]}
            for m in request.messages
        ]
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.stop_sequences:
            body["stop_sequences"] = list(request.stop_sequences)

        blocks = prompt_blocks(body)
        labels = [label for label, _ in blocks]
        digests, cum = chain([block for _, block in blocks])

        n_prefix = len(body.get("tools", [])) + len(body.get("system", []))
        first_message_end = n_prefix + len(body["messages"][0]["content"]) - 1
        affinity_key = digests[first_message_end]

        ttl: Literal["5m", "1h"] | None = None
        breakpoints: list[int] = []
        if request.cache == "auto":
            ttl = "1h" if request.expected_gap == "long" else "5m"
            breakpoints = self._breakpoints(n_prefix, cum, self.config.min_cacheable_tokens(model))
            self._mark(body, blocks, breakpoints, ttl)
        prefix_key = digests[n_prefix - 1] if n_prefix else b""
        volatile = self._volatile_seen.get(prefix_key)
        if volatile is None:
            volatile = self._volatile(request)
            self._volatile_seen[prefix_key] = volatile
            if len(self._volatile_seen) > 1024:
                self._volatile_seen.popitem(last=False)
        return PlannedCall(
            model=model, request=request, body=body, labels=labels, digests=digests,
            cum_tokens=cum, breakpoints=breakpoints, ttl=ttl, affinity_key=affinity_key,
            volatile=volatile,
        )

    def _breakpoints(self, n_prefix: int, cum: list[int], min_tokens: int) -> list[int]:
        last = len(cum) - 1
        limit = self.config.max_breakpoints
        chosen: list[int] = []
        if n_prefix and cum[n_prefix - 1] >= min_tokens and n_prefix - 1 < last:
            chosen.append(n_prefix - 1)
        # Anchors sit at fixed positions (every k-th conversation block), so the positions
        # one turn writes are the positions the next turn looks up.
        k = max(1, self.config.anchor_every)
        anchors = [p for p in range(n_prefix + k - 1, last, k) if cum[p] >= min_tokens]
        room = limit - len(chosen) - 1
        if room > 0:
            chosen.extend(anchors[-room:])
        if cum[last] >= min_tokens:
            chosen.append(last)
        return sorted(set(chosen))[-limit:]

    @staticmethod
    def _mark(body: dict[str, Any], blocks: list[tuple[str, dict[str, Any]]],
              positions: list[int], ttl: str) -> None:
        marker: dict[str, str] = {"type": "ephemeral"}
        if ttl == "1h":
            marker["ttl"] = "1h"
        # prompt_blocks returns the body's own dicts for tools and system blocks, and copies
        # (with the role added) for message blocks; find the real dict to mark.
        n_tools = len(body.get("tools", []))
        n_system = len(body.get("system", []))
        flat: list[dict[str, Any]] = list(body.get("tools", [])) + list(body.get("system", []))
        for message in body["messages"]:
            flat.extend(message["content"])
        assert len(flat) == len(blocks) and n_tools + n_system <= len(flat)
        for p in positions:
            flat[p]["cache_control"] = dict(marker)

    @staticmethod
    def _volatile(request: LLMRequest) -> list[str]:
        found: list[str] = []
        parts = [("system", request.system)] + [
            (f"tools[{t.name}]", t.description + canonical_json(t.input_schema))
            for t in request.tools]
        for where, text in parts:
            for what, pattern in _VOLATILE:
                if pattern.search(text):
                    found.append(f"{where} contains {what}; it changes the cached prefix "
                                 "whenever it changes: move it after the last breakpoint")
        return found


@dataclass(slots=True)
class PrefixBreak:
    """Which part of a run's request broke the prefix its previous request had cached."""

    run_id: str
    position: int  # first block that differs (or where the conversation now ends)
    part: str  # label of that block in the new request, e.g. "system[0]" or "tools[run]"
    previous_part: str
    kind: Literal["changed", "truncated"]
    cached_tokens_lost: int  # tokens of the old cached prefix that can no longer be read

    def describe(self) -> str:
        if self.kind == "truncated":
            return (f"run {self.run_id}: the conversation was cut at block {self.position} "
                    f"({self.previous_part}); {self.cached_tokens_lost} cached tokens lost")
        return (f"run {self.run_id}: {self.part} differs from the previous request's "
                f"{self.previous_part} (block {self.position}); {self.cached_tokens_lost} "
                "cached tokens after it cannot be read")


@dataclass(slots=True)
class _Seen:
    digests: list[bytes]
    labels: list[str]
    cum_tokens: list[int]
    cached_end: int  # last block position the previous request cached


class PrefixTracker:
    """Per run, compares each request's digest chain with the previous request's.

    A run's requests should only grow at the end; anything that changes an earlier block
    (a timestamp in the system prompt, tools in another order, an edited message) makes
    every cached token after it unreadable. :meth:`check` says which part did it.
    Bounded: remembers the last ``max_runs`` runs this process served.
    """

    def __init__(self, max_runs: int = 10_000) -> None:
        self.max_runs = max_runs
        self._seen: OrderedDict[str, _Seen] = OrderedDict()
        self.breaks: OrderedDict[str, list[PrefixBreak]] = OrderedDict()

    def check(self, run_id: str, plan: PlannedCall) -> PrefixBreak | None:
        previous = self._seen.pop(run_id, None)
        if plan.breakpoints:
            self._seen[run_id] = _Seen(plan.digests, plan.labels, plan.cum_tokens,
                                       plan.breakpoints[-1])
        while len(self._seen) > self.max_runs:
            self._seen.popitem(last=False)
        if previous is None:
            return None
        end = previous.cached_end
        found: PrefixBreak | None = None
        for i in range(min(end + 1, len(plan.digests))):
            if plan.digests[i] != previous.digests[i]:
                lost = previous.cum_tokens[end] - (previous.cum_tokens[i - 1] if i else 0)
                found = PrefixBreak(run_id, i, plan.labels[i], previous.labels[i], "changed",
                                    lost)
                break
        else:
            if len(plan.digests) <= end:
                i = len(plan.digests)
                lost = previous.cum_tokens[end] - previous.cum_tokens[i - 1]
                found = PrefixBreak(run_id, i, "(end)", previous.labels[i], "truncated", lost)
        if found is not None:
            runs = self.breaks.setdefault(run_id, [])
            runs.append(found)
            del runs[:-16]
            while len(self.breaks) > self.max_runs:
                self.breaks.popitem(last=False)
        return found

    def report(self, run_id: str) -> list[PrefixBreak]:
        """The prefix breaks seen for ``run_id`` (most recent last)."""
        return list(self.breaks.get(run_id, ()))
