"""The seccomp deny-list every ``ns`` sandbox runs under, compiled to BPF for ``bwrap``.

Built with ``pyseccomp`` on the host's libseccomp and exported as a classic BPF program
that ``bwrap --seccomp FD`` installs before it executes the sandbox's first process, so it
covers everything the sandbox ever runs. Denied calls fail with ``EPERM`` (a process that
probes for a feature gets an answer, not a crash). Syscalls of a foreign architecture
(the i386 ``int 0x80`` path, x32) hit libseccomp's bad-arch action and kill the process.
"""

from __future__ import annotations

import errno
import functools
import tempfile

from nerve import SandboxUnavailable

#: Why each call is denied, in groups. Namespaces, mounts and user namespaces would let
#: code rebuild its own view of the system; the rest reach host-kernel state or other
#: processes' memory, or widen the kernel's attack surface without a use in a sandbox.
DENIED_SYSCALLS: dict[str, tuple[str, ...]] = {
    "debugging and other processes' memory": (
        "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp",
        "perf_event_open",
    ),
    "mounts and namespaces": (
        "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "fsopen", "fsmount",
        "fsconfig", "fspick", "move_mount", "open_tree", "mount_setattr",
        "open_by_handle_at", "name_to_handle_at",
    ),
    "kernel keyrings": ("keyctl", "add_key", "request_key"),
    "eBPF and io_uring (both bypass or widen the filter)": (
        "bpf", "io_uring_setup", "io_uring_enter", "io_uring_register", "userfaultfd",
    ),
    "kernel modules and kexec": (
        "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    ),
    "host administration": (
        "reboot", "swapon", "swapoff", "acct", "syslog", "quotactl", "settimeofday",
        "clock_settime", "clock_adjtime", "adjtimex", "sethostname", "setdomainname",
        "iopl", "ioperm", "lookup_dcookie", "vhangup", "uselib", "nfsservctl",
        "fanotify_init", "add_key",
    ),
    "NUMA and page migration": ("mbind", "migrate_pages", "move_pages", "set_mempolicy"),
}


def denied() -> list[str]:
    return sorted({name for group in DENIED_SYSCALLS.values() for name in group})


@functools.lru_cache(maxsize=1)
def deny_list_bpf() -> bytes:
    """The compiled filter (cached: it is the same for every sandbox)."""
    try:
        import pyseccomp as sc
    except (ImportError, OSError) as exc:
        raise SandboxUnavailable(f"seccomp is unavailable: pyseccomp/libseccomp: {exc!r}; "
                                 "install libseccomp2 and the pyseccomp package") from None
    filt = sc.SyscallFilter(sc.ALLOW)
    for name in denied():
        try:
            filt.add_rule(sc.ERRNO(errno.EPERM), name)
        except (ValueError, RuntimeError, OSError):
            continue  # unknown on this architecture/kernel: nothing to deny
    with tempfile.TemporaryFile() as fh:
        filt.export_bpf(fh)
        fh.seek(0)
        return fh.read()
