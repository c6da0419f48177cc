"""``OsProcess``: an OS process as a supervised child."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from nerve import ProcessExited

log = logging.getLogger("nerve.supervisor.process")

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@dataclass(eq=False)
class OsProcess:
    """Runs ``argv`` until it exits. A non-zero exit (or death by signal) is a crash.

    Cancelling :meth:`run` sends SIGTERM, waits ``term_timeout`` seconds, then SIGKILLs.
    With ``die_with_parent`` the kernel kills the child if this process dies first (even
    by SIGKILL), so a crashed supervisor leaves no orphans behind.
    """

    name: str
    argv: list[str]
    env: dict[str, str] | None = None
    cwd: Path | None = None
    log_file: Path | None = None
    term_timeout: float = 10.0
    die_with_parent: bool = True
    _proc: asyncio.subprocess.Process | None = field(default=None, init=False)
    started: asyncio.Event = field(default_factory=asyncio.Event, init=False)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc and self._proc.returncode is None else None

    async def run(self) -> None:
        out = open(self.log_file, "ab") if self.log_file else None  # noqa: ASYNC230
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv, env=self.env, cwd=self.cwd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out or asyncio.subprocess.DEVNULL, stderr=out or asyncio.subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches the supervisor, which stops us in order
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )
            self.started.set()
            try:
                code = await self._proc.wait()
            except asyncio.CancelledError:
                await self.terminate()
                raise
            if code != 0:
                how = f"signal {-code}" if code < 0 else f"exit code {code}"
                raise ProcessExited(f"process {self.name} (pid {self._proc.pid}) died with {how}",
                                    name=self.name, pid=self._proc.pid, code=code)
        finally:
            self.started.clear()
            if out is not None:
                out.close()

    async def terminate(self) -> None:
        """SIGTERM; after ``term_timeout`` seconds without an exit, SIGKILL to its group.

        Cancelling the caller does not cut the grace short. A supervisor stopping this
        child cancels it again every 0.2 s (``cancel_and_wait``, against lost
        cancellations), and taking each of those for "the stop is urgent" SIGKILLed roles
        that were shutting down cleanly a fraction of a second after SIGTERM (a sandbox
        host removing its sandboxes). So a cancellation that arrives here is held until
        the process has gone, then re-raised: deferred, never swallowed.
        """
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        exited = loop.create_task(proc.wait(), name=f"wait:{self.name}")
        cancelled: asyncio.CancelledError | None = None
        deadline = loop.time() + self.term_timeout
        killed = False
        while not exited.done():
            left = deadline - loop.time()
            if left <= 0:
                if killed:
                    log.error("process %s (pid %s) survived SIGKILL for 5s; leaving it",
                              self.name, proc.pid)
                    exited.cancel()
                    break
                log.warning("process %s (pid %s) ignored SIGTERM for %ss; killing it",
                            self.name, proc.pid, self.term_timeout)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                killed, deadline = True, loop.time() + 5.0
                continue
            try:
                # asyncio.wait raises only our own cancellation, never the waiter's.
                await asyncio.wait({exited}, timeout=left)
            except asyncio.CancelledError as exc:
                cancelled = exc  # held until the process is gone (see the docstring)
        if cancelled is not None:
            raise cancelled
