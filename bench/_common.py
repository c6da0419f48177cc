"""Shared plumbing for the benchmark scripts: arguments, servers, percentiles, output.

Every script prints human-readable figures and, with ``--json``, one JSON object on its last
line. ``--quick`` shrinks the workload to run in well under a minute. Figures that depend on
this shared, noisy machine are reported beside a baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from bus import Bus, ConnectOptions, EmbeddedNats, EmbeddedNatsConfig, connect, provision


def parse_args(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    p.add_argument("--json", action="store_true", help="end with one JSON line of figures")
    return p.parse_args()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def summary_ms(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {"p50_ms": round(pct(ms, 50), 4), "p99_ms": round(pct(ms, 99), 4),
            "mean_ms": round(statistics.fmean(ms), 4) if ms else float("nan")}


@asynccontextmanager
async def embedded_bus(sync_always: bool = True, prefix: str = "bench",
                       ) -> AsyncIterator[tuple[EmbeddedNats, Bus]]:
    store = Path(tempfile.mkdtemp(prefix="nerve-bench-"))
    server = EmbeddedNats(EmbeddedNatsConfig(store_dir=store, sync_always=sync_always))
    await server.start()
    bus = await connect(ConnectOptions(servers=[server.url], prefix=prefix))
    await provision(bus)
    try:
        yield server, bus
    finally:
        await bus.close()
        await server.stop()


def report(title: str, figures: dict[str, Any], as_json: bool) -> None:
    print(f"\n== {title}")
    for key, value in figures.items():
        print(f"  {key:<44} {value}")
    if as_json:
        print(json.dumps(figures, sort_keys=True))
