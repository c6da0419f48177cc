"""Host failure at the sandbox-host level: real host processes, SIGKILLed at bad moments.

Three sandbox host OS processes serve one run's sandbox. The test SIGKILLs the owner in
the middle of a step (the step is redelivered to a restored sandbox on another host and
runs once), then makes the next owner kill itself right after committing a step but
before publishing its result (the redelivered step is answered from the snapshot and not
run again). The workspace must end exactly as an undisturbed run leaves it, and nothing
may leak from the dead hosts once a janitor has run.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from actors import unpack
from bus import Bus
from persistence import StreamEvent
from sandbox_actor import BackendConfig
from sandbox_actor._cgroups import CgroupSet, detect
from sandbox_actor._fs import mounts_under
from sandbox_actor._placement import Placement
from sandbox_actor._records import Assignments
from tests._sandbox import needs_ns, state_dir
from tests.test_sandbox_host import Inbox, publish_step

pytestmark = [needs_ns, pytest.mark.timeout(180)]
ROOT = Path(__file__).resolve().parents[1]


class HostProcess:
    def __init__(self, host_id: str, url: str, prefix: str, state: Path,
                 fault: str = "") -> None:
        self.host_id = host_id
        self.url = url
        self.prefix = prefix
        self.state = state
        self.fault = fault
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        ready = self.state / f"ready-{self.host_id}"
        ready.unlink(missing_ok=True)
        env = dict(os.environ, NERVE_SANDBOX_FAULT_CRASH_AFTER_COMMIT=self.fault,
                   NERVE_LOG="WARNING")
        self.log = open(self.state / f"{self.host_id}.log", "ab")  # noqa: ASYNC230
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sandbox_actor", "--nats-url", self.url,
            "--prefix", self.prefix, "--host-id", self.host_id, "--backend", "ns",
            "--state-dir", str(self.state), "--lease-ttl", "1.5", "--ready-file", str(ready),
            cwd=ROOT, env=env, stdout=self.log, stderr=self.log)
        async with asyncio.timeout(30):
            while not ready.exists():
                if self.proc.returncode is not None:
                    raise AssertionError(f"host {self.host_id} exited: "
                                         f"{(self.state / f'{self.host_id}.log').read_text()}")
                await asyncio.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(10):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self.log.close()


@pytest.fixture
async def hosts(nats_server, prefix: str) -> AsyncIterator[dict[str, HostProcess]]:
    crash_key = "run-chaos:3"
    made = {h: HostProcess(h, nats_server.url, prefix, state_dir(),
                           fault=crash_key if h != "hC" else "")
            for h in ("hA", "hB", "hC")}
    await asyncio.gather(*(h.start() for h in made.values()))
    yield made
    for h in made.values():
        await h.stop()
        log = h.state / f"{h.host_id}.log"
        if log.exists():  # kept for a failed run's post-mortem
            shutil.copy(log, Path("/tmp/nerve-sandbox-tests") / f"last-{h.host_id}.log")
        shutil.rmtree(h.state, ignore_errors=True)


async def _owner(bus: Bus, sid: str) -> str:
    found = await Assignments(bus).get(sid)
    assert found is not None
    return found[0].host or ""


async def test_host_sigkill_mid_step_and_after_commit(bus: Bus, hosts: dict[str, HostProcess]
                                                      ) -> None:
    run_id = "run-chaos"
    placement = Placement(bus, reconcile_every=0.5)
    await placement.start()
    inbox = Inbox(bus, run_id)
    await inbox.start()
    started = asyncio.Event()

    async def on_stream(msg) -> None:
        event = StreamEvent.model_validate(unpack(msg.data))
        if event.data.get("index") == 2 and "started" in event.data.get("text", ""):
            started.set()

    stream_sub = await bus.nc.subscribe(bus.names.stream(run_id), cb=on_stream)
    try:
        # Step 1 on the first host.
        await publish_step(bus, run_id, 1, "exec", {"cmd": "echo 1 >> log"})
        r1 = await inbox.wait_result(1)
        first = await _owner(bus, run_id)
        assert r1.ok and r1.worker == first == "hA"

        # Step 2: SIGKILL its host while the step runs (after its first effect).
        await publish_step(bus, run_id, 2, "exec",
                           {"cmd": "echo partial >> log; echo started; sleep 2; echo 2 >> log"})
        async with asyncio.timeout(30):
            await started.wait()
        hosts["hA"].kill()
        r2 = await inbox.wait_result(2, timeout=60)
        assert r2.ok and r2.worker == "hB", r2
        lost = [n for n in inbox.notices if n.event == "lost"]
        restored = [n for n in inbox.notices if n.event == "restored"]
        assert lost and lost[0].host == "hA"
        assert restored and restored[0].from_snapshot == r1.result["snapshot"]
        assert restored[0].step_index == 1 and restored[0].host == "hB"

        # Step 3: hB commits it (snapshot + assignment) and dies before publishing.
        await publish_step(bus, run_id, 3, "exec", {"cmd": "echo 3 >> log; echo done3"})
        r3 = await inbox.wait_result(3, timeout=60)
        assert r3.ok and r3.worker == "hC", r3
        assert r3.result["stdout"] == "done3\n"  # the result recorded by hB's commit
        assert hosts["hB"].proc.returncode == -signal.SIGKILL

        await publish_step(bus, run_id, 4, "read_file", {"path": "log"})
        r4 = await inbox.wait_result(4)
        # Exactly an undisturbed run's workspace: each step's effects once (the killed
        # attempt's "partial" line died with its sandbox; the re-run wrote its own).
        assert r4.result["content"] == "1\npartial\n2\n3\n"
        assert sorted({r.index for r in inbox.all_results}) == [1, 2, 3, 4]
    finally:
        await stream_sub.unsubscribe()
        await inbox.stop()
        await placement.stop()

    # The dead hosts' sandboxes died with them; a janitor (a host restarted on the same
    # state dir) reclaims their cgroups, mounts and directories.
    for dead in ("hA", "hB"):
        h = hosts[dead]
        version = detect()
        assert version is not None
        bases = CgroupSet.base_paths(
            version, BackendConfig(state_dir=h.state, host_id=dead).cgroup_parent)
        leftovers = [p for base in bases.values() if base.exists() for p in base.iterdir()
                     if p.is_dir()]
        for cg in leftovers:
            assert not (cg / "cgroup.procs").read_text().strip(), "a sandbox outlived its host"
        restarted = HostProcess(dead, h.url, h.prefix, h.state)
        await restarted.start()
        await restarted.stop()
        assert not mounts_under(str(h.state / "sandboxes"))
        assert not [p for base in bases.values() if base.exists() for p in base.iterdir()
                    if p.is_dir()]
        assert not any((h.state / "sandboxes").iterdir())
