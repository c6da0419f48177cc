"""The `nerve` command as operators use it: `nerve up` with each role its own supervised
process, `nerve.json`, the client commands (JSON output), a SIGKILLed role coming back,
clear one-line errors, and a clean Ctrl-C."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest

from actors import unpack
from workflow import NerveClient, Orchestrator, RunContext, WorkflowRegistry

pytestmark = pytest.mark.timeout(180)

NERVE = [sys.executable, "-m", "cli"]


async def nerve(*args: str, check: bool = True) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *NERVE, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    if check and proc.returncode != 0:
        raise AssertionError(f"nerve {' '.join(args)} -> {proc.returncode}: {err.decode()}")
    return proc.returncode or 0, out.decode(), err.decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
async def up(tmp_path: Path) -> AsyncIterator[tuple[Path, asyncio.subprocess.Process, int]]:
    data, port = tmp_path / "nerve", free_port()
    proc = await asyncio.create_subprocess_exec(
        *NERVE, "up", "--data-dir", str(data), "--nats-port", str(port),
        "--roles", "orchestrator,activity,gateway,budget",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        start_new_session=True)  # its own process group, as a shell gives a command
    async with asyncio.timeout(60):
        while not (data / "nerve.json").exists():
            assert proc.returncode is None, "nerve up exited while starting"
            await asyncio.sleep(0.1)
    yield data, proc, port
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


def state(data: Path) -> dict[str, Any]:
    return json.loads((data / "nerve.json").read_text())


async def test_nerve_up_and_the_client_commands(
        up: tuple[Path, asyncio.subprocess.Process, int]) -> None:
    data, _proc, port = up
    info = state(data)
    assert info["nats_url"] == f"nats://127.0.0.1:{port}"
    pids = {role: r["pid"] for role, r in info["roles"].items()}
    assert set(pids) == {"orchestrator", "activity", "gateway", "budget"}
    assert all(alive(pid) for pid in pids.values()) and len(set(pids.values())) == 4

    d = ["--data-dir", str(data)]
    _, out, _ = await nerve("run", "hello [scripted:echo]", "--tenant", "acme", "--wait",
                            "--json", "--input", '{"tools": []}', *d)
    done = json.loads(out)
    assert done["status"] == "completed" and done["result"]["answer"] == "hello"
    _, out, _ = await nerve("runs", "--json", *d)
    assert done["run_id"] in {r["run_id"] for r in json.loads(out)}
    _, out, _ = await nerve("show", done["run_id"], "--json", *d)
    shown = json.loads(out)
    assert shown["events"][0]["type"] == "run_started"
    assert shown["events"][-1]["type"] == "run_completed"
    _, out, _ = await nerve("replay", done["run_id"], *d)
    assert "deterministic" in out

    # A run that never ends by itself, cancelled from the CLI.
    _, out, _ = await nerve("run", "go on [scripted:loop]", "--json", "--input",
                            '{"tools": ["run"], "max_turns": 1000}', *d)
    looping = json.loads(out)["run_id"]
    await nerve("cancel", looping, *d)
    async with asyncio.timeout(30):
        while True:
            _, out, _ = await nerve("show", looping, "--json", *d)
            if json.loads(out)["summary"]["status"] == "cancelled":
                break
            await asyncio.sleep(0.2)

    # One nerve per data dir: a second `nerve up` there is refused and changes nothing.
    code, _, err = await nerve("up", *d, check=False)
    assert code == 2 and f"nerve is already up in {data} (pid {info['pid']})" in err
    assert state(data)["roles"] == info["roles"]

    # Mistakes get one clear line, not a traceback.
    code, _, err = await nerve("show", "no-such-run", *d, check=False)
    assert code == 2 and err.startswith("nerve: error: no run no-such-run")
    assert "Traceback" not in err
    code, _, err = await nerve("signal", done["run_id"], "x", "{not json", *d, check=False)
    assert code == 2 and "not valid JSON" in err
    # A task the orchestrator refuses never becomes a run: --wait and --follow say why at
    # once instead of waiting for it forever.
    for mode in ("--wait", "--follow"):
        code, _, err = await nerve("run", "x", "--workflow", "no-such-workflow", mode, *d,
                                   check=False)
        assert code == 2, err
        assert "the task was rejected: no workflow named 'no-such-workflow'" in err
    code, _, err = await nerve("fork", done["run_id"], "--at", "999", "--wait", *d,
                               check=False)
    assert code == 2 and "the fork was rejected: cannot fork" in err
    _, out, _ = await nerve("fork", done["run_id"], "--at", "2", "--wait", "--json", *d)
    assert json.loads(out)["status"] == "completed"
    # A tool call that needs a person: `nerve show` says which approval the run waits
    # for and how to decide it; an approval that names none of them is refused up front.
    _, out, _ = await nerve("run", "compute 7*6 in python", "--input",
                            '{"tools": ["run"], "requires_approval": ["run"]}', *d)
    gated = out.strip()
    async with asyncio.timeout(30):
        while True:
            _, out, _ = await nerve("show", gated, "--json", *d)
            pending = json.loads(out)["summary"]["approvals"]
            if pending:
                break
            await asyncio.sleep(0.2)
    digest = pending[0]["digest"]
    _, out, _ = await nerve("show", gated, *d)
    assert f"--approves {digest}" in out.splitlines()[-1]
    code, _, err = await nerve("signal", gated, "approval", '{"approved": true}', *d,
                               check=False)
    assert code == 2 and f"no pending approval (no --approves given) named 'approval'; " \
        f"pending: {digest}" in err
    code, _, err = await nerve("signal", gated, "approval", '{"yes": 1}', "--approves", digest,
                               *d, check=False)
    assert code == 2 and "an approval's payload is" in err
    await nerve("signal", gated, "approval", '{"approved": false}', "--approves", digest, *d)
    async with asyncio.timeout(30):
        while json.loads((await nerve("show", gated, "--json", *d))[1])["summary"][
                "status"] != "completed":
            await asyncio.sleep(0.2)

    # A reader that goes away (`nerve show ... | head`) ends the command quietly.
    read_end, write_end = os.pipe()
    os.close(read_end)
    reader_gone = await asyncio.create_subprocess_exec(
        *NERVE, "show", gated, *d, stdout=write_end, stderr=asyncio.subprocess.PIPE)
    os.close(write_end)
    _, err_bytes = await asyncio.wait_for(reader_gone.communicate(), 60)
    assert reader_gone.returncode == 141 and b"Traceback" not in err_bytes, err_bytes

    # A run that has ended takes no more messages (as the API answers 409).
    code, _, err = await nerve("signal", done["run_id"], "x", "{}", *d, check=False)
    assert code == 2 and "is completed already; a signal would change nothing" in err
    code, _, err = await nerve("cancel", done["run_id"], *d, check=False)
    assert code == 2 and "is completed already; nothing to cancel" in err
    code, _, err = await nerve("runs", "--data-dir", str(data / "nowhere"), check=False)
    assert code == 2 and "nerve up --data-dir" in err


async def test_a_sigkilled_role_comes_back_and_ctrl_c_stops_everything(
        up: tuple[Path, asyncio.subprocess.Process, int]) -> None:
    data, proc, _ = up
    nats_pid = state(data)["nats_pid"]
    before = state(data)["roles"]
    events = await nats.connect(state(data)["nats_url"])
    restarts = await events.jetstream().subscribe("nerve.events.supervisor")
    os.kill(before["gateway"]["pid"], signal.SIGKILL)
    async with asyncio.timeout(30):
        while state(data)["roles"]["gateway"]["pid"] in (before["gateway"]["pid"], None):
            await asyncio.sleep(0.1)
    after = state(data)["roles"]
    assert alive(after["gateway"]["pid"])
    seen = []
    async with asyncio.timeout(10):  # the restart is an event anyone can subscribe to
        while ("gateway", "restarting") not in seen:
            msg = await restarts.next_msg(timeout=10)
            event = unpack(msg.data)
            seen.append((event["child"], event["kind"]))
    assert ("gateway", "crashed") in seen
    await events.close()
    assert after["orchestrator"]["pid"] == before["orchestrator"]["pid"]  # one for one
    _, out, _ = await nerve("run", "still here [scripted:echo]", "--wait", "--json",
                            "--input", '{"tools": []}', "--data-dir", str(data))
    assert json.loads(out)["result"]["answer"] == "still here"

    # The embedded server too: it comes back, and nerve.json names the new one.
    os.kill(nats_pid, signal.SIGKILL)
    async with asyncio.timeout(30):
        while state(data)["nats_pid"] == nats_pid or not alive(state(data)["nats_pid"]):
            await asyncio.sleep(0.1)
    new_nats_pid = state(data)["nats_pid"]

    # Ctrl-C in a terminal: SIGINT to the whole foreground process group at once. nerve
    # up stops the roles, then the server, in order: nothing stops under the others.
    os.killpg(proc.pid, signal.SIGINT)
    assert await asyncio.wait_for(proc.wait(), 60) == 0
    assert proc.stdout is not None
    said = (await proc.stdout.read()).decode()
    assert "nerve: stopping" in said
    for trouble in ("Traceback", "crashed", "unexpectedly", "ignored SIGTERM"):
        assert trouble not in said.split("nerve: stopping")[1], said
    everyone = [r["pid"] for r in after.values()] + [nats_pid, new_nats_pid]
    assert not any(alive(pid) for pid in everyone)
    assert not (data / "nerve.json").exists()


async def test_a_sigkilled_nerve_up_takes_its_server_and_roles_with_it(
        up: tuple[Path, asyncio.subprocess.Process, int]) -> None:
    """No Ctrl-C, no cleanup code: the kernel stops the embedded server (SIGTERM, a clean
    shutdown) and the role processes, so the port and the store are free for the next
    `nerve up` on the same data dir."""
    data, proc, port = up
    info = state(data)
    everyone = [r["pid"] for r in info["roles"].values()] + [info["nats_pid"]]
    assert all(alive(pid) for pid in everyone)
    proc.kill()
    await proc.wait()
    async with asyncio.timeout(20):
        while any(alive(pid) for pid in everyone):
            await asyncio.sleep(0.1)
    again = await asyncio.create_subprocess_exec(
        *NERVE, "up", "--data-dir", str(data), "--nats-port", str(port),
        "--roles", "orchestrator,activity", stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL)
    try:
        async with asyncio.timeout(60):
            while not (data / "nerve.json").exists() or state(data)["nats_pid"] in everyone:
                assert again.returncode is None, "nerve up did not start again"
                await asyncio.sleep(0.1)
    finally:
        again.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(again.wait(), 60) == 0


async def test_a_misconfigured_role_stops_nerve_up_at_once_with_its_reason(
        tmp_path: Path, nats_server, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "nerve"
    base = ["up", "--data-dir", str(data), "--roles", "orchestrator,activity"]
    code, out, err = await nerve(*base, "--set", "orchestrator.host_ttl=abc", check=False)
    # The role's own message, once: restarting it would only fail the same way again.
    assert code == 2, (out, err)
    assert "nerve: error: orchestrator setting host_ttl='abc' must be a number" in err
    assert "Traceback" not in err and "nerve: restarting" not in out + err
    log = (data / "logs" / "orchestrator.log").read_text()
    assert log.count("nerve: error:") == 1
    assert not (data / "nerve.json").exists()

    code, _, err = await nerve(*base, "--set", "orchestratr.host_ttl=1", check=False)
    assert code == 2 and "--set 'orchestratr.host_ttl=1': wants ROLE.KEY=VALUE" in err
    code, _, err = await nerve(*base, "--set", "host_ttl=1", check=False)
    assert code == 2 and "wants ROLE.KEY=VALUE" in err

    # The same refusal from `nerve worker` itself: exit status EX_CONFIG (78).
    code, _, err = await nerve("worker", "--role", "activity", "--nats-url", nats_server.url,
                               "--set", "concurrency=4", check=False)
    assert code == 78
    assert "nerve: error: activity has no setting 'concurrency'; it takes: no settings" in err

    # A workflows module that raises when imported, and an API port taken: the same.
    (tmp_path / "raisemod.py").write_text('raise RuntimeError("boom at import")\n')
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{os.environ.get('PYTHONPATH', '')}")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        for extra, expected in (
                (["--workflows", "raisemod"], "importing workflows module 'raisemod' failed at "
                 f"{tmp_path / 'raisemod.py'}:1: RuntimeError: boom at import"),
                (["--roles", "api", "--http-port", str(taken.getsockname()[1])],
                 "the API cannot listen on 127.0.0.1:")):
            code, out, err = await nerve("up", "--data-dir", str(tmp_path / "again"),
                                         *(base[3:] if extra[0] != "--roles" else []),
                                         *extra, check=False)
            assert code == 2 and expected in err, (out, err)
            assert "nerve: restarting" not in out + err
    finally:
        taken.close()


async def test_a_nats_without_jetstream_or_without_nerve_gets_one_clear_line(
        nats_server) -> None:
    from bus import find_nats_server

    port = free_port()
    plain = await asyncio.create_subprocess_exec(  # a server started without -js
        str(find_nats_server()), "-a", "127.0.0.1", "-p", str(port),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        url = f"nats://127.0.0.1:{port}"
        async with asyncio.timeout(10):
            while True:
                try:
                    probe = await nats.connect(url, allow_reconnect=False)
                except (OSError, nats.errors.Error):
                    await asyncio.sleep(0.05)
                    continue
                await probe.close()
                break
        for args in (["run", "hi"], ["worker", "--role", "activity"]):
            code, _, err = await nerve(*args, "--nats-url", url, check=False)
            assert code == 2 and "has no JetStream" in err and "start nats-server with -js" \
                in err, err
            assert "Traceback" not in err
    finally:
        plain.kill()
        await plain.wait()

    # JetStream, but nerve has never run there (here: a prefix nobody provisioned).
    d = ["--nats-url", nats_server.url, "--prefix", "neverprovisioned"]
    code, _, err = await nerve("run", "hi", *d, check=False)
    assert code == 2 and "no stream stores neverprovisioned.tasks.default" in err, err
    code, out, err = await nerve("runs", *d, check=False)
    assert code == 0 and out.startswith("RUN"), err
    code, _, err = await nerve("show", "r1", *d, check=False)
    assert code == 2 and "no stream NEVERPROVISIONED_RUNS on this NATS" in err, err


async def test_mistakes_get_one_line_saying_what_is_wrong_never_a_traceback(
        tmp_path: Path, nats_server, bus) -> None:
    d = ["--nats-url", nats_server.url, "--prefix", bus.names.prefix]
    afile = tmp_path / "afile"
    afile.write_text("")
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "nerve.json").write_text("{}")
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "nerve.json").write_text(json.dumps({"nats_url": f"nats://127.0.0.1:"
                                                  f"{free_port()}", "pid": 2 ** 22 + 1}))
    cases = [
        (["run", "x", "--input", "[1]", *d], "invalid task: input"),
        (["run", "x", "--tenant", "rejected", *d], "tenant 'rejected' is reserved"),
        (["up", "--roles", "orchestrator,orchestrator", "--data-dir", str(tmp_path / "u")],
         "name each role to start once"),
        (["up", "--roles", "", "--data-dir", str(tmp_path / "u")], "name each role"),
        (["up", "--data-dir", str(afile)], "cannot use"),
        (["up", "--http-port", "99999"], "99999 is not a port"),
        (["runs", "--data-dir", str(odd)], "is not what `nerve up` writes"),
        (["show", "r1", "--data-dir", str(stale)], "is not running any more"),
        (["runs", "--status", "weird", *d], "invalid choice: 'weird'"),
        (["runs", "--limit", "0", *d], "0: at least 1"),
        (["logs", "r1", "--api-url", f"http://127.0.0.1:{free_port()}"], "does not answer"),
    ]
    for args, expected in cases:
        code, _, err = await nerve(*args, check=False)
        assert code == 2 and expected in err, (args, code, err)
        assert "Traceback" not in err, (args, err)


async def test_follow_and_wait_are_bounded_by_timeout_and_name_the_run_at_once(
        nats_server, bus) -> None:
    """No orchestrator here: the task stays queued, and both say so at --timeout."""
    d = ["--nats-url", nats_server.url, "--prefix", bus.names.prefix]
    for mode in ("--wait", "--follow"):
        code, _, err = await nerve("run", "x", mode, "--timeout", "1", *d, check=False)
        assert code == 2 and "did not start within --timeout 1.0s: no orchestrator" in err, err
    registry = WorkflowRegistry()

    @registry.register(name="waits_long")
    async def waits_long(ctx: RunContext, inp: dict[str, Any]) -> None:
        await ctx.wait_signal("never", timeout=600)

    orch = Orchestrator(bus, "orch-cli-timeout", registry=registry)
    await orch.start()
    try:
        code, out, err = await nerve("run", "x", "--workflow", "waits_long", "--input", "{}",
                                     "--follow", "--json", "--timeout", "2", *d, check=False)
        # Mistakes about a run that exists.
        run_id = await NerveClient(bus).submit("acme", workflow="waits_long", input={})
        await NerveClient(bus).wait(run_id, timeout=20, statuses=("waiting",))
        for args, expected in ((["signal", run_id, "bad name!"], "invalid signal: name"),
                               (["fork", run_id, "--at", "0"], "invalid fork: at")):
            code2, _, err2 = await nerve(*args, *d, check=False)
            assert code2 == 2 and expected in err2 and "Traceback" not in err2, err2
        # A name no wait has (a typo, most often): sent, kept, and said so.
        code2, _, err2 = await nerve("signal", run_id, "Never", "{}", *d)
        assert f"run {run_id} waits for never now; the signal 'Never' is kept" in err2
    finally:
        await orch.stop()
    assert code == 2 and "did not end within --timeout 2.0s (it goes on" in err, err
    events = [json.loads(line) for line in out.splitlines()]  # --json: one event per line
    assert events[0]["type"] == "run" and events[0]["data"]["run_id"].startswith("r")
    assert {"type": "status", "data": {"status": "waiting"}} in events


async def test_the_nerve_script_finds_a_workflows_module_in_the_current_directory(
        nats_server, tmp_path: Path) -> None:
    """`nerve worker`/`nerve replay --workflows mymodule` run where mymodule.py is, as
    `nerve up` does (the installed script, unlike `python -m`, has no cwd on its path)."""
    (tmp_path / "cwdmod.py").write_text('raise RuntimeError("found and imported")\n')
    script = Path(sys.executable).parent / "nerve"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = await asyncio.create_subprocess_exec(
        str(script), "worker", "--role", "activity", "--workflows", "cwdmod",
        "--nats-url", nats_server.url, cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 78
    assert "importing workflows module 'cwdmod' failed" in err.decode(), err.decode()
    assert "RuntimeError: found and imported" in err.decode()


async def test_a_role_killed_again_and_again_comes_back_after_growing_waits(
        up: tuple[Path, asyncio.subprocess.Process, int]) -> None:
    """Each death within 10 s of the role's start doubles the wait before the next start:
    a role killed as soon as it is back (a tester, a crash at start-up) does not spin, and
    does not spend the restart budget that would stop the whole of nerve up."""
    data, proc, _ = up
    waits = []
    for _ in range(4):
        pid = state(data)["roles"]["activity"]["pid"]
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        async with asyncio.timeout(60):
            while state(data)["roles"]["activity"]["pid"] in (pid, None):
                await asyncio.sleep(0.05)
        waits.append(time.monotonic() - killed)
    assert proc.returncode is None and alive(state(data)["roles"]["activity"]["pid"])
    # Lower bounds only: a wait is never shorter than asked (0.5 s, then 1, 2, 4).
    assert all(w >= 0.5 * 2 ** k for k, w in enumerate(waits)), waits
