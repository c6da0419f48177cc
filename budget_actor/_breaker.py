"""The runaway breaker's detectors: pure, fed with observations, answering with trips.

Two kinds of evidence, from two sources the breaker needs nobody's help to read:

* **Burn rate** from the ledgers' own cost events (``Ledger.settle`` records a
  :class:`~budget_actor.CostEvent` per charge, batched on
  ``nerve.events.budget.cost.<tenant>``): spend and LLM calls per tenant and per run over a
  sliding window of at most ten seconds, timed by the events' own clocks. (The gateway's
  richer per-call records on ``nerve.events.cost`` are for dashboards; the breaker does
  not depend on them.)
* **No progress** from the run histories (``StepScheduled`` / ``StepCompleted`` on
  ``nerve.runs.<id>.history``): a step identity ``(kind, name, args_digest)`` of kind
  ``tool`` or ``llm`` seen ``repeat_*`` times within the run's last ``repeat_horizon``
  steps. A step is counted once per index, whether scheduled, completed or both, so
  retries of one step are not "repeats".

A run or tenant that tripped does not trip again until it is reset or resumed.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from budget_actor._events import Detector
from budget_actor._limits import BreakerPolicy
from budget_actor._prices import NANOS_PER_USD

MAX_RUNS = 100_000


@dataclass(slots=True)
class Trip:
    """What tripped, where, and the evidence."""

    tenant: str
    run_id: str | None
    detector: Detector
    reason: str
    evidence: dict[str, Any]

    @property
    def tenant_wide(self) -> bool:
        return self.run_id is None


@dataclass(slots=True)
class _Rate:
    """Sliding sums of (at, nanos) over a window."""

    samples: collections.deque[tuple[float, int]] = field(default_factory=collections.deque)
    nanos: int = 0
    latest: float = 0.0

    def add(self, at: float, nanos: int, window: float) -> None:
        self.samples.append((at, nanos))
        self.nanos += nanos
        self.latest = max(self.latest, at)
        self.evict(self.latest - window)

    def evict(self, before: float) -> None:
        while self.samples and self.samples[0][0] <= before:
            self.nanos -= self.samples.popleft()[1]

    @property
    def calls(self) -> int:
        return len(self.samples)

    def evidence(self, window: float) -> dict[str, Any]:
        first, last = self.samples[0][0], self.samples[-1][0]
        return {"window_s": window, "usd_in_window": self.nanos / NANOS_PER_USD,
                "calls_in_window": self.calls, "first_at": first, "last_at": last,
                "usd_per_s": self.nanos / NANOS_PER_USD / window}


@dataclass(slots=True)
class _Steps:
    """A run's recent steps of kind tool/llm, for repeat detection."""

    recent: collections.deque[tuple[int, str, str, str]] = field(
        default_factory=collections.deque)
    counts: collections.Counter[tuple[str, str, str]] = field(
        default_factory=collections.Counter)
    seen: set[int] = field(default_factory=set)
    max_index: int = -1


