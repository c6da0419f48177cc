"""``nerve worker --role R``: one role of nerve in this process, against any NATS."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
import signal
import socket
import sys
import time
import traceback
from typing import Any

from actors import Actor, Delivery, PoisonKeeper, Requests, configure_tracing, run
from bus import Bus, provision
from cli._roles import ROLES, RoleOptions, load_role
from cli._target import add_target_args, connect_target
from nerve import ConfigError

log = logging.getLogger("nerve.cli.worker")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("worker", help="run one role (orchestrator, gateway, sandbox, ...)")
    p.add_argument("--role", required=True, choices=sorted(ROLES))
    p.add_argument("--id", default=None, help="a stable id for this process (default: "
                   "<role>-<hostname>). An orchestrator restarted under the same id takes its "
                   "runs back at once; two live orchestrators need two ids. A step worker's "
                   "unfinished steps come back within seconds, to it or a peer")
    p.add_argument("--workflows", action="append", default=[],
                   help="import this module first (it registers workflows/activities/tools); "
                        "repeatable, or NERVE_WORKFLOWS=a,b")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a role setting (repeatable)")
    add_target_args(p)
    p.set_defaults(func=_worker_command, log_level=logging.INFO)


# sysexits.h's EX_CONFIG: `nerve up` does not restart a role that exits with it, since the
# same configuration would fail the same way again.
EX_CONFIG = 78


def _worker_command(args: argparse.Namespace) -> int:
    try:
        return run(worker_main(args))
    except ConfigError as exc:
        print(f"nerve: error: {exc.message}", file=sys.stderr, flush=True)
        return EX_CONFIG


def import_workflow_modules(modules: list[str]) -> None:
    """Import the ``--workflows`` modules (and ``NERVE_WORKFLOWS``), from the current
    directory too: ``nerve worker``/``nerve replay`` find ``mymodule.py`` where ``nerve up``
    (whose roles run ``python -m cli``, which puts it on the path) does."""
    env = os.environ.get("NERVE_WORKFLOWS", "")
    names = [*modules, *[m for m in env.split(",") if m.strip()]]
    if names and "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in names:
        try:
            importlib.import_module(name.strip())
        except ImportError as exc:
            raise ConfigError(f"cannot import workflows module {name!r}: {exc}") from None
        except Exception as exc:
            # The module itself is broken (it raises, or does not parse): every restart would
            # fail the same way, so stop and say where.
            where = ""
            if isinstance(exc, SyntaxError):
                where = f" at {exc.filename}:{exc.lineno}"
            elif exc.__traceback__ is not None:
                frame = traceback.extract_tb(exc.__traceback__)[-1]
                where = f" at {frame.filename}:{frame.lineno}"
            raise ConfigError(f"importing workflows module {name!r} failed{where}: "
                              f"{type(exc).__name__}: {exc}") from None


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set wants KEY=VALUE, got {pair!r}")
        settings[key] = value
    return settings


class RoleStatus(Actor[dict]):
    """Answers ``<prefix>.ctl.role.<id>.ping`` so `nerve up` and operators can see it live."""

    message_type = dict

    def __init__(self, role: str, ident: str) -> None:
        super().__init__(f"role-status-{ident}")
        self.role, self.ident = role, ident
        self.started_at = time.time()

    def mailbox(self) -> Requests:
        assert self.bus is not None
        return Requests(subject=self.bus.names.ctl(f"role.{self.ident}.ping"))

    async def handle(self, message: dict, delivery: Delivery) -> dict[str, Any]:
        return {"role": self.role, "id": self.ident, "pid": os.getpid(),
                "host": socket.gethostname(), "started_at": self.started_at}


async def worker_main(args: argparse.Namespace) -> int:
    import_workflow_modules(args.workflows)
    ident = args.id or f"{args.role}-{socket.gethostname()}".replace(".", "-")
    tracing = configure_tracing(f"nerve-{args.role}")
    runner = load_role(args.role)
    bus: Bus = await connect_target(args, name=f"nerve-{ident}", check_jetstream=False)
    await provision(bus)
    opts = RoleOptions(id=ident, data_dir=args.data_dir, settings=parse_settings(args.set))
    status = RoleStatus(args.role, ident)
    main = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: main.cancel() if main else None)
    role_task = asyncio.create_task(runner(bus, opts), name=f"role:{args.role}")
    ready = asyncio.create_task(opts.ready.wait())
    await asyncio.wait({role_task, ready}, return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    if role_task.done():  # it failed (or ended) before it was serving
        await bus.close()
        role_task.result()
        return 0
    await status.start(bus)
    keeper = PoisonKeeper()
    await keeper.start(bus)
    log.info("worker %s (%s) running, pid %d", ident, args.role, os.getpid())
    try:
        await role_task
    except asyncio.CancelledError:
        role_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await role_task
    finally:
        await keeper.stop()
        await status.stop()
        await bus.close()
        if tracing is not None:
            tracing.shutdown()  # flush what is batched
    return 0


__all__ = ["EX_CONFIG", "RoleStatus", "import_workflow_modules", "register", "worker_main"]
