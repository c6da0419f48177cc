"""Sandbox hosts and placement on a real nats-server, with real ns sandboxes."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from actors import StepResult, WorkItem, encode
from bus import Bus, Names
from persistence import INBOX_ADAPTER, SandboxNotice
from sandbox_actor import NsBackend, WorkspaceStore
from sandbox_actor._host import HostConfig, SandboxHost
from sandbox_actor._placement import Placement
from sandbox_actor._records import Assignments
from sandbox_actor._runner import RunnerConfig
from tests._sandbox import backend_config, needs_ns

pytestmark = needs_ns


@dataclass
class Inbox:
    """Collects what arrives on a run's inbox (from JetStream, as the orchestrator would)."""

    bus: Bus
    run_id: str
    results: dict[int, StepResult] = field(default_factory=dict)
    notices: list[SandboxNotice] = field(default_factory=list)
    all_results: list[StepResult] = field(default_factory=list)
    _sub: Any = None
    _event: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        self._sub = await self.bus.js.subscribe(self.bus.names.inbox(self.run_id),
                                                cb=self._on, ordered_consumer=True)

    async def _on(self, msg) -> None:
        from actors import unpack

        message = INBOX_ADAPTER.validate_python(unpack(msg.data))
        if isinstance(message, StepResult):
            self.results.setdefault(message.index, message)
            self.all_results.append(message)
        elif isinstance(message, SandboxNotice):
            self.notices.append(message)
        self._event.set()

    async def wait_result(self, index: int, timeout: float = 30.0) -> StepResult:
        async with asyncio.timeout(timeout):
            while index not in self.results:
                self._event.clear()
                await self._event.wait()
        return self.results[index]

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self._sub.unsubscribe()


async def publish_step(bus: Bus, run_id: str, index: int, name: str, args: Any,
                       sandbox_id: str | None = None, meta: dict | None = None) -> WorkItem:
    sid = sandbox_id or run_id
    item = WorkItem(run_id=run_id, tenant="acme", index=index, kind="sandbox", name=name,
                    args=args, key=f"{run_id}:{index}", reply_to=bus.names.inbox(run_id),
                    meta=meta or {})
    await bus.js.publish(bus.names.work_sandbox(sid), encode(item),
                         headers={"Nats-Msg-Id": f"work:{item.key}:{item.attempt}"})
    return item


@pytest.fixture
async def host(bus: Bus) -> AsyncIterator[SandboxHost]:
    backend = NsBackend(backend_config(host_id="h1"))
    h = SandboxHost(bus, backend, HostConfig(host_id="h1", lease_ttl=2.0,
                                             runner=RunnerConfig(crash_retries=2)))
    await h.start()
    yield h
    await h.stop()
    shutil.rmtree(backend.config.state_dir, ignore_errors=True)


async def test_work_for_a_new_sandbox_is_placed_run_and_snapshotted(
        bus: Bus, host: SandboxHost, placement: Placement) -> None:
    run_id = "run-a"
    inbox = Inbox(bus, run_id)
    await inbox.start()
    meta = {"sandbox": {"tenant": "acme", "limits": {"memory_mb": 128}}}
    await publish_step(bus, run_id, 1, "write_file", {"path": "notes/a.txt",
                                                      "content": "alpha\n"}, meta=meta)
    await publish_step(bus, run_id, 2, "exec", {"cmd": "cat notes/a.txt; echo beta >> "
                                                       "notes/a.txt; echo oops >&2; exit 4"})
    await publish_step(bus, run_id, 3, "read_file", {"path": "notes/a.txt"})
    await publish_step(bus, run_id, 4, "list_files", {})
    r1, r2, r3, r4 = [await inbox.wait_result(i) for i in (1, 2, 3, 4)]
    assert r1.ok and r1.result["snapshot"]
    assert r2.ok and r2.result["exit_code"] == 4 and r2.result["stdout"] == "alpha\n"
    assert r2.result["stderr"] == "oops\n" and not r2.result["timed_out"]
    assert set(r2.result) >= {"exit_code", "stdout", "stderr", "timed_out", "oom_killed",
                              "duration_ms", "snapshot"}
    assert r3.ok and r3.result["content"] == "alpha\nbeta\n"
    assert {e["path"] for e in r4.result["entries"]} == {"notes", "notes/a.txt"}
    # The placement actor wrote the assignment; the host committed each step boundary.
    record, _rev = await Assignments(bus).get(run_id)
    assert record.host == "h1" and record.state == "running"
    assert record.last_step_index == 2 and record.last_snapshot == r2.result["snapshot"]
    assert record.spec.limits.memory_mb == 128
    store = WorkspaceStore(bus)
    snaps = await store.list(run_id)
    assert [s.step_index for s in snaps] == [1, 2]
    manifest = await store.get_manifest(r2.result["snapshot"])
    assert manifest.step_key == f"{run_id}:2" and manifest.result["exit_code"] == 4
    await inbox.stop()


