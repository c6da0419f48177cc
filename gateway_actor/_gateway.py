"""The gateway core: plan, route, call, retry, fall back; no bus involved.

:class:`Gateway` is what the actor (and the benchmark) calls for one LLM request. It resolves
the model to a pool, plans the request for the prompt cache, checks the run's prefix
stability, picks an upstream with the pool's router and calls its provider. Failures are
retried by kind:

* ``rate_limited`` / ``overloaded`` (429, 529, an ``overloaded_error`` event): the upstream
  is parked for ``retry-after`` (or a backoff) and the call goes to the next upstream of its
  ranking, or waits for the parked one when it is the only one;
* ``unreachable``: the upstream's breaker opens, the call moves on;
* ``server_error`` / ``stream_cut``: a short backoff, then again (same ranking, so usually
  the same upstream and its cache);
* anything not retryable (400, 401, 403, 404) is raised at once.

A retry restarts the token sink (:class:`TokenSink`), which hides from the client what it
already saw. Each call is an OpenTelemetry span following the GenAI conventions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlparse

from opentelemetry import trace

from budget_actor import Usage
from gateway_actor._config import GatewayConfig, PoolConfig
from gateway_actor._planner import CachePlanner, PlannedCall, PrefixBreak, PrefixTracker
from gateway_actor._protocol import LLMRequest, LLMResponse
from gateway_actor._provider import Attempt, Provider
from gateway_actor._router import NoUpstream, Router, Upstream
from nerve import ConfigError, InvalidLLMRequest, UpstreamError

log = logging.getLogger("nerve.gateway")
tracer = trace.get_tracer("nerve.gateway")


class TokenSink(Protocol):
    """Where a call's text deltas go. ``restart`` is called before every retry."""

    def feed(self, text: str) -> None: ...

    def restart(self) -> None: ...


