"""Benchmark: the LLM gateway's prompt caching and cache-aware routing.

A multi-turn agent workload (hundreds of runs, 15 turns each, a shared 4k-token system
prompt and tools, a context that grows by a tool result of 200-1000 tokens every turn, a
5-30 ms tool run between turns) against 4 replicas of
the local upstream (``nerve upstream``, in its own process, each replica with its own prompt
cache and a time to first token that grows with the tokens it has to compute). The same
workload runs four ways, in one process run:

* ``affinity``: the gateway as shipped (cache planner + rendezvous routing, bounded load);
* ``round_robin`` and ``least_loaded``: the same planner, routing without affinity;
* ``no_cache``: affinity routing, no cache breakpoints (what a pass-through pays).

Reported per strategy: cache hit rate (cache-read tokens / all input tokens), input cost
(USD at $3/MTok base: writes 1.25x / 2x, reads 0.1x) and its reduction against no caching,
p50 time to first token, and replica load (max/mean of calls per replica). Then the gateway's
overhead per call over the upstream's own time (each call paired with the upstream's
server-side measurement by message id), sequential calls: through the gateway, through the
bare SDK, through a raw aiohttp client (the floor of any Python client), for the anthropic
and the openai provider; the gateway core alone (a provider that does no I/O); and the whole
actor path over the bus (work item published to step result received), for information.

    python bench/gateway.py [--quick] [--json] [--runs N] [--turns N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anthropic

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors import StepResult, WorkItem, decode, encode
from bus import ConnectOptions, EmbeddedNats, EmbeddedNatsConfig, connect, provision
from gateway_actor import (
    Gateway,
    GatewayActor,
    GatewayConfig,
    LLMRequest,
    LLMResponse,
    Message,
    TextBlock,
    ToolResultBlock,
    ToolSpec,
    ToolUseBlock,
)
from gateway_actor._openai_wire import to_openai

BASE_PRICE = 3.0 / 1e6  # USD per input token
STRATEGIES = ("affinity", "round_robin", "least_loaded", "no_cache")
TOOLS = [
    ToolSpec(name="write_file", description="Write a file in the sandbox workspace.",
             input_schema={"type": "object", "required": ["path", "content"],
                           "properties": {"path": {"type": "string"},
                                          "content": {"type": "string"}}}),
    ToolSpec(name="run", description="Run a shell command in the sandbox.",
             input_schema={"type": "object", "required": ["command"],
                           "properties": {"command": {"type": "string"}}}),
    ToolSpec(name="read_file", description="Read a file from the sandbox workspace.",
             input_schema={"type": "object", "required": ["path"],
                           "properties": {"path": {"type": "string"}}}),
]
_VOCAB = ("alpha", "beta", "gamma", "delta", "sigma", "omega", "kappa", "lambda", "theta",
          "zeta", "stdout", "result", "value", "error", "ok", "file", "line", "build")


def words(rng: random.Random, tokens: int) -> str:
    out: list[str] = []
    size = 0
    while size < tokens * 4:
        w = rng.choice(_VOCAB) + str(rng.randint(0, 999))
        out.append(w)
        size += len(w) + 1
    return " ".join(out)


SYSTEM = words(random.Random(7), 4000)  # the agent's instructions: ~4k tokens, shared


@dataclass
class Call:
    run: int
    turn: int
    upstream: str
    ttft_ms: float | None
    latency_ms: float | None
    input: int
    read: int
    write_5m: int
    write_1h: int


@dataclass
class Outcome:
    calls: list[Call] = field(default_factory=list)
    wall: float = 0.0
    server_ttft_ms: list[float] = field(default_factory=list)

    def summary(self, replicas: int) -> dict[str, float]:
        total = sum(c.input + c.read + c.write_5m + c.write_1h for c in self.calls)
        read = sum(c.read for c in self.calls)
        cost = BASE_PRICE * sum(c.input + 1.25 * c.write_5m + 2.0 * c.write_1h + 0.1 * c.read
                                for c in self.calls)
        per: dict[str, int] = {}
        for c in self.calls:
            per[c.upstream] = per.get(c.upstream, 0) + 1
        loads = [per.get(k, 0) for k in sorted(per)] + [0] * (replicas - len(per))
        ttfts = [c.ttft_ms for c in self.calls if c.ttft_ms is not None]
        server = self.server_ttft_ms
        return {"calls": len(self.calls), "hit_rate": read / total if total else 0.0,
                "input_cost_usd": cost,
                "ttft_p50_ms": statistics.median(server),
                "ttft_p90_ms": statistics.quantiles(server, n=10)[-1],
                "client_ttft_p50_ms": statistics.median(ttfts),
                "load_max_over_mean": max(loads) / (sum(loads) / len(loads)),
                "wall_s": self.wall}


async def start_upstream(replicas: int) -> tuple[asyncio.subprocess.Process, list[str]]:
    nerve = str(Path(sys.executable).parent / "nerve")
    # Time to first token: 3 ms + 5 us per token the replica has to compute (a 20k-token
    # cold prefix costs 100 ms, a cached turn a few ms); 16 requests at once per replica.
    proc = await asyncio.create_subprocess_exec(
        nerve, "upstream", "--port", "0", "--replicas", str(replicas),
        "--base-latency-ms", "3", "--prefill-us-per-token", "5", "--decode-us-per-token", "20",
        "--max-concurrency", "16", "--capacity", "3000000",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    return proc, json.loads(line)["urls"]


async def control(session: aiohttp.ClientSession, url: str, path: str,
                  method: str = "GET") -> Any:
    async with session.request(method, url + path) as resp:
        return await resp.json()


async def workload(urls: list[str], strategy: str, runs: int, turns: int,
                   concurrency: int) -> Outcome:
    policy = "affinity" if strategy in ("affinity", "no_cache") else strategy
    gw = Gateway(GatewayConfig.for_urls(urls, model="claude-bench", policy=policy))
    outcome = Outcome()
    slots = asyncio.Semaphore(concurrency)

    async def one_run(i: int) -> None:
        rng = random.Random(i)
        messages = [Message(role="user", content=f"[scripted:loop] task {i}: "
                            + words(rng, 150))]
        async with slots:
            for turn in range(turns):
                request = LLMRequest(system=SYSTEM, tools=TOOLS, messages=messages,
                                     max_tokens=512,
                                     cache="off" if strategy == "no_cache" else "auto")
                r: LLMResponse = await gw.call(request, run_id=f"run-{i}")
                u = r.usage
                outcome.calls.append(Call(i, turn, r.upstream or "", r.ttft_ms, r.latency_ms,
                                          u.input_tokens, u.cache_read_input_tokens,
                                          u.cache_creation_5m_input_tokens,
                                          u.cache_creation_1h_input_tokens))
                messages = [*messages, Message(role="assistant", content=r.content),
                            Message(role="user", content=[ToolResultBlock(
                                tool_use_id=use.id, content=words(rng, rng.randint(200, 1000)))
                                for use in r.tool_uses])]
                # The tool runs in the sandbox meanwhile (5-30 ms here, seconds in life):
                # the next call does not follow on the heels of the last one.
                await asyncio.sleep(rng.uniform(0.005, 0.030))

    started = time.perf_counter()
    await asyncio.gather(*[one_run(i) for i in range(runs)])
    outcome.wall = time.perf_counter() - started
    await gw.close()
    return outcome


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def overhead(urls: list[str], session: aiohttp.ClientSession, n: int) -> dict[str, float]:
    """Sequential calls of one mid-sized conversation, three ways, interleaved: the gateway,
    the bare SDK (``messages.stream``, what an app calling the API itself would run) and a
    raw aiohttp client (the floor of any Python client). Each is paired with the upstream's
    own time for the same message, so what remains is what the caller's side added."""
    url = urls[0]
    gw = Gateway(GatewayConfig.for_urls([url], model="claude-bench"))
    rng = random.Random(99)
    messages = [Message(role="user", content="[scripted:loop] overhead " + words(rng, 100))]
    for _ in range(6):  # a mid-sized conversation, cached after the first call
        r = await gw.call(LLMRequest(system=SYSTEM, tools=TOOLS, messages=messages))
        messages += [Message(role="assistant", content=r.content),
                     Message(role="user", content=[ToolResultBlock(
                         tool_use_id=r.tool_uses[0].id, content=words(rng, 400))])]
    request = LLMRequest(system=SYSTEM, tools=TOOLS, messages=messages)
    body = gw.plan(request).body
    headers = {"x-api-key": "bench", "anthropic-version": "2023-06-01",
               "content-type": "application/json"}
    sdk = anthropic.AsyncAnthropic(api_key="bench", base_url=url, max_retries=0)

    async def via_gateway() -> str:
        return (await gw.call(request, run_id="overhead")).id

    async def via_sdk() -> str:
        async with sdk.messages.stream(**body) as stream:
            return (await stream.get_final_message()).id

    async def via_raw() -> str:
        msg_id = ""
        async with session.post(url + "/v1/messages", json=dict(body, stream=True),
                                headers=headers) as resp:
            async for line in resp.content:
                if line.startswith(b"data: "):
                    event = json.loads(line[6:])
                    if event["type"] == "message_start":
                        msg_id = event["message"]["id"]
        return msg_id

    ways = {"gateway": via_gateway, "sdk": via_sdk, "raw": via_raw}
    times: dict[str, dict[str, float]] = {k: {} for k in ways}
    for i in range(n * len(ways) + 3 * len(ways)):
        name = list(ways)[i % len(ways)]
        started = time.perf_counter()
        msg_id = await ways[name]()
        if i >= 3 * len(ways):  # warm-up first
            times[name][msg_id] = (time.perf_counter() - started) * 1000
    stats = await control(session, url, "/_nerve/stats?timings=1")
    server = {t[0]: t[1] for t in stats["timings"]}
    over = {k: [ms - server[m] for m, ms in v.items() if m in server] for k, v in times.items()}
    await gw.close()
    await sdk.close()
    p50 = {k: statistics.median(v) for k, v in over.items()}
    return {"calls": len(over["gateway"]),
            "upstream_p50_ms": statistics.median(server[m] for m in times["gateway"]),
            "gateway_overhead_p50_ms": p50["gateway"],
            "gateway_overhead_p90_ms": _percentile(over["gateway"], 0.9),
            "sdk_overhead_p50_ms": p50["sdk"], "raw_client_overhead_p50_ms": p50["raw"],
            "gateway_own_p50_ms": p50["gateway"] - p50["sdk"]}


