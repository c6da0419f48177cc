"""API keys: one per tenant (or several), stored hashed in the ``nerve-apikeys`` bucket.

A key looks like ``nrv_<id>_<secret>``: ``id`` (16 hex digits) names the record
``key.<id>``, which holds the SHA-256 of the whole key, the tenant, a name, and when and by
whom it was created or revoked. The key itself is shown once, when it is created, and is
stored nowhere. A key has 256 random bits, so one fast hash is the right tool (a slow
password hash protects low-entropy secrets; this one cannot be guessed).

Operators use an **admin key** (``NERVE_ADMIN_KEY``, or a file ``nerve up`` writes with
mode 0600): it may act for any tenant and do what only operators may (set budgets, lift a
kill-switch, rebuild the read model).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nats.errors import Error as NatsClientError
from nats.js.errors import KeyNotFoundError, NotFoundError

from bus import Bus, check_token
from nerve._errors import ConfigError, Unauthenticated

KEY_RE = re.compile(r"^nrv_([0-9a-f]{16})_([A-Za-z0-9_\-]{32,128})$")
ADMIN_KEY_ENV = "NERVE_ADMIN_KEY"
MIN_ADMIN_KEY = 24


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    """What the bucket holds about a key (never the key)."""

    id: str
    tenant: str
    sha256: str
    name: str = ""
    created_at: float = 0.0
    created_by: str = ""
    revoked_at: float | None = None
    revoked_by: str | None = None

    def public(self) -> dict[str, object]:
        d = asdict(self)
        del d["sha256"]
        return d


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is asking: a tenant's key, or an operator's admin key."""

    tenant: str | None
    admin: bool = False
    key_id: str | None = None

    @property
    def name(self) -> str:
        """For audit fields (``sender``, ``by``)."""
        return "admin" if self.admin else f"tenant:{self.tenant}:{self.key_id}"

    def may_act_for(self, tenant: str) -> bool:
        return self.admin or self.tenant == tenant


