"""`nerve worker --role R` OS processes for one test, all killed at its end."""

from __future__ import annotations

import asyncio
import os
import sys

from bus import EmbeddedNats


class RoleProcs:
    """Starts ``nerve worker`` processes of one role against the test's server and prefix.

    ``settings`` (``--set`` pairs) and ``env`` apply to every process started from then on;
    ``start(ident, **env)`` adds environment for that process alone.
    """

    def __init__(self, server: EmbeddedNats, prefix: str, role: str, workflows: str,
                 settings: list[str] | None = None, env: dict[str, str] | None = None,
                 ) -> None:
        self.server, self.prefix, self.role, self.workflows = server, prefix, role, workflows
        self.settings = list(settings or [])
        self.env = dict(env or {})
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(self, ident: str, **env: str) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli", "worker", "--role", self.role, "--id", ident,
            "--nats-url", self.server.url, "--prefix", self.prefix,
            "--workflows", self.workflows,
            *(arg for pair in self.settings for arg in ("--set", pair)),
            env={**os.environ, **self.env, **env},
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    async def close(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
