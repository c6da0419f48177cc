"""Egress: default deny; allowlisted domains go through a proxy the host runs.

A sandbox has no network route at all (its network namespace holds only loopback). When
its policy allows some destinations, the host listens on a Unix socket in the sandbox's
directory, bind-mounted into the sandbox, and the agent exposes it as
``127.0.0.1:3128`` (``http_proxy`` / ``https_proxy`` point there). Every connection is
checked here, outside the sandbox:

* **HTTP CONNECT** (for TLS): the target host must match the policy and the port be
  allowed; once the tunnel is up, the TLS ClientHello's SNI must name the same host
  (no domain fronting: a tunnel to an allowed name cannot carry a handshake for another).
* **Plain HTTP** (absolute-form request): the URL's host and the ``Host`` header must
  agree and match the policy; the request is forwarded in origin form.
* **Names are resolved here**, never by the sandbox, and every resolved address must be a
  public one: loopback, private, link-local, CGNAT, multicast, reserved and IPv4-mapped
  forms are refused (SSRF), unless the operator pinned that exact ``address:port`` in
  ``EgressConfig.trusted_addresses``. The proxy connects to the address it checked (no
  second lookup, so DNS rebinding cannot swap it). IP literals never match a policy.

Policies are lists of domains: ``example.com`` (exactly that name) or ``*.example.com``
(any subdomain). A tenant's list (``EgressConfig.tenant_allow``) is added to the sandbox's.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("nerve.sandbox.egress")

_MAX_HEAD = 16 * 1024
_PUBLIC_CHECK_EXTRA = [ipaddress.ip_network("100.64.0.0/10")]


@dataclass(slots=True)
class EgressConfig:
    """Host-wide egress settings (the operator's, not the sandbox's)."""

    allowed_ports: set[int] = field(default_factory=lambda: {80, 443})
    # Names the operator pins to addresses (instead of DNS): {"api.internal": ["10.1.2.3"]}
    static_hosts: dict[str, list[str]] = field(default_factory=dict)
    # "ip:port" pairs exempt from the private-range refusal (operator-vouched services).
    trusted_addresses: set[str] = field(default_factory=set)
    tenant_allow: dict[str, list[str]] = field(default_factory=dict)
    connect_timeout: float = 10.0
    idle_timeout: float = 300.0
    head_timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class Decision:
    sandbox_id: str
    method: str
    host: str
    port: int
    allowed: bool
    reason: str
    at: float


class EgressDeniedError(Exception):
    """Internal: why a request was refused (becomes a 403 and a logged decision)."""


def normalize_host(host: str) -> str:
    host = host.strip().rstrip(".").lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return host


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def matches(host: str, patterns: list[str]) -> bool:
    """Does ``host`` (a name, never an IP literal) match one of the domain patterns?"""
    if is_ip_literal(host) or not host:
        return False
    for pattern in patterns:
        p = normalize_host(pattern)
        if p.startswith("*."):
            if host.endswith(p[1:]) and host != p[2:]:
                return True
        elif host == p:
            return True
    return False


def is_public(addr: str) -> bool:
    """True only for globally routable unicast addresses (the SSRF check)."""
    ip = ipaddress.ip_address(addr)
    if isinstance(ip, ipaddress.IPv6Address):
        for embedded in (ip.ipv4_mapped, ip.sixtofour,
                         ip.teredo[1] if ip.teredo else None):
            if embedded is not None and not is_public(str(embedded)):
                return False
    if not ip.is_global or ip.is_multicast or ip.is_reserved or ip.is_loopback:
        return False
    return not any(ip in net for net in _PUBLIC_CHECK_EXTRA if ip.version == net.version)


def parse_sni(record: bytes) -> str | None:
    """The server name in a TLS ClientHello record, or None if there is none."""
    try:
        if len(record) < 5 or record[0] != 0x16:
            return None
        body = record[5:]
        if body[0] != 0x01:  # handshake type: ClientHello
            return None
        p = 4 + 2 + 32  # handshake header, client version, random
        p += 1 + body[p]  # session id
        p += 2 + int.from_bytes(body[p:p + 2], "big")  # cipher suites
        p += 1 + body[p]  # compression methods
        end = p + 2 + int.from_bytes(body[p:p + 2], "big")
        p += 2
        while p + 4 <= end:
            ext_type = int.from_bytes(body[p:p + 2], "big")
            ext_len = int.from_bytes(body[p + 2:p + 4], "big")
            data = body[p + 4:p + 4 + ext_len]
            if ext_type == 0:  # server_name
                q = 2
                while q + 3 <= len(data):
                    name_type = data[q]
                    name_len = int.from_bytes(data[q + 1:q + 3], "big")
                    if name_type == 0:
                        return data[q + 3:q + 3 + name_len].decode("ascii").lower()
                    q += 3 + name_len
                return None
            p += 4 + ext_len
    except (IndexError, UnicodeDecodeError):
        return None
    return None


@dataclass(eq=False)
class _Listener:
    sandbox_id: str
    path: Path
    server: asyncio.base_events.Server
    allow: list[str]
    tenant: str


class EgressProxy:
    """The host's egress proxy: one Unix socket per sandbox, one policy per socket."""

    def __init__(self, config: EgressConfig | None = None, *, socket_uid: int | None = None,
                 socket_gid: int | None = None) -> None:
        self.config = config or EgressConfig()
        self.socket_uid = socket_uid
        self.socket_gid = socket_gid
        self._listeners: dict[str, _Listener] = {}
        self._conns: set[asyncio.Task[None]] = set()
        self.decisions: deque[Decision] = deque(maxlen=1000)

    # -- listeners ------------------------------------------------------------------------
    async def open(self, sandbox_id: str, path: Path, allow: list[str],
                   tenant: str = "default") -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        listener: _Listener | None = None

        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            if task is not None:
                self._conns.add(task)
            try:
                assert listener is not None
                await self._serve(listener, reader, writer)
            finally:
                if task is not None:
                    self._conns.discard(task)

        server = await asyncio.start_unix_server(on_conn, path=str(path))
        os.chmod(path, 0o600)
        if self.socket_uid is not None:
            os.chown(path, self.socket_uid, self.socket_gid if self.socket_gid is not None
                     else self.socket_uid)
        listener = _Listener(sandbox_id, path, server, list(allow), tenant)
        self._listeners[sandbox_id] = listener

    def set_policy(self, sandbox_id: str, allow: list[str], tenant: str = "default") -> None:
        listener = self._listeners[sandbox_id]
        listener.allow = list(allow)
        listener.tenant = tenant

    def rename(self, old: str, new: str) -> None:
        listener = self._listeners.pop(old, None)
        if listener is not None:
            listener.sandbox_id = new
            self._listeners[new] = listener

    async def close(self, sandbox_id: str) -> None:
        listener = self._listeners.pop(sandbox_id, None)
        if listener is None:
            return
        listener.server.close()
        with contextlib.suppress(FileNotFoundError):
            listener.path.unlink()

    async def stop(self) -> None:
        for sid in list(self._listeners):
            await self.close(sid)
        for task in list(self._conns):
            task.cancel()
        if self._conns:
            await asyncio.wait(set(self._conns))

    # -- policy ---------------------------------------------------------------------------
    def policy(self, listener: _Listener) -> list[str]:
        return listener.allow + self.config.tenant_allow.get(listener.tenant, [])

    async def _resolve(self, host: str, port: int) -> list[str]:
        if host in self.config.static_hosts:
            return list(self.config.static_hosts[host])
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        return list(dict.fromkeys(info[4][0] for info in infos))

    async def check(self, listener: _Listener, host: str, port: int) -> str:
        """The address to connect to, or :class:`EgressDeniedError` saying why not."""
        if is_ip_literal(host):
            raise EgressDeniedError(f"IP literal {host} is not allowed (name a domain)")
        if not matches(host, self.policy(listener)):
            raise EgressDeniedError(f"{host} is not in the sandbox's egress allowlist")
        if port not in self.config.allowed_ports:
            raise EgressDeniedError(f"port {port} is not allowed")
        try:
            addrs = await self._resolve(host, port)
        except (OSError, UnicodeError) as exc:
            raise EgressDeniedError(f"{host} does not resolve ({exc})") from None
        if not addrs:
            raise EgressDeniedError(f"{host} does not resolve")
        for addr in addrs:
            if f"{addr}:{port}" in self.config.trusted_addresses or is_public(addr):
                continue
            raise EgressDeniedError(f"{host} resolves to {addr}, a non-public address")
        return addrs[0]

    def _decide(self, listener: _Listener, method: str, host: str, port: int, allowed: bool,
                reason: str) -> None:
        self.decisions.append(Decision(listener.sandbox_id, method, host, port, allowed,
                                       reason, time.time()))
        log.log(logging.INFO if allowed else logging.WARNING, "egress %s %s %s:%s: %s",
                listener.sandbox_id, method, host, port,
                "allowed" if allowed else f"denied ({reason})")

    # -- serving --------------------------------------------------------------------------
    async def _serve(self, listener: _Listener, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(self.config.head_timeout):
                head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, TimeoutError,
                ConnectionError):
            writer.close()
            return
        if len(head) > _MAX_HEAD:
            await _refuse(writer, 431, "request head too large")
            return
        lines = head.decode("latin-1").split("\r\n")
        try:
            method, target, version = lines[0].split(" ")
        except ValueError:
            await _refuse(writer, 400, "bad request line")
            return
        headers = [line for line in lines[1:] if line]
        try:
            if method.upper() == "CONNECT":
                await self._connect(listener, reader, writer, target)
            else:
                await self._http(listener, reader, writer, method, target, version, headers)
        except EgressDeniedError as exc:
            await _refuse(writer, 403, str(exc))

    async def _open_upstream(self, addr: str, port: int
                             ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                return await asyncio.open_connection(addr, port)
        except (OSError, TimeoutError) as exc:
            raise EgressDeniedError(f"cannot reach {addr}:{port} ({exc!r})") from None

    async def _connect(self, listener: _Listener, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter, target: str) -> None:
        host, port = _split_host_port(target, 443)
        try:
            addr = await self.check(listener, host, port)
        except EgressDeniedError as exc:
            self._decide(listener, "CONNECT", host, port, False, str(exc))
            raise
        up_r, up_w = await self._open_upstream(addr, port)
        writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        await writer.drain()
        # The first record must be a ClientHello naming the same host.
        try:
            async with asyncio.timeout(self.config.head_timeout):
                first = await reader.readexactly(5)
                length = int.from_bytes(first[3:5], "big")
                first += await reader.readexactly(min(length, 1 << 14))
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            up_w.close()
            writer.close()
            return
        sni = parse_sni(first)
        if sni != host:
            reason = f"TLS SNI {sni!r} does not match the CONNECT host {host!r}"
            self._decide(listener, "CONNECT", host, port, False, reason)
            up_w.close()
            writer.close()
            return
        self._decide(listener, "CONNECT", host, port, True, "allowlisted")
        up_w.write(first)
        await _pipe_both(reader, writer, up_r, up_w, self.config.idle_timeout)

    async def _http(self, listener: _Listener, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter, method: str, target: str, version: str,
                    headers: list[str]) -> None:
        if not target.lower().startswith("http://"):
            self._decide(listener, method, "", 0, False, "not an absolute http:// URL")
            raise EgressDeniedError("only absolute http:// URLs (or CONNECT) are proxied")
        rest = target[len("http://"):]
        authority, _, path = rest.partition("/")
        if "@" in authority:
            raise EgressDeniedError("credentials in the URL are not allowed")
        host, port = _split_host_port(authority, 80)
        host_header = next((h.split(":", 1)[1].strip() for h in headers
                            if h.lower().startswith("host:")), None)
        if host_header is not None and _split_host_port(host_header, 80) != (host, port):
            reason = f"Host header {host_header!r} does not match the URL's host {host!r}"
            self._decide(listener, method, host, port, False, reason)
            raise EgressDeniedError(reason)
        try:
            addr = await self.check(listener, host, port)
        except EgressDeniedError as exc:
            self._decide(listener, method, host, port, False, str(exc))
            raise
        self._decide(listener, method, host, port, True, "allowlisted")
        up_r, up_w = await self._open_upstream(addr, port)
        kept = [h for h in headers if not h.lower().startswith(
            ("proxy-", "connection:", "keep-alive:", "host:"))]
        authority_out = host if port == 80 else f"{host}:{port}"
        out = [f"{method} /{path} {version}", f"Host: {authority_out}", *kept,
               "Connection: close", "", ""]
        up_w.write("\r\n".join(out).encode("latin-1"))
        await _pipe_both(reader, writer, up_r, up_w, self.config.idle_timeout)


def _split_host_port(value: str, default: int) -> tuple[str, int]:
    value = value.strip()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    else:
        host, port = value, ""
    try:
        number = int(port) if port else default
    except ValueError:
        raise EgressDeniedError(f"bad port in {value!r}") from None
    if not 0 < number < 65536:
        raise EgressDeniedError(f"bad port in {value!r}")
    return normalize_host(host), number


async def _refuse(writer: asyncio.StreamWriter, status: int, reason: str) -> None:
    body = f"nerve egress proxy: {reason}\n".encode()
    text = {400: "Bad Request", 403: "Forbidden", 431: "Request Header Fields Too Large"}
    with contextlib.suppress(ConnectionError):
        writer.write(f"HTTP/1.1 {status} {text.get(status, 'Error')}\r\n"
                     f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                     "Connection: close\r\n\r\n".encode() + body)
        await writer.drain()
    writer.close()


async def _pipe_both(a_r: asyncio.StreamReader, a_w: asyncio.StreamWriter,
                     b_r: asyncio.StreamReader, b_w: asyncio.StreamWriter,
                     idle: float) -> None:
    async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while True:
                async with asyncio.timeout(idle):
                    data = await src.read(65536)
                if not data:
                    break
                dst.write(data)
                await dst.drain()
        except (ConnectionError, TimeoutError):
            pass
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                if dst.can_write_eof():
                    dst.write_eof()

    tasks = [asyncio.create_task(pump(a_r, b_w)), asyncio.create_task(pump(b_r, a_w))]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in (a_w, b_w):
            w.close()
