"""The hands: isolated sandboxes with snapshots, restore on host failure, and fork."""

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
from sandbox_actor._ns import NsBackend, NsSandbox
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

__all__ = [
    "BACKENDS",
    "BASE_ENV",
    "BackendConfig",
    "Capabilities",
    "EgressConfig",
    "EgressProxy",
    "ExecResult",
    "FileEntry",
    "Isolation",
    "Manifest",
    "NsBackend",
    "NsSandbox",
    "Probe",
    "Sandbox",
    "SandboxBackend",
    "SandboxLimits",
    "SandboxSpec",
    "SnapshotRef",
    "WorkspaceStore",
    "choose",
    "probe_all",
    "register",
]
