"""The local upstream speaks Anthropic's and OpenAI's wire protocols: checked with the real
``anthropic`` SDK and raw HTTP, including prompt-cache rules and usage fields."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import pytest

from gateway_actor import Fault, LocalUpstream, UpstreamConfig
from gateway_actor._upstream import PrefixCache
from tests._gateway_util import SYSTEM, TOOLS

_clients: list[anthropic.AsyncAnthropic] = []


@pytest.fixture
async def upstream() -> AsyncIterator[LocalUpstream]:
    async with LocalUpstream(UpstreamConfig(replicas=2)) as up:
        yield up
        while _clients:
            await _clients.pop().close()


def sdk(url: str, key: str = "test-key") -> anthropic.AsyncAnthropic:
    client = anthropic.AsyncAnthropic(api_key=key, base_url=url, max_retries=0)
    _clients.append(client)
    return client


def body(task: str = "What is 17 * 23?", *, system_ttl: str | None = "5m",
         last_ttl: str | None = "5m", extra: list[dict[str, Any]] | None = None,
         ) -> dict[str, Any]:
    def marker(ttl: str | None) -> dict[str, Any]:
        if ttl is None:
            return {}
        return {"cache_control": {"type": "ephemeral", **({"ttl": ttl} if ttl == "1h" else {})}}

    messages: list[dict[str, Any]] = [{"role": "user", "content": [
        {"type": "text", "text": task, **({} if extra else marker(last_ttl))}]}]
    if extra:
        messages.extend(extra)
        last = messages[-1]["content"][-1]
        last.update(marker(last_ttl))
    return {"model": "claude-test", "max_tokens": 500,
            "system": [{"type": "text", "text": SYSTEM, **marker(system_ttl)}],
            "tools": [t.model_dump(exclude={"requires_approval"}) for t in TOOLS],
            "messages": messages}


async def test_streaming_assembles_the_same_message_as_non_streaming(
        upstream: LocalUpstream) -> None:
    # Two replicas with empty caches, so usage must match too.
    plain = await sdk(upstream.urls[0]).messages.create(**body())
    async with sdk(upstream.urls[1]).messages.stream(**body()) as stream:
        deltas = [e.text async for e in stream if e.type == "text"]
        streamed = await stream.get_final_message()
    assert [b.model_dump(exclude={"citations", "caller", "toolset_name"}) for b in plain.content] \
        == [b.model_dump(exclude={"citations", "caller", "toolset_name", "parsed_output"})
            for b in streamed.content]
    assert plain.content[1].type == "tool_use" and plain.content[1].name == "write_file"
    assert plain.content[1].input == {"path": "main.py", "content": "print(17 * 23)\n"}
    assert "".join(deltas) == plain.content[0].text
    assert len(deltas) > 1  # it really streamed, in pieces
    assert (plain.stop_reason, streamed.stop_reason) == ("tool_use", "tool_use")
    assert plain.usage.model_dump() == streamed.usage.model_dump()
    assert upstream.replica(1).stats.streams == 1


async def test_usage_with_cache_fields_is_parsed(upstream: LocalUpstream) -> None:
    client = sdk(upstream.urls[0])
    first = await client.messages.create(**body(system_ttl="1h", last_ttl="5m"))
    u = first.usage
    assert u.cache_read_input_tokens == 0
    assert u.cache_creation is not None
    assert u.cache_creation.ephemeral_1h_input_tokens > 1000  # tools + system
    assert u.cache_creation.ephemeral_5m_input_tokens > 0  # the first message
    assert u.cache_creation_input_tokens == (u.cache_creation.ephemeral_1h_input_tokens
                                             + u.cache_creation.ephemeral_5m_input_tokens)
    assert u.input_tokens == 0  # nothing after the last breakpoint
    async with client.messages.stream(**body(system_ttl="1h", last_ttl="5m")) as stream:
        second = await stream.get_final_message()
    # The whole prefix was cached by the first call; the stream's cumulative message_delta
    # usage must carry the cache fields through the SDK's accumulator.
    assert second.usage.cache_read_input_tokens == u.cache_creation_input_tokens
    assert second.usage.cache_creation_input_tokens == 0
    assert second.usage.output_tokens == u.output_tokens


async def test_more_than_four_breakpoints_is_a_400(upstream: LocalUpstream) -> None:
    turns: list[dict[str, Any]] = []
    for i in range(2):
        turns.append({"role": "assistant", "content": [
            {"type": "text", "text": f"step {i}", "cache_control": {"type": "ephemeral"}}]})
        turns.append({"role": "user", "content": [
            {"type": "text", "text": f"go on {i}", "cache_control": {"type": "ephemeral"}}]})
    too_many = body(extra=turns)  # system + 4 = 5 breakpoints
    with pytest.raises(anthropic.BadRequestError) as err:
        await sdk(upstream.urls[0]).messages.create(**too_many)
    assert "A maximum of 4 blocks with cache_control may be provided. Found 5." in str(
        err.value)
    four = body(extra=turns[:3])  # system + 3
    assert (await sdk(upstream.urls[0]).messages.create(**four)).stop_reason


async def test_a_1h_breakpoint_after_a_5m_one_is_a_400(upstream: LocalUpstream) -> None:
    with pytest.raises(anthropic.BadRequestError, match="ttl='1h'"):
        await sdk(upstream.urls[0]).messages.create(**body(system_ttl="5m", last_ttl="1h"))


async def test_a_prefix_below_the_minimum_length_is_not_cached(
        upstream: LocalUpstream) -> None:
    short = {"model": "claude-test", "max_tokens": 100, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is 2 + 2?",
                                      "cache_control": {"type": "ephemeral"}}]}]}
    for _ in range(2):
        usage = (await sdk(upstream.urls[0]).messages.create(**short)).usage
        assert usage.cache_creation_input_tokens == 0 and usage.cache_read_input_tokens == 0
        assert usage.input_tokens > 0


async def test_a_breakpoint_looks_back_at_most_20_blocks(upstream: LocalUpstream) -> None:
    client = sdk(upstream.urls[0])

    def conversation(n: int) -> list[dict[str, Any]]:
        # n more exchanges of one block each after the first message.
        out: list[dict[str, Any]] = []
        for i in range(n):
            out.append({"role": "assistant", "content": [{"type": "text", "text": f"a{i}"}]})
            out.append({"role": "user", "content": [{"type": "text", "text": f"u{i}"}]})
        return out

    first = await client.messages.create(**body(system_ttl=None))
    written = first.usage.cache_creation_input_tokens
    assert written > 0
    # 22 blocks later, the only breakpoint cannot see the entry: a miss.
    far = await client.messages.create(**body(system_ttl=None, extra=conversation(11)))
    assert far.usage.cache_read_input_tokens == 0
    # 18 blocks later it can.
    near = await client.messages.create(**body(system_ttl=None, extra=conversation(9)))
    assert near.usage.cache_read_input_tokens == written


def test_entries_expire_by_ttl_and_hits_refresh_them() -> None:
    now = [0.0]
    cache = PrefixCache(clock=lambda: now[0])
    digests = [b"a", b"b", b"c"]
    cum = [600, 1200, 1800]
    r = cache.process(digests, cum, [(1, "1h"), (2, "5m")], min_tokens=1024)
    assert (r.read, r.write_1h, r.write_5m) == (0, 1200, 600)
    now[0] = 299.0  # a hit just before the 5 minutes end refreshes the entry
    assert cache.process(digests, cum, [(2, "5m")], min_tokens=1024).read == 1800
    now[0] = 500.0
    assert cache.process(digests, cum, [(2, "5m")], min_tokens=1024).read == 1800
    now[0] = 900.0  # 5 min after the last hit: gone, but the 1 h entry is there
    r = cache.process(digests, cum, [(1, "1h"), (2, "5m")], min_tokens=1024)
    assert (r.read, r.write_5m) == (1200, 600)
    now[0] = 900.0 + 3601
    assert cache.process(digests, cum, [(1, "1h")], min_tokens=1024).read == 0


def test_the_cache_evicts_least_recently_used_entries() -> None:
    cache = PrefixCache(capacity_tokens=2500)
    for name in (b"x", b"y", b"z"):
        cache.process([name], [1200], [(0, "5m")], min_tokens=0)
    assert cache.evictions == 1 and cache.used_tokens == 2400
    assert cache.process([b"x"], [1200], [(0, "5m")], min_tokens=0).read == 0  # evicted
    assert cache.process([b"z"], [1200], [(0, "5m")], min_tokens=0).read == 1200


async def test_errors_have_anthropics_shape(upstream: LocalUpstream) -> None:
    async with LocalUpstream(UpstreamConfig(api_key="right", models=["claude-test"])) as up:
        with pytest.raises(anthropic.AuthenticationError):
            await sdk(up.urls[0], "wrong").messages.create(**body())
        client = sdk(up.urls[0], "right")
        with pytest.raises(anthropic.NotFoundError):
            await client.messages.create(**{**body(), "model": "claude-nope"})
        with pytest.raises(anthropic.BadRequestError, match="tool_result"):
            await client.messages.create(**body(extra=[{"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_nope", "content": "x"}]}]))
        up.replica(0).inject(Fault("529"))
        with pytest.raises(anthropic.InternalServerError) as err:
            await client.messages.create(**body())
        assert err.value.status_code == 529
        assert err.value.body["error"]["type"] == "overloaded_error"


async def test_the_sdk_sees_a_mid_stream_error_event_after_200(
        upstream: LocalUpstream) -> None:
    upstream.replica(0).inject(Fault("midstream", after_events=5))
    with pytest.raises(anthropic.APIStatusError) as err:
        async with sdk(upstream.urls[0]).messages.stream(**body()) as stream:
            async for _ in stream:
                pass
    assert err.value.status_code == 200
    assert err.value.body["error"]["type"] == "overloaded_error"


async def _openai(url: str, payload: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """POST a chat completion; returns the JSON answer, or the stream's data lines."""
    async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/chat/completions",
                                                    json=payload) as resp:
        assert resp.status == 200
        if not payload.get("stream"):
            return await resp.json(), []
        lines = [line.decode().strip() async for line in resp.content]
        return {}, [line[6:] for line in lines if line.startswith("data: ")]


