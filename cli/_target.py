"""Finding the nerve a command talks to: ``--nats-url``, ``NERVE_NATS_URL``, or the
``nerve.json`` that ``nerve up`` writes into its data dir."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from bus import NATS_URL_ENV, Bus, ConnectOptions, connect, pid_alive
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


def port(text: str) -> int:
    """An argparse type: a TCP port, 0 for a free one."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (0-65535; 0 = a free one)")
    return value


def read_state(data_dir: Path) -> dict[str, Any] | None:
    path = data_dir / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(state, dict) or not isinstance(state.get("nats_url"), str):
        raise ConfigError(f"{path} is not what `nerve up` writes (no nats_url); if no nerve is "
                          "up there, remove it")
    return state


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
    try:
        bus = await connect(ConnectOptions.from_env(url, prefix=prefix, name=name))
    except BusError as exc:
        state = None if args.nats_url or os.environ.get(NATS_URL_ENV) else read_state(
            args.data_dir or default_data_dir())
        if state is not None and not pid_alive(state.get("pid")):
            data_dir = args.data_dir or default_data_dir()
            raise BusError(f"the nerve recorded in {data_dir / STATE_FILE} (pid "
                           f"{state.get('pid')}) is not running any more: start it again "
                           f"with `nerve up --data-dir {data_dir}`") from None
        raise exc from None
    if check_jetstream:
        try:
            await bus.require_jetstream()
        except BusError:
            await bus.close()
            raise
    return bus
