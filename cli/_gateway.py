"""``nerve gateway``: run LLM gateway actors (the brain) against a NATS server.

The model pools come from the environment (see ``GatewayConfig.from_env``):
``NERVE_GATEWAY_CONFIG`` (a JSON file), ``NERVE_LLM_UPSTREAMS`` (``anthropic:URL,URL`` or
``openai:URL,URL``), ``ANTHROPIC_API_KEY``, or else the offline scripted model.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from actors import run
from cli._target import add_target_args, connect_target


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("gateway", help="run LLM gateway actors on nerve.work.llm",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_target_args(p)
    p.add_argument("--instances", type=int, default=1, help="gateway actors in this process")
    p.add_argument("--upstreams", default=None,
                   help="like NERVE_LLM_UPSTREAMS: anthropic:http://127.0.0.1:8600,...")
    p.add_argument("--model", default=None, help="default model (NERVE_LLM_MODEL)")
    p.add_argument("--ack-wait", type=float, default=None,
                   help="seconds before a silent instance's work item goes to another "
                        "(default 5; a live one keeps its items with heartbeats)")
    p.set_defaults(func=lambda args: run(_serve(args)))


async def _serve(args: argparse.Namespace) -> int:
    from bus import provision
    from gateway_actor import GatewayActor, GatewayConfig

    env = dict(os.environ)
    if args.upstreams:
        env["NERVE_LLM_UPSTREAMS"] = args.upstreams
    if args.model:
        env["NERVE_LLM_MODEL"] = args.model
    config = GatewayConfig.from_env(env)
    bus = await connect_target(args, name="nerve-gateway", check_jetstream=False)
    await provision(bus)
    actors = [GatewayActor(config, name=f"gateway-{i}", ack_wait=args.ack_wait)
              for i in range(args.instances)]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        for actor in actors:
            await actor.start(bus)
        pools = ", ".join(f"{p.name} ({p.provider}, {len(p.upstreams)} upstream(s))"
                          for p in config.pools)
        print(f"{len(actors)} gateway actor(s) on {bus.names.work_llm}: {pools}; "
              f"default model {config.default_model}", file=sys.stderr, flush=True)
        await stop.wait()
    finally:
        errors: list[BaseException] = []
        for actor in reversed(actors):
            try:
                await actor.stop()
            except Exception as exc:
                errors.append(exc)
        await bus.close()
        if errors:
            raise errors[0]
    return 0
