"""``RunContext``: everything workflow code may do, each effect a recorded step."""

from __future__ import annotations

import asyncio
import random as _random
import time
import uuid as _uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, NoReturn, TypeVar

from pydantic import BaseModel

from bus import Names
from gateway_actor import LLMRequest, LLMResponse
from workflow._instance import ContinueAsNew, Signal, WorkflowInstance
from workflow._policy import DEFAULT_POLICIES, RetryPolicy

ACTIVITY_ATTR = "__nerve_activity__"
T = TypeVar("T")


def activity_name(fn: str | Callable[..., Any]) -> str:
    if isinstance(fn, str):
        return fn
    name = getattr(fn, ACTIVITY_ATTR, None)
    if name is None:
        raise TypeError(f"{getattr(fn, '__name__', fn)!r} is not an activity: decorate it with "
                        "@activity (from workflow import activity), register it in an "
                        "ActivityRegistry, or pass the activity's name")
    return str(name)


class SandboxSteps:
    """The run's sandbox (``ctx.sandbox``): every call is a step run by the sandbox host."""

    def __init__(self, ctx: RunContext, sandbox_id: str) -> None:
        self._ctx = ctx
        self.id = sandbox_id

    def _step(self, name: str, args: dict[str, Any], retry: RetryPolicy | None) -> Any:
        ctx = self._ctx
        return ctx._instance.issue(
            "sandbox", name, args, policy=retry or ctx._policy("sandbox"),
            subject=ctx._names.work_sandbox(self.id),
            meta={"sandbox": {"id": self.id, "tenant": ctx.tenant, **ctx._sandbox_meta}})

    async def exec(self, cmd: str | list[str], *, timeout: float = 60.0, cwd: str | None = None,
                   env: dict[str, str] | None = None, stdin: str | None = None,
                   retry: RetryPolicy | None = None) -> dict[str, Any]:
        """Run a command; returns ``{"exit_code", "stdout", "stderr", "timed_out", ...}``."""
        args: dict[str, Any] = {"cmd": cmd, "timeout": timeout}
        if cwd is not None:
            args["cwd"] = cwd
        if env:
            args["env"] = env
        if stdin is not None:
            args["stdin"] = stdin
        return await self._step("exec", args, retry)

    async def write_file(self, path: str, content: str | bytes, *,
                         retry: RetryPolicy | None = None) -> dict[str, Any]:
        """Write ``content`` to ``path`` in the run's workspace (parents are created)."""
        return await self._step("write_file", {"path": path, "content": content}, retry)

    async def read_file(self, path: str, *, retry: RetryPolicy | None = None) -> dict[str, Any]:
        """Read ``path`` from the run's workspace: ``{"content": ...}``."""
        return await self._step("read_file", {"path": path}, retry)

    async def list_files(self, path: str = ".", *,
                         retry: RetryPolicy | None = None) -> dict[str, Any]:
        """The files under ``path`` in the run's workspace: ``{"files": [...]}``."""
        return await self._step("list_files", {"path": path}, retry)


