"""Finding the nerve a command talks to: ``--nats-url``, ``NERVE_NATS_URL``, or the
``nerve.json`` that ``nerve up`` writes into its data dir."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from bus import NATS_URL_ENV, Bus, ConnectOptions, connect
from nerve import BusError, ConfigError

DATA_DIR_ENV = "NERVE_DATA_DIR"
STATE_FILE = "nerve.json"


def default_data_dir() -> Path:
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "nerve"


def add_target_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nats-url", default=None,
                        help=f"NATS server(s) to use (or ${NATS_URL_ENV}); default: the running "
                             "`nerve up` found through --data-dir")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help=f"where `nerve up` keeps its state (or ${DATA_DIR_ENV}; default "
                             f"{default_data_dir()})")
    parser.add_argument("--prefix", default=None, help="deployment prefix (default nerve)")


def read_state(data_dir: Path) -> dict[str, Any] | None:
    path = data_dir / STATE_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None


def resolve_url(args: argparse.Namespace) -> tuple[str, str]:
    """The NATS URL and prefix to use, or a clear error saying how to get one."""
    prefix = args.prefix or os.environ.get("NERVE_PREFIX") or "nerve"
    if args.nats_url or os.environ.get(NATS_URL_ENV):
        return args.nats_url or os.environ[NATS_URL_ENV], prefix
    data_dir = args.data_dir or default_data_dir()
    state = read_state(data_dir)
    if state is None:
        raise ConfigError(
            f"no running nerve found: {data_dir / STATE_FILE} does not exist. Start one with "
            f"`nerve up --data-dir {data_dir}`, or pass --nats-url")
    return state["nats_url"], args.prefix or state.get("prefix", prefix)


async def connect_target(args: argparse.Namespace, name: str = "nerve-cli",
                         check_jetstream: bool = True) -> Bus:
    """The NATS of ``--nats-url`` / ``--data-dir``; with JetStream, unless told not to check
    (a caller that provisions next checks it there)."""
    url, prefix = resolve_url(args)
    bus = await connect(ConnectOptions.from_env(url, prefix=prefix, name=name))
    if check_jetstream:
        try:
            await bus.require_jetstream()
        except BusError:
            await bus.close()
            raise
    return bus
