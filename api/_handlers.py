"""The REST endpoints under ``/v1`` (the SSE endpoint lives in :mod:`api._sse`).

Tenancy: a tenant's key sees and acts on its own tenant's runs only. A run of another
tenant answers exactly like a run that does not exist (404, same message), so a key learns
nothing about other tenants. Admin keys act for any tenant.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from actors import ask, new_id
from api._appkeys import SERVICES
from api._http import (
    describe,
    json_response,
    principal,
    query_bool,
    query_choice,
    query_int,
    read_body,
    require_admin,
    require_tenant,
)
from api._models import (
    RUN_STATUSES,
    ApprovalPayload,
    BudgetUpdate,
    CancelBody,
    ForkBody,
    KillBody,
    SignalBody,
    SubmitRun,
)
from api._projector import Projector, rebuild
from api._services import RunState, Services
from budget_actor import BudgetReport, Limits, ShowRequest
from bus import check_token
from nerve._errors import (
    BusError,
    ConfigError,
    Conflict,
    InvalidRequest,
    PermissionDenied,
    UnknownTenant,
)
from persistence import SignalMessage
from workflow import summarize


def _svc(request: web.Request) -> Services:
    return request.app[SERVICES]


def _links(run_id: str) -> dict[str, str]:
    base = f"/v1/runs/{run_id}"
    return {"self": base, "events": f"{base}/events", "history": f"{base}/history",
            "console": f"/runs/{run_id}"}


def _tenant_of_request(p: Any, asked: str | None) -> str:
    if p.admin:
        if not asked:
            raise InvalidRequest("an admin key must say which tenant the run is for "
                                 "(\"tenant\" in the body)", field="tenant")
        return asked
    if asked and asked != p.tenant:
        raise PermissionDenied(f"this key belongs to tenant {p.tenant}; it cannot start runs "
                               f"for tenant {asked}")
    assert p.tenant is not None
    return p.tenant


def _query_tenant(request: web.Request) -> str | None:
    tenant = request.query.get("tenant")
    if tenant is not None:
        try:
            check_token("tenant", tenant)
        except ConfigError as exc:
            raise InvalidRequest(f"?tenant=: {exc.message}", field="tenant") from None
    return tenant


def _check_tenant_path(tenant: str) -> None:
    try:
        check_token("tenant", tenant)
    except ConfigError as exc:
        raise InvalidRequest(exc.message, field="tenant") from None


# -- runs ---------------------------------------------------------------------------------------
async def submit_run(request: web.Request) -> web.Response:
    svc = _svc(request)
    p = principal(request)
    body = await read_body(request, SubmitRun)
    tenant = _tenant_of_request(p, body.tenant)
    if body.task is None and body.input is None:
        raise InvalidRequest("a run needs \"task\" (text for the agent) or \"input\" (an object "
                             "for the workflow)", field="task")
    run_id = body.run_id or new_id("r")
    if body.run_id:
        owner = await svc.run_tenant(run_id)
        if owner is not None:
            if not p.may_act_for(owner) or owner != tenant:
                raise Conflict(f"run id {run_id} is taken; choose another (or leave run_id out "
                               "and one is made for you)", run_id=run_id)
            state = await svc.state(run_id)
            return json_response({"run_id": run_id, "status": state.run["status"],
                                  "run": state.run, "links": _links(run_id)}, status=200)
    extra = {k: getattr(body, k) for k in ("tools", "model", "max_turns", "version")
             if getattr(body, k) is not None}

    async def publish() -> None:
        await svc.client.submit(tenant, body.task, input=body.input, workflow=body.workflow,
                                run_id=run_id, labels=body.labels, **extra)

    state = await svc.start_and_wait(tenant, run_id, publish, body.wait)
    svc.metrics.inc("nerve_api_runs_submitted_total")
    headers = {"Location": f"/v1/runs/{run_id}"}
    if state is None:
        return json_response({"run_id": run_id, "status": "queued", "links": _links(run_id)},
                             status=202, headers=headers)
    return json_response({"run_id": run_id, "status": state.run["status"], "run": state.run,
                          "links": _links(run_id)}, status=201, headers=headers)


async def list_runs(request: web.Request) -> web.Response:
    svc = _svc(request)
    p = principal(request)
    q = request.query
    tenant = _query_tenant(request)
    if not p.admin:
        if tenant and tenant != p.tenant:
            raise PermissionDenied(f"this key belongs to tenant {p.tenant}; it cannot list "
                                   f"tenant {tenant}'s runs")
        tenant = p.tenant
    status = query_choice(request, "status", RUN_STATUSES)
    workflow = q.get("workflow") or None
    search = q.get("q") or None
    if search is not None and len(search) > 200:
        raise InvalidRequest(f"?q= is {len(search)} characters; search with at most 200",
                             field="q")
    limit = query_int(request, "limit", 50, 1, 500)
    runs, cursor = await svc.model.list_runs(tenant=tenant, status=status, workflow=workflow,
                                             q=search, limit=limit, cursor=q.get("cursor"))
    out: dict[str, Any] = {"runs": runs}
    if cursor:
        out["next_cursor"] = cursor
    return json_response(out)


async def get_run(request: web.Request) -> web.Response:
    svc = _svc(request)
    run_id = request.match_info["run_id"]
    await svc.resolve(principal(request), run_id)
    state = await svc.state(run_id)
    out: dict[str, Any] = {"run": state.run, "approvals": state.approvals}
    if query_bool(request, "steps", False):
        out["steps"] = state.steps
    return json_response(out)


async def get_history(request: web.Request) -> web.Response:
    svc = _svc(request)
    run_id = request.match_info["run_id"]
    await svc.resolve(principal(request), run_id)
    offset = query_int(request, "offset", 0, 0, 10**9)
    limit = query_int(request, "limit", 1000, 1, 10_000)
    state = await svc.state(run_id)
    page = state.events[offset:offset + limit]
    events = []
    for n, (seq, ev) in enumerate(page, start=offset):
        d = ev.model_dump(mode="json")
        d["index"], d["seq"] = n, seq
        events.append(d)
    return json_response({"run_id": run_id, "events": events, "total": len(state.events)})


def _open_approvals(state: RunState) -> list[dict[str, Any]]:
    return [a for a in state.approvals if a["status"] == "pending"]


async def send_signal(request: web.Request) -> web.Response:
    svc = _svc(request)
    p = principal(request)
    run_id = request.match_info["run_id"]
    name = request.match_info["name"]
    await svc.resolve(p, run_id)
    try:
        SignalMessage(name=name, signal_id="x")
    except ValidationError:
        raise InvalidRequest(f"invalid signal name {name[:140]!r}: use 1-128 characters from "
                             "A-Z a-z 0-9 _ . - :", field="name") from None
    body = await read_body(request, SignalBody, optional=True)
    state = await svc.state(run_id)
    if state.finished:
        raise Conflict(f"run {run_id} is {state.run['status']}; a signal would change nothing",
                       run_id=run_id)
    if summarize([e for _, e in state.events]).is_approval(name, body.approves):
        try:
            decision = ApprovalPayload.model_validate(body.payload)
        except ValidationError as exc:
            raise InvalidRequest(f"an approval's payload is {{\"approved\": true|false, "
                                 f"\"reason\"?: text}}: {describe(exc)}",
                                 field="payload") from None
        pending = _open_approvals(state)
        if not body.approves:
            raise InvalidRequest("an approval must say which tool call it decides: "
                                 "\"approves\" is the digest from the approval_requested "
                                 f"event (pending: {[a['digest'] for a in pending] or 'none'})",
                                 field="approves")
        if name != "approval" or not any(a["digest"] == body.approves for a in pending):
            raise Conflict(f"run {run_id} has no pending approval {body.approves!r} named "
                           f"{name!r} (pending: {[a['digest'] for a in pending] or 'none'})",
                           run_id=run_id)
        payload: Any = decision.model_dump(exclude_none=True)
    else:
        payload = body.payload
    signal_id = await svc.client.signal(run_id, name, payload, sender=p.name,
                                        approves=body.approves, signal_id=body.signal_id)
    svc.metrics.inc("nerve_api_signals_total")
    return json_response({"signal_id": signal_id, "run_id": run_id, "name": name}, status=202)


async def cancel_run(request: web.Request) -> web.Response:
    svc = _svc(request)
    p = principal(request)
    run_id = request.match_info["run_id"]
    await svc.resolve(p, run_id)
    body = await read_body(request, CancelBody, optional=True)
    state = await svc.state(run_id)
    if state.finished:
        raise Conflict(f"run {run_id} is {state.run['status']} already; nothing to cancel",
                       run_id=run_id)
    await svc.client.cancel(run_id, body.reason or "cancelled through the API", by=p.name)
    return json_response({"run_id": run_id, "status": "cancelling"}, status=202)


async def fork_run(request: web.Request) -> web.Response:
    svc = _svc(request)
    p = principal(request)
    run_id = request.match_info["run_id"]
    tenant = await svc.resolve(p, run_id)
    body = await read_body(request, ForkBody)
    state = await svc.state(run_id)
    if body.at > len(state.events):
        raise InvalidRequest(f"cannot fork {run_id} at {body.at}: its history has "
                             f"{len(state.events)} events (fork at 1..{len(state.events)})",
                             field="at")
    new_run = body.run_id or new_id("r")
    if body.run_id and await svc.run_tenant(new_run) is not None:
        raise Conflict(f"run id {new_run} is taken; choose another", run_id=new_run)

    async def publish() -> None:
        await svc.client.fork(run_id, body.at, tenant=tenant, new_run_id=new_run)

    forked = await svc.start_and_wait(tenant, new_run, publish, body.wait)
    headers = {"Location": f"/v1/runs/{new_run}"}
    if forked is None:
        return json_response({"run_id": new_run, "status": "queued", "links": _links(new_run)},
                             status=202, headers=headers)
    return json_response({"run_id": new_run, "status": forked.run["status"],
                          "run": forked.run, "links": _links(new_run)}, status=201,
                         headers=headers)


async def list_approvals(request: web.Request) -> web.Response:
    svc = _svc(request)
    p = principal(request)
    tenant = _query_tenant(request)
    if not p.admin:
        if tenant and tenant != p.tenant:
            raise PermissionDenied(f"this key belongs to tenant {p.tenant}; it cannot see "
                                   f"tenant {tenant}'s approvals")
        tenant = p.tenant
    allowed = ("pending", "approved", "rejected", "timed_out", "expired", "any")
    status = query_choice(request, "status", allowed, "pending")
    rows = await svc.model.approvals(tenant=tenant, status=None if status == "any" else status,
                                     limit=query_int(request, "limit", 200, 1, 1000))
    return json_response({"approvals": rows})


# -- tenants ------------------------------------------------------------------------------------
async def _budget_report(svc: Services, tenant: str) -> dict[str, Any] | None:
    try:
        reply = await ask(svc.bus, svc.bus.names.budget_api, ShowRequest(tenant=tenant),
                          timeout=2.0)
        report = reply[0] if isinstance(reply, list) else reply
        return BudgetReport.model_validate(report).model_dump(mode="json")
    except UnknownTenant:
        return None
    except BusError:
        pass  # no budget actor: read the ledger (no burn rate)
    try:
        st = await svc.ledger.state(tenant)
    except UnknownTenant:
        return None
    return BudgetReport.of(st, time.time()).model_dump(mode="json")


async def get_budget(request: web.Request) -> web.Response:
    svc = _svc(request)
    tenant = request.match_info["tenant"]
    _check_tenant_path(tenant)
    require_tenant(principal(request), tenant)
    return json_response({"tenant": tenant, "budget": await _budget_report(svc, tenant),
                          "spend": await svc.model.spend(tenant),
                          "counts": await svc.model.counts(tenant)})


async def put_budget(request: web.Request) -> web.Response:
    svc = _svc(request)
    p = principal(request)
    tenant = request.match_info["tenant"]
    _check_tenant_path(tenant)
    require_admin(p)
    body = await read_body(request, BudgetUpdate)
    if body.replace:
        await svc.ledger.set_limits(tenant, Limits.parse(body.limits), by=p.name)
    else:
        await svc.ledger.update_limits(tenant, body.limits, by=p.name)
    return json_response({"tenant": tenant, "budget": await _budget_report(svc, tenant),
                          "spend": await svc.model.spend(tenant),
                          "counts": await svc.model.counts(tenant)})


async def kill_tenant(request: web.Request) -> web.Response:
    svc = _svc(request)
    p = principal(request)
    tenant = request.match_info["tenant"]
    _check_tenant_path(tenant)
    require_tenant(p, tenant)
    body = await read_body(request, KillBody, optional=True)
    if body.reset:
        if not p.admin:
            raise PermissionDenied("only an operator's admin key may lift a kill-switch")
        changed = await svc.ledger.reset(tenant, by=p.name, reason=body.reason)
        return json_response({"tenant": tenant, "killed": False, "changed": changed})
    notice = await svc.ledger.kill(tenant, reason=body.reason, by=p.name, policy=body.policy)
    svc.metrics.inc("nerve_api_kills_total")
    return json_response({"tenant": tenant, "killed": True,
                          "notice": notice.model_dump(mode="json")})


# -- operators and plumbing ---------------------------------------------------------------------
async def whoami(request: web.Request) -> web.Response:
    p = principal(request)
    return json_response({"tenant": p.tenant, "admin": p.admin, "key_id": p.key_id})


async def reindex(request: web.Request) -> web.Response:
    """Rebuild the read model from the streams and swap it in (admin only)."""
    svc = _svc(request)
    require_admin(principal(request))
    if svc.reindex_lock.locked():
        raise Conflict("a reindex is already running; wait for it to finish")
    async with svc.reindex_lock:
        t0 = time.perf_counter()
        result = await reindex_model(svc)
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return json_response(result)


async def reindex_model(svc: Services) -> dict[str, Any]:
    live = svc.model.path
    tmp = live.with_name(f".{live.name}.rebuild-{new_id()}")
    try:
        fresh = await rebuild(svc.bus, tmp)
        try:
            position = fresh.position
            runs = sum((await fresh.counts()).values())
        finally:
            await fresh.close()
    except BaseException:
        await asyncio.to_thread(_remove_db, tmp)
        raise
    # The swap: stop the feed, close the old file, move the new one in, feed from its end.
    await svc.projector.stop()
    await svc.model.close()
    await asyncio.to_thread(_swap_files, tmp, live)
    await svc.model.open()
    svc.projector = Projector(svc.bus, svc.model, instance=svc.config.instance)
    svc.projector.start()
    return {"position": position, "runs": runs}


def _remove_db(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            Path(str(path) + suffix).unlink()


def _swap_files(new: Path, live: Path) -> None:
    for suffix in ("-wal", "-shm"):  # the closed database's; a stale WAL must not be replayed
        with contextlib.suppress(FileNotFoundError):
            Path(str(live) + suffix).unlink()
    os.replace(new, live)


async def healthz(request: web.Request) -> web.Response:
    svc = _svc(request)
    nats_ok = svc.bus.nc.is_connected
    model = {"open": svc.model.is_open, "position": svc.model.position,
             "feed": svc.projector.running, "caught_up": svc.projector.caught_up.is_set()}
    ok = nats_ok and svc.model.is_open and svc.projector.running
    return json_response({"status": "ok" if ok else "degraded", "nats": nats_ok,
                          "readmodel": model}, status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    svc = _svc(request)
    return web.Response(text=svc.metrics.render(),
                        content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


async def openapi(request: web.Request) -> web.Response:
    from api._openapi import document  # here: the document is built from this module's routes

    return json_response(document())


__all__ = [
    "cancel_run",
    "fork_run",
    "get_budget",
    "get_history",
    "get_run",
    "healthz",
    "kill_tenant",
    "list_approvals",
    "list_runs",
    "metrics",
    "openapi",
    "put_budget",
    "reindex",
    "reindex_model",
    "send_signal",
    "submit_run",
    "whoami",
]