class RunContext:
    """The handle workflow code gets. Time, randomness, ids and every side effect come from
    here, so a replay of the run's history makes the same decisions.
    """

    def __init__(self, instance: WorkflowInstance, names: Names,
                 policies: dict[str, RetryPolicy] | None = None,
                 sandbox_meta: dict[str, Any] | None = None) -> None:
        self._instance = instance
        self._names = names
        self._policies = {**DEFAULT_POLICIES, **(policies or {})}
        self._sandbox_meta = sandbox_meta or {}
        started = instance.started
        self.run_id = started.run_id
        self.tenant = started.tenant
        self.workflow = started.workflow
        self.version = started.version
        self.labels = dict(started.labels)
        fork = started.forked_from or {}
        self.sandbox = SandboxSteps(self, sandbox_id=str(fork.get("sandbox_id") or started.run_id))
        if fork:
            # A fork's sandbox starts from the parent's workspace at the fork point.
            self._sandbox_meta = {**self._sandbox_meta, "fork_of": {
                "sandbox_id": fork.get("parent_sandbox_id"), "step_index": fork.get("step_index")}}

    def _policy(self, kind: str, override: RetryPolicy | None = None) -> RetryPolicy:
        return override or self._policies[kind]

    @property
    def is_replaying(self) -> bool:
        """True while the run is catching up with its history (no new effects happen)."""
        return self._instance.is_replaying

    # -- steps -------------------------------------------------------------------------------
    async def activity(self, fn: str | Callable[..., Any], *args: Any,
                       retry: RetryPolicy | None = None, local: bool = False,
                       **kwargs: Any) -> Any:
        """Run a user-defined activity on an activity worker; it receives the step's
        idempotency key (``<run_id>:<index>``) in its :class:`ActivityContext`.

        ``local=True`` runs it inside the orchestrator that owns the run (like Temporal's
        local activities): no hop to a worker, same history, retries and idempotency key.
        For short, cheap effects; the activity must be registered in the orchestrator.
        """
        policy = self._policy("activity", retry)
        meta: dict[str, Any] = {}
        if policy.heartbeat_timeout and not local:
            meta["heartbeat_timeout"] = policy.heartbeat_timeout
        if local:
            meta["local"] = True
        return await self._instance.issue(
            "activity", activity_name(fn), {"args": list(args), "kwargs": kwargs},
            policy=policy, subject=None if local else self._names.work_activity, meta=meta)

    async def llm(self, request: LLMRequest | dict[str, Any], *,
                  retry: RetryPolicy | None = None) -> LLMResponse:
        """Ask the brain (the LLM gateway). Tokens stream to ``nerve.stream.<run_id>``."""
        req = request if isinstance(request, LLMRequest) else LLMRequest.model_validate(request)
        raw = await self._instance.issue(
            "llm", req.model or "default", req.model_dump(mode="json"),
            policy=self._policy("llm", retry), subject=self._names.work_llm)
        return LLMResponse.model_validate(raw)

    async def tool(self, name: str, args: dict[str, Any] | None = None, *,
                   retry: RetryPolicy | None = None) -> Any:
        """Call a tool through the tool gateway."""
        return await self._instance.issue("tool", name, args or {},
                                          policy=self._policy("tool", retry),
                                          subject=self._names.work_tool)

    async def sleep(self, seconds: float) -> None:
        """A durable timer: survives restarts and fires once."""
        await self._instance.issue("timer", "sleep", {"seconds": float(seconds)},
                                   deadline_in=float(seconds))

    async def wait_signal(self, name: str, *, timeout: float | None = None,
                          default: Any = None, approves: str | None = None) -> Signal:
        """Wait for a signal called ``name`` (a human's approval, say).

        The first of the signal or the timeout wins and is recorded; on timeout the result
        carries ``default`` and ``timed_out=True``. With ``approves``, only a signal bound to
        that digest (of the exact tool call) counts; others are recorded as rejected.
        """
        args: dict[str, Any] = {"timeout": timeout, "default": default}
        if approves is not None:
            args["approves"] = approves
        return await self._instance.issue("signal", name, args, deadline_in=timeout)

    # -- recorded values ----------------------------------------------------------------------
    def now(self) -> float:
        """Wall-clock time (epoch seconds), recorded: a replay sees the same value."""
        return float(self._instance.marker("now", "", time.time))

    def random(self) -> float:
        """A random float in [0, 1), recorded."""
        return float(self._instance.marker("random", "", _random.random))

    def uuid(self) -> str:
        """A random UUID, recorded."""
        return str(self._instance.marker("uuid", "", lambda: str(_uuid.uuid4())))

    def continue_as_new(self, input: Any = None) -> NoReturn:
        """End this segment of the run and start the workflow over with ``input``, in the
        same run. A run that lives for weeks calls this now and then so that a takeover
        replays only its latest segment."""
        raise ContinueAsNew(_plain(input))

    def as_completed(self, aws: Iterable[Awaitable[T]]) -> Iterator[asyncio.Future[T]]:
        """``asyncio.as_completed`` that starts the steps in the order given.

        ``asyncio.as_completed`` puts coroutines in a set before making them tasks, so the
        steps they issue get their indices in an order that changes from one process to the
        next, and a replay elsewhere blocks the run. Here they become tasks in list order
        first; results still come as they complete (in the order the history recorded).
        """
        return asyncio.as_completed([asyncio.ensure_future(a) for a in aws])

    def patched(self, change_id: str) -> bool:
        """True where new code should run: always for new runs, and for old histories only
        if they were recorded with this patch. Lets new code run beside old histories."""
        return self._instance.patched(change_id)

    # -- live output ----------------------------------------------------------------------------
    def emit(self, type_: str, **data: Any) -> None:
        """Publish a live event on ``nerve.stream.<run_id>`` (not part of the history)."""
        self._instance.emit(type_, _plain(data))

    def progress(self, **data: Any) -> None:
        """Publish a ``progress`` live event (``ctx.emit("progress", **data)``)."""
        self.emit("progress", **data)


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