@dataclass(slots=True)
class CallRecord:
    """What happened during one call, for accounting (filled in as the call goes)."""

    run_id: str | None = None
    model: str = ""
    pool: str = ""
    plan: PlannedCall | None = None
    attempts: list[Attempt] = field(default_factory=list)
    prefix_break: PrefixBreak | None = None
    started: float = field(default_factory=time.perf_counter)

    def partial_usage(self) -> Usage | None:
        """Best knowledge of what the last attempt consumed, when it did not finish."""
        if not self.attempts:
            return None
        last = self.attempts[-1]
        if last.usage is None:
            return None
        usage = last.usage.model_copy()
        usage.output_tokens = max(usage.output_tokens, (last.output_chars + 3) // 4)
        return usage


@dataclass(slots=True)
class _Pool:
    config: PoolConfig
    router: Router
    provider: Provider


class Gateway:
    """Plans, routes and performs LLM calls for one process (any number may run)."""

    def __init__(self, config: GatewayConfig | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 providers: dict[str, Provider] | None = None) -> None:
        self.config = config or GatewayConfig.from_env()
        self.clock = clock
        self.planner = CachePlanner(self.config.planner)
        self.tracker = PrefixTracker()
        self._providers: dict[str, Provider] = dict(providers or {})
        self.pools: dict[str, _Pool] = {}
        for pool in self.config.pools:
            upstreams = [Upstream(u.name, base_url=u.base_url, api_key=u.key(),
                                  weight=u.weight) for u in pool.upstreams]
            if pool.provider == "anthropic":
                for u in upstreams:
                    if not u.api_key and (not u.base_url or "api.anthropic.com" in u.base_url):
                        raise ConfigError(
                            f"pool {pool.name!r}: upstream {u.name!r} calls Anthropic's API "
                            "but has no key; set ANTHROPIC_API_KEY (or api_key_env)")
            router = Router(upstreams, policy=pool.policy, load_factor=pool.load_factor,
                            stay_factor=pool.stay_factor, breaker=self.config.breaker,
                            clock=clock)
            self.pools[pool.name] = _Pool(pool, router, self._provider(pool.provider))

    def _provider(self, kind: str) -> Provider:
        provider = self._providers.get(kind)
        if provider is None:
            # Imported here: a gateway loads only the SDKs its pools use.
            if kind == "anthropic":
                from gateway_actor._anthropic import AnthropicProvider

                provider = AnthropicProvider(timeout=self.config.timeout)
            elif kind == "openai":
                from gateway_actor._openai import OpenAIProvider

                provider = OpenAIProvider(timeout=self.config.timeout)
            else:
                from gateway_actor._scripted import ScriptedProvider

                provider = ScriptedProvider(
                    token_delay=self.config.scripted_token_delay,
                    min_cacheable_tokens=self.config.scripted_min_cacheable_tokens)
            self._providers[kind] = provider
        return provider

    async def close(self) -> None:
        errors: list[BaseException] = []
        for provider in self._providers.values():
            try:
                await provider.close()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    # -- planning ------------------------------------------------------------------------
    def resolve(self, request: LLMRequest) -> tuple[str, _Pool]:
        model = request.model or self.config.default_model
        pool_config = self.config.pool_for(model)
        if pool_config is None:
            served = sorted({m for p in self.config.pools for m in p.models})
            raise InvalidLLMRequest(f"no upstream pool serves model {model!r}; this gateway "
                                    f"serves {served}", model=model)
        pool = self.pools[pool_config.name]
        if pool_config.provider == "anthropic" and request.temperature is not None \
                and request.temperature > 1.0:
            raise InvalidLLMRequest(f"temperature {request.temperature} is out of range for "
                                    f"{model} (Anthropic accepts 0..1)", model=model)
        return model, pool

    def plan(self, request: LLMRequest) -> PlannedCall:
        model, _ = self.resolve(request)
        return self.planner.plan(request, model)

    def upstream_for(self, request: LLMRequest) -> str:
        """The upstream the next call of ``request`` would go to (no load counted)."""
        model, pool = self.resolve(request)
        plan = self.planner.plan(request, model)
        return pool.router.pick(plan.affinity_key).name

    def stability(self, run_id: str) -> list[PrefixBreak]:
        """The prefix breaks this gateway saw for ``run_id`` (see :class:`PrefixTracker`)."""
        return self.tracker.report(run_id)

    # -- calling -------------------------------------------------------------------------
    async def call(self, request: LLMRequest, *, run_id: str | None = None,
                   sink: TokenSink | None = None, record: CallRecord | None = None,
                   plan: PlannedCall | None = None) -> LLMResponse:
        """Perform ``request``; raises :class:`~nerve.InvalidLLMRequest` or
        :class:`~nerve.UpstreamError` (``retryable`` says whether to try again later).

        ``plan``: the request as :meth:`plan` already planned it (saves doing it twice).
        """
        record = record if record is not None else CallRecord(run_id=run_id)
        record.run_id = run_id
        model, pool = self.resolve(request)
        if plan is None or plan.request is not request:
            plan = self.planner.plan(request, model)
        record.model, record.pool, record.plan = model, pool.config.name, plan
        if run_id is not None:
            record.prefix_break = self.tracker.check(run_id, plan)
            if record.prefix_break is not None:
                log.warning("prefix break: %s", record.prefix_break.describe())
        with tracer.start_as_current_span(f"chat {model}", kind=trace.SpanKind.CLIENT,
                                          attributes=_request_attributes(pool, plan, run_id)
                                          ) as span:
            try:
                response = await self._attempts(pool, plan, request, sink, record)
            except (UpstreamError, InvalidLLMRequest) as exc:
                span.set_attribute("error.type", str(exc.fields.get("kind")
                                                     or type(exc).__name__))
                raise
            _response_attributes(span, response)
        return response

    async def _attempts(self, pool: _Pool, plan: PlannedCall, request: LLMRequest,
                        sink: TokenSink | None, record: CallRecord) -> LLMResponse:
        retry = self.config.retry
        router = pool.router
        last: UpstreamError | None = None
        failures = 0
        while len(record.attempts) < retry.max_attempts:
            try:
                upstream = router.pick(plan.affinity_key)
            except NoUpstream as exc:
                wait = exc.retry_at - self.clock()
                if wait > retry.max_wait:
                    raise self._exhausted(pool, last, f"every upstream is unavailable for "
                                                      f"another {wait:.1f}s") from None
                await asyncio.sleep(max(0.0, wait))
                continue
            attempt = Attempt(upstream.name, len(record.attempts) + 1)
            record.attempts.append(attempt)
            if attempt.number > 1 and sink is not None:
                sink.restart()
            feed = sink.feed if sink is not None else None
            assert upstream.breaker is not None
            breaker = upstream.breaker
            settled = False
            try:
                with router.using(upstream):
                    response = await pool.provider.call(plan, upstream, stream=request.stream,
                                                        sink=feed, attempt=attempt)
                breaker.success()
                settled = True
            except UpstreamError as exc:
                settled = True
                if not exc.retryable:
                    raise
                last = exc
                failures += 1
                kind = exc.fields.get("kind")
                retry_after = exc.fields.get("retry_after")
                if kind == "unreachable":
                    breaker.failure(hard=True)
                elif kind == "rate_limited":
                    breaker.throttled(retry_after or retry.backoff(failures))
                elif kind == "overloaded":
                    breaker.failure(hard=False, retry_after=retry_after or retry.backoff(failures))
                else:
                    breaker.failure(hard=False)
                    await asyncio.sleep(retry.backoff(failures))
                log.info("%s attempt %d on %s failed (%s); retrying", record.run_id or "call",
                         attempt.number, upstream.name, exc.message)
                continue
            except InvalidLLMRequest:
                settled = True
                breaker.success()  # the upstream answered: it is healthy
                raise
            finally:
                if not settled:
                    # Cancelled (a kill, a deadline) or crashed: no verdict on the upstream,
                    # but a half-open breaker must not wait forever for this probe.
                    breaker.probing = False
            now = time.perf_counter()
            response.upstream = upstream.name
            response.attempts = attempt.number
            response.latency_ms = (now - record.started) * 1000
            if attempt.first_token is not None:
                response.ttft_ms = (attempt.first_token - record.started) * 1000
            if not response.model:
                response.model = plan.model
            return response
        raise self._exhausted(pool, last, f"gave up after {len(record.attempts)} attempts")

    @staticmethod
    def _exhausted(pool: _Pool, last: UpstreamError | None, why: str) -> UpstreamError:
        detail = f"; last error: {last.message}" if last is not None else ""
        return UpstreamError(f"pool {pool.config.name!r}: {why}{detail}", retryable=True,
                             kind="exhausted", status=(last.fields.get("status", 0)
                                                       if last is not None else 0),
                             upstream=(last.fields.get("upstream", "") if last is not None
                                       else ""), error_type="", retry_after=None)


def _request_attributes(pool: _Pool, plan: PlannedCall, run_id: str | None) -> dict:
    attrs: dict[str, object] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": pool.config.provider,
        "gen_ai.request.model": plan.model,
        "gen_ai.request.max_tokens": plan.request.max_tokens,
        "nerve.gateway.pool": pool.config.name,
        "nerve.gateway.breakpoints": len(plan.breakpoints),
    }
    if plan.request.temperature is not None:
        attrs["gen_ai.request.temperature"] = plan.request.temperature
    if run_id:
        attrs["gen_ai.conversation.id"] = run_id
    with contextlib.suppress(ValueError):
        url = urlparse(pool.router.upstreams[0].base_url)
        if url.hostname:
            attrs["server.address"] = url.hostname
    return attrs


def _response_attributes(span: trace.Span, response: LLMResponse) -> None:
    u = response.usage
    span.set_attribute("gen_ai.response.id", response.id)
    span.set_attribute("gen_ai.response.model", response.model)
    if response.stop_reason:
        span.set_attribute("gen_ai.response.finish_reasons", [response.stop_reason])
    span.set_attribute("gen_ai.usage.input_tokens", u.total_input_tokens)
    span.set_attribute("gen_ai.usage.output_tokens", u.output_tokens)
    span.set_attribute("gen_ai.usage.cache_read.input_tokens", u.cache_read_input_tokens)
    span.set_attribute("gen_ai.usage.cache_creation.input_tokens",
                       u.cache_creation_input_tokens)
    span.set_attribute("nerve.gateway.upstream", response.upstream or "")
    span.set_attribute("nerve.gateway.attempts", response.attempts)
