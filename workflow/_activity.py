"""``ActivityWorker``: runs user-defined activities (``ctx.activity``) from ``NERVE_WORK``."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from nats.errors import Error as NatsClientError

from actors import Delivery, StepWorker, WorkItem
from nerve import ConfigError, StepError
from workflow._definition import ActivityRegistry, activities


@dataclass(frozen=True, slots=True)
class ActivityContext:
    """What an activity knows about the step it performs.

    ``key`` is the same on every attempt and every redelivery of this step: use it to make
    the effect idempotent (a payment id, a ``create``-only KV key, an upsert key).
    """

    key: str
    run_id: str
    tenant: str
    index: int
    attempt: int
    name: str


async def call_activity(fn: Any, actx: ActivityContext, args: Any) -> Any:
    """Call an activity function: coroutines on the loop, plain functions in a thread."""
    positional = (args or {}).get("args", [])
    keywords = (args or {}).get("kwargs", {})
    if inspect.iscoroutinefunction(fn):
        return await fn(actx, *positional, **keywords)
    return await asyncio.to_thread(fn, actx, *positional, **keywords)


class ActivityWorker(StepWorker):
    """Pulls ``nerve.work.activity`` and runs the registered function for each item.

    Async activities run on the event loop; plain functions run in a worker thread so they
    cannot block it. An async activity must not hold the loop either (``time.sleep``,
    heavy CPU): the loop sends the ``in_progress`` beats that keep a step with this worker,
    and a step silent for ``ack_wait`` (5 s) goes to another worker while this one still
    runs it. That is also how a dead worker's steps come back within seconds, to a peer or
    to its own restart.

    An async activity is cancelled when its step's timeout passes (the owner has given up on
    that attempt) and when its run ends (cancelled, failed, or done without it): it gets
    ``CancelledError`` where it awaits, so its ``finally`` blocks run.
    """

    durable: ClassVar[str] = "activities"

    def __init__(self, registry: ActivityRegistry | None = None, worker_id: str | None = None,
                 ) -> None:
        super().__init__("activity-worker", worker_id)
        self.registry = registry or activities
        self._running: dict[str, set[asyncio.Task[Any]]] = {}  # run id -> its activities
        self._stopped: set[asyncio.Task[Any]] = set()  # cancelled because their run ended
        self._ended_sub: Any = None

    async def on_start(self) -> None:
        assert self.bus is not None
        self._ended_sub = await self.bus.nc.subscribe(self.bus.names.run_ended(),
                                                      cb=self._on_run_ended)

    async def on_stop(self) -> None:
        await super().on_stop()
        if self._ended_sub is not None:
            with contextlib.suppress(NatsClientError):
                await self._ended_sub.unsubscribe()

    async def _on_run_ended(self, msg: Any) -> None:
        run_id = msg.subject.rsplit(".", 2)[-2]
        for task in self._running.get(run_id, ()):
            self._stopped.add(task)
            task.cancel()

    def work_subjects(self) -> list[str]:
        """The ``NERVE_WORK`` subject of activity steps."""
        assert self.bus is not None
        return [self.bus.names.work_activity]

    async def execute(self, item: WorkItem, delivery: Delivery) -> Any:
        """Run the activity the item names with the step's :class:`ActivityContext`."""
        try:
            fn = self.registry.get(item.name)
        except ConfigError:
            # Retryable: in a rolling deploy another worker (or this one, updated) has it.
            raise ConfigError(
                f"no activity named {item.name!r} is registered on activity worker "
                f"{self.worker_id} (it has: {', '.join(self.registry.names()) or 'none'}). "
                "Every activity worker takes any activity step, so each must register every "
                "activity the workflows call", activity=item.name, worker=self.worker_id,
                retryable=True) from None
        actx = ActivityContext(item.key, item.run_id, item.tenant, item.index, item.attempt,
                               item.name)
        # Past its timeout the owner has given up on this attempt (and may have started the
        # next): an async activity is cancelled there rather than left running beside it. A
        # plain function in its thread cannot be stopped; its result is then ignored.
        left = None if item.deadline is None else item.deadline - time.time()
        task = asyncio.current_task()
        assert task is not None
        running = self._running.setdefault(item.run_id, set())
        running.add(task)
        try:
            async with asyncio.timeout(left):
                return await call_activity(fn, actx, item.args)
        except TimeoutError:
            if left is not None and time.time() >= item.deadline:  # type: ignore[operator]
                raise StepError(f"attempt {item.attempt} of step {item.index} (activity "
                                f"{item.name}) was stopped at its timeout", run_id=item.run_id,
                                index=item.index, retryable=True) from None
            raise
        except asyncio.CancelledError:
            if task not in self._stopped:
                raise  # the worker is stopping: the step is redelivered
            task.uncancel()
            raise StepError(f"activity {item.name} (step {item.index}) was stopped: its run "
                            "ended", run_id=item.run_id, index=item.index,
                            retryable=False) from None
        finally:
            self._stopped.discard(task)
            running.discard(task)
            if not running:
                self._running.pop(item.run_id, None)
