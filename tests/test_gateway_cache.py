"""The cache planner: byte-stable requests, breakpoint placement, TTLs, prefix stability;
and, through the real SDK against the local upstream, the hit rate it earns."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway_actor import (
    CachePlanner,
    Gateway,
    GatewayConfig,
    LLMRequest,
    LocalUpstream,
    Message,
    PlannerConfig,
    TextBlock,
    ToolSpec,
    UpstreamConfig,
)
from tests._gateway_util import SYSTEM, TOOLS, agent_run


@pytest.fixture
async def upstream() -> AsyncIterator[LocalUpstream]:
    async with LocalUpstream(UpstreamConfig(replicas=1)) as up:
        yield up


@pytest.fixture
async def gateway(upstream: LocalUpstream) -> AsyncIterator[Gateway]:
    gw = Gateway(GatewayConfig.for_urls(upstream.urls, model="claude-test"))
    yield gw
    await gw.close()


def test_serialization_is_byte_stable() -> None:
    planner = CachePlanner()
    schema_a = {"type": "object", "properties": {"b": {"type": "string"},
                                                 "a": {"type": "integer"}}}
    schema_b = {"properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
                "type": "object"}
    tools_a = [ToolSpec(name="zeta", input_schema=schema_a), ToolSpec(name="alpha")]
    tools_b = [ToolSpec(name="alpha"), ToolSpec(name="zeta", input_schema=schema_b)]
    messages = [Message(role="user", content="hi"),
                Message(role="assistant", content=[
                    {"type": "tool_use", "id": "t1", "name": "zeta",
                     "input": {"b": "x", "a": 1}}]),
                Message(role="user", content=[
                    {"type": "tool_result", "tool_use_id": "t1", "content": "ok"}])]
    flipped = [messages[0], Message(role="assistant", content=[
        {"type": "tool_use", "id": "t1", "name": "zeta", "input": {"a": 1, "b": "x"}}]),
        messages[2]]
    a = planner.plan(LLMRequest(system="s", tools=tools_a, messages=messages), "m")
    b = planner.plan(LLMRequest(system="s", tools=tools_b, messages=flipped), "m")
    # json.dumps keeps insertion order, as the SDK's encoder does: the bytes must match.
    assert json.dumps(a.body) == json.dumps(b.body)
    assert a.digests == b.digests
    assert [t["name"] for t in a.body["tools"]] == ["alpha", "zeta"]
    # A plain string and a one-text-block list are the same prompt.
    c = planner.plan(LLMRequest(messages=[Message(role="user", content=[
        TextBlock(text="hi")])]), "m")
    d = planner.plan(LLMRequest(messages=[Message(role="user", content="hi")]), "m")
    assert c.digests == d.digests


@settings(max_examples=150, deadline=None)
@given(blocks=st.lists(st.integers(min_value=1, max_value=3000), min_size=1, max_size=200),
       system=st.integers(min_value=0, max_value=8000), tools=st.booleans())
def test_never_more_than_four_breakpoints(blocks: list[int], system: int, tools: bool) -> None:
    messages = []
    for i, size in enumerate(blocks):
        messages.append(Message(role="user" if i % 2 == 0 else "assistant",
                                content="x" * size))
    request = LLMRequest(system="s" * system, tools=TOOLS if tools else [],
                         messages=messages)
    plan = CachePlanner().plan(request, "claude-test")
    assert len(plan.breakpoints) <= 4
    marked = json.dumps(plan.body).count('"cache_control"')
    assert marked == len(plan.breakpoints)
    # Every marker sits on a prefix long enough to be cached.
    assert all(plan.cum_tokens[p] >= 1024 for p in plan.breakpoints)
    if plan.cum_tokens[-1] >= 1024:
        assert plan.breakpoints[-1] == len(plan.cum_tokens) - 1  # the growing end


def test_ttl_follows_the_expected_gap() -> None:
    planner = CachePlanner()
    base = dict(system=SYSTEM, tools=TOOLS, messages=[Message(role="user", content="go")])
    short = planner.plan(LLMRequest(**base), "claude-test")
    long = planner.plan(LLMRequest(**base, expected_gap="long"), "claude-test")
    off = planner.plan(LLMRequest(**base, cache="off"), "claude-test")
    assert short.ttl == "5m" and long.ttl == "1h" and off.breakpoints == []
    assert '"ttl"' not in json.dumps(short.body)  # 5 minutes is the API's default
    assert json.dumps(long.body).count('"ttl": "1h"') == len(long.breakpoints) == 2
    assert "cache_control" not in json.dumps(off.body)
    # tools + system first, then the conversation's end.
    assert short.breakpoints == [len(TOOLS), len(TOOLS) + 1]


def test_a_short_tools_and_system_prefix_gets_no_breakpoint() -> None:
    plan = CachePlanner().plan(LLMRequest(system="be brief", messages=[
        Message(role="user", content="x" * 8000)]), "claude-test")
    assert plan.breakpoints == [1]  # only the (long) first message


async def test_a_multi_turn_run_reads_its_prefix_from_cache_from_the_second_turn(
        gateway: Gateway, upstream: LocalUpstream) -> None:
    turns = await agent_run(gateway, "run-1", "[scripted:loop] keep going", turns=8)
    assert len(turns) == 8
    assert turns[0].usage.cache_read_input_tokens == 0
    assert turns[0].usage.cache_creation_input_tokens == turns[0].usage.total_input_tokens
    for previous, turn in itertools.pairwise(turns):
        # Everything the previous turn sent is read back; only the new part is written.
        assert turn.usage.cache_read_input_tokens == previous.usage.total_input_tokens
        assert turn.usage.input_tokens == 0
    total = sum(t.usage.total_input_tokens for t in turns)
    read = sum(t.usage.cache_read_input_tokens for t in turns)
    assert read / total > 0.8
    assert upstream.replica(0).stats.breakpoints_max <= 4
    assert gateway.stability("run-1") == []


async def test_wide_turns_still_hit_thanks_to_anchors(upstream: LocalUpstream) -> None:
    async def run(planner: PlannerConfig) -> list[int]:
        gw = Gateway(GatewayConfig.for_urls(upstream.urls, model="claude-test",
                                            planner=planner))
        upstream.replica(0).reset()
        messages = [Message(role="user", content="start " * 50)]
        reads = []
        for turn in range(6):
            request = LLMRequest(system=SYSTEM, tools=TOOLS, messages=messages,
                                 max_tokens=100)
            reads.append((await gw.call(request)).usage.cache_read_input_tokens)
            # A wide turn: 26 blocks (think: a dozen parallel tool calls and results).
            messages = [*messages,
                        Message(role="assistant", content=[TextBlock(text=f"t{turn}-{i} " * 30)
                                                           for i in range(13)]),
                        Message(role="user", content=[TextBlock(text=f"r{turn}-{i} " * 30)
                                                      for i in range(13)])]
        await gw.close()
        return reads

    prefix = CachePlanner().plan(LLMRequest(system=SYSTEM, tools=TOOLS, messages=[
        Message(role="user", content="x")]), "claude-test").cum_tokens[len(TOOLS)]
    with_anchors = await run(PlannerConfig())
    without = await run(PlannerConfig(anchor_every=10_000))
    # Without anchors each turn adds more than the 20-block lookback: only tools + system
    # are found again. With anchors the conversation is read back too.
    assert all(r == prefix for r in without[2:])
    assert all(r > prefix for r in with_anchors[2:])
    assert sum(with_anchors) > 2 * sum(without)


def test_the_prefix_check_names_the_part_that_broke_the_cache() -> None:
    planner = CachePlanner()
    gw = Gateway(GatewayConfig.scripted())

    def request(system: str, first: str = "task", tools: list[ToolSpec] = TOOLS,
                turns: int = 2) -> LLMRequest:
        messages = [Message(role="user", content=first)]
        for i in range(turns):
            messages += [Message(role="assistant", content=f"step {i} " * 200),
                         Message(role="user", content=f"more {i} " * 200)]
        return LLMRequest(system=system, tools=tools, messages=messages)

    tracker = gw.tracker
    assert tracker.check("r", planner.plan(request(SYSTEM + "now: 2026-01-01 10:00"),
                                           "m")) is None
    # The next turn of the run, with the timestamp moved on: the system prompt broke it.
    brk = tracker.check("r", planner.plan(request(SYSTEM + "now: 2026-01-01 10:05",
                                                  turns=3), "m"))
    assert brk is not None and brk.kind == "changed"
    assert brk.part == "system[0]" and brk.position == len(TOOLS)
    assert brk.cached_tokens_lost > 1000
    assert "system[0]" in brk.describe()
    # Tools in another order are not a break (they are sorted); an edited first message is.
    assert tracker.check("r", planner.plan(request(SYSTEM + "now: 2026-01-01 10:05",
                                                   tools=TOOLS[::-1], turns=4), "m")) is None
    brk = tracker.check("r", planner.plan(request(SYSTEM + "now: 2026-01-01 10:05",
                                                  first="task, edited", turns=5), "m"))
    assert brk is not None and brk.part == "messages[0].content[0]"
    # A conversation cut short (compaction) loses what was cached after the cut.
    brk = tracker.check("r", planner.plan(request(SYSTEM + "now: 2026-01-01 10:05",
                                                  first="task, edited", turns=1), "m"))
    assert brk is not None and brk.kind == "truncated"
    assert [b.part for b in tracker.report("r")] == ["system[0]", "messages[0].content[0]",
                                                    "(end)"]
    # And the planner points at the cause before anything breaks.
    plan = planner.plan(request(SYSTEM + "now: 2026-01-01 10:05"), "m")
    assert any("system contains an ISO timestamp" in v for v in plan.volatile)
