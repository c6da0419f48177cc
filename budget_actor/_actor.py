"""``BudgetActor``: the budget's process-level actor.

It does what no single ledger call can:

* **Sweeps** expired reservations (and lifts ended exhaustion kills) of idle tenants; busy
  tenants are swept by their own traffic, since every ledger write expires what is due.
* **Runs the breaker**: follows cost events (``nerve.events.budget.cost.*``) and run histories
  (``nerve.runs.*.history``) over plain subscriptions, feeds :class:`BreakerState`, and acts
  on trips: a run is halted in the ledger (its reservations are refused) and sent a
  ``CancelMessage`` or ``PauseMessage`` on its inbox; a tenant is killed. Every trip is a
  :class:`TripEvent` on ``nerve.events.budget.trip``. With several budget actors, all
  measure but only the holder of the ``budget.breaker`` lease acts.
* **Enforces kills**: a kill notice published by anyone (``nats pub``) is recorded in the
  ledger; every kill stops the tenant's runs it knows of (cancel or pause by the notice's
  policy, so the stop does not hinge on one broadcast), and a reset resumes the runs a
  kill paused.
* **Serves** ``nerve.budget.api``: reports, limits, kill, reset, resuming a halted run.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from nats.aio.msg import Msg
from nats.errors import Error as NatsClientError

from actors import Actor, Delivery, Requests, cancel_and_wait, decode, encode, new_id
from actors._envelope import H_CONTENT_TYPE, H_ERROR
from budget_actor._api import (
    BudgetReport,
    BudgetRequest,
    KillRequest,
    ResetRequest,
    ResumeRunRequest,
    SetLimitsRequest,
    ShowRequest,
)
from budget_actor._breaker import BreakerState, Trip
from budget_actor._events import CostEvents, TripEvent
from budget_actor._ledger import Ledger
from budget_actor._limits import Limits
from budget_actor._notices import ResetNotice, parse_kill_message
from bus import Names
from nerve import CodecError, ConfigError, LeaseError, NerveError, UnknownTenant
from persistence import (
    TERMINAL_TYPES,
    CancelMessage,
    PauseMessage,
    ResumeMessage,
    RunHistory,
    RunResumed,
    RunStarted,
    StepCompleted,
    StepScheduled,
    decode_record,
)
from supervisor import Lease

log = logging.getLogger("nerve.budget.actor")

MAX_RUNS = 100_000
_OK_HEADERS = {H_CONTENT_TYPE: "application/msgpack"}
_ERR_HEADERS = {H_CONTENT_TYPE: "application/msgpack", H_ERROR: "1"}


class BudgetActor(Actor[BudgetRequest]):
    """Sweeper, runaway breaker, kill enforcer and the budget API. Supervise with
    ``run(bus)``. ``ledger_options`` go to its :class:`Ledger` (``default_limits``,
    ``prices``...); ``clock`` is shared with it."""

    message_type = BudgetRequest
    concurrency = 16

    def __init__(self, name: str = "budget", *, instance_id: str | None = None,
                 clock: Callable[[], float] = time.time, sweep_interval: float = 1.0,
                 breaker: bool = True, stop_runs_on_kill: bool = True,
                 lease_ttl: float = 5.0, policy_ttl: float = 2.0,
                 ledger_options: dict[str, Any] | None = None) -> None:
        super().__init__(name)
        self.instance_id = instance_id or new_id(f"{name}-")
        self.clock = clock
        self.sweep_interval = sweep_interval
        self.breaker_enabled = breaker
        self.stop_runs_on_kill = stop_runs_on_kill
        self.lease_ttl = lease_ttl
        self.policy_ttl = policy_ttl
        self.ledger_options = ledger_options or {}
        self.breaker = BreakerState()
        self.ledger: Ledger | None = None
        self.trips: collections.deque[TripEvent] = collections.deque(maxlen=256)
        self.run_tenants: collections.OrderedDict[str, str] = collections.OrderedDict()
        self.active: dict[str, set[str]] = collections.defaultdict(set)
        self.stopped: set[str] = set()  # runs this actor sent a stop since the last reset
        self.paused_by_kill: dict[str, set[str]] = collections.defaultdict(set)
        self._policies: dict[str, tuple[Limits, float]] = {}
        self._subs: list[Any] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._lease: Lease | None = None
        self._known_tenants: set[str] = set()
        self._sweeps = 0

    # -- lifecycle -----------------------------------------------------------------------
    def mailbox(self) -> Requests:
        assert self.bus is not None
        return Requests(self.bus.names.budget_api, queue="nerve-budget")

    async def on_start(self) -> None:
        assert self.bus is not None
        bus = self.bus
        self.ledger = Ledger(bus, clock=self.clock, **self.ledger_options)
        names = bus.names
        nc = bus.nc
        self._subs = [
            await nc.subscribe(names.tenant_kill("*"), cb=self._guard(self._on_kill_msg)),
            await nc.subscribe(names.tenant_reset("*"), cb=self._guard(self._on_reset_msg)),
        ]
        if self.breaker_enabled:
            self._lease = Lease(bus, Names.budget_lease("breaker"), holder=self.instance_id,
                                ttl=self.lease_ttl)
            with contextlib.suppress(LeaseError, NatsClientError, TimeoutError):
                await self._lease.acquire()
            self._subs += [
                await nc.subscribe(names.budget_cost_event("*"), cb=self._guard(self._on_cost)),
                await nc.subscribe(names.history("*"), cb=self._guard(self._on_history)),
            ]
            self._spawn(self._lead(), "budget:lease")
        await nc.flush()
        self._spawn(self._sweep_loop(), "budget:sweeper")

    async def on_stop(self) -> None:
        await cancel_and_wait(list(self._tasks))
        for sub in self._subs:
            with contextlib.suppress(NatsClientError):
                await sub.unsubscribe()
        self._subs = []
        if self._lease is not None:
            with contextlib.suppress(LeaseError, NatsClientError, TimeoutError):
                await self._lease.release()
        if self.ledger is not None:
            await self.ledger.close()

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(self._crashed)

    def _crashed(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: %s crashed: %r", self.name, task.get_name(), task.exception())
            self.fail(task.exception())  # type: ignore[arg-type]

    def _guard(self, handler: Callable[[Msg], Any]) -> Callable[[Msg], Any]:
        async def cb(msg: Msg) -> None:
            try:
                await handler(msg)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # one bad message must not stop the subscription
                log.warning("%s: handling %s failed: %r", self.name, msg.subject, exc)
        return cb

    @property
    def leader(self) -> bool:
        return self._lease is not None and self._lease.held

    async def _lead(self) -> None:
        assert self._lease is not None
        while True:
            await asyncio.sleep(self.lease_ttl / 3)
            try:
                if self._lease.held:
                    await self._lease.renew()
                else:
                    await self._lease.acquire()
            except (LeaseError, NatsClientError, TimeoutError) as exc:
                log.info("%s: breaker lease: %r", self.name, exc)

    # -- sweeping ------------------------------------------------------------------------
    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            try:
                await self.sweep_once()
            except NerveError as exc:
                log.warning("%s: sweep failed: %s", self.name, exc)

    async def sweep_once(self, full: bool | None = None) -> int:
        """Sweep every tenant's ledger once (and run ledgers on a full sweep). Returns the
        number of ledgers swept."""
        assert self.ledger is not None
        full = self._sweeps % 30 == 0 if full is None else full
        self._sweeps += 1
        if full or not self._known_tenants:
            self._known_tenants.update(await self.ledger.tenants())
        swept = 0
        for tenant in sorted(self._known_tenants):
            try:
                await self.ledger.sweep(tenant)
                swept += 1
            except UnknownTenant:
                self._known_tenants.discard(tenant)
            except NerveError as exc:
                log.warning("%s: sweeping %s failed: %s", self.name, tenant, exc)
        if full:
            for tenant, run_id in await self.ledger.run_keys():
                with contextlib.suppress(NerveError):
                    await self.ledger.sweep_run(tenant, run_id)
                    swept += 1
        return swept

    # -- policies ------------------------------------------------------------------------
    async def _limits(self, tenant: str) -> Limits:
        assert self.ledger is not None
        cached = self._policies.get(tenant)
        if cached is not None and time.monotonic() - cached[1] < self.policy_ttl:
            return cached[0]
        try:
            limits = await self.ledger.limits(tenant)
        except UnknownTenant:
            limits = self.ledger.default_limits or Limits()
        except NerveError:
            return cached[0] if cached else (self.ledger.default_limits or Limits())
        self._policies[tenant] = (limits, time.monotonic())
        return limits

    # -- breaker inputs ------------------------------------------------------------------
    async def _on_cost(self, msg: Msg) -> None:
        try:
            batch = decode(msg.data, CostEvents)
        except CodecError as exc:
            log.warning("%s: ignoring malformed cost events: %s", self.name, exc.message)
            return
        self._known_tenants.add(batch.tenant)
        limits = await self._limits(batch.tenant)
        for ev in batch.events:
            for trip in self.breaker.cost(batch.tenant, ev.run_id, ev.at, ev.cost_nanos,
                                          limits.breaker):
                await self._act(trip, limits)

    async def _on_history(self, msg: Msg) -> None:
        run_id = msg.subject.split(".")[-2]
        try:
            events = decode_record(msg.data)
        except (CodecError, ValueError) as exc:
            log.warning("%s: ignoring an undecodable history record of %s: %s", self.name,
                        run_id, exc)
            return
        for event in events:
            if isinstance(event, RunStarted):
                self._track(run_id, event.tenant)
            elif isinstance(event, StepScheduled | StepCompleted):
                if event.kind not in ("tool", "llm"):
                    continue
                tenant = await self._tenant_of(run_id)
                if tenant is None:
                    continue
                limits = await self._limits(tenant)
                for trip in self.breaker.step(tenant, run_id, event.index, event.kind,
                                              event.name, event.args_digest, limits.breaker):
                    await self._act(trip, limits)
            elif event.type in TERMINAL_TYPES:
                self._untrack(run_id)
            elif isinstance(event, RunResumed):
                self.breaker.resume_run(run_id)
                self.stopped.discard(run_id)

    def _track(self, run_id: str, tenant: str) -> None:
        self.run_tenants[run_id] = tenant
        self.run_tenants.move_to_end(run_id)
        self.active[tenant].add(run_id)
        while len(self.run_tenants) > MAX_RUNS:
            old, t = self.run_tenants.popitem(last=False)
            self.active[t].discard(old)

    def _untrack(self, run_id: str) -> None:
        tenant = self.run_tenants.pop(run_id, None)
        if tenant is not None:
            self.active[tenant].discard(run_id)
            self.paused_by_kill[tenant].discard(run_id)
        self.breaker.forget_run(run_id)
        self.stopped.discard(run_id)

    async def _tenant_of(self, run_id: str) -> str | None:
        tenant = self.run_tenants.get(run_id)
        if tenant is not None:
            return tenant
        assert self.bus is not None
        try:
            started = await RunHistory(self.bus, run_id).load_started()
        except NerveError as exc:
            log.debug("%s: no tenant for run %s: %s", self.name, run_id, exc)
            return None
        self._track(run_id, started.tenant)
        return started.tenant

    # -- acting --------------------------------------------------------------------------
    async def _act(self, trip: Trip, limits: Limits) -> None:
        assert self.ledger is not None and self.bus is not None
        if not self.leader:
            log.info("%s: trip seen but not acted on (not the breaker leader): %s", self.name,
                     trip.reason)
            return
        policy = limits.on_trip
        if trip.tenant_wide:
            action = "kill_tenant" if policy == "kill" else "pause_tenant"
        else:
            action = "cancel_run" if policy == "kill" else "pause_run"
        event = TripEvent(tenant=trip.tenant, run_id=trip.run_id, detector=trip.detector,
                          action=action, reason=trip.reason, evidence=trip.evidence,  # type: ignore[arg-type]
                          at=self.clock())
        log.warning("%s: runaway breaker tripped (%s): %s -> %s", self.name, trip.detector,
                    trip.reason, action)
        try:
            if trip.tenant_wide:
                await self.ledger.kill(trip.tenant, reason=f"runaway breaker: {trip.reason}",
                                       by="breaker", policy=policy, source="breaker")
            else:
                assert trip.run_id is not None
                await self.ledger.halt_run(trip.tenant, trip.run_id, reason=trip.reason,
                                           policy=policy, trip_id=event.trip_id)
                await self._stop_run(trip.run_id, trip.tenant, policy,
                                     f"runaway breaker: {trip.reason}", event.trip_id)
        except NerveError as exc:
            log.error("%s: acting on trip %s failed: %s", self.name, event.trip_id, exc)
            event.evidence["action_error"] = exc.to_wire()
        self.trips.append(event)
        try:
            await self.bus.js.publish(self.bus.names.budget_trip_event, encode(event),
                                      headers={"Nats-Msg-Id": event.trip_id})
        except (NatsClientError, TimeoutError) as exc:
            log.error("%s: trip event %s not stored: %r", self.name, event.trip_id, exc)

    async def _stop_run(self, run_id: str, tenant: str, policy: str, reason: str,
                        cause: str) -> None:
        """Ask the run's owner to cancel or pause it (through the run's inbox)."""
        assert self.bus is not None
        if run_id in self.stopped:
            return
        self.stopped.add(run_id)
        message = (CancelMessage(reason=reason, by="budget") if policy == "kill"
                   else PauseMessage(reason=reason, by="budget"))
        try:
            await self.bus.js.publish(self.bus.names.inbox(run_id), encode(message),
                                      headers={"Nats-Msg-Id": f"budget:{cause}:{run_id}"})
        except (NatsClientError, TimeoutError) as exc:
            self.stopped.discard(run_id)
            log.error("%s: could not ask run %s of %s to stop: %r", self.name, run_id, tenant,
                      exc)

    async def _resume_run(self, run_id: str, by: str, cause: str) -> None:
        assert self.bus is not None
        self.stopped.discard(run_id)
        try:
            await self.bus.js.publish(self.bus.names.inbox(run_id),
                                      encode(ResumeMessage(by=by)),
                                      headers={"Nats-Msg-Id": f"budget:{cause}:{run_id}"})
        except (NatsClientError, TimeoutError) as exc:
            log.error("%s: could not resume run %s: %r", self.name, run_id, exc)

    # -- kill-switch ---------------------------------------------------------------------
    async def _on_kill_msg(self, msg: Msg) -> None:
        assert self.ledger is not None and self.bus is not None
        content_type = (msg.headers or {}).get(H_CONTENT_TYPE)
        try:
            notice = parse_kill_message(msg.subject, msg.data, content_type)
        except (CodecError, ConfigError) as exc:
            log.warning("%s: refused a kill message on %s: %s", self.name, msg.subject,
                        exc.message)
            if msg.reply:
                await self.bus.nc.publish(msg.reply, encode(exc.to_wire()), headers=_ERR_HEADERS)
            return
        recorded = False
        # A notice a ledger published is stored already; re-recording it could revive a
        # kill that a reset has lifted since (kill and reset notices are not ordered).
        if not notice.in_ledger and not await self.ledger.is_killed(notice.tenant):
            await self.ledger.kill(notice.tenant, reason=notice.reason, by=notice.by,
                                   policy=notice.policy, source="notice")
            recorded = True
        self._known_tenants.add(notice.tenant)
        stopped = []
        if self.stop_runs_on_kill:
            for run_id in sorted(self.active.get(notice.tenant, ())):
                if run_id not in self.stopped:
                    await self._stop_run(run_id, notice.tenant, notice.policy,
                                         f"tenant killed: {notice.reason}", notice.notice_id)
                    stopped.append(run_id)
                    if notice.policy == "pause":
                        self.paused_by_kill[notice.tenant].add(run_id)
        if msg.reply:
            await self.bus.nc.publish(msg.reply, encode({"ok": True, "tenant": notice.tenant,
                                                         "recorded": recorded,
                                                         "runs_stopped": stopped}),
                                      headers=_OK_HEADERS)

    async def _on_reset_msg(self, msg: Msg) -> None:
        try:
            notice = decode(msg.data, ResetNotice, (msg.headers or {}).get(H_CONTENT_TYPE))
        except CodecError as exc:
            log.warning("%s: ignoring a malformed reset message: %s", self.name, exc.message)
            return
        self.breaker.reset_tenant(notice.tenant)
        self._policies.pop(notice.tenant, None)
        for run_id in sorted(self.paused_by_kill.pop(notice.tenant, set())):
            await self._resume_run(run_id, notice.by, notice.notice_id)
        for run_id in self.active.get(notice.tenant, ()):
            self.stopped.discard(run_id)

    # -- the API -------------------------------------------------------------------------
    async def report(self, tenant: str) -> BudgetReport:
        assert self.ledger is not None
        st = await self.ledger.state(tenant)
        now = self.clock()
        burn = self.breaker.burn(tenant, st.limits.breaker.window_s, now)
        return BudgetReport.of(st, now, burn)

    async def handle(self, message: BudgetRequest, delivery: Delivery) -> Any:
        assert self.ledger is not None
        led = self.ledger
        if isinstance(message, ShowRequest):
            if message.tenant is not None:
                return await self.report(message.tenant)
            return [await self.report(t) for t in await led.tenants()]
        if isinstance(message, SetLimitsRequest):
            if message.replace:
                await led.set_limits(message.tenant, Limits.parse(message.limits),
                                     by=message.by)
            else:
                await led.update_limits(message.tenant, message.limits, by=message.by)
            self._policies.pop(message.tenant, None)
            return await self.report(message.tenant)
        if isinstance(message, KillRequest):
            return await led.kill(message.tenant, reason=message.reason, by=message.by,
                                  policy=message.policy)
        if isinstance(message, ResetRequest):
            await led.reset(message.tenant, by=message.by, reason=message.reason)
            return await self.report(message.tenant)
        if isinstance(message, ResumeRunRequest):
            resumed = await led.resume_run(message.tenant, message.run_id, by=message.by)
            if resumed:
                self.breaker.resume_run(message.run_id)
                await self._resume_run(message.run_id, message.by, new_id())
            return {"tenant": message.tenant, "run_id": message.run_id, "resumed": resumed}
        raise ConfigError(f"unknown budget request {message!r}")
