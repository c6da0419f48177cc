"""The HTTP API against the real engine: runs, SSE, approvals, cancel, fork, budgets."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from api import SseEvent
from bus import Bus, EmbeddedNats
from gateway_actor._script import _long_text
from nerve import Conflict, InvalidRequest, PermissionDenied
from tests.api_helpers import PRICED_MODEL, Api, api_stack, eventually, long_task
from workflow import RunContext, workflow

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def api(bus: Bus, tmp_path: Path) -> AsyncIterator[Api]:
    async with api_stack(bus, tmp_path) as stack:
        yield stack

def text_of(events: list[SseEvent]) -> dict[int, str]:
    """Each model step's text, assembled from token events by their offsets."""
    texts: dict[int, str] = {}
    for ev in events:
        if ev.event == "token":
            d = ev.json()["data"]
            have = texts.get(d["index"], "")
            texts[d["index"]] = have[:d["offset"]] + d["text"]
    return texts


async def test_a_run_from_submit_to_its_streamed_answer(api: Api) -> None:
    task = long_task(120, "stream me")
    out = await api.acme.request("POST", "/v1/runs", {"task": task, "tools": [],
                                                      "model": PRICED_MODEL})
    run_id = out["run_id"]
    assert out["status"] == "running" and out["run"]["tenant"] == "acme"
    events = [ev async for ev in api.acme.follow(run_id)]
    assert events[-1].event == "end" and events[-1].json()["status"] == "completed"
    ids = [ev.id for ev in events if ev.id is not None]
    assert ids == sorted(set(ids))  # strictly increasing: no duplicates
    kinds = {ev.event for ev in events}
    assert {"token", "status", "final"} <= kinds
    final = next(ev for ev in events if ev.event == "final").json()["data"]["result"]
    assert list(text_of(events).values()) == [final["answer"]] == [_long_text(task, 120)]

    detail = await api.acme.request("GET", f"/v1/runs/{run_id}", params={"steps": "1"})
    assert detail["run"]["status"] == "completed" and detail["run"]["cost_usd"] > 0
    assert any(s["kind"] == "llm" for s in detail["steps"])
    history = await api.acme.request("GET", f"/v1/runs/{run_id}/history")
    assert history["events"][0]["type"] == "run_started" and history["total"] >= 4
    await api.server.services.projector.sync()
    page = await api.acme.request("GET", "/v1/runs", params={"status": "completed"})
    assert [r["run_id"] for r in page["runs"]] == [run_id]

    # Resuming from any id gives exactly the rest.
    cut = ids[len(ids) // 2]
    rest = [ev async for ev in api.acme.follow(run_id, after=cut)]
    assert [ev.id for ev in rest if ev.id is not None] == [i for i in ids if i > cut]


async def test_pagination_and_search(api: Api) -> None:
    run_ids = []
    for n in range(5):
        out = await api.acme.request("POST", "/v1/runs", {
            "task": long_task(5, f"page {n}"), "tools": [], "run_id": f"page-{n}"})
        run_ids.append(out["run_id"])
    await api.server.services.projector.sync()
    seen, cursor = [], None
    while True:
        params = {"limit": "2"} | ({"cursor": cursor} if cursor else {})
        page = await api.acme.request("GET", "/v1/runs", params=params)
        seen += [r["run_id"] for r in page["runs"]]
        cursor = page.get("next_cursor")
        if not cursor:
            break
    assert sorted(seen) == sorted(run_ids) and len(seen) == len(set(seen))
    found = await api.acme.request("GET", "/v1/runs", params={"q": "page 3"})
    assert [r["run_id"] for r in found["runs"]] == ["page-3"]
    # The same run id again is the same run (an idempotent submit).
    again = await api.acme.call("POST", "/v1/runs", {"task": "other", "run_id": "page-0"})
    assert again[0] == 200 and again[1]["run_id"] == "page-0"


async def test_an_approval_through_the_api_reaches_the_workflow(api: Api) -> None:
    out = await api.acme.request("POST", "/v1/runs", {
        "task": "compute 6 * 7", "tools": ["run"], "model": PRICED_MODEL,
        "input": {"requires_approval": ["run"]}})
    run_id = out["run_id"]
    requested = None
    async for ev in api.acme.follow(run_id):
        if ev.event == "approval_requested":
            requested = ev.json()["data"]
            break
    assert requested and requested["tool"] == "run"
    detail = await api.acme.request("GET", f"/v1/runs/{run_id}")
    assert [a["digest"] for a in detail["approvals"] if a["status"] == "pending"] == \
        [requested["digest"]]
    # A wrong digest, a malformed decision: refused, nothing sent.
    with pytest.raises(Conflict):
        await api.acme.request("POST", f"/v1/runs/{run_id}/signals/approval",
                               {"payload": {"approved": True}, "approves": "0" * 24})
    with pytest.raises(InvalidRequest):
        await api.acme.request("POST", f"/v1/runs/{run_id}/signals/approval",
                               {"payload": {"approved": "yes"}, "approves": requested["digest"]})
    await api.acme.request("POST", f"/v1/runs/{run_id}/signals/approval",
                           {"payload": {"approved": False, "reason": "no shell today"},
                            "approves": requested["digest"]})
    summary = await api.nerve.wait(run_id, timeout=30)
    assert summary.status == "completed"
    assert "no shell today" in summary.result["answer"] or "failed" in summary.result["answer"]
    detail = await api.acme.request("GET", f"/v1/runs/{run_id}")
    assert detail["approvals"][0]["status"] == "rejected"
    assert detail["approvals"][0]["decided_by"].startswith("tenant:acme:")
    # The run is over: signals and cancels change nothing.
    with pytest.raises(Conflict):
        await api.acme.request("POST", f"/v1/runs/{run_id}/signals/poke", {"payload": 1})
    with pytest.raises(Conflict):
        await api.acme.request("POST", f"/v1/runs/{run_id}/cancel")


async def test_cancel_and_fork(api: Api) -> None:
    out = await api.acme.request("POST", "/v1/runs", {
        "task": "compute 2 + 2", "tools": ["run"], "input": {"requires_approval": ["run"]}})
    run_id = out["run_id"]
    await api.nerve.wait(run_id, timeout=20, statuses=("waiting",))
    assert (await api.acme.call("POST", f"/v1/runs/{run_id}/cancel", {"reason": "x"}))[0] == 202
    assert (await api.nerve.wait(run_id, timeout=20)).status == "cancelled"
    fork = await api.acme.request("POST", f"/v1/runs/{run_id}/fork", {"at": 2})
    assert fork["run"]["forked_from"]["run_id"] == run_id
    assert fork["run"]["tenant"] == "acme"
    with pytest.raises(InvalidRequest):
        await api.acme.request("POST", f"/v1/runs/{run_id}/fork", {"at": 10_000})


async def test_budgets_and_the_kill_switch(api: Api) -> None:
    with pytest.raises(PermissionDenied):  # a tenant cannot raise its own limits
        await api.acme.request("PUT", "/v1/tenants/acme/budget",
                               {"limits": {"usd_per_day": 1_000}})
    view = await api.admin.request("PUT", "/v1/tenants/acme/budget",
                                   {"limits": {"usd_per_day": 12.5}})
    assert view["budget"]["limits"]["usd_per_day"] == 12.5
    with pytest.raises(InvalidRequest):
        await api.admin.request("PUT", "/v1/tenants/acme/budget", {"limits": {"usd_per_day": -1}})
    mine = await api.acme.request("GET", "/v1/tenants/acme/budget")
    assert mine["budget"]["limits"]["usd_per_day"] == 12.5 and "spend" in mine
    killed = await api.acme.request("POST", "/v1/tenants/acme/kill", {"reason": "runaway"})
    assert killed["killed"] and killed["notice"]["reason"] == "runaway"
    state = await api.acme.request("GET", "/v1/tenants/acme/budget")
    assert state["budget"]["state"] == "killed"
    refused = await api.acme.call("POST", "/v1/runs", {"task": "more", "tools": []})
    assert refused[0] == 422 and "kill" in refused[1]["error"]["message"].lower()
    with pytest.raises(PermissionDenied):  # only operators lift a kill-switch
        await api.acme.request("POST", "/v1/tenants/acme/kill", {"reset": True})
    lifted = await api.admin.request("POST", "/v1/tenants/acme/kill", {"reset": True})
    assert lifted == {"tenant": "acme", "killed": False, "changed": True}


async def test_health_metrics_and_openapi(api: Api) -> None:
    status, health = await api.acme.call("GET", "/healthz")
    assert status == 200 and health["status"] == "ok"
    doc = await api.acme.request("GET", "/openapi.json")
    assert doc["openapi"].startswith("3.1")
    assert "/v1/runs/{run_id}/events" in doc["paths"]
    async with api.acme.session.get(api.server.url + "/metrics") as resp:
        text = await resp.text()
    assert "# TYPE nerve_api_requests_total counter" in text
    assert "acme" not in text  # no tenant names in metrics
    who = await api.acme.request("GET", "/v1/whoami")
    assert who["tenant"] == "acme" and not who["admin"]


async def test_heartbeats_keep_an_idle_stream_talking(api: Api) -> None:
    out = await api.acme.request("POST", "/v1/runs", {
        "task": "compute 1 + 1", "tools": ["run"], "input": {"requires_approval": ["run"]}})
    run_id = out["run_id"]
    await api.nerve.wait(run_id, timeout=20, statuses=("waiting",))
    headers = api.acme.headers()
    async with api.acme.session.get(f"{api.server.url}/v1/runs/{run_id}/events",
                                    headers=headers) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        lines = []
        async with asyncio.timeout(20):
            async for raw in resp.content:
                lines.append(raw.decode().strip())
                if lines.count(": hb") >= 2:
                    break
    assert lines[0] == "retry: 1000"
    await api.nerve.cancel(run_id)
    await eventually(lambda: api.nerve.wait(run_id, timeout=10))


def test_the_public_api_is_pinned() -> None:
    import api

    assert set(api.__all__) == {
        "ADMIN_KEY_ENV", "PROJECTIONS", "ApiClient", "ApiConfig", "ApiKeyRecord", "ApiKeys",
        "ApiServer", "Principal", "Projector", "ReadModel", "Record", "ServerState",
        "SseEvent", "document", "load_admin_key", "rebuild", "run_api"}
    for name in api.__all__:
        assert getattr(api, name) is not None


@workflow(name="api_plain_approval")
async def plain_approval(ctx: RunContext, inp: dict[str, Any]) -> Any:
    """A workflow's own wait named ``approval``: not bound to an agent's tool call."""
    decision = await ctx.wait_signal("approval", timeout=120, default={"approved": False})
    return decision.value


async def test_a_workflows_own_approval_wait_takes_a_plain_signal_from_api_and_cli(
        api: Api, nats_server: EmbeddedNats) -> None:
    """Only a wait bound to a tool call needs {"approved"} and the digest; the README's
    refund workflow waits for a plain signal that happens to be called ``approval``."""
    via_api, via_cli = [await api.nerve.submit("acme", workflow="api_plain_approval", input={})
                        for _ in "ab"]
    for run_id in (via_api, via_cli):
        await api.nerve.wait(run_id, timeout=30, statuses=("waiting",))
    await api.acme.request("POST", f"/v1/runs/{via_api}/signals/approval",
                           {"payload": {"approved": True, "by": "api"}})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli", "signal", via_cli, "approval",
        '{"approved": true, "by": "cli"}', "--nats-url", nats_server.url,
        "--prefix", api.nerve.bus.names.prefix, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    for run_id, by in ((via_api, "api"), (via_cli, "cli")):
        summary = await api.nerve.wait(run_id, timeout=30)
        assert summary.result == {"approved": True, "by": by}
