"""The gvisor backend on runsc: isolation, and checkpoint-based snapshot and fork."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bus import Bus
from nerve import SandboxCrashed
from sandbox_actor import SandboxLimits, SandboxSpec, WorkspaceStore
from sandbox_actor._gvisor import GvisorBackend
from tests._sandbox import backend_config, py, sh

_probe = GvisorBackend.probe(backend_config(Path("/tmp")))
pytestmark = [pytest.mark.skipif(not _probe.available,
                                 reason=f"gvisor unavailable: {_probe.problems}"),
              pytest.mark.timeout(180)]


@pytest.fixture
async def backend() -> AsyncIterator[GvisorBackend]:
    b = GvisorBackend(backend_config(host_id="gv"))
    yield b
    await b.stop()
    shutil.rmtree(b.config.state_dir, ignore_errors=True)


async def test_gvisor_sandbox_isolation(backend: GvisorBackend, tmp_path: Path,
                                        nats_server) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("GVISOR-HOST-SECRET")
    os.chmod(tmp_path, 0o755)
    sb = await backend.create(SandboxSpec(sandbox_id="gv-iso",
                                          limits=SandboxLimits(memory_mb=128, timeout=30)))
    port = int(nats_server.url.rsplit(":", 1)[1])
    code = ("import json,socket,sys\nout={}\n"
            "try: out['read']=open(sys.argv[1]).read()\n"
            "except Exception as e: out['read']=type(e).__name__\n"
            "s=socket.socket(); s.settimeout(3)\n"
            "try: s.connect(('127.0.0.1', int(sys.argv[2]))); out['nats']='connected'\n"
            "except Exception as e: out['nats']=type(e).__name__\n"
            "import os\nout['pids']=sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
            "out['uid']=os.getuid()\nprint(json.dumps(out))")
    result = await sb.exec(["/usr/bin/python3", "-c", code, str(secret), str(port)])
    seen = json.loads(result.stdout)
    assert seen["read"] == "FileNotFoundError" and seen["nats"] != "connected"
    assert seen["uid"] == 1000 and len(seen["pids"]) <= 3
    timeout = await sb.exec(sh("sleep 100"), timeout=1)
    assert timeout.timed_out
    assert (await sb.exec(sh("echo still-here"))).stdout == "still-here\n"
    # Past its memory limit the whole Sentry is OOM-killed: the sandbox crashes (and the
    # runner restores it from its last snapshot); nothing outside it is touched.
    with pytest.raises(SandboxCrashed):
        await sb.exec(py("b = bytearray(400 * 1024 * 1024); print('allocated')"))
    assert not sb.alive


async def test_gvisor_snapshot_and_fork_carry_process_memory(backend: GvisorBackend,
                                                             bus: Bus) -> None:
    store = WorkspaceStore(bus)
    sb = await backend.create(SandboxSpec(sandbox_id="gv-origin"))
    # A process that holds state only in memory: a counter server on a FIFO-free socket.
    # It replaces the file whole: a reader never catches it truncated and still empty.
    await sb.exec(sh("echo base > f; (python3 -c \"import os, time\nn=0\nwhile True:\n"
                     " n+=1; open('/tmp/beat.t','w').write(str(n)); "
                     "os.replace('/tmp/beat.t', '/tmp/beat'); time.sleep(0.05)\" &)"))
    ref = await backend.snapshot(sb, store, seq=1, step_index=1, step_key="r:1")
    manifest = await store.get_manifest(ref.name)
    assert manifest.kind == "gvisor" and manifest.image_size > 0
    await sb.exec(sh("echo origin-only >> f"))
    fork_a = await backend.fork(ref.name, store, SandboxSpec(sandbox_id="gv-a"))
    fork_b = await backend.fork(ref.name, store, SandboxSpec(sandbox_id="gv-b"))
    await fork_a.exec(sh("echo a >> f"))
    await fork_b.exec(sh("echo b >> f"))
    assert (await fork_a.exec(sh("cat f"))).stdout == "base\na\n"
    assert (await fork_b.exec(sh("cat f"))).stdout == "base\nb\n"
    assert (await sb.exec(sh("cat f"))).stdout == "base\norigin-only\n"
    # The background process came back inside each fork, still counting.
    ps = await fork_a.exec(sh("ps -eo args | grep -c 'open(./tmp/beat'"))
    assert int(ps.stdout.strip() or 0) >= 1
    first = int((await fork_b.exec(sh("cat /tmp/beat"))).stdout)
    later = int((await fork_b.exec(sh("sleep 0.3; cat /tmp/beat"))).stdout)
    assert later > first
