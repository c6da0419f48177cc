"""``nerve demo``: the end-to-end demo on an embedded bus (no API key, no network)."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from actors import run
from bus import ConnectOptions, EmbeddedNats, EmbeddedNatsConfig, connect, provision
from persistence import (
    MarkerRecorded,
    RunCompleted,
    RunHistory,
    RunStarted,
    StepCompleted,
    StepScheduled,
    args_digest,
)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo", help="run the demo on an embedded bus")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="where the embedded NATS keeps its data (default: a temp dir)")
    p.set_defaults(func=lambda args: run(_demo(args)))


async def _demo(args: argparse.Namespace) -> int:
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="nerve-demo-"))
    server = EmbeddedNats(EmbeddedNatsConfig(store_dir=data_dir / "nats"))
    await server.start()
    print(f"embedded nats-server at {server.url} (ready in {server.started_in * 1000:.0f} ms, "
          f"data in {data_dir})")
    try:
        bus = await connect(ConnectOptions(servers=[server.url]))
        await provision(bus)
        run_id = f"demo-{int(time.time())}"
        history = RunHistory(bus, run_id)
        await history.create(RunStarted(run_id=run_id, tenant="demo", workflow="agent",
                                        version="1", input={"task": "add 2 and 3"}))
        args_ = {"a": 2, "b": 3}
        step = {"index": 1, "kind": "activity", "name": "add", "args_digest": args_digest(args_)}
        await history.append(MarkerRecorded(index=0, kind="now", value=time.time()))
        await history.append(StepScheduled(**step, args=args_))
        await history.append(StepCompleted(**step, result=5))
        await history.append(RunCompleted(result="2 + 3 = 5"))
        print(f"wrote run {run_id}; replaying its history:")
        for n, event in enumerate(await RunHistory(bus, run_id).read()):
            fields = event.model_dump(exclude={"v", "at", "type"}, exclude_defaults=True)
            print(f"  {n:>3}  {event.type:<16} {fields}")
        await bus.close()
    finally:
        await server.stop()
    return 0
