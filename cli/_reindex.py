"""``nerve reindex``: rebuild the API's read model from the streams.

With a running API (``nerve up``, or ``--api-url``) it asks the API to rebuild and swap its
database in (``POST /v1/admin/reindex``, admin key). Without one, ``--db PATH`` rebuilds that
file offline (no API may be using it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path

from actors import run
from cli._api import add_api_args, api_reachable, api_target
from cli._target import add_target_args, connect_target
from nerve._errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("reindex", help="rebuild the HTTP API's read model from the streams")
    p.add_argument("--db", type=Path, default=None,
                   help="rebuild this database file offline instead (no API may be using it)")
    add_api_args(p)
    add_target_args(p)
    p.set_defaults(func=lambda a: run(_reindex(a)))


async def _reindex(args: argparse.Namespace) -> int:
    from api import ApiClient, rebuild  # here: other commands should not pay for the API

    if args.db is None:
        target = api_target(args)
        assert target is not None
        if not await api_reachable(target[0]):
            raise ConfigError(f"the API at {target[0]} does not answer; start it, or rebuild a "
                              "database file offline with --db PATH")
        async with ApiClient(*target, timeout=3600) as client:
            out = await client.request("POST", "/v1/admin/reindex")
        print(f"read model rebuilt: {out['runs']} runs, position {out['position']}, "
              f"{out['seconds']:.1f}s")
        return 0
    bus = await connect_target(args, name="nerve-reindex")
    t0 = time.perf_counter()
    tmp = args.db.with_name(f".{args.db.name}.rebuild-{os.getpid()}")
    try:
        model = await rebuild(bus, tmp)
        position, runs = model.position, sum((await model.counts()).values())
        await model.close()
    finally:
        await bus.close()
    await asyncio.to_thread(_replace, tmp, args.db)
    print(f"read model {args.db} rebuilt: {runs} runs, position {position}, "
          f"{time.perf_counter() - t0:.1f}s")
    return 0


def _replace(new: Path, live: Path) -> None:
    for suffix in ("-wal", "-shm"):
        Path(str(live) + suffix).unlink(missing_ok=True)
    os.replace(new, live)


__all__ = ["register"]
