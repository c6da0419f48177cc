"""Chaos: the API server process is SIGKILLed in the middle of a token stream and started
again on the same port. The client resumes from its last event id: the text it assembles
equals the model's output exactly, and it saw every event once, in order."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import pytest

from api import ApiClient, ApiKeys, SseEvent
from bus import Bus, EmbeddedNats
from gateway_actor._script import _long_text
from tests.api_helpers import ADMIN, engine, long_task

pytestmark = pytest.mark.timeout(120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ApiProcess:
    """``nerve worker --role api`` as a real OS process on a fixed port."""

    def __init__(self, server: EmbeddedNats, prefix: str, port: int, db: Path) -> None:
        self.server, self.prefix, self.port, self.db = server, prefix, port, db
        self.proc: asyncio.subprocess.Process | None = None
        self.url = f"http://127.0.0.1:{port}"

    async def start(self) -> None:
        env = dict(os.environ, NERVE_ADMIN_KEY=ADMIN)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli", "worker", "--role", "api", "--id", "api-chaos",
            "--nats-url", self.server.url, "--prefix", self.prefix,
            "--set", f"port={self.port}", "--set", f"db_path={self.db}",
            "--set", "heartbeat=1", env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        async with aiohttp.ClientSession() as http, asyncio.timeout(30):
            while True:
                try:
                    async with http.get(self.url + "/healthz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                assert self.proc.returncode is None, "the API process died on start"
                await asyncio.sleep(0.05)

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


def assemble(events: list[SseEvent]) -> dict[int, str]:
    texts: dict[int, str] = {}
    for ev in events:
        if ev.event == "token":
            d = ev.json()["data"]
            texts[d["index"]] = texts.get(d["index"], "")[:d["offset"]] + d["text"]
    return texts


async def test_sigkill_of_the_api_mid_stream_loses_and_repeats_nothing(
        bus: Bus, nats_server: EmbeddedNats, prefix: str, tmp_path: Path) -> None:
    words = 1200
    task = long_task(words, "chaos")
    proc = ApiProcess(nats_server, prefix, free_port(), tmp_path / "rm.db")
    key, _ = await ApiKeys(bus).create("acme")
    # The gateway streams the scripted model's text a few words every 4 ms.
    async with engine(bus, token_delay=0.004) as nerve:
        await proc.start()
        client = ApiClient(proc.url, key)
        try:
            run_id = (await client.request("POST", "/v1/runs", {"task": task, "tools": []}))[
                "run_id"]
            got: list[SseEvent] = []
            killed_at: int | None = None
            restarted: asyncio.Task[None] | None = None
            async with asyncio.timeout(60):
                async for ev in client.follow(run_id):
                    got.append(ev)
                    tokens = sum(e.event == "token" for e in got)
                    if killed_at is None and tokens == 10:
                        # Mid-stream: the model is still talking (the final answer is far off).
                        assert not any(e.event == "final" for e in got)
                        await proc.kill()
                        killed_at = len(got)
                        restarted = asyncio.create_task(proc.start())
            assert restarted is not None and killed_at is not None
            await restarted
            # The restarted server saw the client come back with its last id.
            async with aiohttp.ClientSession() as http, http.get(proc.url + "/metrics") as r:
                assert "nerve_api_sse_resumes_total 1" in await r.text()
        finally:
            await client.close()
            await proc.close()
        summary = await nerve.wait(run_id, timeout=30)

    answer = summary.result["answer"]
    assert answer == _long_text(task, words)
    # The assembled text is the model's output, exactly.
    assert list(assemble(got).values()) == [answer]
    # Every event once, in order, none missing: the same ids as a replay from the stream.
    ids = [e.id for e in got if e.id is not None]
    assert ids == sorted(set(ids))
    assert len(got) > killed_at + 1  # events came from the restarted server
    replay_ids = []
    async for seq, _data, _h in _stream(bus, run_id):
        replay_ids.append(seq)
    assert ids == replay_ids
    assert got[-1].event == "end" and got[-1].json()["status"] == "completed"


async def _stream(bus: Bus, run_id: str):
    from persistence import direct_get_subject

    async for item in direct_get_subject(bus, bus.names.stream_stream, bus.names.stream(run_id)):
        yield item
