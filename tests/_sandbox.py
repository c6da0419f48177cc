"""Shared helpers for the sandbox tests (real sandboxes; skipped where they cannot run)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from sandbox_actor import BackendConfig, NsBackend

SANDBOX_UID = 262_144

_probe = NsBackend.probe(BackendConfig())
needs_ns = pytest.mark.skipif(not _probe.available,
                              reason=f"ns sandbox backend unavailable: {_probe.problems}")


def state_dir() -> Path:
    """A fresh state dir the unprivileged sandbox uid can reach (pytest's tmp is 0700)."""
    root = Path("/tmp/nerve-sandbox-tests")
    root.mkdir(mode=0o711, exist_ok=True)
    os.chmod(root, 0o711)
    return Path(tempfile.mkdtemp(dir=root))


def backend_config(state: Path | None = None, host_id: str = "test",
                   **extra: object) -> BackendConfig:
    return BackendConfig(state_dir=state or state_dir(), host_id=host_id, extra=dict(extra))


def sandbox_uid_processes(uid: int = SANDBOX_UID) -> list[int]:
    """Live host pids running as the sandbox uid (leak check).

    Zombies are left out: a sandbox whose host was SIGKILLed is reparented to the host's
    init, which reaps it in its own time; a zombie holds no memory, files or namespaces.
    """
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text().splitlines()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status if ":" in line)
        if fields.get("State", "").strip().startswith("Z"):
            continue
        if int(fields.get("Uid", "-1 0").split()[0]) == uid:
            found.append(int(entry))
    return found


def py(code: str) -> list[str]:
    """argv running ``code`` with the sandbox's python."""
    return ["/usr/bin/python3", "-c", code]


def sh(script: str) -> list[str]:
    return ["/bin/sh", "-c", script]