async def overhead_openai(urls: list[str], session: aiohttp.ClientSession,
                          n: int) -> dict[str, float]:
    """The same comparison for the ``openai`` provider (plain aiohttp, no SDK), which shows
    the gateway core's own cost: planning, routing, stream assembly, accounting."""
    url = urls[1]
    gw = Gateway(GatewayConfig.for_urls([url], provider="openai", model="claude-bench"))
    rng = random.Random(98)
    messages = [Message(role="user", content="[scripted:loop] overhead " + words(rng, 100))]
    for _ in range(6):
        r = await gw.call(LLMRequest(system=SYSTEM, tools=TOOLS, messages=messages))
        messages += [Message(role="assistant", content=r.content),
                     Message(role="user", content=[ToolResultBlock(
                         tool_use_id=r.tool_uses[0].id, content=words(rng, 400))])]
    request = LLMRequest(system=SYSTEM, tools=TOOLS, messages=messages)
    payload = dict(to_openai(gw.plan(request).body), stream=True,
                   stream_options={"include_usage": True})
    times: dict[str, dict[str, float]] = {"gateway": {}, "raw": {}}
    for i in range(2 * n + 6):
        started = time.perf_counter()
        if i % 2 == 0:
            chat_id = (await gw.call(request, run_id="overhead")).id
            name = "gateway"
        else:
            chat_id, name = "", "raw"
            async with session.post(url + "/v1/chat/completions", json=payload) as resp:
                async for line in resp.content:
                    if line.startswith(b"data: {"):  # every chunk parsed, as any client must
                        chunk = json.loads(line[6:])
                        chat_id = chat_id or chunk["id"]
        if i >= 6:
            times[name][chat_id] = (time.perf_counter() - started) * 1000
    stats = await control(session, url, "/_nerve/stats?timings=1")
    server = {t[0]: t[1] for t in stats["timings"]}
    over = {k: [ms - server[m] for m, ms in v.items() if m in server] for k, v in times.items()}
    await gw.close()
    return {"calls": len(over["gateway"]),
            "gateway_overhead_p50_ms": statistics.median(over["gateway"]),
            "raw_client_overhead_p50_ms": statistics.median(over["raw"]),
            "gateway_own_p50_ms": statistics.median(over["gateway"])
            - statistics.median(over["raw"])}


