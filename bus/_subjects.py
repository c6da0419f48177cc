"""Every stream, subject, bucket and object-store name nerve uses, in one place.

All names carry a prefix (default ``nerve``) so several deployments can share one NATS
cluster: stream names use the upper-cased prefix (``NERVE_RUNS``), subjects and buckets the
lower-cased one (``nerve.runs.<id>.history``, ``nerve-leases``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nerve import ConfigError

_PREFIX_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
# A token that may sit in one subject position: no wildcards, separators or whitespace.
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_\-]{1,128}$")


def check_token(kind: str, value: str) -> str:
    """Return ``value`` if it is safe as one subject token, else raise :class:`ConfigError`.

    Ids end up inside subjects (``nerve.runs.<run_id>.history``); a ``.``, ``*`` or ``>`` in
    one would address other runs' subjects.
    """
    if not isinstance(value, str) or not _TOKEN_RE.match(value):
        raise ConfigError(
            f"invalid {kind} {value!r}: use 1-128 characters from A-Z a-z 0-9 _ -",
            kind=kind, value=str(value),
        )
    return value


@dataclass(frozen=True, slots=True)
class Names:
    """The names of every NATS resource for one deployment prefix."""

    prefix: str = "nerve"

    def __post_init__(self) -> None:
        if not _PREFIX_RE.match(self.prefix):
            raise ConfigError(
                f"invalid prefix {self.prefix!r}: lower-case letters, digits and _ "
                "(starting with a letter, at most 32)", prefix=self.prefix,
            )

    # -- streams -----------------------------------------------------------------------
    @property
    def tasks_stream(self) -> str:
        return f"{self.prefix.upper()}_TASKS"

    @property
    def runs_stream(self) -> str:
        return f"{self.prefix.upper()}_RUNS"

    @property
    def work_stream(self) -> str:
        return f"{self.prefix.upper()}_WORK"

    @property
    def stream_stream(self) -> str:
        return f"{self.prefix.upper()}_STREAM"

    @property
    def dead_stream(self) -> str:
        return f"{self.prefix.upper()}_DEAD"

    @property
    def events_stream(self) -> str:
        return f"{self.prefix.upper()}_EVENTS"

    @property
    def advisories_stream(self) -> str:
        return f"{self.prefix.upper()}_ADVISORIES"

    @staticmethod
    def max_deliveries_advisory(stream: str, consumer: str = "*") -> str:
        """JetStream's advisory that a message ran out of deliveries (no verdict given)."""
        return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{consumer}"

    # -- buckets -----------------------------------------------------------------------
    @property
    def leases_bucket(self) -> str:
        return f"{self.prefix}-leases"

    @property
    def budgets_bucket(self) -> str:
        return f"{self.prefix}-budgets"

    @property
    def snapshots_bucket(self) -> str:
        return f"{self.prefix}-snapshots"

    @property
    def progress_bucket(self) -> str:
        """The last heartbeat details of activity steps, by step, for their next attempt."""
        return f"{self.prefix}-progress"

    @staticmethod
    def progress_key(run_id: str, index: int) -> str:
        """A step's key in the progress bucket."""
        return f"{run_id}.{index}"

    @property
    def apikeys_bucket(self) -> str:
        """HTTP API keys, one per key id, stored hashed (never the key itself)."""
        return f"{self.prefix}-apikeys"

    # -- consumers ---------------------------------------------------------------------
    @staticmethod
    def readmodel_consumer(instance: str) -> str:
        """Durable consumer of the run histories feeding one read model (one per API DB)."""
        return f"readmodel-{check_token('read model instance', instance)}"

    # -- subjects ----------------------------------------------------------------------
    def tasks(self, tenant: str = "*") -> str:
        if tenant == "rejected":
            raise ConfigError("tenant 'rejected' is reserved: its subject carries the notices of "
                              "rejected tasks; use another tenant name", kind="tenant",
                              value=tenant)
        return f"{self.prefix}.tasks.{self._id(tenant, 'tenant')}"

    @property
    def tasks_rejected(self) -> str:
        return f"{self.prefix}.tasks.rejected"

    def history(self, run_id: str = "*") -> str:
        return f"{self.prefix}.runs.{self._id(run_id, 'run id')}.history"

    def inbox(self, run_id: str = "*") -> str:
        return f"{self.prefix}.runs.{self._id(run_id, 'run id')}.inbox"

    @property
    def work_llm(self) -> str:
        return f"{self.prefix}.work.llm"

    @property
    def work_tool(self) -> str:
        return f"{self.prefix}.work.tool"

    @property
    def work_activity(self) -> str:
        return f"{self.prefix}.work.activity"

    def results(self, owner: str = "*", run_id: str = "*") -> str:
        """Where workers hand step results straight to the run's owner (core, not stored).

        Per owner, so one subscription serves all of an orchestrator's runs, and a dead
        owner's subject has no responders (the worker stores the result at once).
        """
        return (f"{self.prefix}.results.{self._id(owner, 'orchestrator id')}."
                f"{self._id(run_id, 'run id')}")

    def work_sandbox(self, sandbox_id: str = "*") -> str:
        return f"{self.prefix}.work.sandbox.{self._id(sandbox_id, 'sandbox id')}"

    def stream(self, run_id: str = "*") -> str:
        return f"{self.prefix}.stream.{self._id(run_id, 'run id')}"

    def dead_letter(self, consumer: str = "*") -> str:
        return f"{self.prefix}.deadletter.{self._id(consumer, 'consumer')}"

    def event(self, kind: str = ">") -> str:
        """Operational events (supervisor restarts, breaker trips, costs): ``nerve.events.*``."""
        return f"{self.prefix}.events.{kind}"

    @property
    def cost_events(self) -> str:
        """One event per LLM call (run, tenant, model, tokens by kind, cache hit ratio)."""
        return f"{self.prefix}.events.cost"

    def ctl(self, suffix: str = ">") -> str:
        return f"{self.prefix}.ctl.{suffix}"

    def run_ended(self, run_id: str = "*") -> str:
        """Where the orchestrator that records a run's end says so (core NATS, best effort):
        the host running the run's sandbox destroys it."""
        return f"{self.prefix}.ctl.run.{self._id(run_id, 'run id')}.ended"

    def attempt_given_up(self, run_id: str = "*") -> str:
        """Where a run's owner says it gave up on an attempt of a step (core NATS, best
        effort; payload ``<index>:<attempt>``): its worker stops running it."""
        return f"{self.prefix}.ctl.run.{self._id(run_id, 'run id')}.given-up"

    def tenant_kill(self, tenant: str = "*") -> str:
        return f"{self.prefix}.ctl.tenant.{self._id(tenant, 'tenant')}.kill"

    def tenant_reset(self, tenant: str = "*") -> str:
        return f"{self.prefix}.ctl.tenant.{self._id(tenant, 'tenant')}.reset"

    # -- budget ------------------------------------------------------------------------
    @property
    def budget_api(self) -> str:
        """Request/reply subject of the budget actor (reports, limits, kill, reset)."""
        return f"{self.prefix}.budget.api"

    def budget_cost_event(self, tenant: str = "*") -> str:
        """Charges to a tenant's ledger, batched (published by ``Ledger.settle``; the
        breaker's burn-rate input): ``nerve.events.budget.cost.<tenant>``."""
        return f"{self.prefix}.events.budget.cost.{self._id(tenant, 'tenant')}"

    @property
    def budget_trip_event(self) -> str:
        """Runaway-breaker trips, with their evidence."""
        return f"{self.prefix}.events.budget.trip"

    @property
    def budget_kill_event(self) -> str:
        """Kill-switch changes (kills and resets), stored for audit."""
        return f"{self.prefix}.events.budget.kill"

    # -- keys --------------------------------------------------------------------------
    @staticmethod
    def host_lease(host_id: str) -> str:
        return f"host.{check_token('host id', host_id)}"

    @staticmethod
    def run_lease(run_id: str) -> str:
        return f"run.{check_token('run id', run_id)}"

    @staticmethod
    def sandbox_lease(sandbox_id: str) -> str:
        return f"sandbox.{check_token('sandbox id', sandbox_id)}"

    @staticmethod
    def budget_key(tenant: str) -> str:
        return f"tenant.{check_token('tenant', tenant)}"

    @staticmethod
    def budget_run_key(tenant: str, run_id: str) -> str:
        """A run's own ledger (only when the tenant has per-run limits)."""
        return f"run.{check_token('tenant', tenant)}.{check_token('run id', run_id)}"

    @staticmethod
    def budget_lease(name: str) -> str:
        """Leader lease of a budget duty (``breaker``) in the leases bucket."""
        return f"budget.{check_token('budget duty', name)}"

    @staticmethod
    def apikey_key(key_id: str) -> str:
        return f"key.{check_token('API key id', key_id)}"

    @staticmethod
    def snapshot_name(sandbox_id: str, seq: int) -> str:
        # Zero-padded so names sort in sequence order.
        return f"sandbox.{check_token('sandbox id', sandbox_id)}.{seq:012d}"

    @staticmethod
    def snapshot_chunk(digest: str) -> str:
        """A content-addressed chunk of workspace data in the snapshots object store."""
        return f"chunk.{check_token('chunk digest', digest)}"

    @staticmethod
    def sandbox_durable(sandbox_id: str) -> str:
        """The durable consumer that feeds one sandbox its steps."""
        return f"sandbox_{check_token('sandbox id', sandbox_id)}"

    @staticmethod
    def _id(value: str, kind: str) -> str:
        return value if value in ("*", ">") else check_token(kind, value)
