"""Client commands: ``nerve run``, ``runs``, ``show``, ``signal``, ``cancel``, ``replay``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Any

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import NotFoundError
from pydantic import ValidationError

from actors import new_id, run
from cli._target import add_target_args, connect_target
from cli._worker import import_workflow_modules
from nerve import ConfigError, Conflict, RunNotFound, TaskRejected, WorkflowError
from persistence import RunHistory
from workflow import ENDED_STATUSES, ApprovalPayload, NerveClient, RunSummary, replay_run, summarize


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("run", help="submit a task and print its run id")
    p.add_argument("task", help="what the agent should do")
    p.add_argument("--tenant", default="default", help="whose run it is (default: default)")
    p.add_argument("--workflow", default="agent", help="the workflow to run (default: agent)")
    p.add_argument("--input", default=None, help="JSON object: the workflow's input")
    p.add_argument("--wait", action="store_true", help="wait for the run to end")
    p.add_argument("--follow", action="store_true", help="print the run's events as they come")
    p.add_argument("--timeout", type=float, default=None, help="with --wait/--follow: give up "
                   "waiting after this many seconds (exit 2; the run goes on)")
    p.add_argument("--json", action="store_true", help="print JSON (with --follow: one event "
                   "per line, then the run's summary)")
    add_target_args(p)
    p.set_defaults(func=lambda a: run(_run(a)))

    p = sub.add_parser("runs", help="list runs (from the API's read model when it is up)")
    p.add_argument("--tenant", default=None)
    p.add_argument("--status", default=None, choices=RUN_STATUSES, help="only runs in this "
                   "status")
    p.add_argument("--limit", type=_positive, default=50, help="at most this many, newest "
                   "first (default 50)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--api-url", default=None, help="the HTTP API (default: the running "
                   "`nerve up`; without one the histories are scanned)")
    p.add_argument("--api-key", default=None)
    add_target_args(p)
    p.set_defaults(func=lambda a: run(_runs(a)))

    p = sub.add_parser("show", help="a run's history, readable")
    p.add_argument("run_id")
    p.add_argument("--json", action="store_true")
    add_target_args(p)
    p.set_defaults(func=lambda a: run(_show(a)))

    p = sub.add_parser("signal", help="send a signal (an approval, say) to a run")
    p.add_argument("run_id")
    p.add_argument("name")
    p.add_argument("payload", nargs="?", default=None, help="JSON payload")
    p.add_argument("--sender", default=None)
    p.add_argument("--approves", default=None, help="digest of the tool call approved")
    add_target_args(p)
    p.set_defaults(func=lambda a: run(_signal(a)))

    p = sub.add_parser("cancel", help="cancel a run")
    p.add_argument("run_id")
    p.add_argument("--reason", default="cancelled from the CLI")
    add_target_args(p)
    p.set_defaults(func=lambda a: run(_cancel(a)))

    p = sub.add_parser("fork", help="start a new run from the first N events of a run "
                                    "(its sandbox starts from the snapshot at that point)")
    p.add_argument("run_id")
    p.add_argument("--at", type=int, required=True, help="history index to fork at (1..)")
    p.add_argument("--wait", action="store_true", help="wait for the fork to end")
    p.add_argument("--timeout", type=float, default=None, help="with --wait: give up waiting "
                   "after this many seconds (the fork goes on)")
    p.add_argument("--json", action="store_true")
    add_target_args(p)
    p.set_defaults(func=lambda a: run(_fork(a)))

    p = sub.add_parser("replay", help="replay a run's history against the current code")
    p.add_argument("run_id")
    p.add_argument("--workflows", action="append", default=[], help="module(s) that register "
                   "your workflows, as for `nerve up --workflows` (repeatable)")
    p.add_argument("--json", action="store_true")
    add_target_args(p)
    p.set_defaults(func=lambda a: run(_replay(a)))


RUN_STATUSES = ("running", "waiting", "paused", "blocked", *ENDED_STATUSES)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: at least 1")
    return value


def _json_arg(text: str | None, what: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{what} is not valid JSON: {exc}") from None


def _summary_dict(s: RunSummary) -> dict[str, Any]:
    return {"run_id": s.run_id, "tenant": s.tenant, "workflow": s.workflow,
            "version": s.version, "status": s.status, "started_at": s.started_at,
            "ended_at": s.ended_at, "result": s.result, "error": s.error, "steps": s.steps,
            "events": s.events, "waiting_for": s.waiting_for, "approvals": s.approvals,
            "blocked": s.blocked}


async def _run(args: argparse.Namespace) -> int:
    bus = await connect_target(args)
    client = NerveClient(bus)
    try:
        task_input = _json_arg(args.input, "--input")
        run_id = new_id("r")

        async def publish() -> None:
            await client.submit(args.tenant, args.task, workflow=args.workflow,
                                input=task_input, run_id=run_id)

        if not (args.wait or args.follow):
            await publish()
            print(json.dumps({"run_id": run_id}) if args.json else run_id)
            return 0
        deadline = None if args.timeout is None else time.monotonic() + args.timeout
        try:
            started = await client.until_started(run_id, publish, args.timeout)
        except TaskRejected as exc:
            raise TaskRejected(f"the task was rejected: {exc.message}", run_id=run_id) from None
        if not started:
            raise WorkflowError(
                f"run {run_id} did not start within --timeout {args.timeout}s: no orchestrator "
                f"took its task (is one up? `nerve up`, or `nerve worker --role orchestrator`). "
                f"The task stays queued and starts when one is", run_id=run_id)
        # Said at once: Ctrl-C before the end must not leave someone without the run id that
        # `nerve signal` and `nerve cancel` need.
        if args.follow:
            print(json.dumps({"type": "run", "data": {"run_id": run_id}}) if args.json
                  else f"run {run_id}", flush=True)
        else:  # stderr: stdout stays the one result (JSON with --json)
            print(f"run {run_id} started; waiting for its end (Ctrl-C stops the waiting, not "
                  "the run)", file=sys.stderr, flush=True)
        try:
            if args.follow and not await _follow(bus, run_id, deadline, args.json):
                raise WorkflowError("--timeout")
            summary = await _wait_telling_blocks(client, run_id, deadline)
        except WorkflowError:
            raise WorkflowError(f"run {run_id} did not end within --timeout {args.timeout}s "
                                f"(it goes on: nerve show {run_id})", run_id=run_id) from None
        if args.json:
            print(json.dumps(_summary_dict(summary), default=str))
        else:
            outcome = summary.result if summary.result is not None else summary.error
            print(f"{run_id} {summary.status}: {json.dumps(outcome, default=str)}")
        return 0 if summary.status == "completed" else 1
    finally:
        await bus.close()


def _blocked_notice(run_id: str, reason: str) -> str:
    return (f"run {run_id} is blocked: {reason}\n"
            f"  It resumes by itself when an orchestrator whose code replays its history takes "
            f"it over: deploy the fix and restart the orchestrators (`nerve replay {run_id} "
            f"--workflows MODULE` checks a fix first). Until then it waits and nothing is lost; "
            f"`nerve cancel {run_id}` ends it instead.")


async def _wait_telling_blocks(client: NerveClient, run_id: str,
                               deadline: float | None) -> RunSummary:
    """Wait for the run to end; say so (on stderr) when it blocks, which can last for days."""
    told = False
    while True:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        statuses = ENDED_STATUSES if told else (*ENDED_STATUSES, "blocked")
        summary = await client.wait(run_id, timeout=left, statuses=statuses)
        if summary.status != "blocked":
            return summary
        told = True
        reason = (summary.blocked or {}).get("reason", "")
        print(_blocked_notice(run_id, reason) + " Still waiting (Ctrl-C stops the waiting, "
              "not the run).", file=sys.stderr, flush=True)


async def _follow(bus, run_id: str, deadline: float | None, as_json: bool) -> bool:
    """Print the run's live events until it ends (True) or ``deadline`` passes (False).
    ``as_json``: one JSON object per event and line, for scripts."""
    from actors import decode
    from persistence import StreamEvent

    sub = await bus.js.subscribe(bus.names.stream(run_id), ordered_consumer=True)
    shown: dict[Any, str] = {}  # per LLM step: the text printed so far
    try:
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            try:
                if left is not None and left <= 0:
                    return False
                msg = await sub.next_msg(timeout=left)
            except (NatsTimeoutError, TimeoutError):
                return False
            ev = decode(msg.data, StreamEvent)
            if as_json:
                print(json.dumps({"type": ev.type, "data": ev.data}, default=str), flush=True)
            elif ev.type == "token":
                # A retried or taken-over stream restarts at an earlier offset: print only
                # what is new, and say so when the text changed under us.
                step = ev.data.get("index")
                before = shown.get(step, "")
                text = before[: int(ev.data.get("offset", len(before)))] + ev.data.get("text", "")
                if text.startswith(before):
                    sys.stdout.write(text[len(before):])
                else:
                    sys.stdout.write(f"\n[the model's stream restarted]\n{text}")
                shown[step] = text
                sys.stdout.flush()
            elif ev.type == "status" and ev.data.get("status") == "blocked":
                # Not the end: the run goes on once fixed code takes it over.
                print(f"\n[blocked] {_blocked_notice(run_id, ev.data.get('reason', ''))} "
                      "Still following.", flush=True)
            else:
                print(f"\n[{ev.type}] {json.dumps(ev.data, default=str)[:400]}", flush=True)
            if ev.type == "status" and ev.data.get("status") in ENDED_STATUSES:
                return True
    finally:
        await sub.unsubscribe()


async def _list_run_ids(bus) -> list[str]:
    names = bus.names
    try:
        info = await bus.js.stream_info(names.runs_stream, subjects_filter=names.history("*"))
    except NotFoundError:
        return []  # nerve has not run on this NATS (with this prefix) yet: no runs
    subjects = (info.state.subjects or {}) if info.state else {}
    return [s.split(".")[-2] for s in subjects]


async def _runs(args: argparse.Namespace) -> int:
    from cli._api import list_runs_via_api

    # The read model answers at once; scanning every history is the fallback.
    rows = await list_runs_via_api(args)
    if rows is not None:
        if args.json:
            print(json.dumps(rows, default=str))
            return 0
        print(f"{'RUN':<30} {'TENANT':<12} {'WORKFLOW':<12} {'STATUS':<10} {'STEPS':>5} "
              f"{'COST':>10}  STARTED")
        for r in rows:
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created_at"]))
            print(f"{r['run_id']:<30} {r['tenant']:<12} {r['workflow']:<12} {r['status']:<10} "
                  f"{r['steps']:>5} {'$' + format(r['cost_usd'], '.4f'):>10}  {started}")
        return 0
    bus = await connect_target(args)
    try:
        rows = []
        for run_id in await _list_run_ids(bus):
            events = await RunHistory(bus, run_id).read()
            if not events:
                continue
            s = summarize(events)
            if (args.tenant and s.tenant != args.tenant) or (args.status and
                                                              s.status != args.status):
                continue
            rows.append(s)
        rows.sort(key=lambda s: s.started_at, reverse=True)
        rows = rows[:args.limit]
        if args.json:
            print(json.dumps([_summary_dict(s) for s in rows], default=str))
            return 0
        print(f"{'RUN':<30} {'TENANT':<12} {'WORKFLOW':<12} {'STATUS':<10} {'STEPS':>5}  STARTED")
        for s in rows:
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.started_at))
            print(f"{s.run_id:<30} {s.tenant:<12} {s.workflow:<12} {s.status:<10} "
                  f"{s.steps:>5}  {started}")
        return 0
    finally:
        await bus.close()


async def _show(args: argparse.Namespace) -> int:
    bus = await connect_target(args)
    try:
        events = await NerveClient(bus).history(args.run_id)
        if args.json:
            print(json.dumps({"summary": _summary_dict(summarize(events)),
                              "events": [e.model_dump(mode="json") for e in events]}))
            return 0
        s = summarize(events)
        print(f"run {s.run_id}  tenant {s.tenant}  workflow {s.workflow} v{s.version}  "
              f"status {s.status}")
        t0 = events[0].at
        for n, ev in enumerate(events):
            fields = ev.model_dump(mode="json", exclude={"v", "at", "type"}, exclude_defaults=True)
            text = json.dumps(fields, default=str)
            print(f"{n:>4} +{ev.at - t0:8.3f}s  {ev.type:<16} {text[:160]}")
        for a in s.approvals:
            print(f"waiting for approval {a['digest']} (step {a['index']}; `nerve logs "
                  f"{s.run_id}` shows the tool call); decide with:\n  nerve signal "
                  f"{s.run_id} {a['name']} '{{\"approved\": true}}' --approves {a['digest']}")
        if s.blocked is not None:
            print(_blocked_notice(s.run_id, s.blocked.get("reason", "")))
            raised = (s.blocked.get("diff") or {}).get("error") or {}
            if raised.get("traceback"):
                print("  " + raised["traceback"].rstrip().replace("\n", "\n  "))
        return 0
    finally:
        await bus.close()


async def _unfinished(client: NerveClient, run_id: str, refusal: str) -> RunSummary:
    """Refuse (as the API does, with 409) to message a run that has ended."""
    summary = await client.summary(run_id)  # RunNotFound for an unknown run
    if summary.done:
        raise Conflict(f"run {run_id} is {summary.status} already; {refusal}", run_id=run_id)
    return summary


async def _signal(args: argparse.Namespace) -> int:
    bus = await connect_target(args)
    try:
        payload = _json_arg(args.payload, "payload")
        client = NerveClient(bus)
        summary = await _unfinished(client, args.run_id, "a signal would change nothing")
        if summary.is_approval(args.name, args.approves):
            # Checked here as the API checks it: the run would only record a rejection.
            pending = [a["digest"] for a in summary.approvals if a["name"] == args.name]
            try:
                payload = ApprovalPayload.model_validate(payload).model_dump(exclude_none=True)
            except ValidationError:
                raise ConfigError('an approval\'s payload is {"approved": true|false, '
                                  '"reason"?: text}') from None
            if args.approves not in pending:
                raise Conflict(f"run {args.run_id} has no pending approval "
                               f"{args.approves or '(no --approves given)'} named "
                               f"{args.name!r}; pending: {', '.join(pending) or 'none'} "
                               f"(nerve show {args.run_id} lists them)", run_id=args.run_id)
        sid = await client.signal(args.run_id, args.name, payload,
                                  sender=args.sender or "cli", approves=args.approves)
        if args.name in summary.late_for:
            print(f"nerve: run {args.run_id}'s last wait for {args.name!r} timed out and none "
                  "is open: the signal is recorded as late and changes nothing",
                  file=sys.stderr)
        elif args.name not in summary.waiting_for:
            # Not an error (a later wait takes it), but most often a misspelt name.
            waits = ", ".join(summary.waiting_for) or "no signal"
            print(f"nerve: run {args.run_id} waits for {waits} now; the signal "
                  f"{args.name!r} is kept for a later wait of that name", file=sys.stderr)
        print(sid)
        return 0
    finally:
        await bus.close()


async def _cancel(args: argparse.Namespace) -> int:
    bus = await connect_target(args)
    try:
        await _unfinished(NerveClient(bus), args.run_id, "nothing to cancel")
        await NerveClient(bus).cancel(args.run_id, args.reason, by="cli")
        return 0
    finally:
        await bus.close()


async def _fork(args: argparse.Namespace) -> int:
    bus = await connect_target(args)
    try:
        client = NerveClient(bus)
        parent = await client.summary(args.run_id)
        fork_id = new_id("r")

        async def publish() -> None:
            await client.fork(args.run_id, args.at, tenant=parent.tenant, new_run_id=fork_id)

        if not args.wait:
            await publish()
            print(json.dumps({"run_id": fork_id}) if args.json else fork_id)
            return 0
        try:
            await client.until_started(fork_id, publish, args.timeout)
        except TaskRejected as exc:
            raise TaskRejected(f"the fork was rejected: {exc.message}", run_id=fork_id) from None
        try:
            summary = await client.wait(fork_id, timeout=args.timeout)
        except WorkflowError:
            raise WorkflowError(f"fork {fork_id} did not end within --timeout {args.timeout}s "
                                f"(it goes on: nerve show {fork_id})", run_id=fork_id) from None
        print(json.dumps(_summary_dict(summary), default=str) if args.json
              else f"{fork_id} {summary.status}")
        return 0 if summary.status == "completed" else 1
    finally:
        await bus.close()


async def _replay(args: argparse.Namespace) -> int:
    import_workflow_modules(args.workflows)
    bus = await connect_target(args)
    try:
        report = await replay_run(bus, args.run_id)
    except RunNotFound as exc:
        raise RunNotFound(f"no run {args.run_id}") from exc
    finally:
        await bus.close()
    if args.json:
        print(json.dumps(dataclasses.asdict(report), default=str))
    else:
        print(report.describe())
    return 0 if report.deterministic else 1
