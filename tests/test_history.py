"""RunHistory: fenced appends, idempotent retries, ordered replay."""

from __future__ import annotations

import pytest

from bus import Bus
from nerve import RunNotFound, StaleWriterError
from persistence import (
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
