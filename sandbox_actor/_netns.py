"""Network namespaces through pyroute2: proving a sandbox has no route out.

``bwrap --unshare-net`` gives each sandbox a network namespace of its own that dies with
it (nothing to leak, nothing for the janitor). After start-up the host looks inside it
with pyroute2 (netlink, in the sandbox's namespace via ``/proc/<pid>/ns/net``) and refuses
the sandbox unless the only interface is loopback and every route stays on it: a
fail-closed check that no interface or route was added behind our back.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass

from nerve._errors import SandboxUnavailable


@dataclass(frozen=True, slots=True)
class NetView:
    links: list[str]
    addresses: list[str]
    routes: list[str]


async def inspect(pid: int) -> NetView:
    """Interfaces, addresses and route destinations in ``pid``'s network namespace."""
    # pyroute2 opens AF_NETLINK datagram endpoints, which uvloop cannot: it gets a plain
    # asyncio loop of its own in a worker thread.
    return await asyncio.to_thread(_inspect_blocking, pid)


def _inspect_blocking(pid: int) -> NetView:
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        return runner.run(_inspect(pid))


async def _inspect(pid: int) -> NetView:
    from pyroute2 import AsyncIPRoute

    async with AsyncIPRoute(netns=f"/proc/{pid}/ns/net") as ipr:
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
