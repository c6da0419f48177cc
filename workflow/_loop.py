"""A deterministic event loop for workflow code.

Workflow code is ordinary ``async`` Python (``await``, ``asyncio.gather``,
``asyncio.wait_for``...), but it must make the same decisions every time its history is
replayed. So it does not run on the process's event loop: it runs on a
:class:`WorkflowLoop`, which runs ready callbacks strictly in FIFO order and only when the
orchestrator activates it (after delivering a step result, a timer, a signal). Between
activations the workflow is frozen; results are delivered in history order; so the order in
which steps get their indices depends only on the history, never on network timing.

Timers requested through the loop (``asyncio.sleep``, ``asyncio.wait_for`` timeouts) become
durable timer steps via ``timer_factory``, so they survive restarts like ``ctx.sleep``.
Anything that needs real I/O (sockets, subprocesses, threads) raises
:class:`WorkflowSandboxViolation`: side effects belong in steps.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import inspect
import weakref
from collections.abc import Callable
from typing import Any

from nerve import WorkflowError


class WorkflowSandboxViolation(WorkflowError):
    """Workflow code tried to do I/O or use real time; do it in a step instead."""


TimerFactory = Callable[[float, asyncio.TimerHandle], None]


class WorkflowLoop(asyncio.AbstractEventLoop):
    """Runs one workflow's tasks deterministically. Driven by ``run_until_quiescent``."""

    def __init__(self, time_source: Callable[[], float], timer_factory: TimerFactory) -> None:
        self._ready: collections.deque[asyncio.Handle] = collections.deque()
        self._time_source = time_source
        self._timer_factory = timer_factory
        self._running = False
        self._closed = False
        self.errors: list[dict[str, Any]] = []
        self._tasks: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()

    # -- driving ---------------------------------------------------------------------------
    def run_until_quiescent(self) -> None:
        """Run every ready callback (and what they make ready) until nothing is ready."""
        outer = asyncio.events._get_running_loop()
        asyncio.events._set_running_loop(self)
        self._running = True
        try:
            while self._ready:
                handle = self._ready.popleft()
                if not handle._cancelled:
                    handle._run()
        finally:
            self._running = False
            asyncio.events._set_running_loop(outer)

    # -- what asyncio needs --------------------------------------------------------------
    def call_soon(self, callback: Callable[..., Any], *args: Any,
                  context: contextvars.Context | None = None) -> asyncio.Handle:
        handle = asyncio.Handle(callback, args, self, context)
        self._ready.append(handle)
        return handle

    def call_soon_threadsafe(self, callback: Callable[..., Any], *args: Any,
                             context: contextvars.Context | None = None) -> asyncio.Handle:
        raise WorkflowSandboxViolation("workflow code cannot be driven from other threads")

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any,
                   context: contextvars.Context | None = None) -> asyncio.TimerHandle:
        return self.call_at(self.time() + max(0.0, delay), callback, *args, context=context)

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any,
                context: contextvars.Context | None = None) -> asyncio.TimerHandle:
        handle = asyncio.TimerHandle(when, callback, args, self, context)
        self._timer_factory(when - self.time(), handle)
        return handle

    def _timer_handle_cancelled(self, handle: asyncio.TimerHandle) -> None:
        pass  # the durable timer's firing checks handle.cancelled()

    def time(self) -> float:
        return self._time_source()

    def create_future(self) -> asyncio.Future[Any]:
        return asyncio.Future(loop=self)

    def create_task(self, coro: Any, *, name: str | None = None,
                    context: contextvars.Context | None = None) -> asyncio.Task[Any]:
        task = asyncio.Task(coro, loop=self, name=name, context=context)
        self._tasks.add(task)
        return task

    def get_debug(self) -> bool:
        return False

    def is_running(self) -> bool:
        return self._running

    def is_closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._closed = True
        self._ready.clear()
        # Tasks that never got to run (the code blocked first): close their coroutines, or
        # each warns "never awaited" when collected (at the end of `nerve replay`, say).
        for task in list(self._tasks):
            coro = task.get_coro()
            if not task.done() and inspect.iscoroutine(coro) and \
                    inspect.getcoroutinestate(coro) == inspect.CORO_CREATED:
                coro.close()

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        self.errors.append(context)

    def default_exception_handler(self, context: dict[str, Any]) -> None:
        self.errors.append(context)

    def get_exception_handler(self) -> None:
        return None

    def set_exception_handler(self, handler: Any) -> None:
        raise WorkflowSandboxViolation("workflow code cannot replace the exception handler")

    def get_task_factory(self) -> None:
        return None

    # -- everything else is I/O: refuse it loudly ------------------------------------------
    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise WorkflowSandboxViolation(
            "workflow code tried to do I/O (sockets, files, subprocesses, threads) on the "
            "workflow loop; move it into a step: ctx.activity(), ctx.tool(), ctx.sandbox")

    run_forever = run_until_complete = stop = _refuse
    shutdown_asyncgens = shutdown_default_executor = _refuse
    run_in_executor = set_default_executor = _refuse
    getaddrinfo = getnameinfo = _refuse
    create_connection = create_server = create_datagram_endpoint = _refuse
    create_unix_connection = create_unix_server = _refuse
    sendfile = start_tls = sock_recv = sock_recv_into = sock_sendall = _refuse
    sock_connect = sock_accept = sock_sendfile = _refuse
    connect_accepted_socket = connect_read_pipe = connect_write_pipe = _refuse
    subprocess_shell = subprocess_exec = _refuse
    add_reader = remove_reader = add_writer = remove_writer = _refuse
    add_signal_handler = remove_signal_handler = _refuse
