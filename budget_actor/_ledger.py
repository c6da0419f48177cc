"""``Ledger``: reserve -> settle -> release against per-tenant ledgers in the KV bucket.

Every change is a compare-and-set on the key's revision (``Nats-Expected-Last-Subject-
Sequence``), so any number of processes share a ledger safely: a writer that lost the race
re-reads and re-decides. Refusals are decided on a fresh read, never on a stale copy.

**Group commit.** One key takes one write at a time, so a ledger round trip (~0.6 ms with
fsync here) would cap a tenant near 1,700 operations/s and make concurrent writers of one
process fight each other. Instead, per key, one task drains everything queued while the
previous write was in flight and applies it, in order, to one copy of the state, deciding
each operation as if alone (admit, refuse, settle), then writes once. Cross-process writers
still race on the revision and retry. The invariant never depends on batching: a batch is
one state transition, checked like any other.

**Cache.** The last state written or read is kept with its revision; the next batch applies
to it and writes with that revision, so a writer alone on a key pays one round trip per
batch. If anyone else wrote, the write fails and the batch is re-applied to a fresh read.

**Unreachable ledger.** A NATS error or a timeout makes the operation fail with
:class:`~nerve.LedgerUnavailable` (fail closed). With ``fail_closed=False`` a reservation is
admitted unguarded instead, and its settlement is charged when the ledger is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from nats.errors import Error as NatsClientError
from nats.js.errors import APIError, NoKeysError, NotFoundError
from pydantic import ValidationError

from actors import cancel_and_wait, encode, new_id
from budget_actor._events import CostEvent, CostEvents
from budget_actor._limits import DEFAULT_LIMITS, Limits, Policy
from budget_actor._notices import KillNotice, ResetNotice
from budget_actor._prices import PRICES, CacheWrite, PriceTable, usd_to_nanos
from budget_actor._reservation import Reservation, Settlement
from budget_actor._state import (
    HaltState,
    KillState,
    RunState,
    TenantState,
    parse_reservation_id,
    reservation_id,
)
from budget_actor._usage import Usage
from bus import Bus, Names, check_token
from nerve import (
    BudgetExceeded,
    ConfigError,
    LedgerUnavailable,
    NerveError,
    UnknownTenant,
)

log = logging.getLogger("nerve.budget.ledger")

H_EXPECTED = "Nats-Expected-Last-Subject-Sequence"
H_TTL = "Nats-TTL"
# A run's own ledger disappears this long after its last write, so finished runs leave no
# keys behind; a run idle for longer starts its per-run count again.
RUN_LEDGER_TTL = f"{35 * 24}h"
WRONG_LAST_SEQUENCE = (10071, 10164)
MAX_TOKENS_PER_CALL = 10_000_000
UNGUARDED_PREFIX = "open"
MAX_COSTS_PER_MESSAGE = 256

S = TypeVar("S", TenantState, RunState)
Creates = Literal["never", "default", "always"]


@dataclass(slots=True)
class _Op:
    fn: Callable[[Any, float], Any]
    creates: Creates
    future: asyncio.Future[Any]


@dataclass(slots=True)
class _Cached(Generic[S]):
    state: S | None
    revision: int


@dataclass(eq=False)
class _Committer(Generic[S]):
    """Serialises and batches the operations of one process on one ledger key."""

    ledger: Ledger
    key: str
    create: Callable[[float], S]
    decode: Callable[[bytes], S]
    missing: Callable[[], NerveError]
    ttl: str | None = None  # a per-message TTL (Nats-TTL) on every write of this key
    pending: list[_Op] = field(default_factory=list)
    cache: _Cached[S] | None = None
    task: asyncio.Task[None] | None = None

    async def submit(self, fn: Callable[[S, float], Any], creates: Creates) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        op = _Op(fn, creates, fut)
        if not self.ledger.coalesce:
            # The one-write-per-operation baseline (for the benchmark's comparison).
            await self._commit([op])
            return await fut
        self.pending.append(op)
        if self.task is None:
            self.task = asyncio.create_task(self._drain(), name=f"ledger:{self.key}")
            self.ledger._tasks.add(self.task)
            self.task.add_done_callback(self.ledger._tasks.discard)
        return await fut

    async def _drain(self) -> None:
        try:
            while self.pending:
                limit = self.ledger.max_batch
                batch = [op for op in self.pending[:limit] if not op.future.done()]
                del self.pending[:limit]
                if batch:
                    await self._commit(batch)
        finally:
            self.task = None
            if self.pending:  # cancelled with work queued: nobody will commit it
                err = LedgerUnavailable(f"ledger {self.key} is shutting down", key=self.key)
                for op in self.pending:
                    if not op.future.done():
                        op.future.set_exception(err)
                self.pending.clear()

    async def _fetch(self) -> _Cached[S]:
        led = self.ledger
        try:
            msg = await led.bus.js.get_last_msg(led.stream, f"{led.subject_prefix}{self.key}")
        except NotFoundError:
            return _Cached(None, 0)
        headers = msg.headers or {}
        if headers.get("KV-Operation") or not msg.data:  # deleted or purged
            return _Cached(None, msg.seq or 0)
        return _Cached(self.decode(msg.data), msg.seq or 0)

    async def _write(self, state: S, revision: int) -> int:
        led = self.ledger
        headers = {H_EXPECTED: str(revision)}
        if self.ttl:
            headers[H_TTL] = self.ttl
        ack = await led.bus.js.publish(f"{led.subject_prefix}{self.key}", state.encode(),
                                       headers=headers)
        return ack.seq

    async def _commit(self, batch: list[_Op]) -> None:
        led = self.ledger
        deadline = time.monotonic() + led.timeout
        conflicts = 0
        try:
            cached, fresh = (self.cache, False) if self.cache is not None else (None, True)
            while True:
                if cached is None:
                    async with asyncio.timeout(max(0.001, deadline - time.monotonic())):
                        cached = await self._fetch()
                    fresh = True
                now = led.clock()
                state, results = self._apply(cached.state, batch, now)
                if state is None or not state.dirty:
                    if fresh:  # a refusal or a read, decided on what the server holds
                        self.cache = cached
                        break
                    cached = None  # decided on a cached copy: confirm on a fresh read
                    continue
                state.dirty = False
                state.updated_at = now
                events = list(state.kill_events)
                state.kill_events.clear()
                try:
                    async with asyncio.timeout(max(0.001, deadline - time.monotonic())):
                        revision = await self._write(state, cached.revision)
                except APIError as exc:
                    if exc.err_code not in WRONG_LAST_SEQUENCE:
                        raise
                    conflicts += 1
                    led.stats["conflicts"] += 1
                    if time.monotonic() > deadline:
                        raise LedgerUnavailable(
                            f"ledger {self.key}: still conflicting after {conflicts} tries in "
                            f"{led.timeout}s", key=self.key) from None
                    if conflicts > 2:
                        await asyncio.sleep(random.uniform(0, 0.0005 * min(conflicts, 20)))
                    cached = None
                    continue
                self.cache = _Cached(state, revision)
                led.stats["writes"] += 1
                led.stats["ops"] += len(batch)
                if events:
                    await led._announce(state, events)
                break
        except NerveError as exc:
            results = [exc] * len(batch)
        except (TimeoutError, NatsClientError, OSError) as exc:
            self.cache = None
            err = LedgerUnavailable(f"ledger {self.key} is unreachable: {exc!r}", key=self.key)
            results = [err] * len(batch)
        except BaseException as exc:
            for op in batch:
                if op.future.done():
                    continue
                if not led.coalesce:
                    op.future.cancel()  # the caller's own commit: it is being cancelled
                else:  # the shared committer stopped: its waiters must not hang
                    op.future.set_exception(exc if isinstance(exc, Exception)
                                            else LedgerUnavailable("ledger commit cancelled"))
            raise
        for op, result in zip(batch, results, strict=True):
            if op.future.done():
                continue
            if isinstance(result, BaseException):
                op.future.set_exception(result)
            else:
                op.future.set_result(result)

    def _apply(self, base: S | None, batch: list[_Op], now: float) -> tuple[S | None, list[Any]]:
        state = base.clone() if base is not None else None
        if state is not None:
            state.roll(now)
            state.expire(now)
        results: list[Any] = []
        for op in batch:
            if state is None:
                if op.creates == "never" or (op.creates == "default"
                                             and self.ledger.default_limits is None):
                    results.append(self.missing())
                    continue
                state = self.create(now)
            try:
                results.append(op.fn(state, now))
            except NerveError as exc:
                results.append(exc)
        return state, results


class Ledger:
    """Per-tenant budgets in the ``nerve-budgets`` KV bucket, shared by every process.

    ``default_limits`` are given to a tenant the first time it reserves or spawns (``None``:
    such a tenant is refused with :class:`~nerve.UnknownTenant` until someone sets its
    limits). ``clock`` is wall-clock seconds (tests pass a controllable one).
    """

    def __init__(self, bus: Bus, *, fail_closed: bool = True, prices: PriceTable = PRICES,
                 default_limits: Limits | None = DEFAULT_LIMITS,
                 clock: Callable[[], float] = time.time, timeout: float = 5.0,
                 coalesce: bool = True, max_batch: int = 512, publish_costs: bool = True,
                 ) -> None:
        self.bus = bus
        self.names: Names = bus.names
        self.fail_closed = fail_closed
        self.prices = prices
        self.default_limits = default_limits
        self.clock = clock
        self.timeout = timeout
        self.coalesce = coalesce
        self.max_batch = max_batch
        self.publish_costs = publish_costs
        self.bucket = bus.names.budgets_bucket
        self.stream = f"KV_{self.bucket}"
        self.subject_prefix = f"$KV.{self.bucket}."
        self.stats = {"writes": 0, "ops": 0, "conflicts": 0}
        self._tenants: dict[str, _Committer[TenantState]] = {}
        self._runs: dict[tuple[str, str], _Committer[RunState]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._costs: dict[str, list[CostEvent]] = {}
        self._cost_task: asyncio.Task[None] | None = None

    # -- plumbing ------------------------------------------------------------------------
    def _tenant(self, tenant: str) -> _Committer[TenantState]:
        c = self._tenants.get(tenant)
        if c is None:
            check_token("tenant", tenant)
            c = self._tenants[tenant] = _Committer(
                self, Names.budget_key(tenant),
                create=lambda now: TenantState.new(tenant, self.default_limits or Limits(), now),
                decode=lambda data: TenantState.decode(tenant, data),
                missing=lambda: UnknownTenant(
                    f"tenant {tenant} has no budget; set one with `nerve budget set --tenant "
                    f"{tenant} --usd-per-day ...`", tenant=tenant))
        return c

    def _run(self, tenant: str, run_id: str) -> _Committer[RunState]:
        c = self._runs.get((tenant, run_id))
        if c is None:
            c = self._runs[(tenant, run_id)] = _Committer(
                self, Names.budget_run_key(tenant, run_id),
                create=lambda now: RunState.new(tenant, run_id, now),
                decode=lambda data: RunState.decode(tenant, run_id, data),
                missing=lambda: UnknownTenant(f"run {run_id} of tenant {tenant} has no ledger",
                                              tenant=tenant, run_id=run_id),
                ttl=RUN_LEDGER_TTL)
        return c

    async def close(self) -> None:
        """Cancel in-flight commits (their callers get LedgerUnavailable)."""
        await cancel_and_wait(list(self._tasks))

    async def __aenter__(self) -> Ledger:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _announce(self, state: TenantState, events: list[KillState | None]) -> None:
        """Broadcast kill-switch changes that a committed write made."""
        for kill in events:
            if kill is None:
                notice: KillNotice | ResetNotice = ResetNotice(
                    tenant=state.tenant, at=self.clock(), by="budget")
                subject = self.names.tenant_reset(state.tenant)
            else:
                notice = KillNotice(tenant=state.tenant, reason=kill.reason, by=kill.by,
                                    at=kill.at, policy=kill.policy, until=kill.until,  # type: ignore[arg-type]
                                    source=kill.source, in_ledger=True)  # type: ignore[arg-type]
                subject = self.names.tenant_kill(state.tenant)
            await self.publish_notice(subject, notice)

    async def publish_notice(self, subject: str, notice: KillNotice | ResetNotice) -> None:
        data = encode(notice)
        try:
            await self.bus.nc.publish(subject, data)
            # The audit copy is stored by NERVE_EVENTS; not waiting for its ack keeps the
            # broadcast fast, and the ledger already holds the truth.
            await self.bus.nc.publish(self.names.budget_kill_event, data)
            await self.bus.nc.flush(timeout=2)
        except (NatsClientError, TimeoutError) as exc:
            log.warning("kill-switch change for %s is in the ledger but its broadcast "
                        "failed: %r", notice.tenant, exc)

    # -- reservations --------------------------------------------------------------------
    async def reserve(self, tenant: str, *, run_id: str | None = None, model: str,
                      input_tokens: int, max_output_tokens: int, key: str | None = None,
                      cache_write: CacheWrite = "1h") -> Reservation:
        """Hold the worst case of one call: ``input_tokens`` (an estimate) at the dearest
        input rate the call may pay (``cache_write``: a 1-hour cache write by default) plus
        ``max_output_tokens`` at the output price.

        ``key`` (the work item's idempotency key) makes a retried reserve return the same
        open reservation. Raises :class:`~nerve.BudgetExceeded` (does not fit),
        :class:`~nerve.TenantKilled`, :class:`~nerve.RunHalted`,
        :class:`~nerve.UnknownModel`, :class:`~nerve.LedgerUnavailable` (fail closed).
        """
        check_token("tenant", tenant)
        if run_id is not None:
            check_token("run id", run_id)
        for name, value in (("input_tokens", input_tokens),
                            ("max_output_tokens", max_output_tokens)):
            if (not isinstance(value, int) or isinstance(value, bool) or value < 0
                    or value > MAX_TOKENS_PER_CALL):
                raise ConfigError(f"{name}={value!r}: need an integer in [0, "
                                  f"{MAX_TOKENS_PER_CALL:,}]", field=name)
        if key is not None and (not isinstance(key, str) or not 0 < len(key) <= 256):
            raise ConfigError(f"reservation key {key!r}: need 1-256 characters", field="key")
        amount = self.prices.worst_case_nanos(model, input_tokens, max_output_tokens,
                                              cache_write)
        tokens = input_tokens + max_output_tokens

        def op(st: TenantState, now: float) -> tuple[Any, ...]:
            seq, r, created = st.reserve(amount=amount, tokens=tokens, run_id=run_id, key=key,
                                         now=now)
            return seq, r, created, st.epoch, st.limits

        try:
            seq, r, created, epoch, limits = await self._tenant(tenant).submit(op, "default")
        except LedgerUnavailable:
            if self.fail_closed:
                raise
            log.warning("ledger unreachable: admitting a call of tenant %s unguarded "
                        "(fail-open)", tenant)
            return Reservation(id=f"{UNGUARDED_PREFIX}-{new_id()}", tenant=tenant, run_id=run_id,
                               model=model, amount_nanos=amount, tokens=tokens,
                               expires_at=self.clock() + 600, key=key, guarded=False)
        run_tracked = run_id is not None and limits.has_run_limits
        res_id = reservation_id(epoch, seq, run_id if run_tracked else None)
        if run_tracked:
            assert run_id is not None
            await self._reserve_run(tenant, run_id, reservation_id(epoch, seq), r, limits,
                                    res_id)
        return Reservation(id=res_id, tenant=tenant, run_id=run_id, model=model,
                           amount_nanos=r.amount, tokens=r.tokens, expires_at=r.expires_ms / 1000,
                           key=key, reused=not created)

    async def _reserve_run(self, tenant: str, run_id: str, run_res_id: str, r: Any,
                           limits: Limits, res_id: str) -> None:
        usd = usd_to_nanos(limits.usd_per_run) if limits.usd_per_run is not None else None

        def op(st: RunState, now: float) -> None:
            st.reserve(run_res_id, amount=r.amount, tokens=r.tokens, expires_ms=r.expires_ms,
                       usd_limit=usd, token_limit=limits.tokens_per_run)

        try:
            await self._run(tenant, run_id).submit(op, "always")
        except (BudgetExceeded, LedgerUnavailable):
            # The tenant ledger holds it: give it back (if that fails too, it expires).
            with contextlib.suppress(NerveError):
                await self.release(res_id, tenant=tenant)
            raise

    async def settle(self, reservation_id: str, *, tenant: str, model: str, usage: Usage,
                     run_id: str | None = None) -> Settlement:
        """Charge what the call really used and release the rest of its reservation.

        Idempotent: settling the same id again charges nothing (``status="duplicate"``).
        A reservation that had expired is charged anyway (``late``): the money was spent.
        """
        check_token("tenant", tenant)
        if not isinstance(usage, Usage):
            raise ConfigError(f"usage must be a Usage, not {type(usage).__name__}")
        if min(usage.input_tokens, usage.output_tokens, usage.cache_read_input_tokens,
               usage.cache_creation_input_tokens) < 0:
            raise ConfigError(f"usage has negative token counts: {usage!r}")
        cost = self.prices.cost_nanos(model, usage)
        tokens = usage.total_input_tokens + usage.output_tokens
        if str(reservation_id).startswith(UNGUARDED_PREFIX + "-"):
            return await self._charge_unreserved(reservation_id, tenant, run_id, model, usage,
                                                 cost, tokens)
        epoch, seq, run_from_id = parse_reservation_id(reservation_id)

        def op(st: TenantState, now: float) -> Any:
            if st.epoch != epoch:
                # A reservation from a ledger since deleted and recreated: still real money.
                st.charge_unreserved(cost=cost, tokens=tokens, now=now)
                return None
            return st.settle(seq, cost=cost, tokens=tokens, now=now)

        outcome = await self._tenant(tenant).submit(op, "never")
        if outcome is None:
            status, released, overrun, res_run = "unreserved", 0, cost, None
        else:
            status, released, overrun, res_run = (outcome.status, outcome.released,
                                                  outcome.overrun, outcome.run_id)
        run_key = run_from_id
        if run_key is not None:
            def run_op(st: RunState, now: float) -> bool:
                return st.settle(reservation_id.partition("~")[0], cost=cost, tokens=tokens)
            try:
                await self._run(tenant, run_key).submit(run_op, "never")
            except NerveError as exc:
                log.warning("run ledger %s/%s not settled for %s: %s", tenant, run_key,
                            reservation_id, exc)
        if status != "duplicate":
            self._publish_cost(CostEvent(tenant=tenant, run_id=run_id or res_run or run_key,
                                         model=model, reservation_id=reservation_id,
                                         cost_nanos=cost, tokens=tokens, usage=usage,
                                         status="settled" if status == "settled" else
                                         ("late" if status == "late" else "unreserved"),
                                         at=self.clock()))
        return Settlement(reservation_id=reservation_id, tenant=tenant, cost_nanos=cost,
                          tokens=tokens, status=status, released_nanos=released,  # type: ignore[arg-type]
                          overrun_nanos=overrun)

    async def _charge_unreserved(self, res_id: str, tenant: str, run_id: str | None, model: str,
                                 usage: Usage, cost: int, tokens: int) -> Settlement:
        def op(st: TenantState, now: float) -> None:
            st.charge_unreserved(cost=cost, tokens=tokens, now=now)

        try:
            await self._tenant(tenant).submit(op, "default")
        except LedgerUnavailable:
            if self.fail_closed:
                raise
            log.error("ledger still unreachable: %s of tenant %s (%s) not recorded", cost,
                      tenant, res_id)
            return Settlement(reservation_id=res_id, tenant=tenant, cost_nanos=cost,
                              tokens=tokens, status="unrecorded")
        self._publish_cost(CostEvent(tenant=tenant, run_id=run_id, model=model,
                                     reservation_id=res_id, cost_nanos=cost, tokens=tokens,
                                     usage=usage, status="unreserved", at=self.clock()))
        return Settlement(reservation_id=res_id, tenant=tenant, cost_nanos=cost, tokens=tokens,
                          status="unreserved", overrun_nanos=cost)

    def _publish_cost(self, event: CostEvent) -> None:
        if not self.publish_costs:
            return
        self._costs.setdefault(event.tenant, []).append(event)
        if self._cost_task is None:
            self._cost_task = asyncio.create_task(self._send_costs(), name="ledger:costs")
            self._tasks.add(self._cost_task)
            self._cost_task.add_done_callback(self._tasks.discard)

    async def _send_costs(self) -> None:
        try:
            # One turn of the loop lets every settle of the same group commit join in.
            await asyncio.sleep(0)
            while self._costs:
                pending, self._costs = self._costs, {}
                for tenant, events in pending.items():
                    for i in range(0, len(events), MAX_COSTS_PER_MESSAGE):
                        batch = CostEvents(tenant=tenant,
                                           events=events[i:i + MAX_COSTS_PER_MESSAGE])
                        try:
                            await self.bus.nc.publish(self.names.budget_cost_event(tenant),
                                                      encode(batch))
                        except NatsClientError as exc:
                            log.warning("%d cost events of %s not published: %r",
                                        len(batch.events), tenant, exc)
        finally:
            self._cost_task = None

    async def release(self, reservation_id: str, *, tenant: str) -> bool:
        """Give a reservation back (the call never ran or cost nothing). Idempotent:
        False if it was already settled, released or expired."""
        check_token("tenant", tenant)
        if str(reservation_id).startswith(UNGUARDED_PREFIX + "-"):
            return False
        epoch, seq, run_key = parse_reservation_id(reservation_id)

        def op(st: TenantState, now: float) -> bool:
            return st.epoch == epoch and st.release(seq)

        try:
            released = await self._tenant(tenant).submit(op, "never")
        except LedgerUnavailable:
            if self.fail_closed:
                raise
            return False  # it expires by itself
        if run_key is not None:
            head = reservation_id.partition("~")[0]
            with contextlib.suppress(NerveError):
                await self._run(tenant, run_key).submit(
                    lambda st, now: st.release(head), "never")
        return bool(released)

    # -- runs ----------------------------------------------------------------------------
    async def check_spawn(self, tenant: str, run_id: str | None = None) -> None:
        """Before starting a run: raises :class:`~nerve.TenantKilled` if the tenant is
        killed, :class:`~nerve.BudgetExceeded` if it started ``runs_per_minute`` runs this
        minute or has spent a window's whole budget. Counts the run when it may start."""
        check_token("tenant", tenant)
        try:
            await self._tenant(tenant).submit(lambda st, now: st.spawn_run(now), "default")
        except LedgerUnavailable:
            if self.fail_closed:
                raise
            log.warning("ledger unreachable: letting tenant %s start a run (fail-open)", tenant)

    async def halt_run(self, tenant: str, run_id: str, *, reason: str, policy: Policy = "kill",
                       by: str = "breaker", trip_id: str = "") -> bool:
        """Refuse every further reservation of ``run_id`` (the breaker's stop for one run)."""
        check_token("run id", run_id)
        halt = HaltState(self.clock(), policy, reason[:500], trip_id)
        return bool(await self._tenant(tenant).submit(
            lambda st, now: st.halt_run(run_id, halt, now), "always"))

    async def resume_run(self, tenant: str, run_id: str, *, by: str = "unknown") -> bool:
        """Let a halted run reserve again (after a person looked at it)."""
        check_token("run id", run_id)
        resumed = await self._tenant(tenant).submit(lambda st, now: st.resume_run(run_id),
                                                    "never")
        log.info("run %s of tenant %s resumed by %s: %s", run_id, tenant, by, resumed)
        return bool(resumed)

    # -- limits and the kill-switch -------------------------------------------------------
    async def set_limits(self, tenant: str, limits: Limits, *, by: str = "unknown") -> Limits:
        """Replace the tenant's limits (creating its ledger if it has none)."""
        limits = Limits.parse(limits)

        def op(st: TenantState, now: float) -> Limits:
            st.set_limits(limits)
            return st.limits

        return await self._tenant(tenant).submit(op, "always")  # type: ignore[no-any-return]

    async def update_limits(self, tenant: str, changes: dict[str, Any], *,
                            by: str = "unknown") -> Limits:
        """Change some limits (``None`` clears one); validated against the current ones."""
        if not isinstance(changes, dict) or not changes:
            raise ConfigError("no limit to change: name at least one")

        def op(st: TenantState, now: float) -> Limits:
            st.set_limits(st.limits.merged(changes))
            return st.limits

        return await self._tenant(tenant).submit(op, "always")  # type: ignore[no-any-return]

    async def kill(self, tenant: str, *, reason: str, by: str, policy: Policy = "kill",
                   source: str = "manual") -> KillNotice:
        """Turn the tenant's kill-switch on: stored in the ledger (it survives restarts),
        then broadcast on ``nerve.ctl.tenant.<tenant>.kill``."""
        check_token("tenant", tenant)
        try:
            notice = KillNotice(tenant=tenant, reason=reason, by=by, policy=policy,
                                at=self.clock(), source=source)  # type: ignore[arg-type]
        except ValidationError as exc:
            raise ConfigError(f"invalid kill of tenant {tenant}: "
                              + "; ".join(f"{e['loc'][0]}: {e['msg']}" for e in exc.errors()),
                              tenant=tenant) from None
        kill = KillState(notice.reason, notice.by, notice.at, notice.policy, None, notice.source)
        changed = await self._tenant(tenant).submit(lambda st, now: st.set_kill(kill), "always")
        notice = notice.model_copy(update={"in_ledger": True})
        if not changed:  # already killed this way: say it again for whoever missed it
            await self.publish_notice(self.names.tenant_kill(tenant), notice)
        return notice

    async def reset(self, tenant: str, *, by: str, reason: str = "", runs: bool = False) -> bool:
        """Turn the kill-switch off (broadcast on ``nerve.ctl.tenant.<tenant>.reset``).
        Runs the breaker halted stay halted unless ``runs`` (each is resumed on its own,
        after a person looked: :meth:`resume_run`)."""
        changed = await self._tenant(tenant).submit(lambda st, now: st.reset(runs), "never")
        log.info("tenant %s reset by %s (%s): %s", tenant, by, reason, changed)
        return bool(changed)

    # -- reading -------------------------------------------------------------------------
    async def state(self, tenant: str) -> TenantState:
        """The tenant's ledger as stored now (:class:`~nerve.UnknownTenant` if none)."""
        c = self._tenant(tenant)
        try:
            async with asyncio.timeout(self.timeout):
                cached = await c._fetch()
        except (TimeoutError, NatsClientError, OSError) as exc:
            raise LedgerUnavailable(f"ledger of tenant {tenant} is unreachable: {exc!r}",
                                    tenant=tenant) from None
        if cached.state is None:
            raise c.missing()
        if c.cache is None or c.cache.revision < cached.revision:
            c.cache = cached
        return cached.state

    async def limits(self, tenant: str) -> Limits:
        return (await self.state(tenant)).limits

    async def is_killed(self, tenant: str) -> bool:
        """Whether the tenant's kill-switch is on, read from the server now. A tenant with
        no ledger is not killed. Unreachable: raises (fail closed) or False (fail open)."""
        try:
            return (await self.state(tenant)).is_killed(self.clock())
        except UnknownTenant:
            return False
        except LedgerUnavailable:
            if self.fail_closed:
                raise
            return False

    async def run_state(self, tenant: str, run_id: str) -> RunState | None:
        c = self._run(tenant, run_id)
        return (await c._fetch()).state

    async def _keys(self) -> list[str]:
        kv = await self.bus.kv(self.bucket)
        try:
            return await kv.keys()
        except NoKeysError:
            return []
        except (TimeoutError, NatsClientError) as exc:
            raise LedgerUnavailable(f"cannot list ledgers: {exc!r}") from None

    async def tenants(self) -> list[str]:
        """Every tenant with a ledger."""
        return sorted(k.partition(".")[2] for k in await self._keys()
                      if k.startswith("tenant."))

    async def run_keys(self) -> list[tuple[str, str]]:
        """``(tenant, run_id)`` of every run ledger."""
        out = []
        for k in await self._keys():
            if k.startswith("run."):
                _, tenant, run_id = k.split(".", 2)
                out.append((tenant, run_id))
        return out

    async def sweep(self, tenant: str) -> float | None:
        """Release the tenant's expired reservations (and lift an ended exhaustion kill).
        Returns when the next open reservation expires (epoch seconds), if any."""
        return await self._tenant(tenant).submit(  # type: ignore[no-any-return]
            lambda st, now: st.next_expiry(), "never")

    async def sweep_run(self, tenant: str, run_id: str) -> None:
        await self._run(tenant, run_id).submit(lambda st, now: None, "never")
