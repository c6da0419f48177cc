"""``ApiClient``: a small client of the HTTP API, with an SSE reader that resumes.

:meth:`ApiClient.follow` is what ``nerve logs -f`` uses: it reads a run's events and, when
the connection drops (the server restarts, the network blips), reconnects with
``Last-Event-ID`` after the ``retry:`` delay the server asked for, so the caller sees every
event once, in order, until the server says ``end``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp

from nerve._errors import (
    ApiError,
    Conflict,
    InvalidRequest,
    NerveError,
    Overloaded,
    PermissionDenied,
    RunNotFound,
    Unauthenticated,
)

log = logging.getLogger("nerve.api.client")


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One Server-Sent Event: ``id`` (the stream sequence), ``event`` (its type), ``data``."""

    id: int | None
    event: str
    data: str

    def json(self) -> Any:
        return json.loads(self.data) if self.data else None


def _error(status: int, body: Any) -> NerveError:
    detail = body.get("error", {}) if isinstance(body, dict) else {}
    message = str(detail.get("message") or f"HTTP {status}")
    code = str(detail.get("code") or "")
    fields: dict[str, Any] = {"status": status, "code": code}
    if detail.get("retry_after_ms") is not None:
        fields["retry_after_ms"] = detail["retry_after_ms"]
    cls: type[NerveError] = {401: Unauthenticated, 403: PermissionDenied, 409: Conflict,
                             503: Overloaded}.get(status, ApiError)
    if status == 404 and code == "run_not_found":
        cls = RunNotFound
    elif status in (400, 413, 422):
        cls = InvalidRequest
    return cls(message, **fields)


class ApiClient:
    """Talks to one nerve API at ``base_url`` with one key."""

    def __init__(self, base_url: str, key: str | None, *,
                 session: aiohttp.ClientSession | None = None, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.key = key
        self._own_session = session is None
        self._session = session
        self.timeout = timeout

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        h = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        return {**h, **(extra or {})}

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
        self._session = None

    async def __aenter__(self) -> ApiClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def call(self, method: str, path: str, body: Any = None,
                   params: dict[str, Any] | None = None) -> tuple[int, Any]:
        """Any request: ``(status, decoded JSON body)`` without raising on 4xx/5xx."""
        async with self.session.request(
                method, self.base_url + path, json=body, params=params, headers=self.headers(),
                timeout=aiohttp.ClientTimeout(total=self.timeout)) as resp:
            text = await resp.text()
            try:
                data = json.loads(text) if text else None
            except ValueError:
                data = text
            return resp.status, data

    async def request(self, method: str, path: str, body: Any = None,
                      params: dict[str, Any] | None = None) -> Any:
        """A request whose error answers raise the matching :class:`~nerve.NerveError`."""
        status, data = await self.call(method, path, body, params)
        if status >= 400:
            raise _error(status, data)
        return data

    async def events(self, run_id: str, after: int = 0, *, follow: bool = True,
                     ) -> AsyncIterator[SseEvent | int]:
        """One SSE connection: yields events, and the ``retry`` hint as an int when sent."""
        headers = self.headers({"Accept": "text/event-stream"})
        if after:
            headers["Last-Event-ID"] = str(after)
        params = {} if follow else {"follow": "0"}
        async with self.session.get(
                f"{self.base_url}/v1/runs/{run_id}/events", headers=headers, params=params,
                timeout=aiohttp.ClientTimeout(total=None, sock_read=60)) as resp:
            if resp.status >= 400:
                text = await resp.text()
                try:
                    body = json.loads(text)
                except ValueError:
                    body = text
                raise _error(resp.status, body)
            ev_id: int | None = None
            ev_type = "message"
            data: list[str] = []
            async for raw in resp.content:
                line = raw.decode("utf-8").rstrip("\r\n")
                if not line:
                    if data or ev_type != "message":
                        yield SseEvent(ev_id, ev_type, "\n".join(data))
                    ev_id, ev_type, data = None, "message", []
                    continue
                if line.startswith(":"):
                    continue
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "id":
                    ev_id = int(value) if value.isdigit() else None
                elif name == "event":
                    ev_type = value
                elif name == "data":
                    data.append(value)
                elif name == "retry" and value.isdigit():
                    yield int(value)

    async def follow(self, run_id: str, after: int = 0, *, max_attempts: int | None = None,
                     follow: bool = True) -> AsyncIterator[SseEvent]:
        """Every event of the run after ``after``, across reconnects, until ``end``."""
        last = after
        retry_ms = 1000
        failures = 0
        while True:
            try:
                async for item in self.events(run_id, last, follow=follow):
                    if isinstance(item, int):
                        retry_ms = item
                        continue
                    failures = 0
                    yield item
                    if item.id is not None:
                        last = item.id
                    if item.event == "end":
                        return
            except (TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
                log.info("stream of %s dropped after %d (%r); reconnecting", run_id, last, exc)
            except Overloaded:
                pass
            failures += 1
            if max_attempts is not None and failures > max_attempts:
                raise ApiError(f"the stream of run {run_id} dropped {failures} times in a row; "
                               f"resume later with --after {last}", run_id=run_id, after=last)
            await asyncio.sleep(min(retry_ms * min(failures, 10), 30_000) / 1000)


__all__ = ["ApiClient", "SseEvent"]
