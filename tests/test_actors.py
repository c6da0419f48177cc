"""The actor kit: work-queue and request/reply mailboxes, dead letters, heartbeats, tracing."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import ClassVar

import msgpack
import pytest
from nats.errors import Error as NatsClientError
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from pydantic import BaseModel

from actors import (
    Actor,
    DeadLetter,
    Delivery,
    Envelope,
    Permanent,
    Requests,
    StepResult,
    StepWorker,
    WorkItem,
    WorkQueue,
    ask,
    decode,
    encode,
)
from bus import (
    Bus,
    ConnectOptions,
    EmbeddedNats,
    EmbeddedNatsConfig,
    StreamLimits,
    connect,
    provision,
    stream_configs,
)
from nerve import CodecError, ConfigError, NerveError


class Job(BaseModel):
    n: int
    sleep: float = 0.0
    fail_times: int = 0


class Worker(Actor[Job]):
    message_type = Job
    concurrency: ClassVar[int] = 2

    def __init__(self, bus_names, ack_wait: float = 30.0, max_deliver: int = 3) -> None:
        super().__init__("worker")
        self.names = bus_names
        self.ack_wait = ack_wait
        self.max_deliver = max_deliver
        self.done: list[int] = []
        self.deliveries: dict[int, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.trace_ids: list[int] = []

    def mailbox(self) -> WorkQueue:
        config = next(c for c in stream_configs(self.names, StreamLimits())
                      if c.name == self.names.work_stream)
        return WorkQueue(stream=self.names.work_stream, subjects=[self.names.work_activity],
                         durable="worker", ack_wait=self.ack_wait, max_deliver=self.max_deliver,
                         backoff=(0.05,), stream_config=config)

    async def handle(self, message: Job, delivery: Delivery) -> None:
        self.deliveries[message.n] = delivery.num_delivered
        self.trace_ids.append(trace.get_current_span().get_span_context().trace_id)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if message.n < 0:
                raise Permanent(f"job {message.n} can never work")
            if delivery.num_delivered <= message.fail_times:
                raise RuntimeError(f"transient failure {delivery.num_delivered}")
            await asyncio.sleep(message.sleep)
            self.done.append(message.n)
        finally:
            self.in_flight -= 1


async def dead_letters(bus: Bus, n: int, within: float = 10) -> list[DeadLetter]:
    sub = await bus.js.subscribe(bus.names.dead_letter(">"))
    out = []
    async with asyncio.timeout(within):
        while len(out) < n:
            msg = await sub.next_msg(timeout=within)
            out.append(decode(msg.data, DeadLetter))
    await sub.unsubscribe()
    return out


async def until(pred, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.01)


async def test_work_queue_processes_and_bounds_concurrency(bus: Bus) -> None:
    worker = Worker(bus.names)
    await worker.start(bus)
    for n in range(10):
        await bus.js.publish(bus.names.work_activity, encode(Job(n=n, sleep=0.02)))
    await until(lambda: len(worker.done) == 10)
    assert sorted(worker.done) == list(range(10))
    assert worker.max_in_flight <= 2
    await worker.stop()
    # Acked work leaves the work queue (the server applies acks asynchronously).
    async with asyncio.timeout(5):
        while (await bus.js.stream_info(bus.names.work_stream)).state.messages:
            await asyncio.sleep(0.01)


async def test_malformed_message_is_dead_lettered_and_the_actor_keeps_serving(bus: Bus) -> None:
    worker = Worker(bus.names)
    await worker.start(bus)
    await bus.js.publish(bus.names.work_activity, b"\xc1\xc1 not msgpack")
    await bus.js.publish(bus.names.work_activity, encode({"n": "not an int"}))
    await bus.js.publish(bus.names.work_activity, encode(Job(n=7)))
    letters = await dead_letters(bus, 2)
    await until(lambda: worker.done == [7])
    reasons = sorted(letter.reason for letter in letters)
    assert "undecodable message: invalid Job" in reasons[0] or "undecodable" in reasons[0]
    assert all(letter.consumer == "worker" for letter in letters)
    assert any(letter.payload == b"\xc1\xc1 not msgpack" for letter in letters)
    await worker.stop()


async def test_transient_failures_retry_then_poison_is_dead_lettered(bus: Bus) -> None:
    worker = Worker(bus.names, max_deliver=3)
    await worker.start(bus)
    await bus.js.publish(bus.names.work_activity, encode(Job(n=1, fail_times=2)))  # 3rd works
    await bus.js.publish(bus.names.work_activity, encode(Job(n=2, fail_times=99)))  # poison
    await bus.js.publish(bus.names.work_activity, encode(Job(n=-1)))  # permanent
    letters = await dead_letters(bus, 2)
    await until(lambda: 1 in worker.done)
    assert worker.deliveries[1] == 3
    by_reason = {letter.num_delivered: letter for letter in letters}
    assert "failed 3 of 3 deliveries" in by_reason[3].reason
    assert by_reason[1].error["type"] == "Permanent"
    assert worker.deliveries[-1] == 1  # not retried
    await asyncio.sleep(0.3)
    assert worker.deliveries[2] == 3  # no endless loop
    await worker.stop()


async def test_heartbeats_keep_a_long_handler_from_being_redelivered(bus: Bus) -> None:
    worker = Worker(bus.names, ack_wait=1.0)
    await worker.start(bus)
    await bus.js.publish(bus.names.work_activity, encode(Job(n=5, sleep=2.5)))
    await until(lambda: worker.done == [5], timeout=15)
    assert worker.deliveries[5] == 1
    await worker.stop()


async def test_trace_context_travels_in_headers(bus: Bus) -> None:
    provider = TracerProvider()
    tracer = provider.get_tracer("test")
    worker = Worker(bus.names)
    await worker.start(bus)
    with tracer.start_as_current_span("submit") as span:
        headers = Envelope(tenant="acme").to_headers()
        await bus.js.publish(bus.names.work_activity, encode(Job(n=3)), headers=headers)
        sent_trace = span.get_span_context().trace_id
    assert headers["traceparent"].split("-")[1] == f"{sent_trace:032x}"
    await until(lambda: worker.done == [3])
    await worker.stop()


class Echo(Actor[dict]):
    message_type = dict

    def mailbox(self) -> Requests:
        assert self.bus is not None
        return Requests(subject=self.bus.names.ctl("echo"), queue="echo")

    async def handle(self, message: dict, delivery: Delivery) -> dict:
        if message.get("boom"):
            raise ConfigError("bad echo request", field="boom")
        return {"echo": message["x"], "tenant": delivery.envelope.tenant}


async def test_request_reply_and_typed_errors_cross_the_bus(bus: Bus) -> None:
    echo = Echo()
    await echo.start(bus)
    reply = await ask(bus, bus.names.ctl("echo"), {"x": 42}, envelope=Envelope(tenant="acme"))
    assert reply == {"echo": 42, "tenant": "acme"}
    with pytest.raises(ConfigError) as info:
        await ask(bus, bus.names.ctl("echo"), {"x": 1, "boom": True})
    assert info.value.field == "boom"
    with pytest.raises(CodecError, match="invalid"):
        await ask(bus, bus.names.ctl("echo"), [1, 2])
    await echo.stop()
    with pytest.raises(NerveError, match="no actor is serving"):
        await ask(bus, bus.names.ctl("echo"), {"x": 1}, timeout=1)


def test_errors_survive_the_wire() -> None:
    import pickle

    from nerve import StaleWriterError, error_from_wire

    err = StaleWriterError("moved on", run_id="r1", expected_seq=4)
    wire = msgpack.unpackb(msgpack.packb(err.to_wire()))
    back = error_from_wire(wire)
    assert type(back) is StaleWriterError and back.run_id == "r1" and back.expected_seq == 4
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is StaleWriterError and again.fields == err.fields


@pytest.mark.timeout(90)
async def test_a_message_that_crashes_its_worker_every_time_is_dead_lettered(
        bus: Bus, nats_server, tmp_path) -> None:
    import sys

    from actors import PoisonKeeper

    done = tmp_path / "done.jsonl"
    keeper = PoisonKeeper()
    await keeper.start(bus)
    letters = asyncio.create_task(dead_letters(bus, 1, within=60))
    await bus.js.publish(bus.names.work_tool, encode({"poison": True}))
    await bus.js.publish(bus.names.work_tool, encode({"ok": 1}))
    crashes = 0
    proc = None
    for _ in range(6):  # a supervisor restarting the worker, bounded
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.crashing_worker", nats_server.url, bus.names.prefix,
            str(done))
        try:
            code = await asyncio.wait_for(proc.wait(), timeout=8)
        except TimeoutError:
            break  # it stays up: the poison is no longer delivered
        assert code == 3
        crashes += 1
    assert crashes == 3  # max_deliver
    [letter] = await asyncio.wait_for(letters, 30)
    assert "out of deliveries (3)" in letter.reason and letter.consumer == "crasher"
    assert decode(letter.payload, dict) == {"poison": True}
    async with asyncio.timeout(10):  # the rest of the queue still flows
        while not done.exists() or '"ok": 1' not in done.read_text():
            await asyncio.sleep(0.05)
    with pytest.raises(Exception):  # noqa: B017 - gone from the work queue
        await bus.js.get_msg(bus.names.work_stream, letter.stream_seq)
    proc.kill()
    await proc.wait()
    await keeper.stop()


async def test_a_work_queue_outlives_its_consumer_being_deleted(bus: Bus) -> None:
    """The standing pull requests die with the consumer; the mailbox notices, re-creates
    the consumer and carries on with what was published meanwhile."""
    worker = Worker(bus.names)
    await worker.start(bus)
    try:
        await bus.js.publish(bus.names.work_activity, encode(Job(n=1)))
        await until(lambda: 1 in worker.done)
        await bus.js.delete_consumer(bus.names.work_stream, "worker")
        await bus.js.publish(bus.names.work_activity, encode(Job(n=2)))
        await until(lambda: 2 in worker.done, timeout=30)
    finally:
        await worker.stop()


async def test_a_work_queue_carries_on_after_the_server_restarts(tmp_path: Path) -> None:
    server = EmbeddedNats(EmbeddedNatsConfig(store_dir=tmp_path / "nats"))
    await server.start()
    b = await connect(ConnectOptions(servers=[server.url], prefix="rs"))
    await provision(b, StreamLimits(duplicate_window=33.0))  # an operator's own limits
    worker = Worker(b.names)
    await worker.start(b)
    try:
        await b.js.publish(b.names.work_activity, encode(Job(n=1)))
        await until(lambda: 1 in worker.done)
        await server.stop()
        await server.start()  # same port: the client reconnects; the server forgot our pulls
        async with asyncio.timeout(30):
            while True:  # the work stream is in memory: published once it is back
                try:
                    await b.js.publish(b.names.work_activity, encode(Job(n=2)))
                    break
                except (NatsClientError, TimeoutError):
                    await asyncio.sleep(0.2)
        await until(lambda: 2 in worker.done, timeout=30)
        # Re-created as it was provisioned, not with the worker's defaults.
        info = await b.js.stream_info(b.names.work_stream)
        assert info.config.duplicate_window == 33.0
    finally:
        await worker.stop()
        await b.close()
        await server.stop()


class SlowReplier(StepWorker):
    """A step worker whose results take longer than ``ack_wait`` to reach the run."""

    ack_wait = 1.0
    durable = "slow-replier"

    def __init__(self, name: str, log: list[tuple[str, str, int]]) -> None:
        super().__init__(name)
        self.log = log

    def work_subjects(self) -> list[str]:
        assert self.bus is not None
        return [self.bus.names.work_tool]

    async def execute(self, item: WorkItem, delivery: Delivery) -> str:
        self.log.append(("execute", self.name, delivery.num_delivered))
        return "done"

    async def reply(self, item: WorkItem, result: StepResult) -> None:
        await asyncio.sleep(3 * self.ack_wait)  # an owner slow to answer, a slow store
        self.log.append(("reply", self.name, 0))


async def test_a_step_worker_keeps_a_step_while_its_result_is_on_its_way(bus: Bus) -> None:
    """The handler's heartbeat ends when the step does; the item stays the worker's until
    the result is delivered and acked, so a peer never runs the finished step again."""
    log: list[tuple[str, str, int]] = []
    workers = [SlowReplier(f"slow-{i}", log) for i in (1, 2)]
    for w in workers:
        await w.start(bus)
    try:
        item = WorkItem(run_id="r1", tenant="acme", index=1, kind="tool", name="t",
                        key="r1:1", reply_to=bus.names.inbox("r1"))
        await bus.js.publish(bus.names.work_tool, encode(item))
        await until(lambda: any(what == "reply" for what, _, _ in log), timeout=15)
        async with asyncio.timeout(10):  # acked: gone from the work queue
            while (await bus.js.stream_info(bus.names.work_stream)).state.messages:
                await asyncio.sleep(0.05)
        await asyncio.sleep(2 * SlowReplier.ack_wait)  # time for a wrongful redelivery
        assert [entry for entry in log if entry[0] == "execute"] == [
            ("execute", log[0][1], 1)], log
        assert len([entry for entry in log if entry[0] == "reply"]) == 1, log
    finally:
        for w in workers:
            await w.stop()


def test_what_the_bus_cannot_carry_is_named_by_where_it_is() -> None:
    from actors import encode_json

    task = {"task": "x", "input": {"when": [1, {"at": object()}]}}
    for encoder in (encode, encode_json):
        with pytest.raises(CodecError, match=r"at input\.when\[1\]\.at \(object\)"):
            encoder(task)
