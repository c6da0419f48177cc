"""``nerve upstream``: the local LLM upstream (Anthropic Messages + OpenAI chat completions).

A stand-in for a hosted model API or a pool of self-hosted replicas, for the offline demo,
tests and benchmarks: ``--replicas`` servers, each with its own prompt cache, answering with
the scripted model. Point the gateway at it with
``NERVE_LLM_UPSTREAMS=anthropic:http://127.0.0.1:8600,http://127.0.0.1:8601``, or any
Anthropic SDK with ``base_url``. It prints one JSON line ``{"urls": [...]}`` when ready.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

from actors import run
from cli._target import port


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("upstream", help="serve the local LLM upstream (Anthropic/OpenAI wire)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, default=1, help="servers, each with its own cache")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port, default=8600,
                   help="first replica's port; replica i uses port+i (0: random ports)")
    p.add_argument("--api-key", default=None, help="require this key (x-api-key or Bearer)")
    p.add_argument("--models", default=None, help="comma-separated model names to accept")
    p.add_argument("--min-cacheable", type=int, default=1024,
                   help="minimum cacheable prefix, tokens")
    p.add_argument("--capacity", type=int, default=2_000_000,
                   help="prompt cache size per replica, tokens")
    p.add_argument("--base-latency-ms", type=float, default=0.0)
    p.add_argument("--prefill-us-per-token", type=float, default=0.0,
                   help="time to first token grows by this per uncached input token")
    p.add_argument("--decode-us-per-token", type=float, default=0.0)
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="requests served at once per replica (the rest queue)")
    p.set_defaults(func=lambda args: run(_serve(args)))


async def _serve(args: argparse.Namespace) -> int:
    from gateway_actor import LocalUpstream, UpstreamConfig

    config = UpstreamConfig(
        replicas=args.replicas, host=args.host, port=args.port, api_key=args.api_key,
        models=args.models.split(",") if args.models else None,
        min_cacheable_tokens=args.min_cacheable, capacity_tokens=args.capacity,
        base_latency=args.base_latency_ms / 1000,
        prefill_per_token=args.prefill_us_per_token / 1e6,
        decode_per_token=args.decode_us_per_token / 1e6, max_concurrency=args.max_concurrency)
    upstream = LocalUpstream(config)
    await upstream.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"urls": upstream.urls}), flush=True)
    print(f"local upstream: {args.replicas} replica(s) at {', '.join(upstream.urls)} "
          "(Anthropic /v1/messages, OpenAI /v1/chat/completions); Ctrl-C stops",
          file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        await upstream.stop()
    return 0
