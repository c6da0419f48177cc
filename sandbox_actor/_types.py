"""The shapes every sandbox backend and the sandbox host share.

Pydantic models are what crosses the bus (specs in ``WorkItem.meta``, exec results in a
``StepResult``); dataclasses stay inside the process.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

#: The only variables a sandboxed process sees unless the step adds its own. Nothing of the
#: host's environment is ever copied in (no API keys, no NATS credentials).
BASE_ENV: dict[str, str] = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/workspace",
    "LANG": "C.UTF-8",
    "TMPDIR": "/tmp",
    "PYTHONDONTWRITEBYTECODE": "1",
}

class SandboxLimits(BaseModel):
    """Resource limits of one sandbox (enforced by the host, from outside)."""

    model_config = ConfigDict(extra="forbid")

    memory_mb: int = Field(default=512, ge=16, le=1 << 20)
    pids: int = Field(default=256, ge=8, le=1 << 22)
    cpus: float = Field(default=1.0, gt=0, le=1024)
    disk_mb: int = Field(default=256, ge=1, le=1 << 22)
    nofile: int = Field(default=1024, ge=16, le=1 << 20)
    timeout: float = Field(default=60.0, gt=0, le=7 * 24 * 3600)
    max_output: int = Field(default=1 << 20, ge=1024, le=64 << 20)


class SandboxSpec(BaseModel):
    """What a sandbox is: who it is for, its limits, where it may connect, where it starts.

    Carried in ``WorkItem.meta["sandbox"]`` by the workflow side; everything is optional.
    """

    model_config = ConfigDict(extra="ignore")

    sandbox_id: str = ""
    run_id: str | None = None
    tenant: str = "default"
    egress: list[str] = Field(default_factory=list)
    from_snapshot: str | None = None
    limits: SandboxLimits = Field(default_factory=SandboxLimits)
    env: dict[str, str] = Field(default_factory=dict)


class ExecResult(BaseModel):
    """The result of ``exec`` (also the ``result`` of an exec step's ``StepResult``).

    ``exit_code`` is the process's exit status, or ``None`` when it died by a signal
    (``signal`` says which) or was killed at the timeout. ``stdout`` / ``stderr`` are UTF-8
    text (invalid bytes replaced), cut at ``max_output`` bytes each (``truncated`` says so).
    ``snapshot`` names the workspace snapshot taken after the step (``None`` when the policy
    did not take one).
    """

    exit_code: int | None
    signal: int | None = None
    stdout: str = ""
    stderr: str = ""
    timed_out: bool = False
    oom_killed: bool = False
    truncated: bool = False
    duration_ms: float = 0.0
    snapshot: str | None = None


class Isolation(enum.IntEnum):
    """How strong a backend's boundary is (higher is stronger)."""

    NAMESPACES = 1  # shared host kernel, namespaces + seccomp + cgroups
    USER_KERNEL = 2  # gVisor: a user-space kernel between the code and the host kernel
    MICROVM = 3  # a hardware-virtualised guest kernel (Firecracker, Cloud Hypervisor)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend offers, as probed on this host at start-up."""

    isolation: Isolation
    memory_snapshots: bool  # snapshots include process memory (not only files)
    egress_proxy: bool  # can reach the host's egress proxy
    cgroup_limits: bool


@dataclass(slots=True)
class Probe:
    """The result of probing one backend: can it run here, and why not."""

    backend: str
    available: bool
    capabilities: Capabilities | None = None
    details: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class SnapshotRef:
    """A stored snapshot: its object name and the step it follows."""

    name: str
    sandbox_id: str
    seq: int
    kind: Literal["files", "gvisor"]
    step_index: int | None
    step_key: str | None
    size: int = 0  # bytes uploaded for this snapshot (new chunks + manifest)
    total: int = 0  # bytes the workspace (or image) holds


@dataclass(frozen=True, slots=True)
class FileEntry:
    path: str
    type: Literal["file", "dir", "symlink", "other"]
    size: int
    mode: int


OutputCallback = Callable[[int, bytes], Awaitable[None] | None]
"""Called with (fd, chunk) as a command writes: fd 1 is stdout, 2 is stderr."""


def step_env(base: dict[str, str], extra: dict[str, Any] | None) -> dict[str, str]:
    """The environment of one exec: the allowlisted base plus the step's own variables.

    The step's variables come from the workflow (data the sandbox could set itself); the
    host's environment is never a source.
    """
    env = dict(base)
    for key, value in (extra or {}).items():
        if not isinstance(key, str) or not key or "=" in key or "\0" in key:
            continue
        env[key] = str(value)
    return env
