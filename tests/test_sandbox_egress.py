"""Egress from a real sandbox through the host's proxy: allowed names only.

A local HTTP server (and a TLS one) stand in for the outside world; the operator pins
test names to them. The sandbox reaches an allowlisted name through the proxy; the same
server under another name, as an IP literal, an allowlisted name that resolves to a
private address, a forged Host header and a TLS handshake for another name are refused.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from sandbox_actor import EgressConfig, EgressProxy, NsBackend, NsSandbox, SandboxSpec
from sandbox_actor._egress import is_public, matches, parse_sni
from tests._sandbox import backend_config, needs_ns

pytestmark = needs_ns


@pytest.fixture
async def upstream() -> AsyncIterator[int]:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"hello from upstream, Host={request.host}")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield port
    await runner.cleanup()


@pytest.fixture
async def tls_upstream(tmp_path: Path) -> AsyncIterator[int]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    await asyncio.to_thread(subprocess.run, [
        "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
        "-out", str(cert), "-days", "1", "-subj", "/CN=allowed.test"],
        check=True, capture_output=True)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(100)
        writer.write(b"tls-echo:" + data)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=ctx)
    yield server.sockets[0].getsockname()[1]
    server.close()


@pytest.fixture
async def egress_sandbox(upstream: int, tls_upstream: int
                         ) -> AsyncIterator[tuple[NsSandbox, EgressProxy]]:
    proxy = EgressProxy(EgressConfig(
        allowed_ports={upstream, tls_upstream},
        static_hosts={"allowed.test": ["127.0.0.1"], "other.test": ["127.0.0.1"],
                      "internal.test": ["10.0.0.7"]},
        trusted_addresses={f"127.0.0.1:{upstream}", f"127.0.0.1:{tls_upstream}"}))
    backend = NsBackend(backend_config(), egress=proxy)
    sb = await backend.create(SandboxSpec(sandbox_id="egress",
                                          egress=["allowed.test", "internal.test"]))
    yield sb, proxy
    await backend.stop()
    await proxy.stop()
    shutil.rmtree(backend.config.state_dir, ignore_errors=True)


FETCH = r"""
import json, sys, urllib.request, urllib.error
out = {}
for url in sys.argv[1:]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            out[url] = [r.status, r.read().decode()]
    except urllib.error.HTTPError as e:
        out[url] = [e.code, e.read().decode()]
    except Exception as e:
        out[url] = [0, type(e).__name__]
print(json.dumps(out))
"""


async def test_allowlisted_name_goes_through_and_nothing_else_does(
        egress_sandbox: tuple[NsSandbox, EgressProxy], upstream: int) -> None:
    sb, proxy = egress_sandbox
    urls = {name: f"http://{name}:{upstream}/" for name in
            ("allowed.test", "other.test", "127.0.0.1", "internal.test", "[::1]")}
    result = await sb.exec(["/usr/bin/python3", "-c", FETCH, *urls.values()])
    seen = json.loads(result.stdout)
    status, body = seen[urls["allowed.test"]]
    assert status == 200 and body == f"hello from upstream, Host=allowed.test:{upstream}"
    assert seen[urls["other.test"]][0] == 403 and "allowlist" in seen[urls["other.test"]][1]
    assert seen[urls["127.0.0.1"]][0] == 403 and "IP literal" in seen[urls["127.0.0.1"]][1]
    assert seen[urls["[::1]"]][0] == 403
    internal = seen[urls["internal.test"]]
    assert internal[0] == 403 and "non-public" in internal[1]
    denied = {d.host for d in proxy.decisions if not d.allowed}
    assert {"other.test", "127.0.0.1", "internal.test"} <= denied
    # Without the proxy there is no way: the same server directly, by address.
    direct = await sb.exec(["/usr/bin/python3", "-c",
                            "import socket,sys\ns=socket.socket(); s.settimeout(3)\n"
                            "try: s.connect(('127.0.0.1', int(sys.argv[1]))); print('open')\n"
                            "except Exception as e: print(type(e).__name__)", str(upstream)])
    assert direct.stdout.strip() == "ConnectionRefusedError"


async def test_forged_host_header_is_refused(egress_sandbox: tuple[NsSandbox, EgressProxy],
                                             upstream: int) -> None:
    sb, _proxy = egress_sandbox
    raw = (f"GET http://allowed.test:{upstream}/ HTTP/1.1\r\n"
           f"Host: other.test:{upstream}\r\n\r\n")
    result = await sb.exec(["/usr/bin/python3", "-c",
                            "import socket,sys\ns=socket.create_connection(('127.0.0.1',3128))\n"
                            "s.sendall(sys.argv[1].encode()); print(s.recv(200).decode())", raw])
    assert result.stdout.startswith("HTTP/1.1 403"), result.stdout


TLS = r"""
import socket, ssl, sys
host, port, sni = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.create_connection(("127.0.0.1", 3128), timeout=10)
s.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
head = s.recv(200).decode()
if not head.startswith("HTTP/1.1 200"):
    print("refused:", head.split("\r\n")[0]); sys.exit()
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
try:
    t = ctx.wrap_socket(s, server_hostname=sni)
    t.sendall(b"ping"); print(t.recv(100).decode())
except Exception as e:
    print("handshake failed:", type(e).__name__)
"""


async def test_connect_checks_the_tls_server_name(egress_sandbox: tuple[NsSandbox, EgressProxy],
                                                  tls_upstream: int) -> None:
    sb, proxy = egress_sandbox
    port = str(tls_upstream)
    ok = await sb.exec(["/usr/bin/python3", "-c", TLS, "allowed.test", port, "allowed.test"])
    assert ok.stdout.strip() == "tls-echo:ping"
    fronted = await sb.exec(["/usr/bin/python3", "-c", TLS, "allowed.test", port, "other.test"])
    assert fronted.stdout.startswith("handshake failed")
    assert any("SNI" in d.reason and not d.allowed for d in proxy.decisions)
    refused = await sb.exec(["/usr/bin/python3", "-c", TLS, "other.test", port, "other.test"])
    assert refused.stdout.startswith("refused: HTTP/1.1 403")


def test_policy_helpers() -> None:
    assert matches("api.example.com", ["*.example.com"])
    assert not matches("example.com", ["*.example.com"])
    assert not matches("evilexample.com", ["*.example.com"])
    assert matches("example.com", ["Example.COM."])
    assert not matches("1.2.3.4", ["1.2.3.4"])
    for private in ("10.1.2.3", "192.168.1.1", "172.16.0.1", "127.0.0.1", "169.254.169.254",
                    "100.64.0.1", "::1", "fe80::1", "::ffff:10.0.0.1", "0.0.0.0", "fc00::1"):
        assert not is_public(private), private
    assert is_public("93.184.216.34") and is_public("2606:2800:220:1::1")
    assert parse_sni(b"\x17\x03\x03\x00\x01x") is None
