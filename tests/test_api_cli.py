"""The CLI's API commands as a person runs them: ``nerve apikey``, ``logs -f``, ``runs``,
``reindex``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from api import ApiClient
from bus import Bus, EmbeddedNats
from cli import main
from cli._api import api_reachable
from gateway_actor._script import _long_text
from tests.api_helpers import ADMIN, Api, api_stack, eventually, long_task

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def api(bus: Bus, tmp_path: Path) -> AsyncIterator[Api]:
    async with api_stack(bus, tmp_path) as stack:
        yield stack


async def nerve_process(*args: str, env: dict[str, str] | None = None,
                        ) -> tuple[int, str, str]:
    """The ``nerve`` command as a separate process."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", *args, env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


@pytest.fixture
def nerve(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    """The ``nerve`` command in this process (its own event loop, in a thread): the same
    code as the process, without paying the interpreter's start-up for every call."""
    async def call(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)
        capsys.readouterr()
        code = await asyncio.to_thread(main, list(args))
        out, err = capsys.readouterr()
        for k in env or {}:
            monkeypatch.delenv(k)
        return code, out, err

    return call


async def test_apikey_logs_runs_and_reindex_from_the_command_line(
        api: Api, nats_server: EmbeddedNats, prefix: str, tmp_path: Path, nerve) -> None:
    target = ["--nats-url", nats_server.url, "--prefix", prefix]
    code, out, _ = await nerve("apikey", "create", "--tenant", "acme", "--name", "cli",
                               "--json", *target)
    assert code == 0
    created = json.loads(out)
    key = created["key"]
    # Without --json the key is alone on stdout (KEY=$(nerve apikey create ...)), the note
    # that it is shown once on stderr.
    code, out, err = await nerve("apikey", "create", "--tenant", "acme", *target)
    assert code == 0 and out.strip().startswith("nrv_") and len(out.split()) == 1
    assert "shown once" in err
    code, out, _ = await nerve("apikey", "list", "--json", *target)
    listed = json.loads(out)
    assert created["id"] in [k["id"] for k in listed] and all("sha256" not in k for k in listed)
    assert key not in out

    client = ApiClient(api.server.url, key)
    try:
        task = long_task(80, "cli")
        run_id = (await client.request("POST", "/v1/runs", {"task": task, "tools": []}))[
            "run_id"]
    finally:
        await client.close()
    via = ["--api-url", api.server.url, "--data-dir", str(tmp_path / "none")]
    code, out, err = await nerve_process("logs", "-f", run_id, *via,
                                         env={"NERVE_API_KEY": key})
    assert code == 0, err
    assert _long_text(task, 80) in out and "[status]" in out
    # Another tenant's key sees no such run.
    other = (await api.keys.create("globex"))[0]
    code, _, err = await nerve("logs", run_id, *via, env={"NERVE_API_KEY": other})
    assert code == 2 and f"no run {run_id}" in err

    await api.server.services.projector.sync()
    code, out, _ = await nerve("runs", "--json", *via, env={"NERVE_API_KEY": key})
    assert [r["run_id"] for r in json.loads(out)] == [run_id]
    code, out, err = await nerve("reindex", *via, env={"NERVE_API_KEY": ADMIN})
    assert code == 0 and "rebuilt: 1 runs" in out, err
    code, _, err = await nerve("reindex", *via, env={"NERVE_API_KEY": key})
    assert code == 2 and "admin" in err
    code, _, _ = await nerve("apikey", "revoke", created["id"], *target)
    assert code == 0


async def test_nerve_up_serves_the_api_and_brings_it_back_on_the_same_url(
        tmp_path: Path) -> None:
    data = tmp_path / "up"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", "up", "--data-dir", str(data), "--roles", "api",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        state_file = data / "nerve.json"
        state = await eventually(lambda: _state(state_file), timeout=60)
        url = state["http_url"]
        # The role answers `nerve up`'s ping as its process starts; the listener follows.
        await eventually(lambda: api_reachable(url), timeout=60, every=0.1)
        admin = (data / "admin.key").read_text().strip()
        assert oct((data / "admin.key").stat().st_mode & 0o777) == "0o600"
        client = ApiClient(url, admin)
        try:
            assert (await client.request("GET", "/v1/whoami"))["admin"] is True
            async with client.session.get(url + "/") as resp:
                assert resp.status == 200 and "nerve console" in await resp.text()
            # SIGKILL the api process: the supervisor restarts it, on the same URL.
            pid = state["roles"]["api"]["pid"]
            os.kill(pid, signal.SIGKILL)

            async def back() -> bool:
                st = _state(state_file)
                if not st or st["roles"]["api"]["pid"] in (None, pid):
                    return False
                return await api_reachable(url)

            await eventually(back, timeout=60, every=0.2)
            assert _state(state_file)["http_url"] == url
            # The same admin key (the file outlives the process).
            assert (await client.request("GET", "/v1/whoami"))["admin"] is True
        finally:
            await client.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)


def _state(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