class _NullProvider:
    """Answers at once without I/O: isolates the gateway core's own cost per call."""

    kind = "null"

    def __init__(self) -> None:
        self.reply = LLMResponse(model="claude-bench", content=[
            TextBlock(text="Trying again."),
            ToolUseBlock(id="toolu_x", name="run", input={"command": "echo again"})])

    async def call(self, plan: Any, upstream: Any, *, stream: bool, sink: Any,
                   attempt: Any) -> LLMResponse:
        if sink is not None:
            sink("Trying again.")
        return self.reply.model_copy()

    async def close(self) -> None:
        return None


async def core_overhead(n: int) -> dict[str, float]:
    """Gateway.call with a provider that does nothing: planning (serialization, digests,
    breakpoints), the prefix check, routing, span and response handling, per call."""
    gw = Gateway(GatewayConfig.for_urls(["http://unused"], provider="openai",
                                        model="claude-bench"),
                 providers={"openai": _NullProvider()})  # type: ignore[dict-item]
    rng = random.Random(97)
    messages = [Message(role="user", content="[scripted:loop] core " + words(rng, 100))]
    for i in range(6):
        messages += [Message(role="assistant", content=[
                         TextBlock(text="Trying again."),
                         ToolUseBlock(id=f"toolu_{i}", name="run", input={"command": "x"})]),
                     Message(role="user", content=[ToolResultBlock(
                         tool_use_id=f"toolu_{i}", content=words(rng, 400))])]
    request = LLMRequest(system=SYSTEM, tools=TOOLS, messages=messages)
    times = []
    for _ in range(n + 50):
        started = time.perf_counter()
        await gw.call(request, run_id="core")
        times.append((time.perf_counter() - started) * 1000)
    await gw.close()
    times = times[50:]
    return {"calls": n, "core_p50_ms": statistics.median(times),
            "core_p90_ms": _percentile(times, 0.9),
            "input_tokens": gw.plan(request).input_tokens}