class BreakerState:
    """Every detector's memory. Feed it; it returns the trips each observation causes."""

    def __init__(self) -> None:
        self.tenant_rates: dict[str, _Rate] = {}
        self.run_rates: dict[tuple[str, str], _Rate] = {}
        self.steps: collections.OrderedDict[str, _Steps] = collections.OrderedDict()
        self.tripped_tenants: set[str] = set()
        self.tripped_runs: set[str] = set()

    # -- resets --------------------------------------------------------------------------
    def reset_tenant(self, tenant: str, runs: list[str] | None = None) -> None:
        self.tripped_tenants.discard(tenant)
        self.tenant_rates.pop(tenant, None)
        for key in [k for k in self.run_rates if k[0] == tenant]:
            del self.run_rates[key]
        for run_id in runs or []:
            self.resume_run(run_id)

    def resume_run(self, run_id: str) -> None:
        self.tripped_runs.discard(run_id)
        self.steps.pop(run_id, None)

    def forget_run(self, run_id: str) -> None:
        self.steps.pop(run_id, None)
        self.tripped_runs.discard(run_id)
        for key in [k for k in self.run_rates if k[1] == run_id]:
            del self.run_rates[key]

    # -- burn rate -----------------------------------------------------------------------
    def burn(self, tenant: str, window: float, now: float) -> dict[str, Any]:
        """The tenant's spend over the last ``window`` seconds before ``now``."""
        rate = self.tenant_rates.get(tenant)
        if rate is not None:
            rate.evict(now - window)
        if rate is None or not rate.samples:
            return {"usd_in_window": 0.0, "calls_in_window": 0, "window_s": window}
        for (t, _run), r in self.run_rates.items():
            if t == tenant:
                r.evict(now - window)
        runs = sorted(((r.nanos, run) for (t, run), r in self.run_rates.items()
                       if t == tenant and r.nanos), reverse=True)[:5]
        return {"usd_in_window": rate.nanos / NANOS_PER_USD, "calls_in_window": rate.calls,
                "window_s": window, "last_at": rate.samples[-1][0] if rate.samples else None,
                "top_runs": {run: n / NANOS_PER_USD for n, run in runs}}

    def cost(self, tenant: str, run_id: str | None, at: float, nanos: int,
             policy: BreakerPolicy) -> list[Trip]:
        w = policy.window_s
        trips: list[Trip] = []
        rate = self.tenant_rates.setdefault(tenant, _Rate())
        rate.add(at, nanos, w)
        if tenant not in self.tripped_tenants:
            trip = self._check(tenant, None, rate, w, policy.tenant_usd_per_window,
                               policy.tenant_calls_per_window, "tenant")
            if trip is not None:
                self.tripped_tenants.add(tenant)
                trips.append(trip)
        if run_id is not None:
            rrate = self.run_rates.setdefault((tenant, run_id), _Rate())
            rrate.add(at, nanos, w)
            if run_id not in self.tripped_runs and tenant not in self.tripped_tenants:
                trip = self._check(tenant, run_id, rrate, w, policy.run_usd_per_window,
                                   policy.run_calls_per_window, "run")
                if trip is not None:
                    self.tripped_runs.add(run_id)
                    trips.append(trip)
        return trips

    @staticmethod
    def _check(tenant: str, run_id: str | None, rate: _Rate, window: float,
               usd: float | None, calls: int | None, scope: str) -> Trip | None:
        who = f"tenant {tenant}" if run_id is None else f"run {run_id} of tenant {tenant}"
        if usd is not None and rate.nanos > usd * NANOS_PER_USD:
            return Trip(tenant, run_id, f"{scope}_burn_rate",  # type: ignore[arg-type]
                        f"{who} spent ${rate.nanos / NANOS_PER_USD:.4f} in {window:g}s "
                        f"(trips above ${usd:g})",
                        {**rate.evidence(window), "threshold_usd": usd})
        if calls is not None and rate.calls > calls:
            return Trip(tenant, run_id, f"{scope}_call_rate",  # type: ignore[arg-type]
                        f"{who} made {rate.calls} LLM calls in {window:g}s (trips above {calls})",
                        {**rate.evidence(window), "threshold_calls": calls})
        return None

    # -- no progress ---------------------------------------------------------------------
    def step(self, tenant: str, run_id: str, index: int, kind: str, name: str, digest: str,
             policy: BreakerPolicy) -> list[Trip]:
        if kind not in ("tool", "llm") or run_id in self.tripped_runs:
            return []
        steps = self.steps.get(run_id)
        if steps is None:
            steps = self.steps[run_id] = _Steps()
            while len(self.steps) > MAX_RUNS:
                self.steps.popitem(last=False)
        else:
            self.steps.move_to_end(run_id)
        if index in steps.seen:
            return []
        steps.seen.add(index)
        steps.max_index = max(steps.max_index, index)
        if len(steps.seen) > 4 * policy.repeat_horizon:
            floor = steps.max_index - 2 * policy.repeat_horizon
            steps.seen = {i for i in steps.seen if i >= floor}
        ident = (kind, name, digest)
        steps.recent.append((index, kind, name, digest))
        steps.counts[ident] += 1
        while len(steps.recent) > policy.repeat_horizon:
            _, *old = steps.recent.popleft()
            steps.counts[tuple(old)] -= 1  # type: ignore[index]
        if kind == "tool":
            threshold = policy.repeat_tool_calls
            if name in policy.ignore_tools:
                return []
        else:
            threshold = policy.repeat_llm_calls
        count = steps.counts[ident]
        if threshold is None or count < threshold:
            return []
        self.tripped_runs.add(run_id)
        indexes = [i for i, k, n, d in steps.recent if (k, n, d) == ident]
        what = f"tool call {name}" if kind == "tool" else "LLM request"
        detector: Detector = "repeated_tool_call" if kind == "tool" else "repeated_llm_call"
        return [Trip(tenant, run_id, detector,
                     f"run {run_id} of tenant {tenant} made the same {what} (arguments "
                     f"digest {digest}) {count} times in its last {len(steps.recent)} steps",
                     {"kind": kind, "name": name, "args_digest": digest, "count": count,
                      "threshold": threshold, "indexes": indexes,
                      "horizon": policy.repeat_horizon, "steps_considered": len(steps.recent)})]
