"""Host-side access to a sandbox's workspace that can never leave it.

The host reads (for snapshots) and writes (for restores) a workspace that hostile code
controls. Every path is walked one component at a time with ``openat`` relative to the
parent's descriptor and ``O_NOFOLLOW``, never ``..``: a symlink the code planted is
recorded as a symlink (its target is just text) and never followed, so no
``ws/link -> /etc/shadow`` trick reaches the host. Only regular files are opened
(``O_NONBLOCK`` too, so a FIFO swapped in cannot hang the host). The ``ns`` backend also
freezes the sandbox while it walks, so nothing changes underneath.

Also: ``mount``/``umount2`` through libc for the per-sandbox disk (a size-limited tmpfs).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
MNT_DETACH = 2


@dataclass(frozen=True, slots=True)
class WalkEntry:
    """One workspace entry as seen from the host (``path`` is relative, '/'-separated)."""

    path: str
    kind: str  # "file", "dir", "symlink"
    mode: int
    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    target: str | None = None  # symlinks only


def walk(root_fd: int, max_entries: int = 1_000_000) -> Iterator[WalkEntry]:
    """Every file, directory and symlink under ``root_fd`` (depth first, sorted)."""
    stack: list[tuple[str, int]] = [("", os.dup(root_fd))]
    count = 0
    try:
        while stack:
            prefix, dfd = stack.pop()
            try:
                names = sorted(os.listdir(dfd))
                subdirs: list[tuple[str, int]] = []
                for name in names:
                    try:
                        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    rel = f"{prefix}{name}"
                    count += 1
                    if count > max_entries:
                        raise OSError(errno.EFBIG, f"workspace has over {max_entries} entries")
                    common = dict(mode=stat.S_IMODE(st.st_mode), size=st.st_size,
                                  mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns,
                                  ino=st.st_ino)
                    if stat.S_ISDIR(st.st_mode):
                        yield WalkEntry(rel, "dir", **common)
                        try:
                            sub = os.open(name, _DIR_FLAGS, dir_fd=dfd)
                        except OSError:
                            continue
                        subdirs.append((rel + "/", sub))
                    elif stat.S_ISREG(st.st_mode):
                        yield WalkEntry(rel, "file", **common)
                    elif stat.S_ISLNK(st.st_mode):
                        yield WalkEntry(rel, "symlink", **common,
                                        target=os.readlink(name, dir_fd=dfd))
                    # devices, FIFOs and sockets are not workspace content: skipped
                for item in reversed(subdirs):
                    stack.append(item)
            finally:
                os.close(dfd)
    finally:
        for _prefix, dfd in stack:
            os.close(dfd)


def _open_parent(root_fd: int, rel: str, create: bool, uid: int, gid: int) -> tuple[int, str]:
    parts = [p for p in rel.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise OSError(errno.EINVAL, f"bad workspace path {rel!r}")
    dfd = os.dup(root_fd)
    try:
        for part in parts[:-1]:
            try:
                nxt = os.open(part, _DIR_FLAGS, dir_fd=dfd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(part, 0o755, dir_fd=dfd)
                nxt = os.open(part, _DIR_FLAGS, dir_fd=dfd)
                os.fchown(nxt, uid, gid)
            os.close(dfd)
            dfd = nxt
    except BaseException:
        os.close(dfd)
        raise
    return dfd, parts[-1]


def read_file(root_fd: int, rel: str, limit: int = 1 << 40) -> bytes:
    """A regular file's bytes (symlinks and special files refused)."""
    dfd, name = _open_parent(root_fd, rel, False, 0, 0)
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dfd)
    finally:
        os.close(dfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"{rel} is not a regular file")
        chunks = []
        remaining = min(st.st_size, limit)
        while remaining > 0:
            data = os.read(fd, min(remaining, 8 << 20))
            if not data:
                break
            chunks.append(data)
            remaining -= len(data)
        return b"".join(chunks)
    finally:
        os.close(fd)


def write_file(root_fd: int, rel: str, data: bytes, mode: int, uid: int, gid: int,
               mtime_ns: int | None = None) -> os.stat_result:
    """Create or replace a regular file (a symlink in the way is replaced, not followed)."""
    dfd, name = _open_parent(root_fd, rel, True, uid, gid)
    try:
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                remove(dfd, name)
        except FileNotFoundError:
            pass
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode & 0o7777, dir_fd=dfd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchown(fd, uid, gid)
            os.fchmod(fd, mode & 0o7777)
            if mtime_ns is not None:
                os.utime(fd, ns=(mtime_ns, mtime_ns))
            return os.fstat(fd)
        finally:
            os.close(fd)
    finally:
        os.close(dfd)


def make_dir(root_fd: int, rel: str, mode: int, uid: int, gid: int) -> None:
    dfd, name = _open_parent(root_fd, rel, True, uid, gid)
    try:
        try:
            os.mkdir(name, mode & 0o7777, dir_fd=dfd)
        except FileExistsError:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                remove(dfd, name)
                os.mkdir(name, mode & 0o7777, dir_fd=dfd)
        fd = os.open(name, _DIR_FLAGS, dir_fd=dfd)
        try:
            os.fchown(fd, uid, gid)
            os.fchmod(fd, mode & 0o7777)
        finally:
            os.close(fd)
    finally:
        os.close(dfd)


def make_symlink(root_fd: int, rel: str, target: str, uid: int, gid: int) -> None:
    dfd, name = _open_parent(root_fd, rel, True, uid, gid)
    try:
        try:
            remove(dfd, name)
        except FileNotFoundError:
            pass
        os.symlink(target, name, dir_fd=dfd)
        os.chown(name, uid, gid, dir_fd=dfd, follow_symlinks=False)
    finally:
        os.close(dfd)


def remove(dfd: int, name: str) -> None:
    """Remove ``name`` (a file, symlink or whole directory tree) under ``dfd``."""
    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dfd)
        return
    sub = os.open(name, _DIR_FLAGS, dir_fd=dfd)
    try:
        for child in os.listdir(sub):
            remove(sub, child)
    finally:
        os.close(sub)
    os.rmdir(name, dir_fd=dfd)


def remove_path(root_fd: int, rel: str) -> None:
    dfd, name = _open_parent(root_fd, rel, False, 0, 0)
    try:
        remove(dfd, name)
    finally:
        os.close(dfd)


def clear(root_fd: int) -> None:
    for name in os.listdir(root_fd):
        remove(root_fd, name)


# -- mounts --------------------------------------------------------------------------------
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def mount_tmpfs(target: str, size_bytes: int, uid: int, gid: int, mode: int = 0o700) -> None:
    opts = f"size={size_bytes},nr_inodes=1m,mode={mode:o},uid={uid},gid={gid}"
    flags = 0x2 | 0x4  # MS_NOSUID | MS_NODEV (not MS_NOEXEC: code runs from the workspace)
    if _libc.mount(b"nerve-sandbox", target.encode(), b"tmpfs", flags, opts.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount tmpfs on {target}: {os.strerror(err)}")


def umount(target: str) -> None:
    if _libc.umount2(target.encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):  # not mounted / gone: nothing to do
            raise OSError(err, f"umount {target}: {os.strerror(err)}")


def mounts_under(prefix: str) -> list[str]:
    """Mount points at or below ``prefix`` in this mount namespace."""
    found = []
    with open("/proc/self/mounts") as fh:
        for line in fh:
            fields = line.split()
            if len(fields) > 1:
                point = fields[1].replace("\\040", " ")
                if point == prefix or point.startswith(prefix.rstrip("/") + "/"):
                    found.append(point)
    return found