async def actor_path(urls: list[str], session: aiohttp.ClientSession, n: int) -> dict[str, float]:
    """Work item published -> step result received, over an embedded NATS (fsync on)."""
    data = Path(tempfile.mkdtemp(prefix="nerve-bench-gw-"))
    server = EmbeddedNats(EmbeddedNatsConfig(store_dir=data / "nats"))
    await server.start()
    bus = await connect(ConnectOptions(servers=[server.url], prefix="bench"))
    await provision(bus)
    actor = GatewayActor(GatewayConfig.for_urls(urls[:1], model="claude-bench"))
    await actor.start(bus)
    results: asyncio.Queue[StepResult] = asyncio.Queue()

    async def on_result(msg: Any) -> None:
        await results.put(decode(msg.data, StepResult))

    sub = await bus.nc.subscribe(bus.names.inbox("bench-run"), cb=on_result)
    args = LLMRequest(system=SYSTEM, tools=TOOLS, messages=[
        Message(role="user", content="[scripted:loop] over the bus")]).model_dump()
    total: dict[str, float] = {}
    try:
        for i in range(n + 5):
            work = WorkItem(run_id="bench-run", tenant="bench", index=i, kind="llm",
                            name="llm", args=args, key=f"bench-run:{i}",
                            reply_to=bus.names.inbox("bench-run"))
            started = time.perf_counter()
            await bus.js.publish(bus.names.work_llm, encode(work),
                                 headers={"Nats-Msg-Id": work.key})
            result = await asyncio.wait_for(results.get(), 30)
            if i >= 5:  # warm-up: connections, caches
                total[result.result["id"]] = (time.perf_counter() - started) * 1000
        stats = await control(session, urls[0], "/_nerve/stats?timings=1")
        server_ms = {t[0]: t[1] for t in stats["timings"]}
        over = [ms - server_ms[k] for k, ms in total.items() if k in server_ms]
        return {"calls": len(over), "step_p50_ms": statistics.median(total.values()),
                "actor_overhead_p50_ms": statistics.median(over)}
    finally:
        await sub.unsubscribe()
        await actor.stop()
        await bus.close()
        await server.stop()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    proc, urls = await start_upstream(4)
    report: dict[str, Any] = {"runs": args.runs, "turns": args.turns, "replicas": 4,
                              "concurrency": args.concurrency, "strategies": {}}
    try:
        async with aiohttp.ClientSession() as session:
            for strategy in STRATEGIES:
                for url in urls:
                    await control(session, url, "/_nerve/reset", "POST")
                outcome = await workload(urls, strategy, args.runs, args.turns,
                                         args.concurrency)
                for url in urls:
                    stats = await control(session, url, "/_nerve/stats?timings=1")
                    outcome.server_ttft_ms.extend(t[2] for t in stats["timings"])
                report["strategies"][strategy] = outcome.summary(len(urls))
                print(f"  {strategy:<13} done in {outcome.wall:.1f}s", file=sys.stderr)
            base = report["strategies"]["no_cache"]["input_cost_usd"]
            for s in report["strategies"].values():
                s["cost_reduction_vs_no_cache"] = 1 - s["input_cost_usd"] / base
            for url in urls:
                await control(session, url, "/_nerve/reset", "POST")
            report["core"] = await core_overhead(args.overhead_calls * 2)
            report["overhead"] = await overhead(urls, session, args.overhead_calls)
            report["overhead_openai"] = await overhead_openai(urls, session,
                                                              args.overhead_calls)
            if not args.no_bus:
                report["actor"] = await actor_path(urls, session, args.bus_calls)
    finally:
        proc.terminate()
        await proc.wait()
    return report


