"""The hands: isolated sandboxes with snapshots, restore on host failure, and fork.

* Backends: :class:`SandboxBackend` (``create``, ``exec``, files, ``snapshot``,
  ``restore``, ``fork``, ``destroy``), :class:`NsBackend` (bubblewrap namespaces,
  seccomp, cgroups; the one CI runs) and :class:`GvisorBackend` (runsc, checkpoint-based
  snapshots); :func:`probe_all` / :func:`choose` pick one at start-up.
* Egress: :class:`EgressProxy` (default deny, domain allowlists, SSRF refusals).
* Snapshots: :class:`WorkspaceStore` (content-addressed zstd chunks + manifests).
* Distribution: :class:`SandboxHost` (runs assigned sandboxes, one :class:`SandboxWorker`
  each), :class:`Placement` (puts sandboxes with work on live hosts, moves them off dead
  ones), :class:`SandboxAssignment` records, :func:`plan_fork` for ``nerve fork``.
"""

from sandbox_actor._backend import (
    BACKENDS,
    BackendConfig,
    Sandbox,
    SandboxBackend,
    choose,
    probe_all,
    register,
)
from sandbox_actor._egress import EgressConfig, EgressProxy
from sandbox_actor._fork import ForkPlan, plan_fork, start_fork
from sandbox_actor._gvisor import GvisorBackend, GvisorSandbox
from sandbox_actor._host import HostConfig, SandboxHost
from sandbox_actor._ns import NsBackend, NsSandbox
from sandbox_actor._placement import Placement
from sandbox_actor._pool import WarmPool
from sandbox_actor._records import Assignments, SandboxAssignment
from sandbox_actor._runner import Fenced, RunnerConfig, SandboxRunner, SnapshotPolicy
from sandbox_actor._snapshots import Manifest, WorkspaceStore
from sandbox_actor._types import (
    BASE_ENV,
    Capabilities,
    ExecResult,
    FileEntry,
    Isolation,
    Probe,
    SandboxLimits,
    SandboxSpec,
    SnapshotRef,
)
from sandbox_actor._worker import SandboxWorker

__all__ = [
    "BACKENDS",
    "BASE_ENV",
    "Assignments",
    "BackendConfig",
    "Capabilities",
    "EgressConfig",
    "EgressProxy",
    "ExecResult",
    "Fenced",
    "FileEntry",
    "ForkPlan",
    "GvisorBackend",
    "GvisorSandbox",
    "HostConfig",
    "Isolation",
    "Manifest",
    "NsBackend",
    "NsSandbox",
    "Placement",
    "Probe",
    "RunnerConfig",
    "Sandbox",
    "SandboxAssignment",
    "SandboxBackend",
    "SandboxHost",
    "SandboxLimits",
    "SandboxRunner",
    "SandboxSpec",
    "SandboxWorker",
    "SnapshotPolicy",
    "SnapshotRef",
    "WarmPool",
    "WorkspaceStore",
    "choose",
    "plan_fork",
    "probe_all",
    "register",
    "start_fork",
]
