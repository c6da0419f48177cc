"""Attacks on the API: tenant isolation on every endpoint, keys, and malformed requests.

Each attack must fail, and must change nothing: the streams (tasks, histories and inboxes,
live events) are compared before and after.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from api import ApiClient
from bus import Bus
from nerve import Unauthenticated
from tests.api_helpers import ADMIN, Api, api_stack, eventually

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def api(bus: Bus, tmp_path: Path) -> AsyncIterator[Api]:
    async with api_stack(bus, tmp_path, max_body=64 * 1024) as stack:
        yield stack


async def stream_state(bus: Bus) -> dict[str, Any]:
    """Where every stream a request could change stands."""
    out = {}
    for name in (bus.names.tasks_stream, bus.names.runs_stream, bus.names.stream_stream):
        info = await bus.js.stream_info(name)
        out[name] = (info.state.messages, info.state.last_seq)
    return out


async def waiting_run(api: Api, client: ApiClient) -> tuple[str, str]:
    """A run waiting for an approval: (run id, the approval's digest)."""
    out = await client.request("POST", "/v1/runs", {
        "task": "compute 3 * 3", "tools": ["run"], "input": {"requires_approval": ["run"]}})
    run_id = out["run_id"]
    await api.nerve.wait(run_id, timeout=20, statuses=("waiting",))
    detail = await client.request("GET", f"/v1/runs/{run_id}")
    return run_id, detail["approvals"][0]["digest"]


def same_as_missing(got: tuple[int, Any], missing: tuple[int, Any], theirs: str) -> bool:
    """A response about another tenant's run must read exactly like one about no run."""
    status, body = got
    m_status, m_body = missing

    def norm(error: dict[str, Any], run_id: str) -> str:
        return str({k: v for k, v in error.items() if k != "request_id"}).replace(run_id, "RUN")

    return status == m_status == 404 and \
        norm(body["error"], theirs) == norm(m_body["error"], "nope-nope")


async def test_a_tenant_key_cannot_touch_another_tenants_runs(api: Api, bus: Bus) -> None:
    theirs, digest = await waiting_run(api, api.globex)
    mine, _ = await waiting_run(api, api.acme)
    await api.server.services.projector.sync()
    history_before = await api.nerve.history(theirs)
    before = await stream_state(bus)
    a = api.acme

    attacks: list[tuple[str, str, Any]] = [
        ("GET", "/v1/runs/{id}", None),
        ("GET", "/v1/runs/{id}?steps=1", None),
        ("GET", "/v1/runs/{id}/history", None),
        ("GET", "/v1/runs/{id}/events", None),
        ("GET", "/v1/runs/{id}/events?after=0&follow=0", None),
        ("POST", "/v1/runs/{id}/signals/approval",
         {"payload": {"approved": True}, "approves": digest}),
        ("POST", "/v1/runs/{id}/signals/other", {"payload": "hello"}),
        ("POST", "/v1/runs/{id}/cancel", {"reason": "mine now"}),
        ("POST", "/v1/runs/{id}/fork", {"at": 1}),
    ]
    for method, path, body in attacks:
        got = await a.call(method, path.format(id=theirs), body)
        missing = await a.call(method, path.format(id="nope-nope"), body)
        assert same_as_missing(got, missing, theirs), (method, path, got, missing)

    # Listing, searching and approvals never show another tenant's runs.
    listed = await a.request("GET", "/v1/runs", params={"limit": "500"})
    assert [r["run_id"] for r in listed["runs"]] == [mine]
    assert (await a.request("GET", "/v1/runs", params={"q": theirs}))["runs"] == []
    for params in ({"tenant": "globex"}, {"tenant": "globex", "status": "waiting"}):
        status, body = await a.call("GET", "/v1/runs", params=params)
        assert status == 403 and body["error"]["code"] == "forbidden"
    approvals = await a.request("GET", "/v1/approvals")
    assert [x["run_id"] for x in approvals["approvals"]] == [mine]
    assert (await a.call("GET", "/v1/approvals", params={"tenant": "globex"}))[0] == 403

    # Starting runs as another tenant, or under another tenant's run id.
    assert (await a.call("POST", "/v1/runs", {"task": "x", "tenant": "globex"}))[0] == 403
    status, body = await a.call("POST", "/v1/runs", {"task": "x", "run_id": theirs})
    assert status == 409 and "taken" in body["error"]["message"]

    # Another tenant's budget and kill-switch.
    for method, path, body in (("GET", "/v1/tenants/globex/budget", None),
                               ("PUT", "/v1/tenants/globex/budget",
                                {"limits": {"usd_per_day": 0}}),
                               ("POST", "/v1/tenants/globex/kill", {"reason": "gotcha"}),
                               ("POST", "/v1/tenants/globex/kill", {"reset": True})):
        status, answer = await a.call(method, path, body)
        assert status == 403, (method, path, status, answer)

    # Ids that would be wildcards or other subjects if they reached NATS unchecked.
    for bad in ("*", ">", "a.b", "..", "%2A", "r" * 200):
        status, body = await a.call("GET", f"/v1/runs/{bad}")
        assert status == 404, (bad, status, body)
        status, body = await a.call("POST", f"/v1/runs/{bad}/cancel")
        assert status == 404, (bad, status, body)
    for bad in ("*", ">", "a.b"):
        assert (await a.call("GET", f"/v1/tenants/{bad}/budget"))[0] in (403, 404, 422)

    # Nothing changed anywhere: not their run, not a stream.
    assert await stream_state(bus) == before
    assert await api.nerve.history(theirs) == history_before
    assert (await api.nerve.summary(theirs)).status == "waiting"
    # And the owner still can.
    assert (await api.globex.call("GET", f"/v1/runs/{theirs}"))[0] == 200
    assert (await api.admin.call("GET", f"/v1/runs/{theirs}"))[0] == 200


async def test_keys_that_are_missing_wrong_forged_or_revoked_get_401(api: Api) -> None:
    url = api.server.url
    key, record = await api.keys.create("acme", name="to revoke")
    forged = f"nrv_{record.id}_{'A' * 43}"  # the right id, a wrong secret
    cases = [None, "", "nope", forged, key + "x", key[:-1], ADMIN + "x", ADMIN[:-1]]
    async with aiohttp.ClientSession() as http:
        for attempt in cases:
            headers = {} if attempt is None else {"Authorization": f"Bearer {attempt}"}
            async with http.get(f"{url}/v1/runs", headers=headers) as resp:
                body = await resp.json()
                assert resp.status == 401, (attempt, body)
                assert resp.headers["WWW-Authenticate"] == "Bearer"
                assert body["error"]["code"] == "unauthenticated"
        # A key in the wrong scheme or header does not count either.
        for headers in ({"Authorization": f"Basic {key}"}, {"X-API-Key": key},
                        {"Authorization": key}):
            async with http.get(f"{url}/v1/whoami", headers=headers) as resp:
                assert resp.status == 401, headers
        async with http.get(f"{url}/v1/whoami", params={"key": key}) as resp:
            assert resp.status == 401
    client = ApiClient(url, key)
    try:
        assert (await client.request("GET", "/v1/whoami"))["tenant"] == "acme"
        # Revoked in another process (this test's ApiKeys): the server hears of it and drops
        # the key from its cache.
        assert await api.keys.revoke(record.id, by="test")
        await eventually(lambda: _refused(client))
        status, body = await client.call("GET", "/v1/runs")
        assert status == 401 and "revoked" in body["error"]["message"]
    finally:
        await client.close()
    # Keys are stored hashed: the bucket holds no key.
    kv = await api.server.bus.kv(api.server.bus.names.apikeys_bucket)
    entry = await kv.get(f"key.{record.id}")
    assert key.encode() not in entry.value and key.split("_")[-1].encode() not in entry.value


async def test_revoking_a_key_ends_the_streams_it_holds_open(api: Api) -> None:
    """A key revoked elsewhere (this test's ApiKeys, not the server's) stops streaming at
    once, not when the run ends; another key of the same tenant streams on."""
    key, record = await api.keys.create("acme", name="leaked")
    leaked = ApiClient(api.server.url, key)
    try:
        run_id, digest = await waiting_run(api, leaked)  # waits for a human: no end in sight

        async def watch(client: ApiClient, until: str | None) -> list[str]:
            got: list[str] = []
            async for item in client.events(run_id):
                if isinstance(item, int):  # the retry hint
                    continue
                got.append(item.event)
                if item.event == until:
                    break
            return got

        theirs = asyncio.create_task(watch(leaked, None))
        ours = asyncio.create_task(watch(api.acme, "end"))
        await eventually(lambda: api.server.services is not None
                         and api.server.services.streams >= 2)
        assert await api.keys.revoke(record.id, by="test")
        seen = await asyncio.wait_for(theirs, 20)  # it ends: before the fix it never did
        assert seen[-1] == "revoked", seen
        assert not ours.done()
        with pytest.raises(Unauthenticated):  # and it cannot come back
            async for _ in leaked.events(run_id):
                pass
        # The other key of the same tenant still streams, to the end of the run (a refusal
        # ends it: this stack runs no tool worker).
        await api.acme.request("POST", f"/v1/runs/{run_id}/signals/approval",
                               {"payload": {"approved": False}, "approves": digest})
        rest = await asyncio.wait_for(ours, 60)
        assert "revoked" not in rest and rest[-1] == "end"
    finally:
        await leaked.close()


async def _refused(client: ApiClient) -> bool:
    return (await client.call("GET", "/v1/whoami"))[0] == 401


async def test_malformed_requests_get_clear_4xx_and_change_nothing(api: Api, bus: Bus) -> None:
    run_id, digest = await waiting_run(api, api.acme)
    before = await stream_state(bus)
    history_before = await api.nerve.history(run_id)
    url = api.server.url
    headers = {**api.acme.headers(), "Content-Type": "application/json"}

    async def raw(method: str, path: str, data: bytes | None) -> tuple[int, dict[str, Any]]:
        async with api.acme.session.request(method, url + path, data=data,
                                            headers=headers) as resp:
            return resp.status, await resp.json()

    cases: list[tuple[str, str, bytes | None, int, str]] = [
        ("POST", "/v1/runs", b"{not json", 400, "invalid_json"),
        ("POST", "/v1/runs", b"", 400, "invalid_request"),
        ("POST", "/v1/runs", b"[]", 422, "invalid_request"),
        ("POST", "/v1/runs", b'{"task": 5}', 422, "invalid_request"),
        ("POST", "/v1/runs", b'{"task": "x", "surprise": 1}', 422, "invalid_request"),
        ("POST", "/v1/runs", b'{"labels": {}}', 422, "invalid_request"),
        ("POST", "/v1/runs", b'{"task": "x", "run_id": "a.b"}', 422, "invalid_request"),
        ("POST", "/v1/runs", b'{"task": "x", "max_turns": 0}', 422, "invalid_request"),
        ("POST", "/v1/runs", b'{"task": "' + b"x" * 70_000 + b'"}', 413, "payload_too_large"),
        ("POST", f"/v1/runs/{run_id}/signals/approval", b'{"payload": {"approved": 1}, '
         b'"approves": "' + digest.encode() + b'"}', 422, "invalid_request"),
        ("POST", f"/v1/runs/{run_id}/signals/approval", b'{"payload": {"approved": true}}',
         422, "invalid_request"),
        ("POST", f"/v1/runs/{run_id}/signals/approval", b'{"payload": {"approved": true}, '
         b'"approves": "abcdef0123456789abcdef01"}', 409, "conflict"),
        ("POST", f"/v1/runs/{run_id}/signals/bad%20name", b"{}", 422, "invalid_request"),
        ("POST", f"/v1/runs/{run_id}/signals/" + "n" * 129, b"{}", 422, "invalid_request"),
        ("POST", f"/v1/runs/{run_id}/signals/go", b'{"payload": 1, "approves": "zz"}', 422,
         "invalid_request"),
        ("POST", f"/v1/runs/{run_id}/signals/go", b"{broken", 400, "invalid_json"),
        ("POST", f"/v1/runs/{run_id}/fork", b'{"at": 0}', 422, "invalid_request"),
        ("POST", f"/v1/runs/{run_id}/fork", b'{"at": 100000}', 422, "invalid_request"),
        ("POST", f"/v1/runs/{run_id}/cancel", b'{"reason": 5}', 422, "invalid_request"),
        ("GET", "/v1/runs?limit=abc", None, 422, "invalid_request"),
        ("GET", "/v1/runs?limit=0", None, 422, "invalid_request"),
        ("GET", "/v1/runs?status=sleeping", None, 422, "invalid_request"),
        ("GET", "/v1/runs?cursor=%%%", None, 422, "invalid_request"),
        ("GET", f"/v1/runs/{run_id}/events?after=-1", None, 422, "invalid_request"),
        ("GET", f"/v1/runs/{run_id}/events?after=x", None, 422, "invalid_request"),
        ("GET", "/v1/runs/nope/history", None, 404, "run_not_found"),
        ("POST", "/v1/runs/nope/signals/approval", b"{}", 404, "run_not_found"),
        ("DELETE", f"/v1/runs/{run_id}", None, 405, "method_not_allowed"),
        ("GET", "/v1/nothing-here", None, 404, "not_found"),
        ("PUT", "/v1/tenants/acme/budget", b'{"limits": {}}', 403, "forbidden"),
    ]
    for method, path, data, status, code in cases:
        got_status, body = await raw(method, path, data)
        assert (got_status, body["error"]["code"]) == (status, code), (method, path, body)
        assert len(body["error"]["message"]) > 20, body  # a sentence a person can act on
    # An unknown workflow is refused by the orchestrator: its reason comes back as a 422.
    status, body = await api.acme.call("POST", "/v1/runs", {"task": "x", "workflow": "nope"})
    assert status == 422 and "no workflow named 'nope'" in body["error"]["message"]
    # Admin: a bad limit is refused with the field named.
    status, body = await api.admin.call("PUT", "/v1/tenants/acme/budget",
                                        {"limits": {"usd_per_day": "lots"}})
    assert status == 422 and "usd_per_day" in body["error"]["message"]
    # Nothing reached a stream, except the rejected workflow's task and its notice.
    after = await stream_state(bus)
    runs, stream = bus.names.runs_stream, bus.names.stream_stream
    assert after[runs] == before[runs] and after[stream] == before[stream]
    assert await api.nerve.history(run_id) == history_before


async def test_stream_limits_answer_503_with_retry_after(bus: Bus, tmp_path: Path) -> None:
    async with api_stack(bus, tmp_path, max_streams_per_tenant=1) as api:
        # A waiting run's stream stays open (a finished run's would end by itself).
        waiting, _ = await waiting_run(api, api.acme)
        url = f"{api.server.url}/v1/runs/{waiting}/events"
        async with api.acme.session.get(url, headers=api.acme.headers()) as first:
            assert first.status == 200
            await first.content.readline()
            async with api.acme.session.get(url, headers=api.acme.headers()) as second:
                body = await second.json()
                assert second.status == 503 and body["error"]["retry_after_ms"] > 0
                assert "Retry-After" in second.headers
            # Another tenant is not held back by acme's streams.
            other, _ = await waiting_run(api, api.globex)
            async with api.globex.session.get(
                    f"{api.server.url}/v1/runs/{other}/events",
                    headers=api.globex.headers()) as third:
                assert third.status == 200
