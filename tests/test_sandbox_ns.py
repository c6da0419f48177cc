"""Attacks on the ns backend from inside a real sandbox. Every one must fail.

Each test runs hostile code in a real bwrap sandbox and checks, from the host, that the
boundary held (and that the sandbox itself is still usable afterwards where it should be).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sandbox_actor import NsBackend, NsSandbox, SandboxLimits, SandboxSpec
from sandbox_actor._fs import mounts_under
from sandbox_actor._netns import inspect
from tests._sandbox import backend_config, needs_ns, py, sandbox_uid_processes, sh

pytestmark = needs_ns


@pytest.fixture
async def backend() -> AsyncIterator[NsBackend]:
    b = NsBackend(backend_config())
    yield b
    await b.stop()
    shutil.rmtree(b.config.state_dir, ignore_errors=True)


async def make(backend: NsBackend, name: str = "sb", **limits: object) -> NsSandbox:
    return await backend.create(SandboxSpec(sandbox_id=name, limits=SandboxLimits(**limits)))


@pytest.fixture
async def sandbox(backend: NsBackend) -> NsSandbox:
    return await make(backend, timeout=20)


# -- the filesystem --------------------------------------------------------------------------
async def test_cannot_read_host_files_outside_the_workspace(sandbox: NsSandbox,
                                                            tmp_path: Path) -> None:
    secret = tmp_path / "host-secret.txt"
    secret.write_text("TOP-SECRET-HOST-DATA")
    os.chmod(tmp_path, 0o755)
    os.chmod(secret, 0o644)  # world-readable on the host: only the namespace protects it
    probes = [str(secret), "/etc/shadow", "/root/.bashrc", "/proc/1/root/etc/shadow",
              str(Path.cwd() / "pyproject.toml"), "/sys/kernel/notes"]
    code = ("import json,sys\nout={}\nfor p in sys.argv[1:]:\n try: out[p]=open(p).read()\n"
            " except Exception as e: out[p]=type(e).__name__\nprint(json.dumps(out))")
    result = await sandbox.exec(["/usr/bin/python3", "-c", code, *probes])
    seen = json.loads(result.stdout)
    assert "TOP-SECRET" not in result.stdout
    for path in probes:
        assert seen[path] in ("FileNotFoundError", "PermissionError"), (path, seen[path])
    listing = await sandbox.exec(sh("ls / /etc"))
    for name in ("work", "root", "home", "shadow", "sys"):
        assert name not in listing.stdout.split()


async def test_cannot_write_outside_the_workspace(sandbox: NsSandbox) -> None:
    targets = ["/usr/evil", "/etc/evil", "/evil", "/run/nerve/agent.py", "/proc/sys/kernel/x"]
    code = ("import json,sys\nout={}\nfor p in sys.argv[1:]:\n try: open(p,'w').write('x');"
            " out[p]='written'\n except Exception as e: out[p]=type(e).__name__\n"
            "print(json.dumps(out))")
    result = await sandbox.exec(["/usr/bin/python3", "-c", code, *targets])
    outcome = json.loads(result.stdout)
    assert all(v != "written" for v in outcome.values()), outcome
    assert not await asyncio.to_thread(os.path.exists, "/usr/evil")
    assert not await asyncio.to_thread(os.path.exists, "/etc/evil")
    ok = await sandbox.exec(sh("echo fine > /workspace/ok && cat /workspace/ok"))
    assert ok.stdout == "fine\n"


async def test_symlink_out_of_the_workspace_is_never_followed(backend: NsBackend,
                                                              sandbox: NsSandbox,
                                                              tmp_path: Path, bus) -> None:
    from sandbox_actor import WorkspaceStore

    secret = tmp_path / "followed.txt"
    secret.write_text("HOST-FILE-BEHIND-A-SYMLINK")
    os.chmod(tmp_path, 0o755)
    os.chmod(secret, 0o644)
    host_disk = sandbox.disk_dir / "upper"
    # Links to a host path, to the sandbox's own host-side directory, and a dir link.
    await sandbox.exec(sh(f"ln -s {secret} leak && ln -s {host_disk} up && "
                          f"ln -s / rootlink && mkdir d && ln -s {tmp_path} d/dirlink"))
    inside = await sandbox.exec(sh("cat leak; ls up; ls d/dirlink"))
    assert "HOST-FILE" not in inside.stdout
    store = WorkspaceStore(bus, tmp_path / "cache")
    ref = await backend.snapshot(sandbox, store, seq=1)
    manifest = await store.get_manifest(ref.name)
    kinds = {e[0]: (e[1], e[5]) for e in manifest.entries}
    assert kinds["leak"] == ("symlink", str(secret))
    assert kinds["d/dirlink"] == ("symlink", str(tmp_path))
    assert not any(p.startswith("d/dirlink/") or p.startswith("rootlink/") for p in kinds)
    # The snapshot holds no byte of the host file, and a restore recreates the link only.
    for entry in manifest.entries:
        if entry[1] == "file":
            for digest in entry[5]:
                assert b"HOST-FILE" not in await store.get_chunk(digest)
    copy = await backend.restore(SandboxSpec(sandbox_id="copy"), ref.name, store)
    again = await copy.exec(sh("readlink leak; cat leak 2>&1"))
    assert again.stdout.startswith(str(secret)) and "HOST-FILE" not in again.stdout
    # The host's own reads refuse links too (read_file through the agent sees the
    # sandbox's view, where the host file does not exist).
    with pytest.raises(Exception, match="No such file"):
        await copy.read_file("leak")


# -- processes and the kernel ----------------------------------------------------------------
async def test_cannot_see_host_processes(sandbox: NsSandbox) -> None:
    result = await sandbox.exec(py(
        "import os,json\nprint(json.dumps({p: open(f'/proc/{p}/cmdline','rb').read()"
        ".decode(errors='replace') for p in os.listdir('/proc') if p.isdigit()}))"))
    seen = json.loads(result.stdout)
    assert len(seen) <= 3, seen  # bwrap's init, the agent, this python: nothing of the host
    assert "pytest" not in result.stdout and "nats-server" not in result.stdout
    kill = await sandbox.exec(py(f"import os; os.kill({os.getpid()}, 9)"))
    assert kill.exit_code != 0  # the host's pid does not exist in here


async def test_ptrace_mount_modules_bpf_keyctl_are_denied(sandbox: NsSandbox) -> None:
    code = r"""
