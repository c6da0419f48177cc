"""The kill-switch broadcast: :class:`KillNotice` / :class:`ResetNotice` on
``nerve.ctl.tenant.<tenant>.kill`` / ``.reset``, and :func:`kill_notices` to follow them.

The ledger is the truth (a kill is stored there first, so it survives restarts and a
subscriber that missed the broadcast still gets refused); the broadcast is how everyone
holding the tenant's work hears about it at once: gateways cut the tenant's streams,
orchestrators cancel or pause its runs.

People may publish a kill by hand (``nats pub nerve.ctl.tenant.acme.kill
'{"reason":"runaway","by":"ops"}'``): the tenant comes from the subject; the budget actor
records such a kill in the ledger. A malformed message is refused with a clear error (as a
reply when the sender asked for one) and changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from nats.aio.msg import Msg
from nats.errors import Error as NatsClientError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from actors import decode, new_id
from actors._envelope import H_CONTENT_TYPE
from bus import Bus, check_token
from nerve import CodecError, ConfigError

log = logging.getLogger("nerve.budget.notices")


class KillNotice(BaseModel):
    """The tenant's kill-switch was turned on.

    ``policy`` tells orchestrators what to do with the tenant's runs (``kill``: cancel them;
    ``pause``: hold them for a human). ``until`` (epoch seconds) is set when the kill lifts
    by itself (a window's budget exhausted until the window ends). ``source`` says who
    decided: ``manual`` (a person), ``breaker`` (the runaway breaker), ``exhaustion``,
    ``notice`` (a kill published on the bus and recorded by the budget actor).
    """

    model_config = ConfigDict(extra="forbid")

    type: Literal["kill"] = "kill"
    tenant: str
    reason: str = Field(default="", max_length=2000)
    by: str = Field(default="unknown", min_length=1, max_length=200)
    at: float = Field(default_factory=time.time, ge=0, allow_inf_nan=False)
    policy: Literal["kill", "pause"] = "kill"
    until: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    source: Literal["manual", "breaker", "exhaustion", "notice"] = "manual"
    notice_id: str = Field(default_factory=new_id, min_length=1, max_length=64)
    # True when a ledger published it after storing the kill; a kill published by hand
    # (False) is what the budget actor records in the ledger.
    in_ledger: bool = False

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, value: str) -> str:
        try:
            return check_token("tenant", value)
        except ConfigError as exc:
            raise ValueError(exc.message) from None


class ResetNotice(BaseModel):
    """The tenant's kill-switch was turned off (and its halted runs released)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["reset"] = "reset"
    tenant: str
    by: str = Field(default="unknown", max_length=200)
    reason: str = Field(default="", max_length=2000)
    at: float = Field(default_factory=time.time)
    notice_id: str = Field(default_factory=new_id)


def tenant_of_subject(subject: str) -> str:
    """``<prefix>.ctl.tenant.<tenant>.kill`` -> ``<tenant>``."""
    parts = subject.split(".")
    if len(parts) < 5 or parts[-3] != "tenant":
        raise ConfigError(f"{subject!r} is not a tenant control subject", subject=subject)
    return parts[-2]


def parse_kill_message(subject: str, data: bytes, content_type: str | None = None) -> KillNotice:
    """Validate a kill message received on ``subject``.

    JSON or msgpack; ``tenant`` may be left out (it is taken from the subject) but must
    match it when given. Raises :class:`~nerve.CodecError` / :class:`~nerve.ConfigError`.
    """
    tenant = tenant_of_subject(subject)
    try:
        raw = decode(data, dict[str, Any], content_type)
    except CodecError as exc:
        raise CodecError(f"malformed kill message for tenant {tenant}: {exc.message}",
                         tenant=tenant, subject=subject) from None
    if raw.get("tenant", tenant) != tenant:
        raise ConfigError(f"kill message on {subject} names tenant {raw.get('tenant')!r}; "
                          f"publish it on the subject of that tenant", subject=subject)
    raw["tenant"] = tenant
    try:
        return KillNotice.model_validate(raw)
    except ValidationError as exc:
        why = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}"
                        for e in exc.errors()[:5])
        raise CodecError(f"invalid kill message for tenant {tenant}: {why}",
                         tenant=tenant, subject=subject) from None


Notice = KillNotice | ResetNotice


class KillNotices:
    """Following kill (and optionally reset) notices; ``async for notice in ...``.

    Subscribes when opened (``await notices.open()``, ``async with``, or the first
    iteration): open it before you need it, so nothing published in between is missed.
    Malformed messages are logged and skipped.
    """

    def __init__(self, bus: Bus, tenant: str = "*", resets: bool = False) -> None:
        self.bus = bus
        self.tenant = tenant
        self.resets = resets
        self._queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._subs: list[Any] = []

    async def open(self) -> KillNotices:
        if not self._subs:
            names = self.bus.names
            self._subs.append(await self.bus.nc.subscribe(names.tenant_kill(self.tenant),
                                                          cb=self._queue.put))
            if self.resets:
                self._subs.append(await self.bus.nc.subscribe(names.tenant_reset(self.tenant),
                                                              cb=self._queue.put))
        return self

    async def close(self) -> None:
        subs, self._subs = self._subs, []
        for sub in subs:
            with contextlib.suppress(NatsClientError):
                await sub.unsubscribe()

    async def __aenter__(self) -> KillNotices:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __aiter__(self) -> AsyncIterator[Notice]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Notice]:
        await self.open()
        while True:
            msg = await self._queue.get()
            content_type = (msg.headers or {}).get(H_CONTENT_TYPE)
            try:
                if msg.subject.endswith(".reset"):
                    yield decode(msg.data, ResetNotice, content_type)
                else:
                    yield parse_kill_message(msg.subject, msg.data, content_type)
            except (CodecError, ConfigError) as exc:
                log.warning("ignoring a malformed control message on %s: %s", msg.subject,
                            exc.message)

    async def next(self, timeout: float | None = None) -> Notice:
        """The next notice (for code that does not want an ``async for``)."""
        it = self._iterate()
        try:
            return await asyncio.wait_for(anext(it), timeout)
        finally:
            await it.aclose()


def kill_notices(bus: Bus, tenant: str = "*", *, resets: bool = False) -> KillNotices:
    """Follow kill notices (of one tenant, or ``*`` for all): ``async for n in
    kill_notices(bus)``. With ``resets=True`` reset notices come too."""
    if tenant != "*":
        check_token("tenant", tenant)
    return KillNotices(bus, tenant, resets)
