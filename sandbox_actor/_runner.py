"""One sandbox on this host: its steps, its snapshots, its recovery.

The step contract (what the workflow side sends on ``nerve.work.sandbox.<sandbox_id>``):

===============  ==============================================  ==========================
``name``         ``args``                                        ``result``
===============  ==============================================  ==========================
``exec``         ``{"cmd": str | [argv], "timeout"?, "cwd"?,      :class:`ExecResult` as a
                 "env"?, "stdin"?}`` (a string runs in ``sh -c``)  dict
``write_file``   ``{"path", "content": str | bytes, "mode"?}``    ``{"path", "size",
                                                                  "snapshot"}``
``read_file``    ``{"path", "limit"?}``                           ``{"path", "content"
                                                                  (str, or bytes if not
                                                                  UTF-8), "size"}``
``list_files``   ``{"path"?}``                                    ``{"entries": [{path,
                                                                  type, size, mode}]}``
``snapshot``     ``{}``                                           ``{"snapshot",
                                                                  "step_index"}``
``destroy``      ``{}``                                           ``{"destroyed": true}``
===============  ==============================================  ==========================

**Commit order of a mutating step** (``exec``, ``write_file``): run it, snapshot the
workspace (tagged with the step's key, index and result), compare-and-set the sandbox's
assignment (the fencing token: a host that lost the sandbox fails here and publishes
nothing), and only then publish the result and ack. So:

* the host dies *before* the commit: the latest snapshot is the one before the step; the
  redelivered step runs again on exactly that workspace, which is correct because the
  restored workspace has none of the first attempt's effects;
* the host dies *after* the commit (result not yet published, or not acked): the restored
  snapshot carries the step's key, and the redelivered step is answered with the recorded
  result without running again. Each step's effect lands in the workspace exactly once.

With a snapshot policy that skips steps (``every_n`` > 1, or ``on_demand``), a restore
lands on the last snapshot, which may be before the last committed step: the
``SandboxNotice(restored, step_index=...)`` says where, and the workflow must re-run what
came after (or fail the run).

**A sandbox that dies during a step** (its init is killed, OOM, backend failure) is
restored from the last good snapshot and the step retried, up to ``crash_retries`` times;
a step that kills its sandbox every time fails with :class:`~nerve.SandboxCrashed`
(``retryable=False``, ``evidence`` listing each attempt), and the sandbox is left restored
for the next step.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from actors import WorkItem
from nerve import LeaseLostError, NerveError, SandboxCrashed, SandboxError
from sandbox_actor._backend import Sandbox, SandboxBackend
from sandbox_actor._records import Assignments, SandboxAssignment
from sandbox_actor._snapshots import GENERATION_STRIDE, WorkspaceStore
from sandbox_actor._types import ExecResult, OutputCallback, SandboxSpec, step_env

log = logging.getLogger("nerve.sandbox.runner")

MUTATING = frozenset({"exec", "write_file"})
OPS = frozenset({"exec", "write_file", "read_file", "list_files", "snapshot", "destroy"})


class SnapshotPolicy(enum.Enum):
    EVERY_STEP = "every_step"
    EVERY_N = "every_n"
    ON_DEMAND = "on_demand"


@dataclass(slots=True)
class RunnerConfig:
    policy: SnapshotPolicy = SnapshotPolicy.EVERY_STEP
    every_n: int = 5
    crash_retries: int = 2
    keep_snapshots: int = 0  # 0: keep all (forks need them); else prune older ones
    # Fault injection for chaos tests: step keys after whose commit this process kills
    # itself (SIGKILL), i.e. between "snapshot committed" and "result published".
    crash_after_commit: frozenset[str] = frozenset()


class Fenced(NerveError):
    """This host no longer owns the sandbox: do nothing, publish nothing."""

    retryable = True


@dataclass(eq=False)
class SandboxRunner:
    """Owns one sandbox on this host for one generation of its assignment."""

    record: SandboxAssignment
    revision: int
    backend: SandboxBackend
    store: WorkspaceStore
    assignments: Assignments
    host_id: str
    config: RunnerConfig = field(default_factory=RunnerConfig)
    acquire: Any = None  # async (spec) -> Sandbox: the warm pool, or backend.create
    sandbox: Sandbox | None = None
    restored_from: str | None = None
    steps_since_snapshot: int = 0
    fenced: bool = False
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def sandbox_id(self) -> str:
        return self.record.sandbox_id

    # -- bring-up -------------------------------------------------------------------------
    async def start(self) -> None:
        """Create the sandbox: from its last snapshot, its fork origin, or empty."""
        spec = self.record.spec.model_copy(update={"sandbox_id": self.sandbox_id})
        self.sandbox = await self._materialize(spec)

    async def _materialize(self, spec: SandboxSpec) -> Sandbox:
        source = self.record.last_snapshot or spec.from_snapshot
        if source is None and self.record.seq:
            # Committed before but the record lost its pointer: newest stored snapshot.
            latest = await self.store.latest(self.sandbox_id)
            source = latest.name if latest else None
        if source is not None:
            manifest = await self.store.get_manifest(source)
            sandbox = await self.backend.restore(spec, source, self.store)
            self.restored_from = source
            if manifest.sandbox_id == self.sandbox_id:
                # Our own snapshot: it knows the last step it follows.
                self.record.last_step_key = manifest.step_key
                self.record.last_step_index = manifest.step_index
                self.record.last_result = manifest.result
            return sandbox
        if self.acquire is not None:
            return await self.acquire(spec)
        return await self.backend.create(spec)

    async def stop(self, destroy: bool = True) -> None:
        if self.sandbox is not None and destroy:
            await self.backend.destroy(self.sandbox)
        self.sandbox = None

    # -- steps ----------------------------------------------------------------------------
    async def perform(self, item: WorkItem, on_output: OutputCallback | None = None) -> Any:
        """Run one step under the commit protocol; return its result (or raise)."""
        async with self._lock:
            if self.fenced:
                raise Fenced(f"sandbox {self.sandbox_id} moved off host {self.host_id}",
                             sandbox_id=self.sandbox_id)
            if item.name not in OPS:
                raise SandboxError(f"unknown sandbox step {item.name!r}; one of "
                                   f"{', '.join(sorted(OPS))}", retryable=False,
                                   key=item.key, name=item.name)
            if item.name in MUTATING and item.key == self.record.last_step_key:
                # Redelivered after its commit (the host died before the result went
                # out, or the ack was lost): the workspace already holds its effect.
                log.info("sandbox %s: step %s already committed; answering from the "
                         "snapshot", self.sandbox_id, item.key)
                return self.record.last_result
            if item.name == "destroy":
                return await self._destroy()
            if item.name == "snapshot":
                ref = await self._commit(item, None, force_snapshot=True)
                return {"snapshot": ref, "step_index": item.index}
            result = await self._with_recovery(item, on_output)
            if item.name in MUTATING:
                snap = await self._commit(item, result)
                if isinstance(result, dict) and "snapshot" in result:
                    result["snapshot"] = snap
                if item.key in self.config.crash_after_commit:
                    log.warning("fault injection: killing this host after committing %s",
                                item.key)
                    os.kill(os.getpid(), signal.SIGKILL)
            return result

    async def _with_recovery(self, item: WorkItem, on_output: OutputCallback | None) -> Any:
        evidence: list[dict[str, Any]] = []
        for attempt in range(self.config.crash_retries + 1):
            if self.sandbox is None or not self.sandbox.alive:
                await self._recover(evidence[-1]["reason"] if evidence else
                                    "sandbox was not running")
            assert self.sandbox is not None
            try:
                return await self._run_op(self.sandbox, item, on_output)
            except SandboxCrashed as exc:
                evidence.append({"attempt": attempt + 1, "reason": exc.message,
                                 "at": time.time()})
                log.warning("sandbox %s crashed during step %s (attempt %d): %s",
                            self.sandbox_id, item.key, attempt + 1, exc.message)
        await self._recover("crashed on every attempt")  # leave it usable for what follows
        raise SandboxCrashed(
            f"step {item.key} crashed sandbox {self.sandbox_id} on all "
            f"{len(evidence)} attempts; last: {evidence[-1]['reason']}",
            retryable=False, sandbox_id=self.sandbox_id, key=item.key, evidence=evidence)

    async def _recover(self, reason: str) -> None:
        """Replace a dead sandbox with one restored from the last good snapshot."""
        self._check_fence(reason)
        old = self.sandbox
        if old is not None:
            await self.backend.destroy(old)
        spec = self.record.spec.model_copy(update={"sandbox_id": self.sandbox_id})
        self.sandbox = None
        fresh = await self._materialize(spec)
        if self.fenced:
            # Taken away (or its run ended) while we restored: nobody would destroy it.
            await self.backend.destroy(fresh)
            self._check_fence(reason)
        self.sandbox = fresh
        log.info("sandbox %s restored from %s after: %s", self.sandbox_id,
                 self.restored_from or "nothing (empty workspace)", reason)

    def _check_fence(self, why: str) -> None:
        if self.fenced:
            raise Fenced(f"sandbox {self.sandbox_id} is no longer host {self.host_id}'s "
                         f"(moved, or its run ended); not restoring it after: {why}",
                         sandbox_id=self.sandbox_id)

    async def _run_op(self, sb: Sandbox, item: WorkItem, on_output: OutputCallback | None
                      ) -> Any:
        args = item.args if isinstance(item.args, dict) else {}
        if item.name == "exec":
            cmd = args.get("cmd")
            if isinstance(cmd, str):
                argv = ["/bin/sh", "-c", cmd]
            elif isinstance(cmd, list) and cmd and all(isinstance(a, str) for a in cmd):
                argv = list(cmd)
            else:
                raise SandboxError("exec needs args.cmd: a string or a list of strings",
                                   retryable=False, key=item.key)
            stdin = args.get("stdin")
            result: ExecResult = await sb.exec(
                argv, timeout=float(args["timeout"]) if args.get("timeout") else None,
                cwd=args.get("cwd"), env=step_env(sb.base_env, args.get("env")),
                stdin=stdin.encode() if isinstance(stdin, str) else stdin,
                on_output=on_output)
            return result.model_dump(mode="json")
        if item.name == "write_file":
            content = args.get("content", b"")
            data = content.encode() if isinstance(content, str) else bytes(content)
            await sb.write_file(_path(args, item), data, int(args.get("mode") or 0o644))
            return {"path": args["path"], "size": len(data), "snapshot": None}
        if item.name == "read_file":
            data = await sb.read_file(_path(args, item), int(args.get("limit") or 64 << 20))
            try:
                content: str | bytes = data.decode()
            except UnicodeDecodeError:
                content = data
            return {"path": args["path"], "content": content, "size": len(data)}
        if item.name == "list_files":
            entries = await sb.list_files(args.get("path") or ".")
            return {"entries": [{"path": e.path, "type": e.type, "size": e.size,
                                 "mode": e.mode} for e in entries]}
        raise SandboxError(f"unknown sandbox step {item.name!r}", retryable=False)

    # -- commit ---------------------------------------------------------------------------
    def _want_snapshot(self) -> bool:
        if self.config.policy is SnapshotPolicy.EVERY_STEP:
            return True
        if self.config.policy is SnapshotPolicy.EVERY_N:
            return self.steps_since_snapshot + 1 >= self.config.every_n
        return False

    def next_seq(self) -> int:
        base = self.record.generation * GENERATION_STRIDE
        return max(self.record.seq + 1, base + 1)

    async def _commit(self, item: WorkItem, result: Any, force_snapshot: bool = False
                      ) -> str | None:
        """Snapshot (per policy) and record the step boundary; raises :class:`Fenced`."""
        assert self.sandbox is not None
        snapshot = None
        record = self.record.model_copy(deep=True)
        if force_snapshot or self._want_snapshot():
            seq = self.next_seq()
            from bus import Names

            name = Names.snapshot_name(self.sandbox_id, seq)
            if isinstance(result, dict) and "snapshot" in result:
                result = {**result, "snapshot": name}
            ref = await self.backend.snapshot(
                self.sandbox, self.store, seq=seq, step_index=item.index, step_key=item.key,
                result=result, parent=record.last_snapshot)
            snapshot = ref.name
            record.seq = seq
            record.last_snapshot = snapshot
            self.steps_since_snapshot = 0
        else:
            self.steps_since_snapshot += 1
        record.last_step_key = item.key
        record.last_step_index = item.index
        record.last_result = result
        record.state = "running"
        revision = await self.assignments.put(record, self.revision)
        if revision is None:
            self.fenced = True
            raise Fenced(f"sandbox {self.sandbox_id}: its assignment changed under host "
                         f"{self.host_id}; not publishing step {item.key}",
                         sandbox_id=self.sandbox_id, key=item.key)
        self.record, self.revision = record, revision
        if snapshot is not None and self.config.keep_snapshots > 0:
            await self.store.blobs.delete_older(f"sandbox.{self.sandbox_id}.",
                                                self.config.keep_snapshots)
        return snapshot

    async def mark_running(self) -> None:
        record = self.record.model_copy(deep=True)
        record.state = "running"
        record.host = self.host_id
        revision = await self.assignments.put(record, self.revision)
        if revision is None:
            self.fenced = True
            raise LeaseLostError(f"sandbox {self.sandbox_id} was reassigned while host "
                                 f"{self.host_id} was starting it", key=self.sandbox_id)
        self.record, self.revision = record, revision

    async def _destroy(self) -> dict[str, Any]:
        await self.stop(destroy=True)
        record = self.record.model_copy(deep=True)
        record.state = "destroyed"
        revision = await self.assignments.put(record, self.revision)
        if revision is None:
            self.fenced = True
        else:
            self.record, self.revision = record, revision
        return {"destroyed": True}


def _path(args: dict[str, Any], item: WorkItem) -> str:
    path = args.get("path")
    if not isinstance(path, str) or not path or "\0" in path:
        raise SandboxError(f"step {item.key} needs args.path (a non-empty string)",
                           retryable=False, key=item.key)
    return path