def show(report: dict[str, Any]) -> None:
    print(f"gateway: {report['runs']} runs x {report['turns']} turns, {report['replicas']} "
          f"replicas, {report['concurrency']} runs at once")
    print(f"  {'strategy':<13} {'hit rate':>9} {'input $':>9} {'vs no cache':>12} "
          f"{'TTFT p50':>9} {'TTFT p90':>9} {'max/mean':>9} {'(client TTFT)':>14}")
    for name, s in report["strategies"].items():
        print(f"  {name:<13} {s['hit_rate']:>9.1%} {s['input_cost_usd']:>9.3f} "
              f"{-s['cost_reduction_vs_no_cache']:>+12.1%} {s['ttft_p50_ms']:>7.1f}ms "
              f"{s['ttft_p90_ms']:>7.1f}ms {s['load_max_over_mean']:>9.2f} "
              f"{s['client_ttft_p50_ms']:>12.1f}ms")
    c = report["core"]
    print(f"  gateway core per call ({c['input_tokens']}-token request, no I/O): p50 "
          f"{c['core_p50_ms']:.3f} ms, p90 {c['core_p90_ms']:.3f} ms")
    o = report["overhead"]
    print(f"  per call over the upstream's own {o['upstream_p50_ms']:.2f} ms (p50 of "
          f"{o['calls']} sequential calls each): gateway +{o['gateway_overhead_p50_ms']:.2f} ms "
          f"(p90 +{o['gateway_overhead_p90_ms']:.2f}), bare SDK "
          f"+{o['sdk_overhead_p50_ms']:.2f} ms, raw aiohttp +{o['raw_client_overhead_p50_ms']:.2f}"
          f" ms; the gateway's own share (gateway - bare SDK) {o['gateway_own_p50_ms']:+.2f} ms")
    oa = report["overhead_openai"]
    print(f"  openai provider (aiohttp, no SDK): gateway +{oa['gateway_overhead_p50_ms']:.2f} ms, "
          f"raw aiohttp +{oa['raw_client_overhead_p50_ms']:.2f} ms; the gateway core's own "
          f"share {oa['gateway_own_p50_ms']:+.2f} ms")
    if "actor" in report:
        a = report["actor"]
        print(f"  actor over the bus: step p50 {a['step_p50_ms']:.2f} ms, of which "
              f"{a['actor_overhead_p50_ms']:.2f} ms beyond the upstream ({a['calls']} calls)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller run (under a minute)")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--turns", type=int, default=15)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--overhead-calls", type=int, default=None)
    parser.add_argument("--bus-calls", type=int, default=None)
    parser.add_argument("--no-bus", action="store_true", help="skip the actor-over-bus part")
    args = parser.parse_args()
    args.runs = args.runs or (48 if args.quick else 300)
    args.overhead_calls = args.overhead_calls or (100 if args.quick else 400)
    args.bus_calls = args.bus_calls or (50 if args.quick else 200)
    if args.quick:
        args.concurrency = min(args.concurrency, 24)
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    result = runner(main(args))
    show(result)
    if args.json:
        print(json.dumps(result))
