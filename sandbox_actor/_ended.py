"""Sandboxes of ended runs: how the hands learn that a run is over, and what goes with it.

A sandbox lives as long as its run (its id is the run id, or a fork's run id). When the run
ends (``run_completed``, ``run_failed``, ``run_cancelled``: ``persistence.TERMINAL_TYPES``)
its sandbox is destroyed and its host's slot freed. Three ways lead there, so none depends
on another process having lived long enough:

* the orchestrator that records the end publishes ``<prefix>.ctl.run.<run_id>.ended``
  (core NATS, best effort) and the host owning the sandbox destroys it at once;
* each host sweeps its sandboxes every ``sweep_every`` seconds and reads the last record
  of each one's run history (one direct get, whatever the history's length): the end an
  orchestrator recorded just before dying, or a notice lost in a reconnect, is found there;
* a sandbox is never brought up, adopted after a host restart, or moved off a dead host
  for a run that has ended: its assignment is marked ``destroyed`` instead.

What goes: the live sandbox (processes, mounts, cgroups, its directory), the sandbox's
durable consumer and any steps still queued for it (a cancelled run's). What stays: its
snapshots, which forks of the run start from (``nerve fork`` of an ended run is the usual
case), and its assignment, marked ``destroyed``, which ``plan_fork`` reads the spec from.
"""

from __future__ import annotations

import contextlib
import logging

from nats.errors import Error as NatsClientError
from nats.js.errors import NotFoundError

from bus import Bus, Names
from nerve import NerveError
from persistence import TERMINAL_TYPES, RunHistory

log = logging.getLogger("nerve.sandbox.ended")


def run_id_of_ended_subject(subject: str) -> str:
    return subject.rsplit(".", 2)[-2]


async def run_ended(bus: Bus, run_id: str) -> str | None:
    """The type of the event that ended ``run_id`` (``run_completed``, ...), else None.

    None also when the history cannot be read now (or there is none, as for sandboxes
    driven by hand): a sandbox is destroyed only on the history's word.
    """
    try:
        last = await RunHistory(bus, run_id).last()
    except (NatsClientError, TimeoutError, NerveError) as exc:
        log.debug("could not read the end of run %s: %r", run_id, exc)
        return None
    for event in reversed(last):
        if event.type in TERMINAL_TYPES:
            return event.type
    return None


async def clear_work(bus: Bus, sandbox_id: str) -> None:
    """Drop what is left of a destroyed sandbox in the work stream: the steps still queued
    for it (nothing will run them) and its durable consumer."""
    names = bus.names
    with contextlib.suppress(NotFoundError):
        await bus.js.delete_consumer(names.work_stream, Names.sandbox_durable(sandbox_id))
    with contextlib.suppress(NotFoundError):
        await bus.js.purge_stream(names.work_stream, subject=names.work_sandbox(sandbox_id))
