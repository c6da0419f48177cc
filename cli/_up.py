"""``nerve up``: everything on one machine, each role its own supervised OS process.

The process tree: this process supervises the embedded ``nats-server`` (unless
``--nats-url`` names one) and one ``nerve worker --role R`` process per role. Any of them
can be SIGKILLed: the supervisor restarts it (a role under the same id resumes its work at
once). ``<data-dir>/nerve.json`` says where everything is, and is rewritten whenever a
process restarts. Ctrl-C (or SIGTERM) stops the roles, then the server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from nats.errors import Error as NatsClientError

from actors import ask, run
from bus import (
    Bus,
    ConnectOptions,
    EmbeddedNats,
    EmbeddedNatsConfig,
    PidLock,
    connect,
    pid_alive,
    provision,
)
from cli._roles import DEFAULT_UP_ROLES, ROLES
from cli._target import STATE_FILE, default_data_dir, port
from cli._worker import EX_CONFIG
from nerve import BusError, ConfigError, NerveError, ProcessExited
from supervisor import (
    ChildSpec,
    OsProcess,
    Strategy,
    Supervisor,
    SupervisorEvent,
    bus_event_sink,
)

log = logging.getLogger("nerve.cli.up")

# A role that lived less than ROLE_YOUNG seconds died young; its next start waits
# ROLE_BACKOFF_FIRST, doubling with each young death in a row up to ROLE_BACKOFF_MAX.
ROLE_YOUNG = 10.0
ROLE_BACKOFF_FIRST = 0.5
ROLE_BACKOFF_MAX = 30.0
# More restarts than this within RESTART_PERIOD seconds, all roles together, and nerve up
# stops (everything is failing: a person must look). The back-off keeps one crash-looping
# role well under it.
RESTART_INTENSITY = 20
RESTART_PERIOD = 60.0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("up", help="run everything on this machine (embedded NATS + all roles)")
    add_up_args(p)
    p.set_defaults(func=lambda args: run(up_main(args)))


def add_up_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, default=None,
                   help=f"state and NATS store (default {default_data_dir()})")
    p.add_argument("--nats-port", type=port, default=0, help="NATS port (0 = a free one)")
    p.add_argument("--nats-url", default=None,
                   help="use this NATS server/cluster instead of starting one")
    p.add_argument("--prefix", default="nerve", help="deployment prefix")
    p.add_argument("--roles", default=",".join(DEFAULT_UP_ROLES),
                   help=f"roles to run (default {','.join(DEFAULT_UP_ROLES)}; "
                        f"known: {','.join(sorted(ROLES))})")
    p.add_argument("--workflows", action="append", default=[],
                   help="a module registering your workflows/activities (repeatable)")
    p.add_argument("--lazy-sync", action="store_true",
                   help="NATS fsyncs lazily (faster; acked writes can be lost on power loss)")
    p.add_argument("--http-port", type=port, default=0,
                   help="port of the HTTP API and console (0 = a free one)")
    p.add_argument("--http-host", default="127.0.0.1", help="address the HTTP API listens on")
    p.add_argument("--set", action="append", default=[], metavar="ROLE.KEY=VALUE",
                   help="a setting for one role, e.g. orchestrator.host_ttl=1")


class Cluster:
    """The supervised process tree of one ``nerve up``."""

    def __init__(self, args: argparse.Namespace, narrate: bool = True) -> None:
        self.args = args
        self.narrate = narrate  # print crashes and restarts as they happen
        self.data_dir: Path = (args.data_dir or default_data_dir()).resolve()
        self.roles = [r.strip() for r in args.roles.split(",") if r.strip()]
        unknown = [r for r in self.roles if r not in ROLES]
        if unknown:
            raise ConfigError(f"unknown role(s) {', '.join(unknown)}; known: "
                              f"{', '.join(sorted(ROLES))}")
        if not self.roles or len(set(self.roles)) != len(self.roles):
            raise ConfigError(f"--roles {args.roles!r}: name each role to start once, e.g. "
                              f"{','.join(DEFAULT_UP_ROLES)}")
        for pair in args.set:
            scope, dot, rest = pair.partition(".")
            if not dot or "=" not in rest or scope not in self.roles:
                raise ConfigError(
                    f"--set {pair!r}: wants ROLE.KEY=VALUE, ROLE one of the roles this starts "
                    f"({', '.join(self.roles)})")
        self.server: EmbeddedNats | None = None
        self.nats_url: str = args.nats_url or ""
        self.procs: dict[str, OsProcess] = {}
        self._young_deaths: dict[str, int] = {}  # role -> deaths in a row, each < ROLE_YOUNG
        self.supervisor: Supervisor | None = None
        self.http_url: str | None = None
        self.http_port: int | None = None
        self._state_lock = asyncio.Lock()
        self._rewrites: set[asyncio.Task[None]] = set()
        self._tree: asyncio.Task[None] | None = None
        self._bus: Bus | None = None
        self._lock: PidLock | None = None

    def role_id(self, role: str) -> str:
        return f"{role}-1"

    def _role_settings(self, role: str) -> list[str]:
        out = []
        if role == "api" and self.http_port:
            # Chosen once here, so a restarted api process listens where clients look.
            out += ["--set", f"host={self.args.http_host}", "--set", f"port={self.http_port}"]
        for pair in self.args.set:
            scope, _, rest = pair.partition(".")
            if scope == role:
                out += ["--set", rest]
        return out

    async def start(self) -> None:
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot use {self.data_dir} as the data dir: "
                              f"{exc.strerror or exc}") from None
        # One nerve per data dir: a second would share the store and overwrite nerve.json.
        lock = PidLock(self.data_dir / "up.lock")
        if not await lock.acquire():
            holder = lock.holder()
            raise ConfigError(f"nerve is already up in {self.data_dir} (pid {holder}); stop "
                              f"it first (Ctrl-C where it runs, or kill {holder}), or use "
                              f"another --data-dir")
        self._lock = lock
        (self.data_dir / STATE_FILE).unlink(missing_ok=True)
        logs = self.data_dir / "logs"
        logs.mkdir(exist_ok=True)
        if "api" in self.roles:
            self.http_port = self.args.http_port or _free_port(self.args.http_host)
            shown = "127.0.0.1" if self.args.http_host in ("0.0.0.0", "") else \
                self.args.http_host
            self.http_url = f"http://{shown}:{self.http_port}"
        children: list[ChildSpec] = []
        if not self.nats_url:
            self.server = EmbeddedNats(EmbeddedNatsConfig(
                store_dir=self.data_dir / "nats", port=self.args.nats_port,
                sync_always=not self.args.lazy_sync))
            await self.server.start()
            self.nats_url = self.server.url
            children.append(ChildSpec("nats-server", self.server.run, shutdown=15))
        bus = await connect(ConnectOptions(servers=[self.nats_url], prefix=self.args.prefix,
                                           name="nerve-up"))
        self._bus = bus  # kept for the supervisor's events (nerve.events.supervisor)
        try:
            await provision(bus)
            # Stopped after every role and before the server (reverse start order): the
            # last events are flushed while there is still a server to take them.
            children.append(ChildSpec("events-connection", bus.hold, shutdown=5))
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            for role in self.roles:
                ident = self.role_id(role)
                argv = [sys.executable, "-m", "cli", "worker", "--role", role, "--id", ident,
                        "--nats-url", self.nats_url, "--prefix", self.args.prefix,
                        "--data-dir", str(self.data_dir), *self._role_settings(role)]
                for module in self.args.workflows:
                    argv += ["--workflows", module]
                proc = OsProcess(role, argv, env=env, log_file=logs / f"{role}.log",
                                 term_timeout=10)
                self.procs[role] = proc
                children.append(ChildSpec(role, functools.partial(self._run_role, role, proc),
                                          shutdown=15))
            self.supervisor = Supervisor("nerve-up", children, strategy=Strategy.ONE_FOR_ONE,
                                         intensity=RESTART_INTENSITY, period=RESTART_PERIOD,
                                         on_event=[self._on_supervisor_event,
                                                   bus_event_sink(bus)])
            self._tree = asyncio.create_task(self.supervisor.run(), name="nerve-up-tree")
            await self._wait_roles_ready(bus)
            await self.write_state()
        except BaseException:
            await bus.close(drain=False)
            raise

    async def _run_role(self, role: str, proc: OsProcess) -> None:
        # A role that died young is started again after a doubling wait, as systemd's
        # RestartSec or a crash-loop back-off would: one killed over and over, or crashing
        # at once, neither spins nor spends the tree's restart budget in seconds.
        young = self._young_deaths.get(role, 0)
        if young:
            await asyncio.sleep(min(ROLE_BACKOFF_MAX, ROLE_BACKOFF_FIRST * 2 ** (young - 1)))
            self._rewrite_soon()  # nerve.json said "no pid" while it waited
        started = time.monotonic()
        try:
            await proc.run()
        except ProcessExited as exc:
            if exc.fields.get("code") != EX_CONFIG:
                raise
            assert proc.log_file is not None
            why = await asyncio.to_thread(_last_error, proc.log_file)
            raise ConfigError(f"{why or f'the {role} role refused its configuration'} "
                              f"(see {proc.log_file})") from None
        finally:
            lived = time.monotonic() - started
            self._young_deaths[role] = young + 1 if lived < ROLE_YOUNG else 0

    async def _wait_roles_ready(self, bus: Bus, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        pending = set(self.roles)
        while pending:
            assert self._tree is not None
            for role in list(pending):
                if self._tree.done():
                    self._tree.result()  # raises the escalation (it has closed the bus)
                with contextlib.suppress(BusError, NerveError, NatsClientError):
                    await ask(bus, bus.names.ctl(f"role.{self.role_id(role)}.ping"), {},
                              timeout=0.5)
                    pending.discard(role)
            if pending and time.monotonic() > deadline:
                raise ConfigError(f"roles {', '.join(sorted(pending))} did not start within "
                                  f"{timeout}s; see {self.data_dir / 'logs'}")
            if pending:
                await asyncio.sleep(0.1)

    async def _on_supervisor_event(self, event: SupervisorEvent) -> None:
        if event.kind in ("started", "restarting") and self.procs:
            self._rewrite_soon()
        if event.kind == "restarting" and self.narrate:
            print(f"nerve: restarting {event.child} ({event.reason})", flush=True)

    def _rewrite_soon(self) -> None:
        async def rewrite() -> None:
            for _ in range(100):  # the new process gets its pid a moment after "started"
                if all(p.pid for p in self.procs.values()) and (
                        self.server is None or pid_alive(self.server.pid)):
                    break
                await asyncio.sleep(0.02)
            await self.write_state()

        task = asyncio.get_running_loop().create_task(rewrite())
        self._rewrites.add(task)
        task.add_done_callback(self._rewrites.discard)

    def state(self) -> dict[str, Any]:
        return {
            "nats_url": self.nats_url,
            "http_url": self.http_url,
            "prefix": self.args.prefix,
            "data_dir": str(self.data_dir),
            "pid": os.getpid(),
            "nats_pid": self.server.pid if self.server else None,
            "roles": {role: {"id": self.role_id(role), "pid": p.pid}
                      for role, p in self.procs.items()},
            "updated_at": time.time(),
        }

    async def write_state(self) -> None:
        async with self._state_lock:
            path = self.data_dir / STATE_FILE
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.state(), indent=2))
            tmp.replace(path)  # atomic: readers never see half a file

    async def wait(self, stop: asyncio.Event) -> None:
        """Until the tree ends (it gave up: its error is raised) or ``stop`` is set."""
        assert self._tree is not None
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({self._tree, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if self._tree.done():
            self._tree.result()

    async def stop(self) -> None:
        if self._tree is not None:
            self._tree.cancel()
            with contextlib.suppress(asyncio.CancelledError, NerveError):
                await self._tree
        if self._bus is not None:
            await self._bus.close(drain=False)
        if self.server is not None:
            await self.server.stop()
        if self._lock is not None:  # not the state of another nerve, which holds the lock
            (self.data_dir / STATE_FILE).unlink(missing_ok=True)
            self._lock.release()
            self._lock = None


def _last_error(log_file: Path) -> str | None:
    """The last ``nerve: error:`` line a role process wrote to its log."""
    with open(log_file, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
        lines = f.read().decode(errors="replace").splitlines()
    marker = "nerve: error: "
    return next((line.partition(marker)[2] for line in reversed(lines) if marker in line), None)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def up_main(args: argparse.Namespace) -> int:
    cluster = Cluster(args)
    main = asyncio.current_task()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal() -> None:
        stop.set()
        if main is not None:
            main.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        await cluster.start()
        if stop.is_set():
            # Asked to stop while starting, and the cancel was lost on the way (Python
            # 3.11's wait_for drops a cancel that lands as its awaitable completes).
            raise asyncio.CancelledError
        st = cluster.state()
        print(f"nerve is up ({len(cluster.roles)} roles, data in {cluster.data_dir})")
        print(f"  NATS:   {st['nats_url']}   (prefix {args.prefix})")
        for role, info in st["roles"].items():
            print(f"  {role:<13} pid {info['pid']}   log {cluster.data_dir / 'logs' / role}.log")
        if st["http_url"]:
            print(f"  HTTP:   {st['http_url']}   (console; admin key in "
                  f"{cluster.data_dir / 'admin.key'})")
        print(f"  state:  {cluster.data_dir / STATE_FILE}")
        print(f"try:  nats pub --server {st['nats_url']} {args.prefix}.tasks.acme "
              "'{\"task\": \"...\"}'   or   nerve run \"...\"", flush=True)
        await cluster.wait(stop)
    except asyncio.CancelledError:
        print("nerve: stopping", flush=True)
    finally:
        await cluster.stop()
    return 0
