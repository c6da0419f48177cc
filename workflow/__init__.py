"""The state: the durable workflow engine, the orchestrator, activities and the agent loop."""

from workflow._activity import ActivityContext, ActivityWorker
from workflow._agent import AgentInput, ApprovalPayload, call_digest
from workflow._client import ENDED_STATUSES, NerveClient, RunSummary, summarize
from workflow._context import RunContext, SandboxSteps
from workflow._definition import (
    ActivityRegistry,
    WorkflowDefinition,
    WorkflowRegistry,
    activities,
    activity,
    workflow,
    workflows,
)
from workflow._instance import InstanceState, Signal, WorkflowInstance
from workflow._loop import WorkflowSandboxViolation
from workflow._orchestrator import Orchestrator, RunRecord
from workflow._policy import DEFAULT_POLICIES, RetryPolicy
from workflow._replay import (
    ReplayReport,
    assert_replays,
    load_history,
    replay_history,
    replay_run,
    save_history,
)

__all__ = [
    "DEFAULT_POLICIES",
    "ENDED_STATUSES",
    "ActivityContext",
    "ActivityRegistry",
    "ActivityWorker",
    "AgentInput",
    "ApprovalPayload",
    "InstanceState",
    "NerveClient",
    "Orchestrator",
    "ReplayReport",
    "RetryPolicy",
    "RunContext",
    "RunRecord",
    "RunSummary",
    "SandboxSteps",
    "Signal",
    "WorkflowDefinition",
    "WorkflowInstance",
    "WorkflowRegistry",
    "WorkflowSandboxViolation",
    "activities",
    "activity",
    "assert_replays",
    "call_digest",
    "load_history",
    "replay_history",
    "replay_run",
    "save_history",
    "summarize",
    "workflow",
    "workflows",
]
