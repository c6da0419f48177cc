"""``nerve budget show|set|resume|prices`` and ``nerve kill``: the budget from a terminal.

They talk to the ledger in the KV bucket directly, so they work whether or not a budget
actor runs; ``show`` asks the budget actor first for the live burn rate. The target is
``--nats-url`` / ``$NERVE_NATS_URL``, or the running ``nerve up`` found through its data dir.
"""

from __future__ import annotations

import argparse
import getpass
import json
import time
from typing import Any

from actors import ask, run
from budget_actor import PRICES, BudgetReport, Ledger, ShowRequest
from bus import Bus
from cli._target import add_target_args, connect_target
from nerve import BusError

_WINDOW_FLAGS = ("minute", "hour", "day", "month")
_CLEAR_WORDS = ("none", "off", "unlimited", "null")


class _Clear:
    """A flag given as NONE: clear that limit (argparse's None means "not given")."""

    def __repr__(self) -> str:
        return "NONE"


CLEAR = _Clear()


def _usd(value: str) -> float | _Clear:
    return CLEAR if value.lower() in _CLEAR_WORDS else float(value)


def _int(value: str) -> int | _Clear:
    return CLEAR if value.lower() in _CLEAR_WORDS else int(value)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    budget = sub.add_parser("budget", help="per-tenant budgets: show, set limits, resume runs")
    bsub = budget.add_subparsers(dest="budget_command", required=True, metavar="ACTION")

    show = bsub.add_parser("show", help="limits, spend, reservations, burn rate, state")
    show.add_argument("--tenant", default=None, help="one tenant (default: every tenant)")
    show.add_argument("--json", action="store_true", help="print JSON")
    add_target_args(show)
    show.set_defaults(func=lambda a: run(_show(a)))

    set_ = bsub.add_parser("set", help="change a tenant's limits (NONE clears one)")
    set_.add_argument("--tenant", required=True)
    for w in _WINDOW_FLAGS:
        set_.add_argument(f"--usd-per-{w}", type=_usd, metavar="USD")
        set_.add_argument(f"--tokens-per-{w}", type=_int, metavar="N")
    set_.add_argument("--usd-per-run", type=_usd, metavar="USD")
    set_.add_argument("--tokens-per-run", type=_int, metavar="N")
    set_.add_argument("--runs-per-minute", type=_int, metavar="N")
    set_.add_argument("--on-trip", choices=("kill", "pause"))
    set_.add_argument("--on-exhaustion", choices=("refuse", "kill", "pause"))
    set_.add_argument("--reservation-ttl", type=float, metavar="SECONDS")
    set_.add_argument("--max-in-flight", type=int, metavar="N")
    set_.add_argument("--breaker-window", type=float, metavar="SECONDS",
                      help="burn-rate window (at most 10 s)")
    set_.add_argument("--breaker-tenant-usd", type=_usd, metavar="USD",
                      help="tenant spend per breaker window that trips")
    set_.add_argument("--breaker-run-usd", type=_usd, metavar="USD",
                      help="one run's spend per breaker window that trips")
    set_.add_argument("--breaker-repeat-tool", type=_int, metavar="N",
                      help="the same tool call this many times trips")
    set_.add_argument("--breaker-repeat-llm", type=_int, metavar="N",
                      help="the same LLM request this many times trips")
    set_.add_argument("--by", default=None, help="who is changing it (default: you)")
    add_target_args(set_)
    set_.set_defaults(func=lambda a: run(_set(a)))

    resume = bsub.add_parser("resume", help="let a run the breaker halted reserve again")
    resume.add_argument("--tenant", required=True)
    resume.add_argument("--run", required=True, dest="run_id")
    resume.add_argument("--by", default=None)
    add_target_args(resume)
    resume.set_defaults(func=lambda a: run(_resume(a)))

    prices = bsub.add_parser("prices", help="the price table in use")
    prices.set_defaults(func=_prices)

    kill = sub.add_parser("kill", help="a tenant's kill-switch: stop all its spend now")
    kill.add_argument("--tenant", required=True)
    kill.add_argument("--reset", action="store_true", help="turn the kill-switch off again")
    kill.add_argument("--reason", default="killed by an operator")
    kill.add_argument("--policy", choices=("kill", "pause"), default="kill",
                      help="cancel the tenant's runs (kill) or hold them for a human (pause)")
    kill.add_argument("--by", default=None)
    add_target_args(kill)
    kill.set_defaults(func=lambda a: run(_kill(a)))


