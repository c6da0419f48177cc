"""Snapshots cost what changed; fork plans; warm pool; the janitor; the public API."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import sandbox_actor
from bus import Bus
from sandbox_actor import NsBackend, SandboxSpec, WarmPool, WorkspaceStore, plan_fork
from sandbox_actor._fs import mounts_under
from tests._sandbox import backend_config, needs_ns, sandbox_uid_processes, sh, state_dir

pytestmark = needs_ns
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
async def backend() -> AsyncIterator[NsBackend]:
    b = NsBackend(backend_config())
    yield b
    await b.stop()
    shutil.rmtree(b.config.state_dir, ignore_errors=True)


async def test_snapshot_uploads_only_what_changed(backend: NsBackend, bus: Bus) -> None:
    store = WorkspaceStore(bus)
    sb = await backend.create(SandboxSpec(sandbox_id="delta"))
    made = await sb.exec(sh("for i in 1 2 3 4 5 6 7 8; do head -c 1048576 /dev/urandom > f$i; "
                            "done"))
    assert made.exit_code == 0, made
    full = await backend.snapshot(sb, store, seq=1, step_index=1)
    assert full.size > 8 * 1024 * 1024 and full.total == 8 * 1024 * 1024
    changed = await sb.exec(sh("head -c 65536 /dev/urandom > f3; echo new > g; rm f8; "
                               "ln -s f1 l"))
    assert changed.exit_code == 0, changed  # a failure here used to show up as "f8" below
    delta = await backend.snapshot(sb, store, seq=2, step_index=2, parent=full.name)
    assert delta.size < 200 * 1024  # the changed 64 KiB file, a small one, the manifest
    same = await backend.snapshot(sb, store, seq=3, step_index=3)
    assert same.size < 16 * 1024  # nothing changed: the manifest alone
    copy = await backend.restore(SandboxSpec(sandbox_id="delta-copy"), delta.name, store)
    listing = await copy.exec(sh("ls; readlink l; cat g; wc -c < f3; "
                                 "md5sum f1 f2 | cut -c1-32"))
    original = await sb.exec(sh("ls; readlink l; cat g; wc -c < f3; "
                                "md5sum f1 f2 | cut -c1-32"))
    assert listing.stdout == original.stdout
    assert "f8" not in listing.stdout.splitlines()  # a line of `ls`, not inside an md5
    assert [r.step_index for r in await store.list("delta")] == [1, 2, 3]
    assert (await store.at_step("delta", 2)).name == delta.name


async def test_fork_plan_finds_the_snapshot_at_or_before_a_step(backend: NsBackend,
                                                                bus: Bus) -> None:
    store = WorkspaceStore(bus)
    sb = await backend.create(SandboxSpec(sandbox_id="src"))
    refs = {}
    for index in (2, 5, 9):
        await sb.exec(sh(f"echo {index} >> steps"))
        refs[index] = await backend.snapshot(sb, store, seq=index, step_index=index)
    plan = await plan_fork(bus, source_sandbox_id="src", at=7, new_sandbox_id="src-fork")
    assert plan.snapshot == refs[5].name and plan.step_index == 5
    assert plan.meta["from_snapshot"] == refs[5].name
    none = await plan_fork(bus, source_sandbox_id="src", at=1, new_sandbox_id="f2")
    assert none.snapshot is None
    fork = await backend.fork(plan.snapshot, store, SandboxSpec(sandbox_id="src-fork"))
    assert (await fork.exec(sh("cat steps"))).stdout == "2\n5\n"


async def test_warm_pool_hands_out_ready_sandboxes(backend: NsBackend) -> None:
    pool = WarmPool(backend, 2)
    await pool.start()
    await pool.wait_full()
    sb = await pool.acquire(SandboxSpec(sandbox_id="warm-1", egress=[]))
    assert pool.hits == 1 and sb.sandbox_id == "warm-1" and sb.alive
    assert (await sb.exec(sh("echo warm"))).stdout == "warm\n"
    other = await pool.acquire(SandboxSpec(sandbox_id="cold-1",
                                           limits={"disk_mb": 64}))  # a different disk
    assert pool.misses == 1 and other.sandbox_id == "cold-1"
    await pool.stop()


@pytest.mark.timeout(60)
async def test_janitor_reclaims_what_a_killed_host_left(tmp_path: Path) -> None:
    state = state_dir()
    script = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from sandbox_actor import NsBackend, SandboxSpec, BackendConfig\n"
        "async def main():\n"
        f"    b = NsBackend(BackendConfig(state_dir=Path({str(state)!r}), host_id='jan'))\n"
        "    for i in range(2):\n"
        "        sb = await b.create(SandboxSpec(sandbox_id=f'orphan{i}'))\n"
        "        await sb.exec(['/bin/sh', '-c', '(setsid sleep 1000 &)'])\n"
        "    print('ready', flush=True)\n"
        "    await asyncio.sleep(1000)\n"
        "asyncio.run(main())\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE,
        cwd=ROOT)
    assert proc.stdout is not None
    async with asyncio.timeout(30):
        assert (await proc.stdout.readline()).strip() == b"ready"
    assert sandbox_uid_processes()
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    # Its sandboxes died with it (die-with-parent); its mounts and cgroups did not.
    async with asyncio.timeout(10):
        while sandbox_uid_processes():
            await asyncio.sleep(0.05)
    assert len(mounts_under(str(state))) == 2
    janitor = NsBackend(backend_config(state, host_id="jan"))
    reclaimed = await janitor.reclaim_orphans()
    assert sorted(r.split()[1] for r in reclaimed if r.startswith("sandbox")) == [
        "orphan0", "orphan1"]
    assert not mounts_under(str(state))
    assert not os.listdir(state / "sandboxes")
    assert not sandbox_uid_processes()
    assert not await janitor.reclaim_orphans()  # idempotent
    shutil.rmtree(state, ignore_errors=True)


def test_public_api_is_pinned() -> None:
    assert sorted(sandbox_actor.__all__) == sorted([
        "BACKENDS", "BASE_ENV", "Assignments", "BackendConfig", "Capabilities",
        "EgressConfig", "EgressProxy", "ExecResult", "Fenced", "FileEntry", "ForkPlan",
        "GvisorBackend", "GvisorSandbox", "HostConfig", "Isolation", "Manifest", "NsBackend",
        "NsSandbox", "Placement", "Probe", "RunnerConfig", "Sandbox", "SandboxAssignment",
        "SandboxBackend", "SandboxHost", "SandboxLimits", "SandboxRunner", "SandboxSpec",
        "SandboxWorker", "SnapshotPolicy", "SnapshotRef", "WarmPool", "WorkspaceStore",
        "choose", "plan_fork", "probe_all", "register", "start_fork"])
    for name in sandbox_actor.__all__:
        assert hasattr(sandbox_actor, name)
