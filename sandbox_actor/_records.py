"""Sandbox assignments: which host runs which sandbox, and where its state stands.

One key per sandbox in the ``nerve-leases`` bucket, ``sandbox.<sandbox_id>``
(:meth:`bus.Names.sandbox_lease`). It holds a :class:`~supervisor.LeaseRecord` (so
anything watching the bucket with ``watch_leases`` can read it) whose ``holder`` is the
owning host and whose ``data`` is a :class:`SandboxAssignment`. It carries no TTL: a
sandbox is alive exactly while its host's lease (``host.<host_id>``) is.

Every change is a compare-and-set on the key's revision. That revision is the fencing
token of a sandbox's owner: the placement actor bumps ``generation`` when it moves the
sandbox, and the old owner's next commit fails, so it can never publish a step result
after a new owner took over.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError
from pydantic import BaseModel, Field

from bus import Bus, Names
from sandbox_actor._types import SandboxSpec
from supervisor import LeaseRecord

AssignmentState = Literal["assigned", "running", "idle", "destroyed"]


class SandboxAssignment(BaseModel):
    """Where a sandbox lives and the last step boundary it committed."""

    sandbox_id: str
    run_id: str | None = None
    tenant: str = "default"
    inbox: str | None = None  # where SandboxNotices go (the run's inbox)
    spec: SandboxSpec = Field(default_factory=SandboxSpec)
    host: str | None = None
    generation: int = 0
    state: AssignmentState = "assigned"
    prev_host: str | None = None  # set when moved off a dead host: the restore reports it
    reason: str = ""
    last_snapshot: str | None = None
    last_step_index: int | None = None
    last_step_key: str | None = None
    last_result: Any = None  # the committed step's result (answers a redelivery)
    seq: int = 0  # the last snapshot sequence number used
    updated_at: float = Field(default_factory=time.time)

    def encode(self) -> bytes:
        now = time.time()
        return LeaseRecord(holder=self.host or "", acquired_at=now, renewed_at=now, ttl=0,
                           data=self.model_dump(mode="json")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> SandboxAssignment:
        return cls.model_validate(LeaseRecord.decode(raw).data)


class Assignments:
    """Read and compare-and-set sandbox assignments."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    async def _kv(self):
        return await self.bus.kv(self.bus.names.leases_bucket)

    async def get(self, sandbox_id: str) -> tuple[SandboxAssignment, int] | None:
        kv = await self._kv()
        try:
            entry = await kv.get(Names.sandbox_lease(sandbox_id))
        except KeyNotFoundError:
            return None
        if entry.value is None or entry.operation is not None:
            return None
        try:
            return SandboxAssignment.decode(entry.value), entry.revision or 0
        except (KeyError, ValueError):
            return None

    async def put(self, record: SandboxAssignment, revision: int | None) -> int | None:
        """Write ``record`` if the key is still at ``revision`` (None: must not exist).

        Returns the new revision, or None when someone else changed it first.
        """
        kv = await self._kv()
        record.updated_at = time.time()
        key = Names.sandbox_lease(record.sandbox_id)
        try:
            if revision is None:
                return await kv.create(key, record.encode())
            return await kv.update(key, record.encode(), last=revision)
        except KeyWrongLastSequenceError:
            return None
        except APIError as exc:
            if exc.err_code in (10071, 10164):  # wrong last sequence / key exists
                return None
            raise


def parse_key(key: str) -> str | None:
    """The sandbox id of a ``sandbox.<id>`` lease key, else None."""
    return key[len("sandbox."):] if key.startswith("sandbox.") else None
