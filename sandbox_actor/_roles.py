"""The ``sandbox`` role for ``nerve worker --role sandbox`` / ``nerve up``.

One process runs a :class:`SandboxHost` (with a janitor at start-up, a warm pool and the
egress proxy) and a :class:`Placement` actor (placement is compare-and-set, so every
sandbox host may run one). Settings (``--set KEY=VALUE``): ``backend`` (ns|gvisor; default
the best available), ``state_dir`` (default: see :func:`default_state_dir`), ``capacity``,
``pool``, ``lease_ttl``, ``snapshot_policy`` (every_step|every_n|on_demand), ``every_n``,
``egress_ports`` (comma-separated extra ports the proxy allows), ``sweep_every`` (seconds
between checks for sandboxes whose run ended without this host hearing of it).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

from bus import Bus
from nerve import ConfigError, read_settings
from sandbox_actor._backend import BackendConfig, choose
from sandbox_actor._egress import EgressConfig, EgressProxy
from sandbox_actor._host import HostConfig, SandboxHost
from sandbox_actor._placement import Placement
from sandbox_actor._runner import RunnerConfig, SnapshotPolicy

log = logging.getLogger("nerve.sandbox")

SANDBOX_SETTINGS: dict[str, Any] = {
    "backend": "", "state_dir": "", "capacity": 32, "pool": 0, "lease_ttl": 2.0,
    "snapshot_policy": SnapshotPolicy.EVERY_STEP.value, "every_n": 5, "egress_ports": "",
    "sweep_every": 10.0}
SHARED_STATE_ROOT = Path("/var/lib/nerve/sandbox")


def default_state_dir(data_dir: Path | None, ident: str) -> Path:
    """Where a sandbox host keeps its state unless ``state_dir`` is set.

    Under the deployment's data dir (``<data-dir>/sandbox/<id>``), so two deployments
    (two ``nerve up --data-dir``) never share one: a host's janitor takes what it finds
    there for a crashed instance's leftovers. The sandbox uid must be able to reach it,
    so a data dir behind a directory it cannot search (a home dir such as ``/root``)
    gets ``/var/lib/nerve/sandbox/<id>-<digest of the data dir>`` instead: still its own.
    Without a data dir (``nerve worker`` without ``--data-dir``):
    ``/var/lib/nerve/sandbox/<id>``.
    """
    if data_dir is None:
        return SHARED_STATE_ROOT / ident
    data_dir = Path(os.path.abspath(data_dir))
    if _searchable(data_dir):
        return data_dir / "sandbox" / ident
    digest = hashlib.blake2b(str(data_dir).encode(), digest_size=4).hexdigest()
    return SHARED_STATE_ROOT / f"{ident}-{digest}"


def _searchable(path: Path) -> bool:
    """Every existing directory on the way to ``path`` lets others through (o+x)."""
    for part in [path, *path.parents]:
        try:
            mode = os.stat(part).st_mode
        except FileNotFoundError:
            continue  # created later, 0755 under the usual umask
        except OSError:
            return False
        if not mode & 0o001:
            return False
    return True


def _ports(text: str) -> set[int]:
    try:
        ports = {int(p) for p in text.split(",") if p.strip()}
    except ValueError:
        ports = {0}
    if not all(0 < p < 65536 for p in ports):
        raise ConfigError(f"sandbox setting egress_ports={text!r} must be comma-separated "
                          f"port numbers (1-65535)", setting="egress_ports")
    return ports


async def run_sandbox_host(bus: Bus, opts: Any) -> None:
    """Run until cancelled: a sandbox host plus a placement actor."""
    settings = read_settings("sandbox", getattr(opts, "settings", None) or {},
                             SANDBOX_SETTINGS)
    ident = str(opts.id)
    if settings["state_dir"]:
        state = Path(settings["state_dir"])
    else:
        state = default_state_dir(getattr(opts, "data_dir", None), ident)
        log.info("sandbox state dir: %s", state)
    config = BackendConfig(state_dir=state, host_id=ident)
    ports = _ports(settings["egress_ports"])
    try:
        policy = SnapshotPolicy(settings["snapshot_policy"])
    except ValueError:
        raise ConfigError(
            f"sandbox setting snapshot_policy={settings['snapshot_policy']!r} must be one of "
            f"{', '.join(p.value for p in SnapshotPolicy)}", setting="snapshot_policy",
        ) from None
    egress = EgressProxy(EgressConfig(allowed_ports={80, 443, *ports}))
    backend = choose(config, settings["backend"] or None)
    if hasattr(backend, "egress"):
        backend.egress = egress
    runner = RunnerConfig(policy=policy, every_n=settings["every_n"])
    host = SandboxHost(bus, backend, HostConfig(
        host_id=ident, capacity=settings["capacity"], lease_ttl=settings["lease_ttl"],
        pool_size=settings["pool"], runner=runner, cache_dir=state / "chunks",
        sweep_every=settings["sweep_every"]))
    placement = Placement(bus)
    await host.start()
    await placement.start()
    opts.ready.set()
    try:
        await host.wait()
    finally:
        # shield: we are usually being cancelled; teardown must still release everything.
        await asyncio.shield(_stop(placement, host, egress))


async def _stop(placement: Placement, host: SandboxHost, egress: EgressProxy) -> None:
    await placement.stop()
    await host.stop()
    await egress.stop()
