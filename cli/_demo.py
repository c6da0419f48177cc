"""``nerve demo``: the whole system on this machine, offline, in about half a minute.

It starts what ``nerve up`` starts (embedded NATS, orchestrator, brain, hands, budget,
activity worker, each its own supervised process), submits a task the way ``nats pub``
would (a plain NATS client, JSON on ``nerve.tasks.demo``), follows the run's live stream,
SIGKILLs the orchestrator in the middle of the run, and shows that the run still finishes
with every step done once: the history, the owners it had, what it cost, and a replay
check of the history against the code.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import nats

from actors import ask, decode, new_id, run
from bus import ConnectOptions, connect
from cli._up import Cluster, add_up_args
from persistence import OwnerChanged, StepCompleted, StreamEvent
from workflow import NerveClient, replay_run

TASK = (
    "Write this program to a file, run it in the sandbox, and tell me what it prints:\n"
    "```python\n"
    "squares = [n * n for n in range(1, 101)]\n"
    "print(sum(squares))\n"
    "```"
)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo", help="run the whole system offline: an agent run that survives "
                                    "its orchestrator being SIGKILLed")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="where the demo keeps its data (default: a fresh temp dir)")
    p.add_argument("--no-chaos", action="store_true", help="do not kill the orchestrator")
    p.set_defaults(func=lambda args: run(_demo(args)))


def _say(text: str = "") -> None:
    print(text, flush=True)


async def _demo(args: argparse.Namespace) -> int:
    # The supervisor's own crash line repeats what the demo narrates; keep the output clean.
    logging.getLogger("nerve.supervisor").setLevel(logging.ERROR)
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="nerve-demo-"))
    # Exactly what `nerve up --data-dir D` would run.
    up_args = argparse.ArgumentParser()
    add_up_args(up_args)
    cluster = Cluster(up_args.parse_args(["--data-dir", str(data_dir)]), narrate=False)
    t0 = time.perf_counter()
    _say(f"starting nerve ({', '.join(cluster.roles)}) with data in {data_dir} ...")
    await cluster.start()
    state = cluster.state()
    _say(f"up in {time.perf_counter() - t0:.1f}s: NATS at {state['nats_url']}, "
         f"console at {state['http_url']}")
    for role, info in state["roles"].items():
        _say(f"  {role:<13} pid {info['pid']}")
    try:
        return await _scenario(cluster, args)
    finally:
        _say("\nstopping nerve ...")
        await cluster.stop()


async def _scenario(cluster: Cluster, args: argparse.Namespace) -> int:
    url = cluster.nats_url
    run_id = new_id("demo-")
    _say("\n1. a task, published by a plain NATS client, as `nats pub` would:")
    _say(f"   nats pub nerve.tasks.demo '{{\"task\": ..., \"run_id\": \"{run_id}\"}}'")
    plain = await nats.connect(url)
    await plain.publish("nerve.tasks.demo", json.dumps({"task": TASK, "run_id": run_id}).encode())
    await plain.flush()
    await plain.close()

    bus = await connect(ConnectOptions(servers=[url], prefix="nerve", name="nerve-demo"))
    client = NerveClient(bus)
    try:
        _say("\n2. the run, live (nerve.stream.<run_id>):")
        killed = await _follow(bus, run_id, cluster, chaos=not args.no_chaos)
        summary = await client.wait(run_id, timeout=120)
        events = await client.history(run_id)
        _say(f"\n3. the run {summary.status}: {json.dumps(summary.result)}")
        owners = [e for e in events if isinstance(e, OwnerChanged)]
        steps = [e for e in events if isinstance(e, StepCompleted)]
        _say(f"   history: {len(events)} events, {len(steps)} steps completed, "
             f"{len(owners)} owner change(s)")
        for e in steps:
            _say(f"     step {e.index:>2} {e.kind:<8} {e.name:<12} attempt {e.attempt}")
        if killed:
            _say(f"   the orchestrator (pid {killed}) was SIGKILLed mid-run; its restart "
                 f"replayed the history and carried on: every step above ran once.")
        report = await replay_run(bus, run_id)
        _say(f"   replay of the history against the code: {report.describe()}")
        await _spend(bus)
        _say("\nto keep nerve running and try your own tasks:  nerve up  (then, in another "
             "shell: nerve run \"...\" --follow, nerve runs, nerve show <run>)")
        return 0 if summary.status == "completed" else 1
    finally:
        await bus.close()


async def _follow(bus: Any, run_id: str, cluster: Cluster, chaos: bool) -> int | None:
    """Print the live stream; SIGKILL the orchestrator after the first tool call."""
    sub = await bus.js.subscribe(bus.names.stream(run_id), ordered_consumer=True)
    killed: int | None = None
    shown: dict[Any, str] = {}
    try:
        while True:
            msg = await sub.next_msg(timeout=120)
            ev = decode(msg.data, StreamEvent)
            if ev.type == "token":
                step = ev.data.get("index")
                before = shown.get(step, "")
                text = before[: int(ev.data.get("offset", 0))] + ev.data.get("text", "")
                print(text[len(before):] if text.startswith(before) else f"\n{text}",
                      end="", flush=True)
                shown[step] = text
            elif ev.type == "tool_call_started":
                args = json.dumps(ev.data.get("args"))
                _say(f"\n   -> {ev.data.get('name')}({args[:90]}{'...' if len(args) > 90 else ''})")
            elif ev.type == "tool_call_finished":
                _say(f"   <- {str(ev.data.get('result'))[:100]}")
                if chaos and killed is None:
                    killed = _kill_orchestrator(cluster)
            elif ev.type == "status" and ev.data.get("status") in (
                    "completed", "failed", "cancelled", "blocked"):
                return killed
    finally:
        await sub.unsubscribe()


def _kill_orchestrator(cluster: Cluster) -> int | None:
    proc = cluster.procs.get("orchestrator")
    pid = proc.pid if proc else None
    if pid:
        os.kill(pid, signal.SIGKILL)
        _say(f"   !! kill -9 {pid} (the orchestrator that owns this run)")
    return pid


async def _spend(bus: Any) -> None:
    try:
        report = await ask(bus, bus.names.budget_api, {"type": "show", "tenant": "demo"},
                           timeout=5)
    except Exception as exc:
        _say(f"   (budget not available: {exc})")
        return
    data = report if isinstance(report, dict) else {}
    rows = data.get("tenants") or [data]
    for row in rows:
        if isinstance(row, dict) and row.get("tenant") == "demo":
            _say(f"   budget: tenant demo spent ${row.get('lifetime_usd', 0):.6f} "
                 f"({row.get('lifetime_tokens', 0)} tokens, priced as "
                 f"the scripted model's stand-in); state {row.get('state')}")
