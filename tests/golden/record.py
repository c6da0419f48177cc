"""Record the golden histories: ``python -m tests.golden.record`` (rewrites the .jsonl files).

Runs each golden workflow on a real embedded nats-server with a real orchestrator and
activity worker, drives it with signals, and saves the history it produced.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from bus import ConnectOptions, EmbeddedNats, EmbeddedNatsConfig, connect, provision
from tests.golden.workflows import activities, registry
from workflow import ActivityWorker, NerveClient, Orchestrator, save_history

HERE = Path(__file__).parent


async def main() -> None:
    server = EmbeddedNats(EmbeddedNatsConfig(store_dir=Path(tempfile.mkdtemp())))
    await server.start()
    bus = await connect(ConnectOptions(servers=[server.url], prefix="golden"))
    await provision(bus)
    orch = Orchestrator(bus, "recorder", registry=registry)
    worker = ActivityWorker(activities)
    await orch.start()
    await worker.start(bus)
    client = NerveClient(bus)
    for name, ok in (("approval_approved", True), ("approval_rejected", False)):
        run_id = await client.submit("golden", workflow="approval", input={"x": 21},
                                     run_id=f"golden-{name.replace('_', '-')}")
        await client.wait(run_id, timeout=30, statuses=("waiting",))
        await client.signal(run_id, "approve", {"ok": ok}, sender="reviewer")
        await client.wait(run_id, timeout=30)
        save_history(await client.history(run_id), HERE / f"{name}.jsonl")
        print(f"recorded {name}")
    await worker.stop()
    await orch.stop()
    await bus.close()
    await server.stop()


if __name__ == "__main__":
    asyncio.run(main())
