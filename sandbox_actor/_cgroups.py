"""Per-sandbox cgroups: memory, pids and CPU limits, freeze, kill-all, OOM counts.

Both layouts are supported:

* **cgroup v1** (this machine): one directory per controller (``memory``, ``pids``,
  ``cpu``, ``freezer``), each under the host process's own cgroup of that controller, so
  sandboxes are charged to whoever runs the host.
* **cgroup v2**: one directory in the unified tree, with ``memory.max``, ``pids.max``,
  ``cpu.max``, ``cgroup.freeze`` and ``cgroup.kill``.

Sandbox processes join their cgroup before ``bwrap`` executes (``join_paths`` is written
from the child between fork and exec), so nothing the sandbox starts is ever outside it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from nerve import SandboxUnavailable

CGROUP_ROOT = Path("/sys/fs/cgroup")
V1_CONTROLLERS = ("memory", "pids", "cpu", "freezer")
_PERIOD_US = 100_000


def _own_v1_path(controller: str) -> str:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        if controller in ctrls.split(","):
            return path
    return "/"


def _own_v2_path() -> str:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    return "/"


def detect() -> Literal["v1", "v2"] | None:
    """Which cgroup layout can give a sandbox memory, pids and CPU limits here."""
    if all((CGROUP_ROOT / c / "cgroup.procs").exists() for c in V1_CONTROLLERS):
        return "v1"
    unified = CGROUP_ROOT / "cgroup.controllers"
    if unified.exists():
        have = set(unified.read_text().split())
        if {"memory", "pids", "cpu"} <= have:
            return "v2"
    return None


@dataclass(slots=True)
class CgroupSet:
    """The cgroup directories of one sandbox (one per controller on v1, one on v2)."""

    version: Literal["v1", "v2"]
    paths: dict[str, Path] = field(default_factory=dict)  # controller (or "unified") -> dir

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def base_paths(cls, version: Literal["v1", "v2"], group: str) -> dict[str, Path]:
        """Where the sandboxes of ``group`` live: under this process's own cgroups."""
        if version == "v1":
            return {c: CGROUP_ROOT / c / _own_v1_path(c).lstrip("/") / group
                    for c in V1_CONTROLLERS}
        return {"unified": CGROUP_ROOT / _own_v2_path().lstrip("/") / group}

    @classmethod
    def create(cls, version: Literal["v1", "v2"], group: str, name: str) -> CgroupSet:
        paths = {k: base / name for k, base in cls.base_paths(version, group).items()}
        try:
            for path in paths.values():
                parent = path.parent
                if not parent.exists():
                    parent.mkdir(parents=True, exist_ok=True)
                    if version == "v2":
                        _enable_v2_controllers(parent)
                path.mkdir(exist_ok=True)
        except OSError as exc:
            raise SandboxUnavailable(f"cannot create cgroup for sandbox {name}: {exc}",
                                     sandbox_id=name) from None
        return cls(version, paths)

    # -- limits ---------------------------------------------------------------------------
    def set_limits(self, memory_bytes: int, pids: int, cpus: float) -> None:
        quota = max(1000, int(cpus * _PERIOD_US))
        if self.version == "v1":
            mem = self.paths["memory"]
            _write(mem / "memory.limit_in_bytes", str(memory_bytes))
            # No swap for sandboxes: memsw = limit (the file exists only with swap accounting).
            with contextlib.suppress(OSError):
                _write(mem / "memory.memsw.limit_in_bytes", str(memory_bytes))
            _write(self.paths["pids"] / "pids.max", str(pids))
            _write(self.paths["cpu"] / "cpu.cfs_period_us", str(_PERIOD_US))
            _write(self.paths["cpu"] / "cpu.cfs_quota_us", str(quota))
        else:
            d = self.paths["unified"]
            _write(d / "memory.max", str(memory_bytes))
            with contextlib.suppress(OSError):
                _write(d / "memory.swap.max", "0")
            _write(d / "pids.max", str(pids))
            _write(d / "cpu.max", f"{quota} {_PERIOD_US}")

    @property
    def join_paths(self) -> list[str]:
        """The ``cgroup.procs`` files a new process writes its pid to (to join)."""
        return [str(p / "cgroup.procs") for p in self.paths.values()]

    # -- observation ----------------------------------------------------------------------
    def oom_kills(self) -> int:
        """How many processes the kernel OOM-killed in this cgroup so far."""
        path = (self.paths["memory"] / "memory.oom_control" if self.version == "v1"
                else self.paths["unified"] / "memory.events")
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        return 0

    def memory_usage(self) -> int:
        path = (self.paths["memory"] / "memory.usage_in_bytes" if self.version == "v1"
                else self.paths["unified"] / "memory.current")
        with contextlib.suppress(OSError, ValueError):
            return int(path.read_text())
        return 0

    def pids(self) -> list[int]:
        """Host pids of every process in the sandbox."""
        path = self.paths["pids" if self.version == "v1" else "unified"] / "cgroup.procs"
        with contextlib.suppress(OSError):
            return sorted(int(x) for x in path.read_text().split())
        return []

    # -- control --------------------------------------------------------------------------
    def freeze(self, frozen: bool) -> None:
        if self.version == "v1":
            path = self.paths["freezer"] / "freezer.state"
            _write(path, "FROZEN" if frozen else "THAWED")
            if frozen:  # FREEZING -> FROZEN is asynchronous on v1
                for _ in range(200):
                    if path.read_text().strip() == "FROZEN":
                        return
                    time.sleep(0.001)
        else:
            _write(self.paths["unified"] / "cgroup.freeze", "1" if frozen else "0")

    def kill_all(self, spare: int | None = None) -> None:
        """SIGKILL every process in the sandbox (frozen first, so nothing forks away).

        ``spare`` (bwrap's outer process) is left alive so it can reap the sandbox's init
        instead of orphaning it to the host's init as a zombie.
        """
        if self.version == "v2" and spare is None:
            kill = self.paths["unified"] / "cgroup.kill"
            if kill.exists():
                _write(kill, "1")
                return
        for _ in range(50):
            pids = [p for p in self.pids() if p != spare]
            if not pids:
                return
            with contextlib.suppress(OSError):
                self.freeze(True)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                self.freeze(False)  # killed tasks only die once thawed
            time.sleep(0.002)

    def remove(self, timeout: float = 2.0) -> list[str]:
        """Kill what is left and remove the directories; return what could not be removed."""
        self.kill_all()
        left: list[str] = []
        deadline = time.monotonic() + timeout
        for path in self.paths.values():
            while True:
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno == errno.EBUSY and time.monotonic() < deadline:
                        self.kill_all()
                        time.sleep(0.005)
                        continue
                    left.append(f"{path}: {exc.strerror}")
                    break
        return left

    def exists(self) -> bool:
        return any(p.exists() for p in self.paths.values())

    def to_dict(self) -> dict[str, object]:
        return {"version": self.version, "paths": {k: str(v) for k, v in self.paths.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> CgroupSet:
        paths = data.get("paths") or {}
        assert isinstance(paths, dict)
        version = "v2" if data.get("version") == "v2" else "v1"
        return cls(version, {str(k): Path(str(v)) for k, v in paths.items()})


def _enable_v2_controllers(parent: Path) -> None:
    # v2: a controller must be enabled in every ancestor's subtree_control.
    with contextlib.suppress(OSError):
        _write(parent / "cgroup.subtree_control", "+memory +pids +cpu")


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def join_in_child(paths: list[str]) -> None:
    """Move the calling process into each ``cgroup.procs`` (between fork and exec)."""
    pid = str(os.getpid()).encode()
    for path in paths:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, pid)
        finally:
            os.close(fd)