async def test_openai_chat_completions_stream_and_not(upstream: LocalUpstream) -> None:
    payload = {"model": "qwen", "messages": [{"role": "system", "content": SYSTEM},
                                             {"role": "user", "content": "What is 6 * 7?"}],
               "tools": [{"type": "function", "function": {
                   "name": t.name, "description": t.description,
                   "parameters": t.input_schema}} for t in TOOLS]}
    answer, _ = await _openai(upstream.urls[0], payload)
    message = answer["choices"][0]["message"]
    assert answer["choices"][0]["finish_reason"] == "tool_calls"
    call = message["tool_calls"][0]
    assert call["function"]["name"] == "write_file"
    assert json.loads(call["function"]["arguments"])["content"] == "print(6 * 7)\n"
    assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == 0

    _, data = await _openai(upstream.urls[0], {**payload, "stream": True,
                                               "stream_options": {"include_usage": True}})
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or ""
                   for c in chunks if c["choices"])
    args = "".join(tc["function"].get("arguments", "")
                   for c in chunks if c["choices"]
                   for tc in c["choices"][0]["delta"].get("tool_calls") or [])
    assert text == message["content"]
    assert args == call["function"]["arguments"]
    usage = chunks[-1]["usage"]
    # Automatic prefix caching: the second request reads everything the first one saw.
    assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"]


