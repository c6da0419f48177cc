"""The read model: projections of real runs agree with the histories; a rebuild from the
streams equals the incremental model; re-applying changes nothing."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from api import Projector, ReadModel, Record, rebuild
from bus import Bus
from persistence import RunStarted, decode_record, direct_get_subject
from tests.api_helpers import (
    PRICED_MODEL,
    engine,
    eventually,
    long_task,
    submit_approval_run,
    wait_status,
)
from workflow import NerveClient, summarize

pytestmark = pytest.mark.timeout(120)


async def all_records(bus: Bus) -> list[Record]:
    out = []
    async for seq, data, headers in direct_get_subject(
            bus, bus.names.runs_stream, bus.names.history("*")):
        out.append(Record(seq, headers["Nats-Subject"].split(".")[-2], decode_record(data)))
    return out


async def pending_approval(model: ReadModel, run_id: str) -> dict:
    rows = await model.approvals(run_id=run_id)
    return rows[0] if rows else None


async def test_projections_follow_real_runs_and_rebuild_equal(bus: Bus, tmp_path: Path) -> None:
    model = await ReadModel(tmp_path / "live.db").open()
    projector = Projector(bus, model, instance="t", batch=7)  # small batches on purpose
    projector.start()
    try:
        async with engine(bus) as client:
            runs = await _workload(client, model)
        await projector.sync()
        # Every run's row says what its history says.
        for run_id in runs:
            summary = summarize(await client.history(run_id))
            row = await model.get_run(run_id)
            assert row is not None
            assert (row["status"], row["steps"], row["events"], row["tenant"],
                    row["segments"]) == (summary.status, summary.steps, summary.events,
                                         summary.tenant, summary.segments), run_id
            assert row["result"] == summary.result
        # Costs come from the llm steps' results; spend per tenant is their sum.
        rows = [await model.get_run(r) for r in runs]
        acme = [r for r in rows if r["tenant"] == "acme"]
        assert all(r["cost_usd"] > 0 and r["llm_calls"] >= 1 for r in acme)
        spend = await model.spend("acme")
        assert spend["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in acme))
        assert spend["runs"] == len(acme)
        assert (await model.spend("globex"))["runs"] == 1
        # Approvals: rejected with the reason, timed out, expired by the cancel.
        decided = {a["run_id"]: a for a in await model.approvals(status=None)}
        assert decided[runs[1]]["status"] == "rejected"
        assert decided[runs[1]]["reason"] == "not today"
        assert decided[runs[1]]["tool"] == "run" and "command" in decided[runs[1]]["args"]
        assert decided[runs[2]]["status"] == "timed_out"
        assert decided[runs[3]]["status"] == "expired"
        steps = await model.steps(runs[0])
        assert [s["kind"] for s in steps if s["kind"] == "llm"] and \
            all(s["status"] == "completed" for s in steps)

        # A rebuild from the stream equals the model built incrementally, batch by batch.
        rebuilt = await rebuild(bus, tmp_path / "rebuilt.db")
        try:
            live_dump = await model.dump()
            assert await rebuilt.dump() == live_dump
            # Re-applying every record (in other batch sizes) changes nothing.
            records = await all_records(bus)
            await model.apply(records)
            for rec in records:
                await rebuilt.apply([rec])
            assert await model.dump() == live_dump
            assert await rebuilt.dump() == live_dump
        finally:
            await rebuilt.close()

        # One record at a time from nothing gives the same model too.
        single = await ReadModel(tmp_path / "single.db").open()
        try:
            for rec in records:
                await single.apply([rec])
            assert await single.dump() == live_dump
        finally:
            await single.close()
    finally:
        await projector.stop()
        await model.close()


async def _workload(client: NerveClient, model: ReadModel) -> list[str]:
    done = await client.submit("acme", long_task(40, "a"), tools=[], model=PRICED_MODEL,
                               run_id="acme-done")
    rejected = await submit_approval_run(client, "acme")
    await eventually(lambda: pending_approval(model, rejected))
    approval = await pending_approval(model, rejected)
    await client.signal(rejected, "approval", {"approved": False, "reason": "not today"},
                        sender="tester", approves=approval["digest"])
    timed_out = await submit_approval_run(client, "acme", timeout=0.3)
    cancelled = await submit_approval_run(client, "acme", task="compute 5 * 5")
    await eventually(lambda: pending_approval(model, cancelled))
    await client.cancel(cancelled, "changed my mind", by="tester")
    other = await client.submit("globex", long_task(10, "g"), tools=[], model=PRICED_MODEL)
    for run_id in (done, rejected, timed_out, cancelled, other):
        await wait_status(client, run_id)
    # Forked before its first model call: the agent's LLM request names its run id, so a
    # fork past that point would not replay (reported to the workflow engine's owner).
    fork = await client.fork(done, at=2, tenant="acme", new_run_id="acme-fork")
    await wait_status(client, fork)
    return [done, rejected, timed_out, cancelled, other, fork]


TASKS = ["compute 3 * 3", "Write a README for the Parser", "résumé of 50% of the rows",
         'say "hello" to o_o', "naïve ÉCOLE test", "short", "x", "", None,
         "the parser's parser parses", "a\\b\\c and %_% literal"]
QUERIES = ["parser", "PARSER", "3 *", "50%", "o_o", '"hello"', "ÉCO", "école", "rés",
           "\\b\\", "%_%", "r-00", "r-01", "nothing like it", "se", "x", "%", "_"]


def found_by_scan(runs: dict[str, str | None], q: str) -> set[str]:
    """What `LIKE '%q%'` finds (ASCII case folded, as SQLite's LIKE does)."""
    def fold(text: str) -> str:
        return "".join(c.lower() if c.isascii() else c for c in text)
    return {r for r, task in runs.items() if fold(q) in fold(r) or fold(q) in fold(task or "")}


async def search(model: ReadModel, q: str) -> set[str]:
    found, cursor = set(), None
    while True:
        page, cursor = await model.list_runs(q=q, limit=7, cursor=cursor)
        found |= {r["run_id"] for r in page}
        if cursor is None:
            return found


async def test_search_by_trigram_index_finds_what_a_scan_finds(tmp_path: Path) -> None:
    runs = {f"r-{i:02d}": TASKS[i % len(TASKS)] for i in range(30)}
    records = [Record(i + 1, run_id, [RunStarted(
        run_id=run_id, tenant="acme", workflow="agent", version="1",
        input=None if task is None else {"task": task})]) for i, (run_id, task) in
        enumerate(runs.items())]
    model = await ReadModel(tmp_path / "m.db").open()
    try:
        await model.apply(records)
        await model.apply(records)  # again: changes nothing, indexes nothing twice
        for q in QUERIES:
            expected = found_by_scan(runs, q)
            if any(not c.isascii() for c in q):  # the index also folds non-ASCII case
                expected |= found_by_scan(runs, q.lower()) | found_by_scan(runs, q.upper())
            assert await search(model, q) == expected, q
        assert await search(model, "parser") == {r for r, t in runs.items()
                                                 if t and "parser" in t.lower()} != set()
    finally:
        await model.close()

    # A model written by schema 1 (no search index) is brought up to date when opened.
    with sqlite3.connect(tmp_path / "m.db") as db:
        db.executescript("DROP TRIGGER run_text_added; DROP TRIGGER run_text_changed; "
                         "DROP TABLE run_text_index; DROP TABLE run_text; "
                         "UPDATE meta SET value = '1' WHERE key = 'schema';")
    model = await ReadModel(tmp_path / "m.db").open()
    try:
        assert await search(model, "parser") == found_by_scan(runs, "parser")
        assert await search(model, "r-2") == found_by_scan(runs, "r-2")  # short: a scan
    finally:
        await model.close()
