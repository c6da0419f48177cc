"""Each package's public surface is what its ``__all__`` says; a change to it is on purpose.

Everything else lives in private ``_x.py`` modules and may change without notice.
"""

from __future__ import annotations

import importlib

import pytest

PUBLIC = {
    "bus": ["Bus", "ConnectOptions", "EmbeddedNats", "EmbeddedNatsConfig", "NATS_URL_ENV",
            "Names", "PidLock", "RawHeaders", "Reply", "ReplyInbox", "ServerState", "StoredAck",
            "StreamLimits", "check_token", "connect",
            "find_nats_server", "pid_alive", "provision", "stream_configs"],
    "actors": ["Actor", "ActorState", "DeadLetter", "Delivery", "Envelope", "H_HEARTBEAT",
               "H_NOT_OWNER",
               "JSON", "MAX_RESULT_BYTES", "MSGPACK", "Permanent", "PoisonKeeper", "Requests",
               "StepPulse", "StepResult",
               "StepWorker", "WorkItem", "WorkQueue", "ask", "cancel_and_wait", "configure_tracing",
               "decode", "encode", "encode_json", "new_id", "publish_dead_letter", "run",
               "stop_task", "tracing_enabled", "unpack"],
    "persistence": ["CancelMessage", "CancelRequested", "EVENT_ADAPTER", "Event", "ForkSpec",
                    "GroupCommit",
                    "INBOX_ADAPTER", "InboxMessage", "MarkerRecorded", "OwnerChanged",
                    "PauseMessage", "ResumeMessage", "RunBlocked", "RunCancelled",
                    "RunCompleted", "RunContinued", "RunFailed", "RunHistory", "RunPaused",
                    "RunResumed", "RunStarted", "SCHEMA_VERSION", "SandboxLost",
                    "SandboxNotice", "SandboxRestored", "SignalMessage", "SignalReceived",
                    "SignalRejected", "SignalTimedOut", "SnapshotInfo", "SnapshotStore",
                    "StepCompleted", "StepFailed", "StepKind", "StepScheduled", "StreamEvent",
                    "StreamEventType", "TERMINAL_TYPES", "TaskRequest", "TimerFired",
                    "WaitAbandoned",
                    "args_digest", "decode_record", "direct_get_subject", "encode_record"],
    "supervisor": ["ChildSpec", "Lease", "LeaseChange", "LeaseRecord", "OsProcess", "Restart",
                   "Strategy", "Supervisor", "SupervisorEvent", "bus_event_sink",
                   "lease_entries", "watch_leases"],
    "workflow": ["ActivityContext", "ActivityRegistry", "ActivityWorker", "AgentInput",
                 "ApprovalPayload",
                 "DEFAULT_POLICIES", "ENDED_STATUSES", "InstanceState", "NerveClient",
                 "Orchestrator",
                 "ReplayReport", "RetryPolicy", "RunContext", "RunRecord", "RunSummary",
                 "SandboxSteps", "Signal", "WorkflowDefinition", "WorkflowInstance",
                 "WorkflowRegistry", "WorkflowSandboxViolation", "activities", "activity",
                 "assert_replays", "call_digest", "load_history", "replay_history",
                 "replay_run", "save_history", "summarize", "workflow", "workflows"],
}


@pytest.mark.parametrize("package", sorted(PUBLIC))
def test_the_public_surface_is_pinned(package: str) -> None:
    module = importlib.import_module(package)
    assert sorted(module.__all__) == sorted(PUBLIC[package])
    for name in module.__all__:
        assert hasattr(module, name), f"{package}.{name} is listed but missing"


def test_every_error_is_in_the_one_tree_and_drawn() -> None:
    import nerve
    from nerve import NerveError

    errors = [getattr(nerve, n) for n in nerve.__all__
              if isinstance(getattr(nerve, n), type) and issubclass(getattr(nerve, n),
                                                                      Exception)]
    assert all(issubclass(e, NerveError) for e in errors)
    drawing = nerve._errors.__doc__ or ""
    missing = [e.__name__ for e in errors if e.__name__ not in drawing]
    assert not missing, f"errors missing from the tree in nerve/_errors.py: {missing}"
