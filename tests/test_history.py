"""RunHistory: fenced appends, idempotent retries, ordered replay."""

from __future__ import annotations

import asyncio

import pytest

from bus import Bus
from nerve import ConfigError, RunNotFound, StaleWriterError
from persistence import (
    GroupCommit,
    MarkerRecorded,
    RunCompleted,
    RunHistory,
    RunStarted,
    StepCompleted,
    StepScheduled,
    args_digest,
)


def started(run_id: str = "r1") -> RunStarted:
    return RunStarted(run_id=run_id, tenant="acme", workflow="w", version="1", input={"x": 1})


def step(i: int) -> StepScheduled:
    return StepScheduled(index=i, kind="activity", name="f", args_digest=args_digest([i]), args=[i])


async def test_replay_returns_events_in_order_with_their_types(bus: Bus) -> None:
    h = RunHistory(bus, "r1")
    assert await h.create(started())
    for i in range(50):
        await h.append(step(i), StepCompleted(index=i, kind="activity", name="f",
                                              args_digest=args_digest([i]), result=i * i))
    await h.append(RunCompleted(result="done"))
    events = await RunHistory(bus, "r1").read()
    assert [type(e).__name__ for e in events[:3]] == [
        "RunStarted", "StepScheduled", "StepCompleted"]
    assert len(events) == 1 + 100 + 1
    completed = [e for e in events if isinstance(e, StepCompleted)]
    assert [e.result for e in completed] == [i * i for i in range(50)]
    assert isinstance(events[-1], RunCompleted)


async def test_stale_writer_is_rejected_and_history_unchanged(bus: Bus) -> None:
    owner = RunHistory(bus, "r2")
    await owner.create(started("r2"))
    await owner.append(step(0))
    stale = RunHistory(bus, "r2")
    await stale.read()
    # The owner moves on; the stale copy still thinks sequence N is the end.
    await owner.append(step(1))
    with pytest.raises(StaleWriterError) as info:
        await stale.append(step(99))
    assert info.value.run_id == "r2"
    events = await RunHistory(bus, "r2").read()
    assert [getattr(e, "index", None) for e in events] == [None, 0, 1]


async def test_stale_writer_with_the_same_event_index_is_still_rejected(bus: Bus) -> None:
    """Both writers compute msg id r3:2; the second must not be taken as a duplicate."""
    a = RunHistory(bus, "r3")
    await a.create(started("r3"))
    await a.append(step(0))
    b = RunHistory(bus, "r3")
    await b.read()
    await b.append(MarkerRecorded(index=1, kind="now", value=1.0))
    with pytest.raises(StaleWriterError):
        await a.append(MarkerRecorded(index=1, kind="now", value=2.0))
    events = await RunHistory(bus, "r3").read()
    assert events[-1].value == 1.0


async def test_retry_after_a_lost_ack_is_stored_once(bus: Bus) -> None:
    h = RunHistory(bus, "r4")
    await h.create(started("r4"))
    before = (h.last_seq, h.length)
    event = step(0)
    seq = await h.append(event)
    # The ack was lost: the writer still believes it is where it was, and retries.
    h.last_seq, h.length = before
    assert await h.append(event) == seq
    assert len(await RunHistory(bus, "r4").read()) == 2


async def test_a_plain_duplicate_msg_id_is_stored_once(bus: Bus) -> None:
    subject = bus.names.history("r7")
    first = await bus.js.publish(subject, b"x", headers={"Nats-Msg-Id": "r7:0"})
    again = await bus.js.publish(subject, b"x", headers={"Nats-Msg-Id": "r7:0"})
    assert again.duplicate and again.seq == first.seq


async def test_create_is_idempotent_per_run_id(bus: Bus) -> None:
    assert await RunHistory(bus, "r5").create(started("r5"))
    assert not await RunHistory(bus, "r5").create(started("r5"))
    assert len(await RunHistory(bus, "r5").read()) == 1


async def test_reading_a_missing_run(bus: Bus) -> None:
    assert await RunHistory(bus, "nope").read() == []
    with pytest.raises(RunNotFound):
        await RunHistory(bus, "nope").load_started()


async def test_long_history_reads_across_batches(bus: Bus) -> None:
    h = RunHistory(bus, "r6")
    await h.create(started("r6"))
    for i in range(2500):
        await h.append(step(i))
    events = await RunHistory(bus, "r6").read()
    assert len(events) == 2501
    assert [e.index for e in events[1:]] == list(range(2500))


