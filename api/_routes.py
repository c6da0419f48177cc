"""The route table: every endpoint once, with what the OpenAPI document says about it.

The application's routes and ``GET /openapi.json`` are both built from :data:`ROUTES`, so
the document cannot drift from what the server serves (a test checks both ways).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel

from api import _handlers as h
from api import _models as m
from api._sse import stream_events

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Auth = Literal["none", "key", "admin"]


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    where: Literal["path", "query", "header"]
    description: str
    schema: dict[str, Any] = field(default_factory=lambda: {"type": "string"})
    required: bool = False


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    handler: Handler
    op_id: str
    summary: str
    tag: str
    auth: Auth = "key"
    body: type[BaseModel] | None = None
    body_required: bool = True
    responses: dict[int, tuple[type[BaseModel] | str | None, str]] = field(default_factory=dict)
    params: tuple[Param, ...] = ()
    description: str = ""
    bus: bool = True  # needs NATS to answer (False: the read model, or nothing, will do)


_ID_SCHEMA = {"type": "string", "pattern": r"^[A-Za-z0-9_\-]{1,128}$"}
RUN_ID = Param("run_id", "path", "the run's id", _ID_SCHEMA, required=True)
TENANT = Param("tenant", "path", "the tenant", _ID_SCHEMA, required=True)

ROUTES: tuple[Route, ...] = (
    Route("POST", "/v1/runs", h.submit_run, "submitRun", "Start a run", "runs",
          body=m.SubmitRun,
          responses={201: (m.Submitted, "the run started"),
                     202: (m.Submitted, "queued: it did not start within submit_wait"),
                     200: (m.Submitted, "a run with this run_id exists already (idempotent)"),
                     403: (None, "a run for another tenant"),
                     409: (None, "run_id is taken"), 422: (None, "invalid or rejected task")},
          description="Publishes the task on `nerve.tasks.<tenant>` and waits briefly for "
                      "the orchestrator to start the run, so a rejected task is a 422 with "
                      "the orchestrator's reason."),
    Route("GET", "/v1/runs", h.list_runs, "listRuns", "List runs (newest first)", "runs",
          params=(Param("tenant", "query", "only this tenant (admin keys; a tenant key sees "
                                           "its own)", _ID_SCHEMA),
                  Param("status", "query", "only runs in this status",
                        {"type": "string", "enum": list(m.RUN_STATUSES)}),
                  Param("workflow", "query", "only runs of this workflow"),
                  Param("q", "query", "search run ids and task text",
                        {"type": "string", "maxLength": 200}),
                  Param("limit", "query", "page size",
                        {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}),
                  Param("cursor", "query", "next_cursor of the previous page",
                        {"type": "string", "pattern": r"^[A-Za-z0-9_\-]{1,1024}$"})),
          responses={200: (m.RunList, "a page of runs from the read model"),
                     403: (None, "another tenant's runs")}, bus=False),
    Route("GET", "/v1/runs/{run_id}", h.get_run, "getRun", "One run, fresh from its history",
          "runs", params=(RUN_ID, Param("steps", "query", "include the steps",
                                        {"type": "boolean"})),
          responses={200: (m.RunDetail, "the run and its approvals"),
                     404: (None, "no such run (or another tenant's)")}),
    Route("GET", "/v1/runs/{run_id}/history", h.get_history, "getHistory",
          "The run's history events", "runs",
          params=(RUN_ID,
                  Param("offset", "query", "first event",
                        {"type": "integer", "minimum": 0, "maximum": 10**9}),
                  Param("limit", "query", "events", {"type": "integer", "minimum": 1,
                                                     "maximum": 10000})),
          responses={200: (m.History, "events with their index and stream sequence"),
                     404: (None, "no such run")}),
    Route("GET", "/v1/runs/{run_id}/events", stream_events, "streamEvents",
          "Live events (Server-Sent Events), resumable", "runs",
          params=(RUN_ID,
                  Param("Last-Event-ID", "header", "resume after this event id"),
                  Param("after", "query", "resume after this event id (same as "
                                          "Last-Event-ID)", {"type": "integer", "minimum": 0}),
                  Param("follow", "query", "0: send what is stored now and end",
                        {"type": "boolean", "default": True})),
          responses={200: ("text/event-stream", "typed events: token, tool_call_started, "
                                                "tool_call_finished, status, "
                                                "approval_requested, final, error, progress; "
                                                "then `end` (or `revoked` if the key is)"),
                     404: (None, "no such run"), 503: (None, "too many streams")},
          description="Each event's `id` is its NERVE_STREAM sequence; reconnect with "
                      "`Last-Event-ID` for exactly the events missed. `retry:` hint, a "
                      "comment heartbeat, and `event: end` when the run has finished."),
    Route("POST", "/v1/runs/{run_id}/signals/{name}", h.send_signal, "sendSignal",
          "Send a signal (an approval, say)", "runs", body=m.SignalBody, body_required=False,
          params=(RUN_ID, Param("name", "path", "signal name", {
              "type": "string", "pattern": r"^[A-Za-z0-9_.\-:]{1,128}$"}, required=True)),
          responses={202: (m.SignalSent, "stored on the run's inbox"),
                     404: (None, "no such run"),
                     409: (None, "the run ended, or no such pending approval"),
                     422: (None, "invalid signal")}),
    Route("POST", "/v1/runs/{run_id}/cancel", h.cancel_run, "cancelRun", "Cancel a run",
          "runs", body=m.CancelBody, body_required=False, params=(RUN_ID,),
          responses={202: (m.Accepted, "cancellation requested"),
                     404: (None, "no such run"), 409: (None, "the run ended already")}),
    Route("POST", "/v1/runs/{run_id}/fork", h.fork_run, "forkRun",
          "Fork a run at a history index", "runs", body=m.ForkBody, params=(RUN_ID,),
          responses={201: (m.Submitted, "the fork started"),
                     202: (m.Submitted, "queued"), 404: (None, "no such run"),
                     409: (None, "the new run id is taken"),
                     422: (None, "invalid fork point")}),
    Route("GET", "/v1/approvals", h.list_approvals, "listApprovals",
          "Approvals (pending by default)", "runs",
          params=(Param("tenant", "query", "admin keys: only this tenant", _ID_SCHEMA),
                  Param("status", "query", "which approvals (default pending)", {
                      "type": "string", "enum": ["pending", "approved", "rejected",
                                                 "timed_out", "expired", "any"]}),
                  Param("limit", "query", "at most", {"type": "integer", "minimum": 1,
                                                      "maximum": 1000})),
          responses={200: (m.ApprovalList, "approvals from the read model"),
                     403: (None, "another tenant's approvals")}, bus=False),
    Route("GET", "/v1/tenants/{tenant}/budget", h.get_budget, "getBudget",
          "A tenant's budget and spend", "tenants", params=(TENANT,),
          responses={200: (m.BudgetView, "budget report and recorded spend"),
                     403: (None, "another tenant")}),
    Route("PUT", "/v1/tenants/{tenant}/budget", h.put_budget, "putBudget",
          "Change a tenant's limits (admin)", "tenants", auth="admin", body=m.BudgetUpdate,
          params=(TENANT,),
          responses={200: (m.BudgetView, "the new budget"), 403: (None, "not an admin key"),
                     422: (None, "invalid limits")}),
    Route("POST", "/v1/tenants/{tenant}/kill", h.kill_tenant, "killTenant",
          "Kill-switch: stop all of a tenant's spend now", "tenants", body=m.KillBody,
          body_required=False, params=(TENANT,),
          responses={200: (m.KillResult, "killed (or, admin with reset, lifted)"),
                     403: (None, "another tenant, or a reset without an admin key")}),
    Route("GET", "/v1/whoami", h.whoami, "whoAmI", "Who this key is", "meta",
          responses={200: (m.WhoAmI, "the key's tenant, or admin")}, bus=False),
    Route("POST", "/v1/admin/reindex", h.reindex, "reindex",
          "Rebuild the read model from the streams (admin)", "meta", auth="admin",
          responses={200: (m.Reindexed, "rebuilt and swapped in"),
                     409: (None, "a reindex is running")}),
    Route("GET", "/healthz", h.healthz, "health", "Liveness and readiness", "meta",
          auth="none", responses={200: (m.Health, "ok"), 503: (m.Health, "degraded")},
          bus=False),
    Route("GET", "/metrics", h.metrics, "metrics", "Prometheus metrics", "meta", auth="none",
          responses={200: ("text/plain", "Prometheus text exposition")}, bus=False),
    Route("GET", "/openapi.json", h.openapi, "openapi", "This document", "meta", auth="none",
          responses={200: ("application/json", "OpenAPI 3.1")}, bus=False),
)


NEEDS_BUS = frozenset(r.op_id for r in ROUTES if r.bus)


def add_routes(app: web.Application) -> None:
    for route in ROUTES:
        app.router.add_route(route.method, route.path, route.handler, name=route.op_id)


__all__ = ["NEEDS_BUS", "ROUTES", "Param", "Route", "add_routes"]
