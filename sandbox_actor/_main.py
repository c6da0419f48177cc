"""A sandbox host as its own OS process: ``python -m sandbox_actor --nats-url ...``.

This is what ``nerve sandbox-host`` runs, and what the chaos tests SIGKILL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

from actors import run
from bus import ConnectOptions, connect, provision
from sandbox_actor._backend import BackendConfig, choose
from sandbox_actor._egress import EgressConfig, EgressProxy
from sandbox_actor._host import HostConfig, SandboxHost
from sandbox_actor._placement import Placement
from sandbox_actor._runner import RunnerConfig, SnapshotPolicy


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nerve sandbox-host", description=__doc__)
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nats-url", default=None, help="NATS server (default: NERVE_NATS_URL)")
    p.add_argument("--prefix", default=None, help="deployment prefix (default: nerve)")
    p.add_argument("--host-id", default=None, help="this host's id (default: hostname-pid)")
    p.add_argument("--backend", default=None, choices=["ns", "gvisor"],
                   help="sandbox backend (default: the best available)")
    p.add_argument("--state-dir", type=Path, default=Path("/var/lib/nerve/sandbox"))
    p.add_argument("--capacity", type=int, default=32)
    p.add_argument("--pool", type=int, default=0, help="warm pool size")
    p.add_argument("--lease-ttl", type=float, default=2.0)
    p.add_argument("--snapshot-policy", choices=[p.value for p in SnapshotPolicy],
                   default="every_step")
    p.add_argument("--every-n", type=int, default=5)
    p.add_argument("--placement", action="store_true",
                   help="also run a placement actor in this process")
    p.add_argument("--ready-file", type=Path, default=None,
                   help="write this file once the host serves (for scripts and tests)")
    p.add_argument("--egress-static", action="append", default=[], metavar="NAME=IP",
                   help="pin a name to an address for the egress proxy (repeatable)")
    p.add_argument("--egress-trusted", action="append", default=[], metavar="IP:PORT",
                   help="an address:port exempt from the private-range refusal")
    p.add_argument("--egress-port", action="append", type=int, default=[],
                   help="an extra port the egress proxy allows (repeatable)")


async def serve(args: argparse.Namespace) -> int:
    host_id = args.host_id or f"{os.uname().nodename}-{os.getpid()}"
    opts = ConnectOptions.from_env(args.nats_url, prefix=args.prefix,
                                   name=f"nerve-sandbox-{host_id}")
    bus = await connect(opts)
    await provision(bus)
    config = BackendConfig(state_dir=args.state_dir, host_id=host_id)
    static: dict[str, list[str]] = {}
    for pin in args.egress_static:
        name, _, addr = pin.partition("=")
        static.setdefault(name.lower(), []).append(addr)
    egress = EgressProxy(EgressConfig(static_hosts=static,
                                      trusted_addresses=set(args.egress_trusted),
                                      allowed_ports={80, 443, *args.egress_port}))
    backend = choose(config, args.backend)
    if hasattr(backend, "egress"):
        backend.egress = egress
    crash = os.environ.get("NERVE_SANDBOX_FAULT_CRASH_AFTER_COMMIT", "")
    runner = RunnerConfig(policy=SnapshotPolicy(args.snapshot_policy), every_n=args.every_n,
                          crash_after_commit=frozenset(k for k in crash.split(",") if k))
    host = SandboxHost(bus, backend, HostConfig(
        host_id=host_id, capacity=args.capacity, lease_ttl=args.lease_ttl,
        pool_size=args.pool, runner=runner, cache_dir=args.state_dir / "chunks"))
    placement = Placement(bus) if args.placement else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    def on_signal(sig: signal.Signals) -> None:
        logging.getLogger("nerve.sandbox").warning("sandbox host %s: got %s; stopping",
                                                   host_id, sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await host.start()
    if placement is not None:
        await placement.start()
    if args.ready_file is not None:
        args.ready_file.write_text(host_id)
    print(f"sandbox host {host_id} serving ({backend.name} backend)", flush=True)
    try:
        stopper = asyncio.ensure_future(stop.wait())
        failure = asyncio.ensure_future(host.wait())
        _done, pending = await asyncio.wait({stopper, failure},
                                            return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if failure.done() and not failure.cancelled() and failure.exception() is not None:
            logging.getLogger("nerve.sandbox").error("sandbox host %s stops: %s", host_id,
                                                     failure.exception())
            code = 1
        elif failure.done():
            logging.getLogger("nerve.sandbox").error("sandbox host %s: wait ended (%s)",
                                                     host_id, failure)
            code = 1
        else:
            code = 0
    finally:
        if placement is not None:
            await placement.stop()
        await host.stop()
        await egress.stop()
        with contextlib.suppress(Exception):
            await bus.close()
    return code


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("NERVE_LOG", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    return int(run(serve(args)) or 0)