def _who(args: argparse.Namespace) -> str:
    if args.by:
        return str(args.by)
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


async def _connect(args: argparse.Namespace) -> Bus:
    return await connect_target(args, name="nerve-budget-cli")


async def _show(args: argparse.Namespace) -> int:
    bus = await _connect(args)
    try:
        try:
            reply = await ask(bus, bus.names.budget_api, ShowRequest(tenant=args.tenant),
                              timeout=3.0)
            reports = [BudgetReport.model_validate(r)
                       for r in (reply if isinstance(reply, list) else [reply])]
        except BusError:  # no budget actor: read the ledgers (no burn rate)
            ledger = Ledger(bus)
            tenants = [args.tenant] if args.tenant else await ledger.tenants()
            reports = [BudgetReport.of(await ledger.state(t), time.time()) for t in tenants]
    finally:
        await bus.close()
    if args.json:
        print(json.dumps([r.model_dump(mode="json") for r in reports], indent=2))
    elif not reports:
        print("no tenant has a budget yet (nerve budget set --tenant NAME ...)")
    else:
        print("\n\n".join(r.render() for r in reports))
    return 0


def _changes(args: argparse.Namespace) -> dict[str, Any]:
    given = vars(args)
    fields = [f"{u}_per_{w}" for w in _WINDOW_FLAGS for u in ("usd", "tokens")] + [
        "usd_per_run", "tokens_per_run", "runs_per_minute", "on_trip", "on_exhaustion",
        "reservation_ttl", "max_in_flight"]
    breaker = {"window_s": "breaker_window", "tenant_usd_per_window": "breaker_tenant_usd",
               "run_usd_per_window": "breaker_run_usd", "repeat_tool_calls":
               "breaker_repeat_tool", "repeat_llm_calls": "breaker_repeat_llm"}

    def value(v: Any) -> Any:
        return None if v is CLEAR else v

    changes = {f: value(given[f]) for f in fields if given.get(f) is not None}
    b = {k: value(given[v]) for k, v in breaker.items() if given.get(v) is not None}
    if b:
        changes["breaker"] = b
    return changes


async def _set(args: argparse.Namespace) -> int:
    changes = _changes(args)
    bus = await _connect(args)
    try:
        ledger = Ledger(bus)
        await ledger.update_limits(args.tenant, changes, by=_who(args))
        report = BudgetReport.of(await ledger.state(args.tenant), time.time())
    finally:
        await bus.close()
    print(report.render())
    return 0


async def _resume(args: argparse.Namespace) -> int:
    bus = await _connect(args)
    try:
        from budget_actor import ResumeRunRequest

        try:
            reply = await ask(bus, bus.names.budget_api, ResumeRunRequest(
                tenant=args.tenant, run_id=args.run_id, by=_who(args)), timeout=3.0)
            resumed = bool(reply["resumed"])
        except BusError:  # no budget actor: release it in the ledger only
            resumed = await Ledger(bus).resume_run(args.tenant, args.run_id, by=_who(args))
    finally:
        await bus.close()
    print(f"run {args.run_id} of tenant {args.tenant}: "
          + ("resumed" if resumed else "was not halted"))
    return 0


async def _kill(args: argparse.Namespace) -> int:
    bus = await _connect(args)
    try:
        ledger = Ledger(bus)
        if args.reset:
            changed = await ledger.reset(args.tenant, by=_who(args), reason=args.reason)
            print(f"tenant {args.tenant}: kill-switch "
                  + ("off" if changed else "was not on"))
        else:
            notice = await ledger.kill(args.tenant, reason=args.reason, by=_who(args),
                                       policy=args.policy)
            print(f"tenant {args.tenant}: KILLED ({notice.policy}) by {notice.by}: "
                  f"{notice.reason}")
    finally:
        await bus.close()
    return 0


def _prices(args: argparse.Namespace) -> int:
    table = PRICES.to_dict()
    print(f"price table {table['version']} ({table['source'] or 'custom'}), USD per MTok")
    print(f"  {'model':<24} {'input':>8} {'output':>8} {'cache read':>11} {'5m write':>9} "
          f"{'1h write':>9}")
    for name, p in table["models"].items():
        print(f"  {name:<24} {p['input']:>8} {p['output']:>8} {p['cache_read']:>10}x "
              f"{p['cache_write_5m']:>8}x {p['cache_write_1h']:>8}x")
    return 0
