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
from sandbox_actor._backend import BackendConfig, choose
from sandbox_actor._egress import EgressConfig, EgressProxy
from sandbox_actor._host import HostConfig, SandboxHost
from sandbox_actor._placement import Placement
from sandbox_actor._runner import RunnerConfig, SnapshotPolicy


async def run_sandbox_host(bus: Bus, opts: Any) -> None:
    """Run until cancelled: a sandbox host plus a placement actor."""
    settings: dict[str, Any] = dict(getattr(opts, "settings", {}) or {})
    ident = str(opts.id)
    state = Path(settings.get("state_dir") or f"/var/lib/nerve/sandbox/{ident}")
    config = BackendConfig(state_dir=state, host_id=ident)
    ports = {int(p) for p in str(settings.get("egress_ports", "")).split(",") if p.strip()}
    egress = EgressProxy(EgressConfig(allowed_ports={80, 443, *ports}))
    backend = choose(config, settings.get("backend") or None)
    if hasattr(backend, "egress"):
        backend.egress = egress
    runner = RunnerConfig(policy=SnapshotPolicy(settings.get("snapshot_policy", "every_step")),
                          every_n=int(settings.get("every_n", 5)))
    host = SandboxHost(bus, backend, HostConfig(
        host_id=ident, capacity=int(settings.get("capacity", 32)),
        lease_ttl=float(settings.get("lease_ttl", 2.0)), pool_size=int(settings.get("pool", 0)),
        runner=runner, cache_dir=state / "chunks"))
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