async def test_group_commit_stores_many_runs_in_one_batch_with_their_own_sequences(
        bus: Bus) -> None:
    """Concurrent appends of many runs go out as atomic batches; each writer learns its own
    record's stream sequence (its next append is fenced on it, so a wrong one would fail)."""
    commit = GroupCommit(bus)
    writers = [RunHistory(bus, f"gc-{n}", commit=commit) for n in range(40)]
    assert all(await asyncio.gather(*(w.create(started(w.run_id)) for w in writers)))
    for i in range(3):
        await asyncio.gather(*(w.append(step(i)) for w in writers))
    assert commit.batches >= 1 and commit.appends >= 40, (commit.batches, commit.appends)
    assert commit.batches < commit.appends  # fewer fsyncs than appends
    for w in writers:
        events = await RunHistory(bus, w.run_id).read()
        assert [getattr(e, "index", None) for e in events] == [None, 0, 1, 2]
        last = await bus.js.get_last_msg(bus.names.runs_stream, w.subject, direct=True)
        assert last.seq == w.last_seq
    await commit.close()


async def test_group_commit_fails_only_the_stale_writer_in_a_batch(bus: Bus) -> None:
    """A batch is all or nothing: one stale writer's fence must not cost the others their
    appends, nor let the stale one through."""
    commit = GroupCommit(bus, atomic_from=2)
    owner = RunHistory(bus, "gc-stale")
    await owner.create(started("gc-stale"))
    stale = RunHistory(bus, "gc-stale", commit=commit)
    await stale.read()
    await owner.append(step(0))  # the stale copy's fence is now wrong
    others = [RunHistory(bus, f"gc-ok-{n}", commit=commit) for n in range(10)]
    for w in others:
        await w.create(started(w.run_id))
    results = await asyncio.gather(stale.append(step(99)),
                                   *(w.append(step(0)) for w in others),
                                   return_exceptions=True)
    assert isinstance(results[0], StaleWriterError)
    assert all(isinstance(r, int) for r in results[1:]), results
    assert [getattr(e, "index", None) for e in await RunHistory(bus, "gc-stale").read()] == [
        None, 0]
    for w in others:
        await w.append(step(1))  # fenced on the sequence the batch fallback reported
    await commit.close()


async def test_group_commit_retry_of_a_stored_append_is_stored_once(bus: Bus) -> None:
    """A retried append (its first ack lost) inside a batch: the duplicate fails the batch,
    the fallback finds the record already there, and nothing is stored twice."""
    commit = GroupCommit(bus, atomic_from=2)
    h = RunHistory(bus, "gc-retry", commit=commit)
    await h.create(started("gc-retry"))
    before_seq, before_len = h.last_seq, h.length
    event = step(0)
    seq = await h.append(event)
    h.last_seq, h.length = before_seq, before_len  # as if that ack had been lost
    others = [RunHistory(bus, f"gc-r-{n}", commit=commit) for n in range(5)]
    for w in others:
        await w.create(started(w.run_id))
    again, *_ = await asyncio.gather(h.append(event), *(w.append(step(0)) for w in others))
    assert again == seq
    assert [getattr(e, "index", None) for e in await RunHistory(bus, "gc-retry").read()] == [
        None, 0]
    await commit.close()


@pytest.mark.parametrize("atomic", [False, True])
async def test_without_atomic_batches_or_below_atomic_from_appends_are_stored_one_by_one(
        bus: Bus, atomic: bool) -> None:
    """No atomic batches on this stream, or too few appends queued for one to pay off (a
    batch costs nats-server a staging store of its own): each append is stored alone."""
    commit = GroupCommit(bus, atomic=atomic, atomic_from=11)
    writers = [RunHistory(bus, f"gc-plain-{atomic}-{n}", commit=commit) for n in range(10)]
    await asyncio.gather(*(w.create(started(w.run_id)) for w in writers))
    await asyncio.gather(*(w.append(step(0)) for w in writers))
    assert commit.appends == 0 and commit.batches == 0
    for w in writers:
        assert len(await RunHistory(bus, w.run_id).read()) == 2
    await commit.close()


async def test_a_batch_of_one_is_refused_as_a_setting(bus: Bus) -> None:
    with pytest.raises(ConfigError, match="at least 2"):
        GroupCommit(bus, atomic_from=1)
