"""``nerve apikey create|list|revoke``, and finding the HTTP API a command talks to.

The API is ``--api-url`` (or ``$NERVE_API_URL``), else the ``http_url`` the running
``nerve up`` wrote into ``<data-dir>/nerve.json``. The key is ``--api-key`` (or
``$NERVE_API_KEY``), else the operator's admin key (``$NERVE_ADMIN_KEY`` or
``<data-dir>/admin.key``, which only someone who can read that directory has).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from actors import run
from bus import NATS_URL_ENV
from cli._target import add_target_args, connect_target, default_data_dir, read_state
from nerve._errors import ConfigError

API_URL_ENV = "NERVE_API_URL"
API_KEY_ENV = "NERVE_API_KEY"


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("apikey", help="API keys for the HTTP API: create, list, revoke")
    asub = p.add_subparsers(dest="apikey_command", required=True, metavar="ACTION")

    create = asub.add_parser("create", help="a new key for a tenant (shown once)")
    create.add_argument("--tenant", required=True)
    create.add_argument("--name", default="", help="what the key is for")
    create.add_argument("--json", action="store_true")
    add_target_args(create)
    create.set_defaults(func=lambda a: run(_create(a)))

    ls = asub.add_parser("list", help="keys (never the keys themselves)")
    ls.add_argument("--tenant", default=None)
    ls.add_argument("--json", action="store_true")
    add_target_args(ls)
    ls.set_defaults(func=lambda a: run(_list(a)))

    revoke = asub.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    add_target_args(revoke)
    revoke.set_defaults(func=lambda a: run(_revoke(a)))


def add_api_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api-url", default=None,
                        help=f"the HTTP API (or ${API_URL_ENV}; default: the running `nerve up`)")
    parser.add_argument("--api-key", default=None,
                        help=f"API key (or ${API_KEY_ENV}; default: the admin key of the "
                             "running `nerve up`)")


def api_target(args: argparse.Namespace, *, required: bool = True,
               ) -> tuple[str, str | None] | None:
    """The API's URL and the key to use, or ``None`` (when not ``required``)."""
    data_dir: Path = getattr(args, "data_dir", None) or default_data_dir()
    url = getattr(args, "api_url", None) or os.environ.get(API_URL_ENV)
    if not url:
        # The data dir's nerve, unless --nats-url points elsewhere: its API serves other runs.
        state = read_state(data_dir)
        nats_url = getattr(args, "nats_url", None) or os.environ.get(NATS_URL_ENV)
        if state and (not nats_url or nats_url == state.get("nats_url")):
            url = state.get("http_url")
    if not url:
        if not required:
            return None
        raise ConfigError(f"no HTTP API found: pass --api-url (or set {API_URL_ENV}), or start "
                          f"one with `nerve up --data-dir {data_dir}`")
    from api import load_admin_key  # here: `nerve worker` should not pay for the API

    key = getattr(args, "api_key", None) or os.environ.get(API_KEY_ENV) or \
        load_admin_key(data_dir)
    return url, key


async def api_reachable(url: str) -> bool:
    import aiohttp

    try:
        async with aiohttp.ClientSession() as http, http.get(
                url.rstrip("/") + "/healthz", timeout=aiohttp.ClientTimeout(total=2)) as resp:
            return resp.status in (200, 503)
    except (aiohttp.ClientError, TimeoutError, OSError):
        return False


def _who() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


async def _create(args: argparse.Namespace) -> int:
    from api import ApiKeys

    bus = await connect_target(args, name="nerve-apikey")
    try:
        key, record = await ApiKeys(bus).create(args.tenant, name=args.name, by=_who())
    finally:
        await bus.close()
    if args.json:
        print(json.dumps({"key": key, **record.public()}))
    else:
        print(key)  # alone on stdout: KEY=$(nerve apikey create ...) is the key
        print(f"# key {record.id} for tenant {record.tenant}: shown once, store it now "
              "(only its hash is kept)", file=sys.stderr)
    return 0


async def _list(args: argparse.Namespace) -> int:
    from api import ApiKeys

    bus = await connect_target(args, name="nerve-apikey")
    try:
        records = await ApiKeys(bus).list(args.tenant)
    finally:
        await bus.close()
    if args.json:
        print(json.dumps([r.public() for r in records]))
        return 0
    print(f"{'ID':<18} {'TENANT':<16} {'CREATED':<20} {'STATE':<8} NAME")
    for r in records:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created_at))
        state = "revoked" if r.revoked_at else "active"
        print(f"{r.id:<18} {r.tenant:<16} {created:<20} {state:<8} {r.name}")
    return 0


async def _revoke(args: argparse.Namespace) -> int:
    from api import ApiKeys

    bus = await connect_target(args, name="nerve-apikey")
    try:
        found = await ApiKeys(bus).revoke(args.key_id, by=_who())
    finally:
        await bus.close()
    if not found:
        raise ConfigError(f"no API key with id {args.key_id} (see `nerve apikey list`)")
    print(f"key {args.key_id} revoked")
    return 0


async def list_runs_via_api(args: argparse.Namespace) -> list[dict[str, Any]] | None:
    """``nerve runs`` from the read model, when an API is reachable (else ``None``)."""
    target = api_target(args, required=False)
    if target is None or not await api_reachable(target[0]):
        return None
    from api import ApiClient

    params: dict[str, Any] = {"limit": str(min(max(args.limit, 1), 500))}
    if args.tenant:
        params["tenant"] = args.tenant
    if args.status:
        params["status"] = args.status
    async with ApiClient(*target) as client:
        page = await client.request("GET", "/v1/runs", params=params)
    return list(page["runs"])


__all__ = ["add_api_args", "api_reachable", "api_target", "list_runs_via_api", "register"]
