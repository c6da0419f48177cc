"""The backend interface every isolation technology implements, and choosing one.

A :class:`SandboxBackend` makes :class:`Sandbox` es. The sandbox host only ever talks to
this interface, so a new technology (a Firecracker microVM backend where ``/dev/kvm`` is
real: boot from a rootfs, the agent on a vsock, ``PUT /snapshot/create`` for memory
snapshots) is one more subclass registered in :data:`BACKENDS`; nothing else changes.

Backends are probed at start-up (:func:`probe_all`); :func:`choose` takes the configured
one, or the strongest isolation that is available here.
"""

from __future__ import annotations

import abc
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from nerve import ConfigError, SandboxUnavailable
from sandbox_actor._types import (
    BASE_ENV,
    Capabilities,
    ExecResult,
    FileEntry,
    OutputCallback,
    Probe,
    SandboxSpec,
    SnapshotRef,
)

if TYPE_CHECKING:
    from sandbox_actor._snapshots import WorkspaceStore


@dataclass(slots=True)
class BackendConfig:
    """Host-wide settings shared by the backends.

    ``state_dir`` holds one directory per live sandbox (its disk mount point, proxy socket
    and a ``sandbox.json`` record that the janitor reads after a crash). ``sandbox_uid`` /
    ``sandbox_gid`` is the unprivileged host identity sandboxes run as (inside they are uid
    1000); pick ids no other host process uses. ``group`` names the cgroup directory
    sandboxes are created under (below this process's own cgroups), in a directory of
    their own per host id and state dir (:attr:`cgroup_parent`).
    """

    state_dir: Path = field(default_factory=lambda: Path("/var/lib/nerve/sandbox"))
    sandbox_uid: int = 262_144
    sandbox_gid: int = 262_144
    group: str = "nerve-sandbox"
    host_id: str = "local"
    base_workspace: Path | None = None  # read-only lower layer of every workspace
    agent_ready_timeout: float = 10.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def sandboxes_dir(self) -> Path:
        return self.state_dir / "sandboxes"

    @property
    def cgroup_host(self) -> str:
        """``<host_id>-<digest of the state dir>``: names the cgroup directory of this state
        dir's sandboxes. A janitor reclaims the cgroups it finds there, so two hosts with
        the same id (two deployments' ``sandbox-1``) must not share it."""
        path = os.path.abspath(self.state_dir).encode()
        return f"{self.host_id}-{hashlib.blake2b(path, digest_size=4).hexdigest()}"

    @property
    def cgroup_parent(self) -> str:
        return f"{self.group}/{self.cgroup_host}"


class Sandbox(abc.ABC):
    """One live sandbox: a private workspace and a place to run commands."""

    sandbox_id: str
    spec: SandboxSpec

    @property
    @abc.abstractmethod
    def alive(self) -> bool:
        """False once the sandbox died (crashed, was killed, or was destroyed)."""

    @property
    def death_reason(self) -> str:
        return ""

    @property
    def base_env(self) -> dict[str, str]:
        """The environment every command starts from (the allowlist; no host variables)."""
        return dict(BASE_ENV)

    @abc.abstractmethod
    async def exec(self, argv: list[str], *, timeout: float | None = None,
                   cwd: str | None = None, env: dict[str, str] | None = None,
                   stdin: bytes | None = None,
                   on_output: OutputCallback | None = None) -> ExecResult:
        """Run ``argv`` to completion (or the timeout); stream output to ``on_output``.

        Raises :class:`~nerve.SandboxCrashed` if the sandbox itself died meanwhile.
        """

    @abc.abstractmethod
    async def read_file(self, path: str, limit: int = 64 << 20) -> bytes: ...

    @abc.abstractmethod
    async def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None: ...

    @abc.abstractmethod
    async def list_files(self, path: str = ".") -> list[FileEntry]: ...