async def test_nerve_upstream_command_serves_the_sdk() -> None:
    nerve = str(Path(sys.executable).parent / "nerve")
    proc = await asyncio.create_subprocess_exec(
        nerve, "upstream", "--port", "0", "--replicas", "2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        urls = json.loads(line)["urls"]
        assert len(urls) == 2
        client = anthropic.AsyncAnthropic(api_key="k", base_url=urls[1], max_retries=0)
        message = await client.messages.create(**body())
        await client.close()
        assert message.content[1].name == "write_file"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0


async def test_faults_can_be_queued_over_http(upstream: LocalUpstream) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{upstream.urls[0]}/_nerve/faults",
                          json={"faults": [{"kind": "429", "retry_after": 7}]}) as resp:
            assert (await resp.json())["queued"] == 1
        with pytest.raises(anthropic.RateLimitError) as err:
            await sdk(upstream.urls[0]).messages.create(**body())
        assert err.value.response.headers["retry-after"] == "7"
        async with s.get(f"{upstream.urls[0]}/_nerve/stats") as resp:
            stats = await resp.json()
        assert stats["faults"] == 1 and stats["errors"] == {"429": 1}
        async with s.post(f"{upstream.urls[0]}/_nerve/reset") as resp:
            assert (await resp.json())["reset"]
    assert upstream.replica(0).stats.requests == 0
