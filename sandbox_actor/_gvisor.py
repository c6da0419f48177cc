"""The ``gvisor`` backend: the same sandbox contract on gVisor's ``runsc``.

gVisor puts a user-space kernel (the Sentry) between the code and the host kernel: the
code's system calls are served by the Sentry, which itself runs under a tight seccomp
filter, so a kernel bug reachable from the sandbox is far less likely to be reachable from
the host. It runs on the ``ptrace`` platform here (no usable KVM).

* The root filesystem is a minimal directory of our own (``/usr`` and our ``/etc`` bound
  read-only); ``/workspace`` and ``/tmp`` are tmpfs mounts *inside* the Sentry, so their
  contents are part of the sandbox's memory image.
* ``--network=none`` (loopback only); with egress, ``--host-uds=open`` lets the agent's
  bridge reach the proxy socket bound in at ``/run/nerve/proxy.sock``, and nothing else.
* Limits go through the OCI spec (``linux.resources``: memory, pids, CPU) and runsc's own
  cgroup; ``noNewPrivileges``, no capabilities, uid 1000.
* **Snapshots are checkpoints**: ``runsc checkpoint`` writes the whole sandbox (process
  memory and the in-Sentry filesystems) to an image, stored as content-addressed zstd
  chunks like any snapshot; the sandbox is then restored from it and keeps running.
  ``restore`` and ``fork`` start new containers from such an image: running processes,
  their memory and the workspace come back as they were. (``runsc checkpoint
  --leave-running`` fails in this runsc version, hence checkpoint-then-restore.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nerve import SandboxCrashed, SandboxError, SandboxUnavailable
from sandbox_actor import _cgroups
from sandbox_actor._agentproto import AGENT_PATH_IN_SANDBOX, AgentChannel
from sandbox_actor._backend import BackendConfig, Sandbox, SandboxBackend, register
from sandbox_actor._ns import AGENT_ARGV, PROXY_SOCK_IN_SANDBOX, NsBackend, NsSandbox
from sandbox_actor._snapshots import CHUNK_SIZE, Manifest, WorkspaceStore, digest_of
from sandbox_actor._types import (
    BASE_ENV,
    Capabilities,
    Isolation,
    Probe,
    SandboxSpec,
    SnapshotRef,
)

log = logging.getLogger("nerve.sandbox.gvisor")


@dataclass(eq=False)
class GvisorSandbox(NsSandbox):
    """An agent-driven sandbox whose processes live inside a runsc container."""

    container: str = ""
    bundle: Path | None = None
    generation: int = 0


def _runsc() -> str | None:
    return shutil.which("runsc")


@register
class GvisorBackend(SandboxBackend):
    """Sandboxes in gVisor (see the module docstring)."""

    name = "gvisor"

    def __init__(self, config: BackendConfig, egress: Any = None) -> None:
        super().__init__(config)
        self.egress = egress
        self.runsc = _runsc()
        self._live: dict[str, GvisorSandbox] = {}
        self._ns = NsBackend(config, egress)  # shares the base /etc and agent files
        self._started = False

    @classmethod
    def probe(cls, config: BackendConfig) -> Probe:
        probe = Probe(backend=cls.name, available=False)
        runsc = _runsc()
        if runsc is None:
            probe.problems.append("runsc not found (apt-get install runsc)")
        else:
            probe.details["runsc"] = runsc
            probe.details["platform"] = "ptrace"
        if os.geteuid() != 0:
            probe.problems.append("runsc runs as root here")
        if _cgroups.detect() is None:
            probe.problems.append("no usable cgroups for limits")
        probe.available = not probe.problems
        if probe.available:
            probe.capabilities = Capabilities(isolation=Isolation.USER_KERNEL,
                                              memory_snapshots=True, egress_proxy=True,
                                              cgroup_limits=True)
        return probe

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(isolation=Isolation.USER_KERNEL, memory_snapshots=True,
                            egress_proxy=True, cgroup_limits=True)

    def egress_allowed(self, spec: SandboxSpec) -> bool:
        return self._ns.egress_allowed(spec)

    @property
    def root_dir(self) -> Path:
        return self.config.state_dir / "runsc"

    def _cmd(self, *args: str) -> list[str]:
        assert self.runsc is not None
        return [self.runsc, f"--root={self.root_dir}", "--platform=ptrace", "--network=none",
                "--host-uds=open", *args]

    async def start(self) -> None:
        if self._started:
            return
        if self.runsc is None:
            raise SandboxUnavailable("the gvisor backend needs runsc (apt-get install runsc)")
        await self._ns.start()
        await asyncio.to_thread(self._prepare_rootfs)
        self._started = True

    def _prepare_rootfs(self) -> None:
        rootfs = self.config.state_dir / "base" / "gvisor-rootfs"
        for d in ("usr", "etc", "tmp", "workspace", "run/nerve", "proc", "dev"):
            (rootfs / d).mkdir(parents=True, exist_ok=True)
        for name, target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"),
                             ("lib64", "usr/lib64")):
            link = rootfs / name
            if not link.is_symlink():
                link.symlink_to(target)
        self.root_dir.mkdir(parents=True, exist_ok=True)

    # -- bundles --------------------------------------------------------------------------
    def _spec(self, sb: GvisorSandbox) -> dict[str, Any]:
        base = self.config.state_dir / "base"
        limits = sb.spec.limits
        mounts = [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
            {"destination": "/usr", "type": "bind", "source": "/usr",
             "options": ["rbind", "ro"]},
            {"destination": "/etc", "type": "bind", "source": str(base / "etc"),
             "options": ["rbind", "ro"]},
            {"destination": AGENT_PATH_IN_SANDBOX, "type": "bind",
             "source": str(base / "agent.py"), "options": ["bind", "ro"]},
            {"destination": "/workspace", "type": "tmpfs", "source": "tmpfs",
             "options": [f"size={limits.disk_mb}m", "mode=0777"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": [f"size={limits.disk_mb}m", "mode=1777"]},
        ]
        if self.egress is not None:
            mounts.append({"destination": PROXY_SOCK_IN_SANDBOX, "type": "bind",
                           "source": str(sb.dir / "proxy.sock"), "options": ["bind"]})
        quota = max(1000, int(limits.cpus * 100_000))
        return {
            "ociVersion": "1.0.2",
            "process": {
                "terminal": False, "user": {"uid": 1000, "gid": 1000},
                "args": list(AGENT_ARGV),
                "env": [f"{k}={v}" for k, v in BASE_ENV.items()],
                "cwd": "/workspace", "noNewPrivileges": True,
                "capabilities": {"bounding": [], "effective": [], "inheritable": [],
                                 "permitted": [], "ambient": []},
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": limits.nofile,
                             "soft": limits.nofile},
                            {"type": "RLIMIT_CORE", "hard": 0, "soft": 0}],
            },
            "root": {"path": str(base / "gvisor-rootfs"), "readonly": True},
            "hostname": "sandbox",
            "mounts": mounts,
            "linux": {
                "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount",
                                                     "network")],
                "cgroupsPath": f"/{self.config.group}-gvisor/{self.config.cgroup_host}/"
                               f"{sb.container}",
                "resources": {
                    "memory": {"limit": limits.memory_mb << 20},
                    "pids": {"limit": limits.pids},
                    "cpu": {"quota": quota, "period": 100_000},
                },
            },
        }

    def _cgroups_of(self, sb: GvisorSandbox) -> _cgroups.CgroupSet:
        rel = f"{self.config.group}-gvisor/{self.config.cgroup_host}/{sb.container}"
        return _cgroups.CgroupSet("v1", {c: _cgroups.CGROUP_ROOT / c / rel
                                         for c in _cgroups.V1_CONTROLLERS})

    def _new_container(self, sb: GvisorSandbox) -> None:
        sb.generation += 1
        sb.container = f"{sb.sandbox_id}-{os.getpid()}-{sb.generation}"
        sb.bundle = sb.dir / f"bundle-{sb.generation}"
        sb.bundle.mkdir()
        (sb.bundle / "config.json").write_text(json.dumps(self._spec(sb)))
        sb.cgroups = self._cgroups_of(sb)

    # -- create / restore -----------------------------------------------------------------
    async def create(self, spec: SandboxSpec) -> GvisorSandbox:
        return await self._create(spec, None)

    async def _create(self, spec: SandboxSpec, image: Path | None) -> GvisorSandbox:
        await self.start()
        sid = spec.sandbox_id
        if sid in self._live:
            raise SandboxError(f"sandbox {sid} already exists on this host", sandbox_id=sid)
        started = time.perf_counter()
        d = self.config.sandboxes_dir / sid
        if d.exists():
            await asyncio.to_thread(self._reclaim_dir, d)
        d.mkdir(parents=True, mode=0o700)
        sb = GvisorSandbox(sandbox_id=sid, spec=spec, backend=self._ns, dir=d,
                           cgroups=_cgroups.CgroupSet("v1", {}))
        self._live[sid] = sb
        try:
            if self.egress is not None:
                await self.egress.open(sid, d / "proxy.sock", spec.egress, tenant=spec.tenant)
            await asyncio.to_thread(self._new_container, sb)
            await self._launch(sb, image)
        except BaseException:
            await self.destroy(sb)
            raise
        sb.created_in = time.perf_counter() - started
        return sb

    async def _launch(self, sb: GvisorSandbox, image: Path | None) -> None:
        assert sb.bundle is not None
        args = (["restore", f"--image-path={image}"] if image else ["run"])
        log_fd = os.open(sb.dir / "agent.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            sb.proc = await asyncio.create_subprocess_exec(
                *self._cmd(*args, "--bundle", str(sb.bundle), sb.container),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=log_fd, limit=1 << 20, start_new_session=True)
        finally:
            os.close(log_fd)
        assert sb.proc.stdout is not None and sb.proc.stdin is not None
        sb._dead = ""
        sb.channel = AgentChannel(sb.sandbox_id, sb.proc.stdout, sb.proc.stdin)
        sb.channel.start()
        sb._waiter = asyncio.create_task(sb._watch(), name=f"gvisor-wait:{sb.sandbox_id}")
        if image is None:
            await sb.channel.wait_ready(max(self.config.agent_ready_timeout, 30.0))
        else:
            # A restored agent is already past its start-up: ask it instead.
            await sb.channel.call({"op": "ping"}, timeout=30.0)
        sb.agent_pid = None  # its processes are the Sentry's, not the host's

    async def snapshot(self, sandbox: Sandbox, store: WorkspaceStore, *, seq: int,
                       step_index: int | None = None, step_key: str | None = None,
                       result: Any = None, parent: str | None = None) -> SnapshotRef:
        assert isinstance(sandbox, GvisorSandbox)
        sb = sandbox
        if not sb.alive:
            raise sb._crashed("before its checkpoint")
        image = sb.dir / f"image-{seq}"
        await self._checkpoint(sb, image)
        uploaded = 0
        files: list[list[Any]] = []
        total = 0
        try:
            for path in sorted(image.iterdir()):
                data = await asyncio.to_thread(path.read_bytes)
                total += len(data)
                digests = []
                for off in range(0, max(len(data), 1), CHUNK_SIZE):
                    piece = data[off:off + CHUNK_SIZE]
                    digest, n = await store.put_chunk(piece, digest_of(piece))
                    uploaded += n
                    digests.append(digest)
                files.append([path.name, "file", 0o600, len(data), 0, digests])
            manifest = Manifest(sandbox_id=sb.sandbox_id, seq=seq, kind="gvisor",
                                parent=parent, step_index=step_index, step_key=step_key,
                                result=result, entries=files, image_size=total,
                                spec=sb.spec.model_dump(mode="json"),
                                host=self.config.host_id)
            uploaded += await store.put_manifest(manifest)
            # Carry on from the image we just took: same processes, same memory.
            await self._relaunch(sb, image)
        finally:
            await asyncio.to_thread(shutil.rmtree, image, True)
        return manifest.ref(uploaded)

    async def _checkpoint(self, sb: GvisorSandbox, image: Path) -> None:
        proc = await asyncio.create_subprocess_exec(
            *self._cmd("checkpoint", f"--image-path={image}", sb.container),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _out, err = await proc.communicate()
        if proc.returncode != 0:
            raise SandboxCrashed(f"sandbox {sb.sandbox_id}: runsc checkpoint failed: "
                                 f"{err.decode(errors='replace')[-300:]}",
                                 sandbox_id=sb.sandbox_id)

    async def _relaunch(self, sb: GvisorSandbox, image: Path) -> None:
        sb._dead = "checkpointed"
        if sb.channel is not None:
            await sb.channel.close()
        if sb.proc is not None:
            await sb.proc.wait()
        if sb._waiter is not None:
            sb._waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sb._waiter
        await self._delete(sb.container)
        await asyncio.to_thread(self._new_container, sb)
        await self._launch(sb, image)

    async def restore(self, spec: SandboxSpec, snapshot: str,
                      store: WorkspaceStore) -> GvisorSandbox:
        manifest = await store.get_manifest(snapshot)
        if manifest.kind != "gvisor":
            raise SandboxError(f"snapshot {snapshot} is a {manifest.kind} snapshot; the gvisor "
                               "backend restores checkpoints", snapshot=snapshot)
        staging = self.config.state_dir / "images" / f"{spec.sandbox_id}-{os.getpid()}"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        try:
            for name, _kind, _mode, _size, _mtime, digests in manifest.entries:
                data = b"".join(await store.get_chunks(list(digests)))
                await asyncio.to_thread((staging / name).write_bytes, data)
            return await self._create(spec, staging)
        finally:
            await asyncio.to_thread(shutil.rmtree, staging, True)

    # -- teardown -------------------------------------------------------------------------
    async def _delete(self, container: str) -> None:
        for args in (("kill", "--all", container, "KILL"), ("delete", "--force", container)):
            proc = await asyncio.create_subprocess_exec(
                *self._cmd(*args), stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL)
            await proc.wait()

    async def kill(self, sb: NsSandbox, reason: str) -> None:
        assert isinstance(sb, GvisorSandbox)
        if not sb._dead:
            sb._dead = reason
        await self._delete(sb.container)

    async def destroy(self, sandbox: Sandbox) -> None:
        assert isinstance(sandbox, GvisorSandbox)
        sb = sandbox
        if sb.destroyed:
            return
        sb.destroyed = True
        sb._dead = sb._dead or "destroyed"
        if sb.channel is not None:
            await sb.channel.close()
        if sb.container:
            await self._delete(sb.container)
        if sb.proc is not None:
            if sb.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    sb.proc.kill()
            await sb.proc.wait()
        if sb._waiter is not None:
            sb._waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sb._waiter
        if self.egress is not None:
            await self.egress.close(sb.sandbox_id)
        await asyncio.to_thread(self._reclaim_dir, sb.dir)
        if self._live.get(sb.sandbox_id) is sb:
            del self._live[sb.sandbox_id]

    def _reclaim_dir(self, d: Path) -> None:
        shutil.rmtree(d, ignore_errors=True)

    async def stop(self) -> None:
        for sb in list(self._live.values()):
            await self.destroy(sb)

    async def reclaim_orphans(self) -> list[str]:
        """Janitor: delete runsc containers and directories no live sandbox owns."""
        if self.runsc is None or not self.root_dir.exists():
            return []
        proc = await asyncio.create_subprocess_exec(
            *self._cmd("list", "--format=json"), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL)
        out, _ = await proc.communicate()
        done = []
        live = {sb.container for sb in self._live.values()}
        with contextlib.suppress(ValueError):
            for entry in json.loads(out or b"[]") or []:
                cid = entry.get("id", "")
                if cid and cid not in live:
                    await self._delete(cid)
                    done.append(f"container {cid}")
        sdir = self.config.sandboxes_dir
        if sdir.exists():
            for d in sdir.iterdir():
                if d.name not in self._live:
                    await asyncio.to_thread(self._reclaim_dir, d)
                    done.append(f"sandbox {d.name}")
        return done
