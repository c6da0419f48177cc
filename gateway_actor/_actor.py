"""The gateway actor: the brain's worker on ``nerve.work.llm``.

For each work item (``kind="llm"``, ``args`` an :class:`LLMRequest` dict) it

1. validates the request (:class:`~nerve.InvalidLLMRequest` at once, never retried);
2. reserves the worst case with the budget ledger (keyed by the step, so a redelivery does
   not reserve twice);
3. calls the model through :class:`Gateway` (cache planning, routing, retries), streaming
   text deltas to ``nerve.stream.<run_id>`` (:class:`TokenStream`);
4. settles the reservation with the real usage (or releases it when nothing was consumed),
   publishes a :class:`CostEvent` on ``nerve.events.cost``;
5. returns the :class:`LLMResponse` dict, which :class:`~actors.StepWorker` stores on the
   run's inbox.

Any number of instances share the ``gateway`` durable consumer. Each listens for tenant kill
notices (``nerve.ctl.tenant.<tenant>.kill``, core NATS) and cuts that tenant's in-flight
calls at once: the upstream connection is closed, the step fails with
:class:`~nerve.TenantKilled`, and what was consumed is settled.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from nats.aio.msg import Msg
from nats.errors import Error as NatsClientError

from actors import Delivery, Envelope, StepWorker, WorkItem, WorkQueue, encode
from budget_actor import Usage, parse_kill_message
from gateway_actor._accounting import CostEvent
from gateway_actor._budget import BudgetLedger, PriceTable, cost_of, default_prices, price_version
from gateway_actor._config import GatewayConfig
from gateway_actor._gateway import CallRecord, Gateway
from gateway_actor._protocol import LLMResponse, parse_request
from gateway_actor._stream import TokenStream
from gateway_actor._tokens import BYTES_PER_TOKEN, WORST_CASE_BYTES_PER_TOKEN
from nerve import (
    GatewayError,
    InvalidLLMRequest,
    LedgerUnavailable,
    NerveError,
    TenantKilled,
)

log = logging.getLogger("nerve.gateway.actor")


@dataclass(eq=False, slots=True)
class _InFlight:
    tenant: str
    key: str
    task: asyncio.Task[LLMResponse]
    killed: str | None = None  # the kill notice's reason, once one arrived


class GatewayActor(StepWorker):
    """Performs ``llm`` steps. ``ledger``/``prices``: the budget actor's (optional)."""

    durable = "gateway"
    concurrency = 64

    def __init__(self, config: GatewayConfig | None = None, *,
                 ledger: BudgetLedger | None = None, prices: PriceTable | None = None,
                 gateway: Gateway | None = None, name: str | None = None,
                 worker_id: str | None = None, ack_wait: float | None = None) -> None:
        super().__init__(name or "gateway",
                         worker_id or f"gateway@{socket.gethostname()}:{os.getpid()}")
        if ack_wait is not None:
            # How long a silent (dead) instance holds a work item before another gets it.
            self.ack_wait = ack_wait  # type: ignore[misc]
        self.gateway = gateway or Gateway(config)
        self.ledger = ledger
        self.prices = prices if prices is not None else default_prices()
        self._in_flight: dict[str, set[_InFlight]] = {}
        self._killed: dict[str, str] = {}  # tenant -> reason, until a reset notice
        self._subs: list[Any] = []
        self._background: set[asyncio.Task[None]] = set()

    def mailbox(self) -> WorkQueue:
        assert self.bus is not None
        return WorkQueue(stream=self.bus.names.work_stream, subjects=[self.bus.names.work_llm],
                         durable=self.durable, ack_wait=self.ack_wait,
                         max_deliver=self.max_deliver)

    # -- lifecycle -----------------------------------------------------------------------
    async def on_start(self) -> None:
        assert self.bus is not None
        names = self.bus.names
        self._subs = [
            await self.bus.nc.subscribe(names.tenant_kill("*"), cb=self._on_kill),
            await self.bus.nc.subscribe(names.tenant_reset("*"), cb=self._on_reset),
        ]

    async def on_stop(self) -> None:
        errors: list[BaseException] = []
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except NatsClientError as exc:
                errors.append(exc)
        self._subs = []
        if self._background:
            await asyncio.wait(set(self._background), timeout=5.0)
        try:
            await self.gateway.close()
        except Exception as exc:
            errors.append(exc)
        if errors:
            raise errors[0]

    # -- the kill-switch -----------------------------------------------------------------
    async def _on_kill(self, msg: Msg) -> None:
        try:
            notice = parse_kill_message(msg.subject, msg.data,
                                        (msg.headers or {}).get("Content-Type"))
        except NerveError as exc:
            # A malformed kill changes nothing here; the budget actor reports it.
            log.warning("ignoring malformed kill message on %s: %s", msg.subject, exc.message)
            return
        tenant, reason = notice.tenant, notice.reason or "killed"
        self._killed[tenant] = reason
        calls = list(self._in_flight.get(tenant, ()))
        for call in calls:
            call.killed = reason
            call.task.cancel()
        if calls:
            log.warning("tenant %s killed (%s): cut %d in-flight call(s)", tenant, reason,
                        len(calls))

    async def _on_reset(self, msg: Msg) -> None:
        self._killed.pop(msg.subject.split(".")[-2], None)

    # -- one step ------------------------------------------------------------------------
    async def execute(self, item: WorkItem, delivery: Delivery) -> Any:
        assert self.bus is not None
        if item.kind != "llm":
            raise InvalidLLMRequest(f"the gateway performs llm steps, not {item.kind!r} "
                                    f"({item.key})", key=item.key)
        request = parse_request(item.args)
        if self.ledger is None and item.tenant in self._killed:
            # With a ledger, the ledger decides (it refuses a killed tenant at reserve): a
            # reset notice still on its way must not make this gateway refuse.
            raise TenantKilled(f"tenant {item.tenant} is killed ({self._killed[item.tenant]}); "
                               "reset it to run LLM calls again", tenant=item.tenant,
                               run_id=item.run_id)
        plan = self.gateway.plan(request)
        model = plan.model
        remaining = None
        if item.deadline is not None:
            remaining = item.deadline - time.time()
            if remaining <= 0:
                raise GatewayError(f"step {item.key} is past its deadline; not calling the "
                                   "model", key=item.key, run_id=item.run_id)

        reservation = None
        if self.ledger is not None:
            worst = math.ceil(plan.input_tokens * BYTES_PER_TOKEN / WORST_CASE_BYTES_PER_TOKEN)
            reservation = await self.ledger.reserve(
                item.tenant, run_id=item.run_id, model=model, input_tokens=worst,
                max_output_tokens=request.max_tokens, key=item.key)

        stream = (TokenStream(self.bus, run_id=item.run_id, tenant=item.tenant,
                              index=item.index, key=item.key,
                              coalesce=self.gateway.config.coalesce_ms / 1000)
                  if request.stream else None)
        record = CallRecord(run_id=item.run_id)
        task = asyncio.create_task(self.gateway.call(request, run_id=item.run_id, sink=stream,
                                                     record=record, plan=plan),
                                   name=f"llm:{item.key}")
        call = _InFlight(item.tenant, item.key, task)
        self._in_flight.setdefault(item.tenant, set()).add(call)
        try:
            try:
                if remaining is not None:
                    async with asyncio.timeout(remaining):
                        response = await task
                else:
                    response = await task
            except asyncio.CancelledError:
                me = asyncio.current_task()
                if call.killed is not None and (me is None or not me.cancelling()):
                    raise TenantKilled(f"tenant {item.tenant} was killed ({call.killed}) "
                                       f"while step {item.key} was streaming; the call was "
                                       "cut", tenant=item.tenant, run_id=item.run_id,
                                       key=item.key) from None
                raise
            except TimeoutError:
                raise GatewayError(f"step {item.key} ran past its deadline; the call was cut",
                                   key=item.key, run_id=item.run_id) from None
        except BaseException as exc:
            if stream is not None:
                await stream.abort()
            usage = record.partial_usage()
            await self._settle(item, reservation, model, usage, record, None, exc)
            raise
        finally:
            calls = self._in_flight.get(item.tenant)
            if calls is not None:
                calls.discard(call)
                if not calls:
                    del self._in_flight[item.tenant]
        if stream is not None:
            await stream.close()
        response.cost_usd = await self._settle(item, reservation, model, response.usage,
                                               record, response, None)
        return response.model_dump(mode="python")

    async def _settle(self, item: WorkItem, reservation: Any, model: str, usage: Usage | None,
                      record: CallRecord, response: LLMResponse | None,
                      error: BaseException | None) -> float | None:
        """Settle (or release) the reservation and publish the call's cost event."""
        cost: float | None = None
        consumed = usage is not None and (usage.total_input_tokens or usage.output_tokens)
        if reservation is not None and self.ledger is not None:
            for attempt in range(3):
                try:
                    if consumed:
                        assert usage is not None
                        settled = await self.ledger.settle(reservation.id, tenant=item.tenant,
                                                           model=model, usage=usage,
                                                           run_id=item.run_id)
                        cost = getattr(settled, "cost_usd", None)
                    else:
                        await self.ledger.release(reservation.id, tenant=item.tenant)
                    break
                except LedgerUnavailable as exc:
                    # The call happened; failing the step now would only make it run (and be
                    # paid) twice. The reservation expires on its own; the cost event stays.
                    if attempt == 2:
                        log.error("could not settle %s for %s: %s", reservation.id, item.key,
                                  exc.message)
                    else:
                        await asyncio.sleep(0.1 * (attempt + 1))
        if cost is None and consumed:
            assert usage is not None
            cost = cost_of(self.prices, model, usage)
        if consumed:
            assert usage is not None
            self._publish_cost(item, model, usage, cost, record, response, error)
        return cost

    def _publish_cost(self, item: WorkItem, model: str, usage: Usage, cost: float | None,
                      record: CallRecord, response: LLMResponse | None,
                      error: BaseException | None) -> None:
        assert self.bus is not None
        brk = record.prefix_break
        event = CostEvent.of(
            usage, run_id=item.run_id, tenant=item.tenant, index=item.index, key=item.key,
            model=model, pool=record.pool,
            upstream=(response.upstream if response is not None
                      else (record.attempts[-1].upstream if record.attempts else None)),
            ok=error is None, error=(None if error is None else
                                     (error.message if isinstance(error, NerveError)
                                      else type(error).__name__)),
            cost_usd=cost, price_version=price_version(self.prices),
            attempts=len(record.attempts),
            breakpoints=len(record.plan.breakpoints) if record.plan is not None else 0,
            ttft_ms=response.ttft_ms if response is not None else None,
            latency_ms=response.latency_ms if response is not None else None,
            prefix_break=None if brk is None else {
                "position": brk.position, "part": brk.part, "previous_part": brk.previous_part,
                "kind": brk.kind, "cached_tokens_lost": brk.cached_tokens_lost})
        bus = self.bus
        headers = Envelope(run_id=item.run_id, tenant=item.tenant).to_headers(
            {"Nats-Msg-Id": f"cost:{item.key}:{item.attempt}"})

        async def publish() -> None:
            try:
                await bus.js.publish(bus.names.cost_events, encode(event), headers=headers)
            except (TimeoutError, NatsClientError) as exc:
                log.warning("cost event for %s not stored: %r", item.key, exc)

        # Off the step's critical path; kept so on_stop can wait for it.
        task = asyncio.create_task(publish(), name=f"cost:{item.key}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)