import ctypes, os, json
libc = ctypes.CDLL(None, use_errno=True)
def call(nr, *args):
    r = libc.syscall(nr, *args)
    return "ok" if r >= 0 else os.strerror(ctypes.get_errno())
out = {
  "ptrace_traceme": call(101, 0, 0, 0, 0),
  "ptrace_attach_agent": call(101, 16, 2, 0, 0),
  "mount": call(165, b"none", b"/tmp", b"tmpfs", 0, 0),
  "unshare_user": call(272, 0x10000000),
  "unshare_mnt": call(272, 0x00020000),
  "init_module": call(175, 0, 0, b""),
  "finit_module": call(313, 0, b"", 0),
  "delete_module": call(176, b"ext4", 0),
  "kexec_load": call(246, 0, 0, 0, 0),
  "bpf": call(321, 0, 0, 0),
  "keyctl": call(250, 0, 0, 0),
  "perf_event_open": call(298, 0, 0, -1, -1, 0),
  "io_uring_setup": call(425, 8, 0),
  "process_vm_readv": call(310, 2, 0, 0, 0, 0, 0),
  "reboot": call(169, 0xfee1dead, 672274793, 0x4321fedc, 0),
}
print(json.dumps(out))
"""
    result = await sandbox.exec(py(code))
    outcome = json.loads(result.stdout)
    for name, verdict in outcome.items():
        assert verdict != "ok", (name, outcome)
        assert verdict == "Operation not permitted", (name, outcome)


async def test_agent_cannot_be_hijacked_through_proc(sandbox: NsSandbox) -> None:
    result = await sandbox.exec(py(
        "import json\nout={}\nfor p in ['/proc/2/mem','/proc/2/environ','/proc/2/fd/0',"
        "'/proc/2/fd/1']:\n try: open(p,'rb').read(1); out[p]='read'\n"
        " except Exception as e: out[p]=type(e).__name__\nprint(json.dumps(out))"))
    assert all(v != "read" for v in json.loads(result.stdout).values()), result.stdout


# -- the network -----------------------------------------------------------------------------
def _host_addresses() -> list[str]:
    found = set()
    for line in Path("/proc/net/fib_trie").read_text().splitlines():
        line = line.strip()
        if line.startswith("|-- "):
            addr = line[4:]
            if not addr.startswith(("127.", "0.", "255.")) and not addr.endswith(".255"):
                found.add(addr)
    return sorted(found)[:3]


async def test_no_route_to_the_host_nats_or_loopback_services(sandbox: NsSandbox,
                                                               nats_server) -> None:
    port = int(nats_server.url.rsplit(":", 1)[1])
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    host_port = listener.getsockname()[1]
    targets = [("127.0.0.1", port), ("127.0.0.1", host_port)] + [
        (a, port) for a in _host_addresses()]
    code = ("import socket,json,sys\nout={}\nfor t in json.loads(sys.argv[1]):\n"
            " s=socket.socket(); s.settimeout(3)\n"
            " try: s.connect(tuple(t)); out[str(t)]='connected'\n"
            " except Exception as e: out[str(t)]=type(e).__name__\nprint(json.dumps(out))")
    try:
        result = await sandbox.exec(["/usr/bin/python3", "-c", code, json.dumps(targets)])
    finally:
        listener.close()
    outcome = json.loads(result.stdout)
    assert outcome and all(v != "connected" for v in outcome.values()), outcome
    view = await inspect(sandbox.agent_pid or 0)  # pyroute2, inside its namespace
    assert view.links == ["lo"]


async def test_names_do_not_resolve_inside(sandbox: NsSandbox) -> None:
    result = await sandbox.exec(py(
        "import socket\ntry: print(socket.getaddrinfo('example.com', 80))\n"
        "except Exception as e: print(type(e).__name__)"))
    assert result.stdout.strip() == "gaierror"


# -- resources -------------------------------------------------------------------------------
async def test_fork_bomb_is_contained(backend: NsBackend) -> None:
    sb = await make(backend, "bomb", pids=64, timeout=15)
    result = await sb.exec(py(
        "import os\nn=0\nerr=None\nwhile n < 100000:\n try:\n  pid=os.fork()\n"
        "  if pid==0:\n   import time; time.sleep(30); os._exit(0)\n  n+=1\n"
        " except OSError as e:\n  err=e.strerror; break\n"
        "print(n, err, flush=True)\nos.killpg(0, 9)"),
        timeout=10)
    assert "Resource temporarily unavailable" in result.stdout or result.timed_out, result
    assert len(sb.cgroups.pids()) <= 64
    after = await sb.exec(sh("echo alive"))  # the sandbox is still usable
    assert after.stdout == "alive\n"


async def test_memory_limit_kills_the_allocator_not_the_sandbox(backend: NsBackend) -> None:
    sb = await make(backend, "mem", memory_mb=64, timeout=30)
    result = await sb.exec(py("b = bytearray(300 * 1024 * 1024); print('allocated')"))
    assert "allocated" not in result.stdout
    assert result.oom_killed and result.signal == 9, result
    assert sb.alive
    assert (await sb.exec(sh("echo ok"))).stdout == "ok\n"


async def test_disk_quota_holds(backend: NsBackend) -> None:
    sb = await make(backend, "disk", disk_mb=8, memory_mb=256, timeout=30)
    # One big file hits RLIMIT_FSIZE; many small ones fill the per-sandbox disk.
    big = await sb.exec(sh("dd if=/dev/zero of=/workspace/big bs=1M count=64 2>&1"))
    assert "File size limit exceeded" in big.stdout, big
    many = await sb.exec(sh("for i in $(seq 1 32); do "
                            "dd if=/dev/zero of=/workspace/f$i bs=1M count=1 2>&1 || break; "
                            "done; du -sk /workspace"))
    assert "No space left on device" in many.stdout, many
    used_kb = int(many.stdout.split()[-2])
    assert used_kb <= 8 * 1024 + 64
    tmp = await sb.exec(sh("for i in $(seq 1 32); do "
                           "dd if=/dev/zero of=/tmp/f$i bs=1M count=1 2>&1 || break; done"))
    assert "No space left on device" in tmp.stdout


async def test_timeout_kills_the_command_and_everything_it_started(backend: NsBackend) -> None:
    sb = await make(backend, "slow", timeout=30)
    baseline = len(sb.cgroups.pids())  # bwrap, the sandbox's init, the agent
    result = await sb.exec(sh("(setsid sleep 1000 &) ; sleep 1000 & sleep 1000"), timeout=1)
    assert result.timed_out and result.exit_code is None
    # Only bwrap, the sandbox's init and the agent remain: the daemon that left the
    # process group died too.
    for _ in range(100):
        if len(sb.cgroups.pids()) <= baseline:
            break
        await asyncio.sleep(0.02)
    assert len(sb.cgroups.pids()) == baseline
    assert (await sb.exec(sh("echo next"))).stdout == "next\n"


# -- secrets ---------------------------------------------------------------------------------
async def test_no_host_environment_or_secret_enters(backend: NsBackend,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-SECRET-123")
    monkeypatch.setenv("NERVE_NATS_PASSWORD", "nats-SECRET-456")
    sb = await make(backend, "env")
    result = await sb.exec(sh("env; cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n'"))
    assert "SECRET" not in result.stdout
    names = {line.split("=", 1)[0] for line in result.stdout.splitlines() if "=" in line}
    assert names <= {"PATH", "HOME", "LANG", "TMPDIR", "PYTHONDONTWRITEBYTECODE", "PWD",
                     "SHLVL", "_", "OLDPWD"}, names


# -- cleanup ---------------------------------------------------------------------------------
async def test_destroy_leaves_no_process_mount_or_cgroup(backend: NsBackend) -> None:
    before = set(sandbox_uid_processes())  # other tests' sandboxes may be going away
    sb = await make(backend, "clean")
    await sb.exec(sh("(setsid sleep 1000 &); sleep 0.1"))
    cgroup_dirs = list(sb.cgroups.paths.values())
    assert set(sandbox_uid_processes()) - before
    await backend.destroy(sb)
    assert not set(sandbox_uid_processes()) - before
    assert not any(p.exists() for p in cgroup_dirs)
    assert not mounts_under(str(backend.config.state_dir))
    assert not (backend.config.sandboxes_dir / "clean").exists()
