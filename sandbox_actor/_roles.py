"""The ``sandbox`` role for ``nerve worker --role sandbox`` / ``nerve up``.

One process runs a :class:`SandboxHost` (with a janitor at start-up, a warm pool and the
egress proxy) and a :class:`Placement` actor (placement is compare-and-set, so every
sandbox host may run one). Settings (``--set KEY=VALUE``): ``backend`` (ns|gvisor; default
the best available), ``state_dir`` (default ``/var/lib/nerve/sandbox/<id>``), ``capacity``,
``pool``, ``lease_ttl``, ``snapshot_policy`` (every_step|every_n|on_demand), ``every_n``,
``egress_ports`` (comma-separated extra ports the proxy allows).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from bus import Bus
from nerve import ConfigError, read_settings
from sandbox_actor._backend import BackendConfig, choose
from sandbox_actor._egress import EgressConfig, EgressProxy
from sandbox_actor._host import HostConfig, SandboxHost
from sandbox_actor._placement import Placement
from sandbox_actor._runner import RunnerConfig, SnapshotPolicy

SANDBOX_SETTINGS: dict[str, Any] = {
    "backend": "", "state_dir": "", "capacity": 32, "pool": 0, "lease_ttl": 2.0,
    "snapshot_policy": SnapshotPolicy.EVERY_STEP.value, "every_n": 5, "egress_ports": ""}


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
    state = Path(settings["state_dir"] or f"/var/lib/nerve/sandbox/{ident}")
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
        pool_size=settings["pool"], runner=runner, cache_dir=state / "chunks"))
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
