"""The ``api`` role of ``nerve worker`` / ``nerve up``: the HTTP API and console.

Settings (``--set KEY=VALUE``, or ``--set api.KEY=VALUE`` under ``nerve up``) are the
fields of :class:`ApiConfig` (``host``, ``port``, ``db_path``, ``heartbeat``...). The read
model lives in ``<data-dir>/api/readmodel-<id>.db`` when the worker has a data dir. The
admin key is ``$NERVE_ADMIN_KEY`` or ``<data-dir>/admin.key`` (created, mode 0600).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from api._config import ApiConfig
from api._keys import load_admin_key
from api._server import ApiServer
from bus import Bus


async def run_api(bus: Bus, opts: Any) -> None:
    """Serve the API until cancelled (``opts``: ``id``, ``data_dir``, ``settings``)."""
    data_dir = getattr(opts, "data_dir", None)
    ident = str(getattr(opts, "id", "api")).replace(".", "-")
    base: dict[str, Any] = {"instance": ident}
    if data_dir is not None:
        base["db_path"] = data_dir / "api" / f"readmodel-{ident}.db"
    config = ApiConfig.from_settings(dict(getattr(opts, "settings", {}) or {}), **base)
    admin = load_admin_key(data_dir, create=data_dir is not None)
    if admin:
        config.admin_keys = [admin]
    server = ApiServer(bus, config)
    await server.start()  # listening once this returns
    # Said once, on stderr: with port 0 (the default) nothing else tells where it is.
    print(f"nerve: API and console on {server.url}", file=sys.stderr, flush=True)
    opts.ready.set()
    try:
        await asyncio.Future()  # until cancelled
    finally:
        await server.stop()


__all__ = ["run_api"]
