"""Failures through the real SDK (and the openai provider) against the local upstream:
429/529/mid-stream errors and dropped connections are retried, without the client seeing
text twice; 400/401/404 are not retried and surface as typed errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy

from actors import decode
from bus import Bus
from gateway_actor import (
    Fault,
    Gateway,
    GatewayConfig,
    LLMRequest,
    LocalUpstream,
    Message,
    RetryPolicy,
    TokenStream,
    UpstreamConfig,
)
from nerve import InvalidLLMRequest, UpstreamError
from persistence import StreamEvent
from tests._gateway_util import SYSTEM, TOOLS

FAST = RetryPolicy(base_delay=0.01, max_delay=0.05, max_wait=2.0)
LONG_TASK = "[scripted:long 60] tell me a story"


@pytest.fixture
async def upstream() -> AsyncIterator[LocalUpstream]:
    async with LocalUpstream(UpstreamConfig(replicas=2)) as up:
        yield up


def gateway(upstream: LocalUpstream, provider: str = "anthropic", replicas: int = 1,
            **kwargs: Any) -> Gateway:
    return Gateway(GatewayConfig.for_urls(upstream.urls[:replicas], provider=provider,
                                          model="claude-test", retry=FAST,
                                          **kwargs))  # type: ignore[arg-type]


def request(task: str = "What is 17 * 23?", **kwargs: Any) -> LLMRequest:
    return LLMRequest(system=SYSTEM, tools=TOOLS, messages=[Message(role="user", content=task)],
                      max_tokens=500, **kwargs)


async def stream_events(bus: Bus, run_id: str) -> list[dict[str, Any]]:
    """Every token event stored for ``run_id``, in order."""
    subject = bus.names.stream(run_id)
    info = await bus.js.stream_info(bus.names.stream_stream, subjects_filter=subject)
    count = (info.state.subjects or {}).get(subject, 0)
    if not count:
        return []
    sub = await bus.js.pull_subscribe(subject, stream=bus.names.stream_stream,
                                      config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL))
    msgs = await sub.fetch(count, timeout=5)
    await sub.unsubscribe()
    return [decode(m.data, StreamEvent).data for m in msgs]


def client_view(events: list[dict[str, Any]]) -> str:
    """What an SSE client shows: ``text = text[:offset] + chunk``."""
    text = ""
    for e in events:
        text = text[: e["offset"]] + e["text"]
    return text


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
@pytest.mark.parametrize("fault", [Fault("429", retry_after=0.05), Fault("529"),
                                   Fault("500"), Fault("midstream", after_events=4),
                                   Fault("drop", after_events=4)],
                         ids=["429", "529", "500", "midstream", "drop"])
async def test_transient_failures_are_retried(upstream: LocalUpstream, provider: str,
                                              fault: Fault) -> None:
    gw = gateway(upstream, provider)
    upstream.replica(0).inject(fault)
    response = await gw.call(request(), run_id="r1")
    assert response.attempts == 2
    assert response.tool_uses[0].name == "write_file"
    stats = upstream.replica(0).stats
    assert stats.requests == 2 and stats.faults == 1
    await gw.close()


async def test_retry_after_is_honoured(upstream: LocalUpstream) -> None:
    gw = gateway(upstream)
    upstream.replica(0).inject(Fault("429", retry_after=0.2))
    router = gw.pools["anthropic"].router
    await gw.call(request())
    # The only upstream was parked for the retry-after the upstream asked for, then used.
    breaker = router.upstreams[0].breaker
    assert breaker is not None and breaker.parked_until > 0
    assert upstream.replica(0).stats.requests == 2
    await gw.close()


async def test_a_429_moves_the_call_to_another_replica(upstream: LocalUpstream) -> None:
    gw = gateway(upstream, replicas=2)
    home = gw.upstream_for(request())
    index = int(home.rsplit("-", 1)[1])
    upstream.replica(index).inject(Fault("429", retry_after=30))
    response = await gw.call(request())
    assert response.upstream != home and response.attempts == 2
    await gw.close()


@pytest.mark.parametrize("fault,error,status", [
    (Fault("400"), InvalidLLMRequest, 400),
    (Fault("401"), UpstreamError, 401),
])
async def test_permanent_failures_are_not_retried(upstream: LocalUpstream, fault: Fault,
                                                  error: type[Exception], status: int) -> None:
    gw = gateway(upstream)
    upstream.replica(0).inject(fault)
    with pytest.raises(error) as err:
        await gw.call(request())
    assert err.value.retryable is False  # type: ignore[attr-defined]
    assert err.value.status == status  # type: ignore[attr-defined]
    assert upstream.replica(0).stats.requests == 1
    await gw.close()


async def test_an_unknown_model_is_a_clear_invalid_request(upstream: LocalUpstream) -> None:
    async with LocalUpstream(UpstreamConfig(models=["claude-test"])) as only:
        gw = Gateway(GatewayConfig.for_urls(only.urls, model="claude-test", retry=FAST))
        with pytest.raises(InvalidLLMRequest, match="404"):
            await gw.call(request(model="claude-nope"))
        assert only.replica(0).stats.requests == 1
        # Out of Anthropic's temperature range: refused before any upstream sees it.
        with pytest.raises(InvalidLLMRequest, match="temperature"):
            await gw.call(request(temperature=1.5))
        assert only.replica(0).stats.requests == 1
        await gw.close()


async def test_every_upstream_down_fails_retryable_with_the_reason() -> None:
    async with LocalUpstream(UpstreamConfig(replicas=2)) as up:
        urls = up.urls
    gw = Gateway(GatewayConfig.for_urls(urls, model="claude-test",
                                        retry=RetryPolicy(max_attempts=3, base_delay=0.01,
                                                          max_wait=0.5)))
    with pytest.raises(UpstreamError) as err:
        await gw.call(request())
    assert err.value.retryable is True
    assert "unreachable" in err.value.message
    await gw.close()


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
async def test_a_cut_stream_is_retried_without_the_client_seeing_text_twice(
        bus: Bus, upstream: LocalUpstream, provider: str) -> None:
    gw = gateway(upstream, provider)
    # Cut twice, at different places, in the middle of the answer.
    upstream.replica(0).inject(Fault("midstream", after_events=12),
                               Fault("drop", after_events=25))
    sink = TokenStream(bus, run_id="cut-1", tenant="t", index=3, key="cut-1:3",
                       coalesce=0.0)
    response = await gw.call(request(LONG_TASK), run_id="cut-1", sink=sink)
    await sink.close()
    assert response.attempts == 3
    events = await stream_events(bus, "cut-1")
    assert client_view(events) == response.text
    # Nothing the client had was sent again: the chunks add up to the text exactly.
    assert sum(len(e["text"]) for e in events) == len(response.text)
    assert [e["offset"] for e in events] == sorted(e["offset"] for e in events)
    assert {e["index"] for e in events} == {3}
    await gw.close()


async def test_a_retry_that_says_something_else_overwrites_from_where_it_differs(
        bus: Bus) -> None:
    sink = TokenStream(bus, run_id="div-1", tenant="t", index=0, key="div-1:0", coalesce=0.0)
    for piece in ("The answer ", "is 41"):
        sink.feed(piece)
    sink.restart()  # the stream was cut; the next attempt says something else
    for piece in ("The answer ", "is 42, ", "I think."):
        sink.feed(piece)
    await sink.close()
    events = await stream_events(bus, "div-1")
    assert client_view(events) == "The answer is 42, I think."
    assert events[-1]["offset"] <= len("The answer is 4")  # rewound to the difference
    assert sink.text == "The answer is 42, I think."
