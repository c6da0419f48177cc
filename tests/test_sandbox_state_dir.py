"""Two deployments never share a sandbox host's state: its state dir defaults to one under
the deployment's data dir, cgroups are per state dir, and a second live host on a state dir
is refused. (A host's janitor takes what it finds there for a crashed host's leftovers.)"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from bus import Bus
from cli._roles import RoleOptions
from nerve import ConfigError
from sandbox_actor import NsBackend, SandboxSpec
from sandbox_actor._host import HostConfig, SandboxHost
from sandbox_actor._roles import SHARED_STATE_ROOT, default_state_dir, run_sandbox_host
from tests._sandbox import backend_config, needs_ns, py, state_dir

pytestmark = [needs_ns, pytest.mark.timeout(90)]


def test_the_default_state_dir_is_under_the_data_dir() -> None:
    root = state_dir()
    os.chmod(root, 0o711)  # searchable by the sandbox uid, like /tmp
    try:
        one, two = root / "one", root / "two"
        assert default_state_dir(one, "sandbox-1") == one / "sandbox" / "sandbox-1"
        assert default_state_dir(two, "sandbox-1") == two / "sandbox" / "sandbox-1"
        # A data dir the sandbox uid cannot reach (a 0700 home): a dir of its own under
        # the shared root, still one per data dir.
        home = root / "home"
        home.mkdir(mode=0o700)
        os.chmod(home, 0o700)
        a, b = default_state_dir(home / "a", "sandbox-1"), default_state_dir(home / "b",
                                                                             "sandbox-1")
        assert a.parent == b.parent == SHARED_STATE_ROOT and a != b
        assert a.name.startswith("sandbox-1-") and a == default_state_dir(home / "a",
                                                                           "sandbox-1")
        assert default_state_dir(None, "sandbox-1") == SHARED_STATE_ROOT / "sandbox-1"
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def _serve_role(bus: Bus, opts: RoleOptions) -> asyncio.Task[None]:
    task = asyncio.create_task(run_sandbox_host(bus, opts))
    ready = asyncio.create_task(opts.ready.wait())
    await asyncio.wait({task, ready}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        ready.cancel()
        task.result()  # raises what stopped it
    assert opts.ready.is_set(), "the sandbox role did not come up in 30s"
    return task


async def _stop_role(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_the_sandbox_role_keeps_its_state_under_the_data_dir(bus: Bus) -> None:
    root = state_dir()
    os.chmod(root, 0o711)
    try:
        data = root / "deployment"
        task = await _serve_role(bus, RoleOptions(id="sbx-a", data_dir=data))
        try:
            state = data / "sandbox" / "sbx-a"
            assert (state / "host.lock").exists() and (state / "base").is_dir()
        finally:
            await _stop_role(task)
        # An explicit state_dir still wins over the data dir.
        explicit = root / "explicit"
        task = await _serve_role(bus, RoleOptions(id="sbx-b", data_dir=data,
                                                  settings={"state_dir": str(explicit)}))
        try:
            assert (explicit / "host.lock").exists()
            assert not (data / "sandbox" / "sbx-b").exists()
        finally:
            await _stop_role(task)
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def test_same_host_id_other_state_dir_leaves_the_live_sandbox_alone() -> None:
    # Two deployments' hosts are both called sandbox-1; one runs a sandbox when the other
    # starts (and runs its janitor).
    first = NsBackend(backend_config(host_id="twin"))
    second = NsBackend(backend_config(host_id="twin"))
    await first.start()
    try:
        sb = await first.create(SandboxSpec(sandbox_id="busy-run"))
        await second.start()
        assert await second.reclaim_orphans() == []
        assert sb.alive
        res = await sb.exec(py("print('still here')"))
        assert res.exit_code == 0 and res.stdout == "still here\n"
        await first.destroy(sb)
    finally:
        for backend in (first, second):
            await backend.stop()
            shutil.rmtree(backend.config.state_dir, ignore_errors=True)


async def test_a_second_live_host_on_a_state_dir_is_refused(bus: Bus) -> None:
    state: Path = state_dir()
    one = SandboxHost(bus, NsBackend(backend_config(state, host_id="lk1")),
                      HostConfig(host_id="lk1"))
    two = SandboxHost(bus, NsBackend(backend_config(state, host_id="lk2")),
                      HostConfig(host_id="lk2"))
    await one.start()
    try:
        with pytest.raises(ConfigError, match=f"in use by another sandbox host \\(pid "
                                              f"{os.getpid()}\\)"):
            await two.start()
        assert not two.lease_held
    finally:
        await one.stop()
    await two.start()  # free once the first one stopped
    await two.stop()
    shutil.rmtree(state, ignore_errors=True)
