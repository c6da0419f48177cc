"""What the handlers share: the bus, the read model, keys, tails, metrics; and the few
operations that need more than one of them (resolving a run for a key, starting a run and
waiting for it to start, folding one run's history the way the read model does)."""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass, field
from typing import Any

from api._config import ApiConfig
from api._keys import ApiKeys, Principal
from api._metrics import Metrics
from api._projections import Batch, Record, fold
from api._projector import Projector
from api._readmodel import ReadModel, run_view
from api._tail import Tails
from budget_actor import Ledger
from bus import Bus, check_token
from nerve._errors import ConfigError, NerveError, RunNotFound
from persistence import RunHistory, RunStarted
from workflow import NerveClient


def not_found(run_id: str) -> RunNotFound:
    """The one answer about a run this key may not see: the same whether it exists or not."""
    return RunNotFound(f"no run {run_id}: check the id (GET /v1/runs lists your runs; a run "
                       "submitted a moment ago may take a moment to appear)", run_id=run_id)


@dataclass(slots=True)
class RunState:
    """One run folded from its history, exactly as the read model would store it."""

    run: dict[str, Any]
    approvals: list[dict[str, Any]]
    steps: list[dict[str, Any]]
    events: list[tuple[int, Any]]  # (record seq, event)

    @property
    def tenant(self) -> str:
        return str(self.run["tenant"])

    @property
    def finished(self) -> bool:
        return self.run["status"] in ("completed", "failed", "cancelled")


@dataclass(slots=True)
class Services:
    """Everything a handler may use; one per server."""

    bus: Bus
    config: ApiConfig
    model: ReadModel
    projector: Projector
    keys: ApiKeys
    tails: Tails
    metrics: Metrics
    client: NerveClient
    streams: int = 0
    streams_by_tenant: dict[str, int] = field(default_factory=dict)
    reindex_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Set when the server stops: open streams end at once (without `end`), and their
    # clients reconnect, with their last id, to whichever server answers next.
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _ledger: Ledger | None = None

    @property
    def ledger(self) -> Ledger:
        if self._ledger is None:
            self._ledger = Ledger(self.bus)
        return self._ledger

    async def close(self) -> None:
        if self._ledger is not None:
            await self._ledger.close()

    # -- runs ---------------------------------------------------------------------------------
    async def run_tenant(self, run_id: str) -> str | None:
        """The run's tenant, from the read model or (when it lags) the history's start."""
        tenant = await self.model.run_tenant(run_id)
        if tenant is not None:
            return tenant
        started = await RunHistory(self.bus, run_id).first()
        return started.tenant if started is not None else None

    async def resolve(self, p: Principal, run_id: str) -> str:
        """The run's tenant, if this key may see the run. Anything else is the same 404,
        so a key learns nothing about other tenants' runs (not even that they exist)."""
        try:
            check_token("run id", run_id)
        except ConfigError:
            raise not_found(run_id[:128]) from None
        tenant = await self.run_tenant(run_id)
        if tenant is None or not p.may_act_for(tenant):
            raise not_found(run_id)
        return tenant

    async def state(self, run_id: str) -> RunState:
        """Fold the run's history now (fresh, unlike the read model, which may lag)."""
        records: list[Record] = []
        events: list[tuple[int, Any]] = []
        async for seq, _headers, evs in RunHistory(self.bus, run_id).records():
            records.append(Record(seq, run_id, evs))
            events.extend((seq, e) for e in evs)
        if not records or not isinstance(records[0].events[0], RunStarted):
            raise not_found(run_id)
        batch = Batch()
        positions: dict[str, int] = {}
        for rec in records:
            fold(batch, rec, positions)
        run = batch.runs[run_id]
        approvals = []
        for a in sorted(batch.approvals.values(), key=lambda a: a.idx):
            d = asdict(a)
            d["tenant"] = run.tenant
            approvals.append(d)
        steps = [asdict(s) for s in sorted(batch.steps.values(), key=lambda s: s.idx)]
        return RunState(run_view(run), approvals, steps, events)

    async def start_and_wait(self, tenant: str, run_id: str, publish: Any, wait: bool,
                             ) -> RunState | None:
        """Publish a task (``publish()``) and wait briefly for its run to start.

        Returns the started run, ``None`` if it did not start within ``submit_wait`` (it is
        queued), or raises :class:`~nerve.TaskRejected` with the orchestrator's reason.
        """
        if not wait:
            await publish()
            return None
        if not await self.client.until_started(run_id, publish, self.config.submit_wait):
            return None
        # A core subscriber hears an append as it is published, a moment before JetStream
        # has stored it, and the read model catches up after: read until it shows the run.
        for attempt in range(40):
            try:
                return await self.state(run_id)
            except RunNotFound:
                await asyncio.sleep(min(0.005 * 2 ** attempt, 0.1))
            except NerveError:
                break
        return None


__all__ = ["RunState", "Services", "not_found"]