async def test_a_step_that_crashes_its_sandbox_every_time_fails_with_evidence(
        bus: Bus, host: SandboxHost, placement: Placement) -> None:
    run_id = "run-crash"
    inbox = Inbox(bus, run_id)
    await inbox.start()
    await publish_step(bus, run_id, 1, "write_file", {"path": "keep.txt", "content": "kept"})
    assert (await inbox.wait_result(1)).ok
    # kill -9 of the sandbox's init process (the agent) from inside, every time.
    await publish_step(bus, run_id, 2, "exec", {"cmd": "echo doomed > keep.txt; kill -9 $PPID"})
    r2 = await inbox.wait_result(2)
    assert not r2.ok and r2.error["type"] == "SandboxCrashed"
    assert r2.error["retryable"] is False
    assert len(r2.error["fields"]["evidence"]) == 3  # the first try and two retries
    # No loop: the step was answered once, and the sandbox is back at the last snapshot.
    await publish_step(bus, run_id, 3, "read_file", {"path": "keep.txt"})
    r3 = await inbox.wait_result(3)
    assert r3.ok and r3.result["content"] == "kept"
    assert len([r for r in inbox.all_results if r.index == 2]) == 1
    await inbox.stop()


async def test_a_sandbox_killed_mid_step_is_restored_and_the_step_retried(
        bus: Bus, host: SandboxHost, placement: Placement) -> None:
    run_id = "run-restore"
    inbox = Inbox(bus, run_id)
    await inbox.start()
    await publish_step(bus, run_id, 1, "exec", {"cmd": "echo one >> log"})
    assert (await inbox.wait_result(1)).ok
    await publish_step(bus, run_id, 2, "exec",
                       {"cmd": "echo two-partial >> log; sleep 3; echo two >> log"})
    runner = None
    async with asyncio.timeout(10):
        while runner is None or not (await _running(runner)):
            runner = host.runner(run_id)
            await asyncio.sleep(0.05)
    first = runner.sandbox
    # The backend fails under the step (its whole process tree is killed from outside).
    await host.backend.kill(first, "test: killed from outside")
    r2 = await inbox.wait_result(2)
    assert r2.ok and r2.result["exit_code"] == 0
    assert runner.sandbox is not first  # a new sandbox, restored from step 1's snapshot
    await publish_step(bus, run_id, 3, "read_file", {"path": "log"})
    r3 = await inbox.wait_result(3)
    # The killed attempt's partial write is gone with its sandbox: the step ran once.
    assert r3.result["content"] == "one\ntwo-partial\ntwo\n"
    await inbox.stop()


async def _running(runner) -> bool:
    sb = runner.sandbox
    return sb is not None and sb.alive and len(sb.cgroups.pids()) > 3


async def test_fork_diverges_from_its_origin(bus: Bus, host: SandboxHost,
                                             placement: Placement) -> None:
    run_id = "run-origin"
    inbox = Inbox(bus, run_id)
    await inbox.start()
    await publish_step(bus, run_id, 1, "exec", {"cmd": "echo base > f; mkdir d; echo x > d/x"})
    snapshot = (await inbox.wait_result(1)).result["snapshot"]
    # Two forks of that snapshot, each its own run and sandbox.
    forks = {}
    # One names the snapshot; the other says what the workflow engine's forks say: the
    # parent sandbox and the step index to start after.
    metas = {"fork-a": {"sandbox": {"from_snapshot": snapshot}},
             "fork-b": {"sandbox": {"id": "fork-b", "tenant": "acme",
                                    "fork_of": {"sandbox_id": run_id, "step_index": 1}}}}
    for name in ("fork-a", "fork-b"):
        fin = Inbox(bus, name)
        await fin.start()
        meta = metas[name]
        await publish_step(bus, name, 1, "exec", {"cmd": f"echo {name} >> f; cat f; "
                                                         f"touch only-{name}; ls"}, meta=meta)
        forks[name] = fin
    a = await forks["fork-a"].wait_result(1)
    b = await forks["fork-b"].wait_result(1)
    assert a.result["stdout"] == "base\nfork-a\nd\nf\nonly-fork-a\n"
    assert b.result["stdout"] == "base\nfork-b\nd\nf\nonly-fork-b\n"
    await publish_step(bus, run_id, 2, "exec", {"cmd": "cat f; ls"})
    origin = await inbox.wait_result(2)
    assert origin.result["stdout"] == "base\nd\nf\n"
    for fin in forks.values():
        await fin.stop()
    await inbox.stop()


async def test_a_redelivered_committed_step_is_answered_not_rerun(
        bus: Bus, host: SandboxHost, placement: Placement) -> None:
    run_id = "run-dup"
    inbox = Inbox(bus, run_id)
    await inbox.start()
    await publish_step(bus, run_id, 1, "exec", {"cmd": "echo once >> log; cat log"})
    first = await inbox.wait_result(1)
    # The same item again (as JetStream would redeliver it after a lost ack), with a
    # fresh message id so the stream accepts it.
    item = WorkItem(run_id=run_id, tenant="acme", index=1, kind="sandbox", name="exec",
                    args={"cmd": "echo once >> log; cat log"}, key=f"{run_id}:1",
                    reply_to=bus.names.inbox(run_id))
    await bus.js.publish(bus.names.work_sandbox(run_id), encode(item))
    await publish_step(bus, run_id, 2, "read_file", {"path": "log"})
    r2 = await inbox.wait_result(2)
    assert r2.result["content"] == "once\n"
    dups = [r for r in inbox.all_results if r.index == 1]
    assert all(r.result == first.result for r in dups)
    await inbox.stop()


def test_names_for_sandboxes() -> None:
    assert Names.sandbox_durable("run-1") == "sandbox_run-1"
    assert Names.snapshot_chunk("ab" * 32).startswith("chunk.")
    with pytest.raises(Exception, match="invalid"):
        Names.sandbox_durable("a.b")