class ApiKeys:
    """Create, list, revoke and check API keys (see the module docstring).

    ``cache_ttl`` seconds: how long a checked key is trusted without another look at the
    bucket. With :meth:`watch` running (the server runs it), every change to a key record
    (a revocation in another process) drops that key from the cache as it happens; the TTL
    only bounds staleness when such a notice is lost (a reconnect also clears the cache).
    A revocation also ends what the key holds open: see :meth:`revocation`.
    """

    def __init__(self, bus: Bus, admin_keys: list[str] | tuple[str, ...] = (), *,
                 cache_ttl: float = 1.0) -> None:
        self.bus = bus
        for key in admin_keys:
            if len(key) < MIN_ADMIN_KEY:
                raise ConfigError(f"the admin key is too short ({len(key)} characters): use "
                                  f"at least {MIN_ADMIN_KEY} random characters")
        self._admin = [digest(k) for k in admin_keys]
        self.cache_ttl = cache_ttl
        self._cache: dict[str, tuple[float, Principal]] = {}
        self._watch: Any = None
        self._holders: dict[str, set[asyncio.Event]] = {}  # key id -> what it holds open

    async def watch(self) -> None:
        """Follow changes to key records (core NATS, on the bucket's subjects)."""
        if self._watch is not None:
            return
        subject = f"$KV.{self.bus.names.apikeys_bucket}.key.*"

        async def changed(msg: Any) -> None:
            key_id = msg.subject.rsplit(".", 1)[-1]
            if (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE") or not msg.data:
                self._revoked(key_id)
                return
            try:
                revoked = json.loads(msg.data).get("revoked_at") is not None
            except (ValueError, AttributeError):
                revoked = True  # a record nobody can read vouches for no one
            if revoked:
                self._revoked(key_id)
            else:
                self._forget(key_id)

        async def reconnected() -> None:
            self._cache.clear()
            # Notices sent while we were away are lost: look at every key holding a stream.
            # One that cannot be checked ends its streams too (fail closed): clients resume
            # with their last event id and authenticate again.
            for key_id in list(self._holders):
                try:
                    record = await self.get(key_id)
                except (NatsClientError, TimeoutError):
                    record = None
                if record is None or record.revoked_at is not None:
                    self._revoked(key_id)

        self._watch = await self.bus.nc.subscribe(subject, cb=changed)
        self.bus.on_reconnect(reconnected)

    def _forget(self, key_id: str) -> None:
        self._cache = {d: p for d, p in self._cache.items() if p[1].key_id != key_id}

    def _revoked(self, key_id: str) -> None:
        self._forget(key_id)
        for event in self._holders.get(key_id, ()):
            event.set()

    @contextlib.contextmanager
    def revocation(self, principal: Principal) -> Iterator[asyncio.Event]:
        """An event set when ``principal``'s key is revoked while the block runs.

        Long-lived work done for a key (an SSE stream) waits on it and ends at once, in
        this process or any other that revokes the key (with :meth:`watch` running). Admin
        keys come from the configuration and are never revoked: their event never fires.
        """
        event = asyncio.Event()
        key_id = principal.key_id
        if key_id is None:
            yield event
            return
        holders = self._holders.setdefault(key_id, set())
        holders.add(event)
        try:
            yield event
        finally:
            holders.discard(event)
            if not holders:
                self._holders.pop(key_id, None)

    async def close(self) -> None:
        sub, self._watch = self._watch, None
        if sub is not None:
            with contextlib.suppress(NatsClientError):
                await sub.unsubscribe()

    async def _kv(self):
        return await self.bus.kv(self.bus.names.apikeys_bucket)

    async def create(self, tenant: str, *, name: str = "", by: str = "",
                     ) -> tuple[str, ApiKeyRecord]:
        """A new key for ``tenant``: returns ``(key, record)``; the key is shown only now."""
        check_token("tenant", tenant)
        key_id = secrets.token_hex(8)
        key = f"nrv_{key_id}_{secrets.token_urlsafe(32)}"
        record = ApiKeyRecord(id=key_id, tenant=tenant, sha256=digest(key), name=name[:200],
                              created_at=time.time(), created_by=by[:200])
        kv = await self._kv()
        await kv.create(self.bus.names.apikey_key(key_id), json.dumps(asdict(record)).encode())
        return key, record

    async def get(self, key_id: str) -> ApiKeyRecord | None:
        kv = await self._kv()
        try:
            entry = await kv.get(self.bus.names.apikey_key(key_id))
        except (KeyNotFoundError, NotFoundError):
            return None
        if not entry.value:
            return None
        return ApiKeyRecord(**json.loads(entry.value))

    async def revoke(self, key_id: str, *, by: str = "") -> bool:
        """Revoke a key (it stays listed, marked revoked). False if there is no such key."""
        record = await self.get(key_id)
        if record is None:
            return False
        if record.revoked_at is None:
            revoked = ApiKeyRecord(**{**asdict(record), "revoked_at": time.time(),
                                      "revoked_by": by[:200]})
            kv = await self._kv()
            await kv.put(self.bus.names.apikey_key(key_id), json.dumps(asdict(revoked)).encode())
        self._revoked(key_id)
        return True

    async def list(self, tenant: str | None = None) -> list[ApiKeyRecord]:
        kv = await self._kv()
        try:
            keys = await kv.keys()
        except (NotFoundError, KeyNotFoundError):  # an empty bucket
            return []
        out = []
        for k in keys:
            record = await self.get(k.removeprefix("key."))
            if record is not None and (tenant is None or record.tenant == tenant):
                out.append(record)
        return sorted(out, key=lambda r: (r.tenant, r.created_at))

    async def authenticate(self, key: str | None) -> Principal:
        """The principal a key speaks for; :class:`~nerve.Unauthenticated` if none."""
        if not key:
            raise Unauthenticated("no API key: send `Authorization: Bearer <key>` (create a "
                                  "key with `nerve apikey create --tenant NAME`)")
        d = digest(key)
        if any(hmac.compare_digest(d, a) for a in self._admin):
            return Principal(tenant=None, admin=True)
        now = time.monotonic()
        cached = self._cache.get(d)
        if cached is not None and cached[0] > now:
            return cached[1]
        m = KEY_RE.match(key)
        record = await self.get(m.group(1)) if m else None
        if record is None or not hmac.compare_digest(record.sha256, d):
            raise Unauthenticated("unknown API key: check it was copied whole (keys look like "
                                  "nrv_<16 hex>_<secret>), or create one with "
                                  "`nerve apikey create --tenant NAME`")
        if record.revoked_at is not None:
            raise Unauthenticated(f"API key {record.id} was revoked; create a new one with "
                                  "`nerve apikey create`", key_id=record.id)
        principal = Principal(tenant=record.tenant, key_id=record.id)
        if self.cache_ttl > 0:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[d] = (now + self.cache_ttl, principal)
        return principal


def load_admin_key(data_dir: Path | None, *, create: bool = False) -> str | None:
    """The admin key: ``$NERVE_ADMIN_KEY``, else ``<data_dir>/admin.key`` (made with mode
    0600 when ``create`` and it does not exist yet)."""
    env = os.environ.get(ADMIN_KEY_ENV)
    if env:
        return env.strip()
    if data_dir is None:
        return None
    path = Path(data_dir) / "admin.key"
    with contextlib.suppress(FileNotFoundError):
        return path.read_text().strip() or None
    if not create:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    key = f"nrv_admin_{secrets.token_urlsafe(32)}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it a moment ago
        return path.read_text().strip() or None
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


__all__ = ["ADMIN_KEY_ENV", "ApiKeyRecord", "ApiKeys", "Principal", "digest", "load_admin_key"]
