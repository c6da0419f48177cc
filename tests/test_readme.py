"""The README's examples run as written."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"

pytestmark = pytest.mark.timeout(120)


def _example(heading: str) -> str:
    section = README.read_text().split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no python example under '## {heading}'"
    return match.group(1)


async def test_the_embedding_example_runs_a_workflow_in_one_process(tmp_path: Path) -> None:
    script = tmp_path / "edge.py"
    script.write_text(_example("Embedding nerve in your own process")
                      .replace("port=4250", f"port={_free_port()}"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode == 0, err.decode()[-3000:]
    assert out.decode().strip() == "{'sensor': 't1', 'value': 21.5}"
    assert (tmp_path / "edge-data" / "jetstream").is_dir()  # the history is on disk there
    assert not err.strip(), err.decode()  # stopped in order: no reconnect noise, no traceback


async def test_the_embedded_example_survives_its_nats_server_being_killed(
        tmp_path: Path) -> None:
    """The example with a durable 4 s sleep in its workflow: its nats-server is SIGKILLed
    during the sleep, the supervisor brings it back on the same port and store, and the run
    finishes (its timer re-armed from the history)."""
    example = _example("Embedding nerve in your own process")
    step = '    value = await ctx.activity(read_sensor, inp["sensor"])\n'
    assert step in example
    script = tmp_path / "edge.py"
    script.write_text(example.replace(step, step + "    await ctx.sleep(4)\n")
                      .replace("port=4250", f"port={_free_port()}"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    run_dir = tmp_path / "edge-data" / "run"
    try:
        async with asyncio.timeout(30):  # the server writes nats-server_<pid>.ports there
            while not (ports := list(run_dir.glob("nats-server_*.ports"))):
                await asyncio.sleep(0.05)
        await asyncio.sleep(1.5)  # the run is in its sleep now
        os.kill(int(ports[0].stem.rpartition("_")[2]), signal.SIGKILL)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()[-3000:]
    assert out.decode().strip() == "{'sensor': 't1', 'value': 21.5}"
    assert "nats-server crashed" in err.decode()  # and the run needed it back to finish


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
