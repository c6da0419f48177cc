"""Network namespaces through pyroute2: proving a sandbox has no route out.

``bwrap --unshare-net`` gives each sandbox a network namespace of its own that dies with
it (nothing to leak, nothing for the janitor). After start-up the host looks inside it
with pyroute2 (netlink, in the sandbox's namespace via ``/proc/<pid>/ns/net``) and refuses
the sandbox unless the only interface is loopback and every route stays on it: a
fail-closed check that no interface or route was added behind our back.
"""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import os
import threading
from dataclasses import dataclass

from nerve import SandboxUnavailable

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True, slots=True)
class NetView:
    links: list[str]
    addresses: list[str]
    routes: list[str]


async def inspect(pid: int) -> NetView:
    """Interfaces, addresses and route destinations in ``pid``'s network namespace."""
    return await asyncio.to_thread(_inspect_in_thread, pid)


def _inspect_in_thread(pid: int) -> NetView:
    # Not pyroute2's ``netns=`` mode: it forks a helper and later SIGTERMs the helper's pid,
    # which another process may own by then (the asyncio child watcher can reap the helper
    # first, and pids wrap quickly on a busy host): that killed unrelated processes here.
    # Instead a throw-away thread joins the namespace (setns applies to one thread) and
    # opens an ordinary netlink socket there. pyroute2 also needs a plain asyncio loop
    # (uvloop cannot open AF_NETLINK endpoints), which that thread runs.
    box: dict[str, object] = {}

    def body() -> None:
        try:
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {pid}'s network namespace failed")
            finally:
                os.close(fd)
            with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
                box["view"] = runner.run(_inspect())
        except BaseException as exc:  # handed to the caller's thread below
            box["error"] = exc

    thread = threading.Thread(target=body, name=f"netns-inspect-{pid}", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["view"]  # type: ignore[return-value]


async def _inspect() -> NetView:
    from pyroute2 import AsyncIPRoute

    async with AsyncIPRoute() as ipr:
        links = [str(link.get("ifname")) async for link in await ipr.link("dump")]
        addrs = [str(a.get("address")) async for a in await ipr.addr("dump")]
        routes = [str(r.get("dst") or "default") async for r in await ipr.route("dump")]
    return NetView(links, addrs, routes)


async def verify_isolated(pid: int, sandbox_id: str) -> NetView:
    """Raise :class:`~nerve.SandboxUnavailable` unless only loopback exists in there."""
    view = await inspect(pid)
    problems = [f"interface {name}" for name in view.links if name != "lo"]
    for dst in view.routes:
        if dst == "default" or not ipaddress.ip_address(dst).is_loopback:
            problems.append(f"route to {dst}")
    for addr in view.addresses:
        if not ipaddress.ip_address(addr).is_loopback:
            problems.append(f"address {addr}")
    if problems:
        raise SandboxUnavailable(
            f"sandbox {sandbox_id} has a way out of its network namespace "
            f"({', '.join(problems)}); refusing it", sandbox_id=sandbox_id)
    return view
