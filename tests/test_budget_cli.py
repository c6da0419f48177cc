"""``nerve budget`` and ``nerve kill`` as a person runs them, against the real server."""

from __future__ import annotations

import asyncio
import json
import os
import sys

from budget_actor import BudgetActor, KillNotice, Ledger, Limits, kill_notices
from bus import Bus, EmbeddedNats
from nerve import TenantKilled
from tests.budget_helpers import MODEL


async def nerve(server: EmbeddedNats, prefix: str, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sys; from cli import main; sys.exit(main())", *args,
        "--nats-url", server.url, "--prefix", prefix,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "NERVE_NATS_URL": ""})
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_set_show_kill_and_reset_from_the_command_line(
        bus: Bus, nats_server: EmbeddedNats, prefix: str) -> None:
    rc, out, err = await nerve(nats_server, prefix, "budget", "set", "--tenant", "acme",
                               "--usd-per-day", "10", "--usd-per-minute", "0.5",
                               "--runs-per-minute", "30", "--breaker-repeat-tool", "4")
    assert rc == 0, err
    assert "tenant acme: OK" in out
    limits = await Ledger(bus).limits("acme")
    assert limits.usd_per_day == 10 and limits.runs_per_minute == 30
    assert limits.breaker.repeat_tool_calls == 4

    rc, out, err = await nerve(nats_server, prefix, "budget", "set", "--tenant", "acme",
                               "--usd-per-minute", "none")
    assert rc == 0, err
    assert (await Ledger(bus).limits("acme")) == Limits(usd_per_day=10, runs_per_minute=30,
                                                        breaker={"repeat_tool_calls": 4})

    # Without a budget actor, show reads the ledger; with one, it also has the burn rate.
    rc, out, err = await nerve(nats_server, prefix, "budget", "show", "--tenant", "acme",
                               "--json")
    assert rc == 0, err
    assert json.loads(out)[0]["burn"] is None
    actor = BudgetActor(sweep_interval=3600)
    await actor.start(bus)
    try:
        rc, out, err = await nerve(nats_server, prefix, "budget", "show", "--json")
        assert rc == 0, err
        [report] = json.loads(out)
        assert report["tenant"] == "acme" and report["burn"] is not None
    finally:
        await actor.stop()

    async with kill_notices(bus, "acme") as notices:
        rc, out, err = await nerve(nats_server, prefix, "kill", "--tenant", "acme",
                                   "--reason", "runaway", "--by", "alice")
        assert rc == 0, err
        assert "KILLED" in out
        notice = await notices.next(timeout=10)
    assert isinstance(notice, KillNotice) and notice.by == "alice"
    try:
        await Ledger(bus).reserve("acme", model=MODEL, input_tokens=1, max_output_tokens=1)
        raise AssertionError("a killed tenant reserved")
    except TenantKilled:
        pass
    rc, out, _ = await nerve(nats_server, prefix, "budget", "show", "--tenant", "acme")
    assert "tenant acme: KILLED" in out and "runaway" in out
    rc, out, err = await nerve(nats_server, prefix, "kill", "--tenant", "acme", "--reset")
    assert rc == 0 and "off" in out, err
    assert not await Ledger(bus).is_killed("acme")


async def test_bad_input_on_the_command_line_is_refused_and_changes_nothing(
        bus: Bus, nats_server: EmbeddedNats, prefix: str) -> None:
    await Ledger(bus).set_limits("acme", Limits(usd_per_day=5))
    for args in (("--usd-per-day", "-3"), ("--usd-per-day", "1e15"),
                 ("--breaker-window", "60"), ("--tokens-per-day", "-1")):
        rc, out, err = await nerve(nats_server, prefix, "budget", "set", "--tenant", "acme",
                                   *args)
        assert rc == 2 and "nerve: error: invalid limits" in err, (args, out, err)
    rc, _, err = await nerve(nats_server, prefix, "budget", "set", "--tenant", "acme",
                             "--usd-per-day", "ten")
    assert rc == 2 and "invalid _usd value" in err
    rc, _, err = await nerve(nats_server, prefix, "budget", "set", "--tenant", "acme")
    assert rc == 2 and "no limit to change" in err
    rc, _, err = await nerve(nats_server, prefix, "budget", "show", "--tenant", "nobody")
    assert rc == 2 and "tenant nobody has no budget" in err
    rc, _, err = await nerve(nats_server, prefix, "kill", "--tenant", "a.b")
    assert rc == 2 and "invalid tenant" in err
    rc, _, err = await nerve(nats_server, prefix, "kill", "--tenant", "nobody", "--reset")
    assert rc == 2 and "nobody" in err
    assert (await Ledger(bus).limits("acme")) == Limits(usd_per_day=5)
    assert await Ledger(bus).tenants() == ["acme"]
