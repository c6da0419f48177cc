"""The actor kit: actors, mailboxes, the envelope and the wire codec."""

from actors._actor import Actor, ActorState, Delivery, Permanent, ask, run
from actors._codec import JSON, MSGPACK, decode, encode, encode_json, unpack
from actors._envelope import Envelope, new_id
from actors._mailbox import DeadLetter, Requests, WorkQueue, publish_dead_letter
from actors._poison import PoisonKeeper
from actors._tasks import cancel_and_wait, stop_task
from actors._telemetry import configure_tracing, tracing_enabled
from actors._work import (
    H_HEARTBEAT,
    H_NOT_OWNER,
    MAX_RESULT_BYTES,
    StepPulse,
    StepResult,
    StepWorker,
    WorkItem,
)

__all__ = [
    "H_HEARTBEAT",
    "H_NOT_OWNER",
    "JSON",
    "MAX_RESULT_BYTES",
    "MSGPACK",
    "Actor",
    "ActorState",
    "DeadLetter",
    "Delivery",
    "Envelope",
    "Permanent",
    "PoisonKeeper",
    "Requests",
    "StepPulse",
    "StepResult",
    "StepWorker",
    "WorkItem",
    "WorkQueue",
    "ask",
    "cancel_and_wait",
    "configure_tracing",
    "decode",
    "encode",
    "encode_json",
    "new_id",
    "publish_dead_letter",
    "run",
    "stop_task",
    "tracing_enabled",
    "unpack",
]
