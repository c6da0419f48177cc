"""A ledger client running generated programs: in the test process, or as its own OS
process (``python -m tests.budget_proc <nats-url> <prefix> <subject>``) answering requests.

A program is a list of lanes run concurrently; each lane is a list of operations:
``["reserve", input_tokens, max_output_tokens]``, ``["settle", pick, in_frac, out_frac]``
(settle the ``pick``-th reservation the lane holds, with usage no larger than reserved),
``["release", pick]``, ``["sleep", seconds]``. A lane releases what it still holds when it
ends.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from actors import encode, unpack
from budget_actor import Ledger, Usage
from bus import ConnectOptions, connect
from nerve import BudgetExceeded

MODEL = "claude-haiku-4-5"


async def run_lane(ledger: Ledger, tenant: str, ops: list[list[Any]], out: dict[str, Any]) -> None:
    held: list[tuple[str, int, int]] = []  # id, input estimate, max output
    for op in ops:
        if op[0] == "reserve":
            try:
                res = await ledger.reserve(tenant, model=MODEL, input_tokens=op[1],
                                           max_output_tokens=op[2])
            except BudgetExceeded:
                out["refused"] += 1
                continue
            out["admitted"].append([res.id, res.amount_nanos])
            held.append((res.id, op[1], op[2]))
        elif held and op[0] == "settle":
            res_id, est, max_out = held.pop(op[1] % len(held))
            usage = Usage(input_tokens=int(est * op[2]), output_tokens=int(max_out * op[3]))
            s = await ledger.settle(res_id, tenant=tenant, model=MODEL, usage=usage)
            out["settled"].append([res_id, s.cost_nanos, s.status])
        elif op[0] == "sleep":  # hold what the lane reserved (a slow model call)
            await asyncio.sleep(op[1])
        elif held and op[0] == "release":
            res_id, _, _ = held.pop(op[1] % len(held))
            out["released"].append([res_id, await ledger.release(res_id, tenant=tenant)])
    for res_id, _, _ in held:
        out["released"].append([res_id, await ledger.release(res_id, tenant=tenant)])


async def run_program(ledger: Ledger, tenant: str, lanes: list[list[list[Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {"admitted": [], "settled": [], "released": [], "refused": 0}
    await asyncio.gather(*(run_lane(ledger, tenant, lane, out) for lane in lanes))
    return out


async def serve(url: str, prefix: str, subject: str) -> None:
    bus = await connect(ConnectOptions(servers=[url], prefix=prefix))
    ledger = Ledger(bus)
    done = asyncio.Event()

    async def on_request(msg: Any) -> None:
        req = unpack(msg.data)
        if req.get("stop"):
            await msg.respond(encode({"ok": True}))
            done.set()
            return
        result = await run_program(ledger, req["tenant"], req["lanes"])
        await msg.respond(encode(result))

    await bus.nc.subscribe(subject, cb=on_request)
    await bus.nc.flush()
    print("ready", flush=True)
    await done.wait()
    await bus.close()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], sys.argv[2], sys.argv[3]))
