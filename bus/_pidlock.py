"""``PidLock``: one process (tree) at a time on a directory."""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from pathlib import Path
from typing import Any


class PidLock:
    """An exclusive ``flock`` on a file that names its holder's pid.

    The lock belongs to the open file, not to a process: a child given the descriptor
    (``pass_fds=(lock.fd,)``) holds it too, and it is free only once every holder has
    closed it or exited, whatever killed them.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    async def acquire(self, wait: float = 0.0) -> bool:
        """Take the lock, waiting up to ``wait`` seconds for its holder to let go."""
        if self.fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return False
                await asyncio.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return True

    def holder(self) -> str:
        """The pid the lock's holder wrote (``unknown`` if it wrote none)."""
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None




def pid_alive(pid: Any) -> bool:
    """Whether process ``pid`` exists on this host (ours or another user's)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists; signalling it is not ours to do
    return True


__all__ = ["PidLock", "pid_alive"]
