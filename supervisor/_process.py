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
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            # shield: we are often being cancelled ourselves; the wait must still finish.
            await asyncio.shield(asyncio.wait_for(proc.wait(), self.term_timeout))
        except (TimeoutError, asyncio.CancelledError):
            log.warning("process %s (pid %s) ignored SIGTERM; killing it", self.name, proc.pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await asyncio.shield(proc.wait())