class SandboxBackend(abc.ABC):
    """Makes, snapshots, restores, forks and destroys sandboxes of one technology."""

    name: ClassVar[str]

    def __init__(self, config: BackendConfig) -> None:
        self.config = config

    @classmethod
    @abc.abstractmethod
    def probe(cls, config: BackendConfig) -> Probe:
        """Can this backend run on this host? (fast, side-effect free)"""

    @property
    @abc.abstractmethod
    def capabilities(self) -> Capabilities: ...

    async def start(self) -> None:  # noqa: B027 (optional hook)
        """Prepare host-wide state (base images, caches)."""

    async def stop(self) -> None:  # noqa: B027 (optional hook)
        """Release host-wide state; sandboxes must have been destroyed first."""

    @abc.abstractmethod
    async def create(self, spec: SandboxSpec) -> Sandbox:
        """A new sandbox with an empty workspace (or the base layer)."""

    @abc.abstractmethod
    async def snapshot(self, sandbox: Sandbox, store: WorkspaceStore, *, seq: int,
                       step_index: int | None = None, step_key: str | None = None,
                       result: Any = None, parent: str | None = None) -> SnapshotRef:
        """Store the sandbox's state; it keeps running afterwards."""

    @abc.abstractmethod
    async def restore(self, spec: SandboxSpec, snapshot: str,
                      store: WorkspaceStore) -> Sandbox:
        """A new sandbox (``spec.sandbox_id``) whose state is that of ``snapshot``."""

    async def fork(self, snapshot: str, store: WorkspaceStore, spec: SandboxSpec) -> Sandbox:
        """A new, independent sandbox started from ``snapshot``. The same as a restore under
        a new id: nothing is shared afterwards."""
        return await self.restore(spec, snapshot, store)

    async def reconfigure(self, sandbox: Sandbox, spec: SandboxSpec) -> None:
        """Apply ``spec`` (limits, egress) to a pooled sandbox being handed out."""
        raise SandboxUnavailable(f"backend {self.name} cannot reconfigure a live sandbox")

    @abc.abstractmethod
    async def destroy(self, sandbox: Sandbox) -> None:
        """Kill everything in it and release every host resource it held."""

    async def reclaim_orphans(self) -> list[str]:
        """Janitor: release what sandboxes of a dead host process left behind."""
        return []


BACKENDS: dict[str, type[SandboxBackend]] = {}


def register(cls: type[SandboxBackend]) -> type[SandboxBackend]:
    BACKENDS[cls.name] = cls
    return cls


def probe_all(config: BackendConfig) -> list[Probe]:
    """Probe every registered backend on this host."""
    _load_builtin()
    return [cls.probe(config) for cls in BACKENDS.values()]


def choose(config: BackendConfig, wanted: str | None = None) -> SandboxBackend:
    """The configured backend, or the strongest one available (raises if none is)."""
    probes = {p.backend: p for p in probe_all(config)}
    if wanted:
        if wanted not in BACKENDS:
            raise ConfigError(f"unknown sandbox backend {wanted!r}; known: "
                              f"{', '.join(sorted(BACKENDS))}", backend=wanted)
        probe = probes[wanted]
        if not probe.available:
            raise SandboxUnavailable(f"sandbox backend {wanted} cannot run here: "
                                     f"{'; '.join(probe.problems)}", backend=wanted)
        return BACKENDS[wanted](config)
    usable = [p for p in probes.values() if p.available and p.capabilities]
    if not usable:
        raise SandboxUnavailable(
            "no sandbox backend can run here: " + "; ".join(
                f"{p.backend}: {', '.join(p.problems)}" for p in probes.values()))
    best = max(usable, key=lambda p: p.capabilities.isolation)  # type: ignore[union-attr]
    return BACKENDS[best.backend](config)


def _load_builtin() -> None:
    # Imported here: each module registers itself, and importing them at the top would
    # be circular.
    from sandbox_actor import _gvisor, _ns  # noqa: F401
