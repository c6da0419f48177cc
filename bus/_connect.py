"""Connecting to NATS: the embedded server or any server/cluster named by URL."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.errors import (
    BadHeaderError,
    ConnectionClosedError,
    ConnectionDrainingError,
    MaxPayloadError,
    OutboundBufferLimitError,
)
from nats.errors import Error as NatsClientError
from nats.js import JetStreamContext
from nats.js.errors import APIError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from bus._parser import RawSink, WireParser
from bus._replies import ReplyInbox
from bus._subjects import Names
from nerve import BusError, ConfigError

log = logging.getLogger("nerve.bus")

NATS_URL_ENV = "NERVE_NATS_URL"


@dataclass(slots=True)
class ConnectOptions:
    """Where and how to connect. Every field has an environment variable twin.

    ``NERVE_NATS_URL`` (comma-separated for a cluster), ``NERVE_NATS_USER`` /
    ``NERVE_NATS_PASSWORD``, ``NERVE_NATS_TOKEN``, ``NERVE_NATS_CREDS`` (a ``.creds`` file),
    ``NERVE_NATS_TLS_CA`` / ``NERVE_NATS_TLS_CERT`` / ``NERVE_NATS_TLS_KEY``.
    """

    servers: list[str] = field(default_factory=lambda: ["nats://127.0.0.1:4222"])
    name: str = "nerve"
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds_file: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_hostname: str | None = None
    connect_timeout: float = 5.0
    reconnect_wait: float = 0.25
    initial_attempts: int = 3
    prefix: str = "nerve"

    @classmethod
    def from_env(cls, url: str | None = None, **overrides: object) -> ConnectOptions:
        """Options from ``url`` (or ``NERVE_NATS_URL``) and the ``NERVE_NATS_*`` variables."""
        env = os.environ
        raw = url or env.get(NATS_URL_ENV)
        opts = cls()
        if raw:
            opts.servers = [s.strip() for s in raw.split(",") if s.strip()]
        opts.user = env.get("NERVE_NATS_USER") or None
        opts.password = env.get("NERVE_NATS_PASSWORD") or None
        opts.token = env.get("NERVE_NATS_TOKEN") or None
        for attr, var in (("creds_file", "NERVE_NATS_CREDS"), ("tls_ca", "NERVE_NATS_TLS_CA"),
                          ("tls_cert", "NERVE_NATS_TLS_CERT"), ("tls_key", "NERVE_NATS_TLS_KEY")):
            if env.get(var):
                setattr(opts, attr, Path(env[var]))
        opts.prefix = env.get("NERVE_PREFIX", opts.prefix)
        for key, value in overrides.items():
            if value is not None:
                setattr(opts, key, value)
        return opts

    def tls_context(self) -> ssl.SSLContext | None:
        if not (self.tls_ca or self.tls_cert):
            return None
        ctx = ssl.create_default_context(cafile=str(self.tls_ca) if self.tls_ca else None)
        if self.tls_cert:
            ctx.load_cert_chain(str(self.tls_cert), str(self.tls_key) if self.tls_key else None)
        return ctx


class _Client(NatsClient):
    """nats-py's client, with nerve's wire parser and raw subscriptions for bulk reads.

    A raw subscription hands each message's header block and payload straight to a plain
    callback, skipping header parsing, message objects and the per-subscription task.
    Reading a run history is mostly that per-message machinery; this halves it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.raw_sinks: dict[int, RawSink] = {}
        self._ps = WireParser(self)
        self._kick: asyncio.Future[None] | None = None

    def publish_now(self, subject: str, payload: bytes, reply: str = "",
                    headers: dict[str, str] | None = None) -> None:
        """``publish`` without the coroutine, the flusher queue's future per call, or the
        regular expressions per header: queued for the flusher at once.

        Same limits as ``publish`` (closed, draining, reconnect buffer, max payload). For
        nerve's own messages: header names are nerve's, and values are refused if they
        would break the header block (a CR or LF).
        """
        if self.is_closed:
            raise ConnectionClosedError
        if self.is_draining_pubs:
            raise ConnectionDrainingError
        size = len(payload)
        if not self.is_connected and (self._max_pending_size <= 0 or
                                      size + self._pending_data_size > self._max_pending_size):
            raise OutboundBufferLimitError
        if size > self._max_payload:
            raise MaxPayloadError
        if headers:
            block = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            if block.count("\n") != len(headers) or block.count("\r") != len(headers):
                raise BadHeaderError(f"a header contains a line break: {headers!r}")
            hdr = b"NATS/1.0\r\n" + block.encode() + b"\r\n"
            cmd = b"HPUB %s %s %d %d\r\n%s%s\r\n" % (
                subject.encode(), reply.encode(), len(hdr), len(hdr) + size, hdr, payload)
        else:
            cmd = b"PUB %s %s %d\r\n%s\r\n" % (subject.encode(), reply.encode(), size,
                                                 payload)
        self._pending.append(cmd)
        self._pending_data_size += len(cmd)
        self.stats["out_msgs"] += 1
        self.stats["out_bytes"] += size
        queue = self._flush_queue
        if queue is not None and queue.empty() and self.is_connected:
            if self._kick is None:
                self._kick = asyncio.get_running_loop().create_future()
                self._kick.set_result(None)  # the flusher resolves what it takes; this is
            queue.put_nowait(self._kick)     # done already, so any one object serves

    def drop_pending(self) -> None:
        """Forget what is buffered for a server that is gone. nats-py's ``close`` writes it
        to the dead transport and fails (``ConnectionResetError``, or ``RuntimeError``
        under uvloop) before it has closed anything else."""
        self._pending = []
        self._pending_data_size = 0


class Bus:
    """A live NATS connection with its JetStream context and the deployment's :class:`Names`.

    Every actor gets one of these. ``kv()`` and ``object_store()`` bind buckets once and
    cache the handles.
    """

    def __init__(self, nc: NatsClient, names: Names,
                 reconnect_listeners: list[Callable[[], Awaitable[None]]] | None = None) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.names = names
        self._reconnect_listeners = reconnect_listeners if reconnect_listeners is not None else []
        self._kv: dict[str, KeyValue] = {}
        self._obj: dict[str, ObjectStore] = {}
        self.replies = ReplyInbox(self)

    async def publish(self, subject: str, payload: bytes, reply: str = "",
                      headers: dict[str, str] | None = None) -> None:
        """Publish nerve's own message (see ``_Client.publish_now``; plain nats-py otherwise)."""
        if isinstance(self.nc, _Client):
            self.nc.publish_now(subject, payload, reply, headers)
        else:
            await self.nc.publish(subject, payload, reply=reply, headers=headers)

    async def raw_subscribe(self, subject: str, sink: RawSink) -> Any:
        """Subscribe with a plain callback ``sink(subject, reply, header_bytes_or_None,
        payload)``, called synchronously by the wire parser."""
        sub = await self.nc.subscribe(subject)
        if isinstance(self.nc, _Client):
            self.nc.raw_sinks[sub._id] = sink
        else:  # a plain nats-py client: fall back to a parsed subscription
            async def forward(msg: Any) -> None:
                raw = None
                if msg.headers:
                    raw = b"NATS/1.0\r\n" + b"".join(
                        f"{k}: {v}\r\n".encode() for k, v in msg.headers.items()) + b"\r\n"
                sink(msg.subject.encode(), (msg.reply or "").encode(), raw, msg.data)

            await sub.unsubscribe()
            sub = await self.nc.subscribe(subject, cb=forward)
        return sub

    async def require_jetstream(self) -> None:
        """Raise :class:`~nerve.BusError` unless the server answers JetStream's API.

        Everything nerve keeps is in streams; a server started without ``-js`` would
        otherwise fail later, on the first publish, with nats-py's bare "no responders".
        """
        try:
            await self.js.account_info()
        except (APIError, NatsClientError, TimeoutError) as exc:
            url = self.nc.connected_url.geturl() if self.nc.connected_url else "NATS"
            raise BusError(
                f"{url} has no JetStream for this account ({exc!r}); nerve keeps its runs in "
                f"JetStream streams: start nats-server with -js (or a jetstream {{}} block "
                f"in its config), or use `nerve up`, which starts one", url=url) from None

    async def raw_unsubscribe(self, sub: Any) -> None:
        if isinstance(self.nc, _Client):
            self.nc.raw_sinks.pop(sub._id, None)
        with contextlib.suppress(NatsClientError):
            await sub.unsubscribe()

    async def kv(self, bucket: str) -> KeyValue:
        if bucket not in self._kv:
            self._kv[bucket] = await self.js.key_value(bucket)
        return self._kv[bucket]

    async def object_store(self, bucket: str) -> ObjectStore:
        if bucket not in self._obj:
            self._obj[bucket] = await self.js.object_store(bucket)
        return self._obj[bucket]

    def on_reconnect(self, listener: Callable[[], Awaitable[None]]) -> None:
        """Call ``listener`` after every reconnect (state held by the server may be gone)."""
        self._reconnect_listeners.append(listener)

    @property
    def connected_url(self) -> str | None:
        url = self.nc.connected_url
        return url.geturl() if url else None

    async def hold(self) -> None:
        """Keep the connection open until cancelled, then close it. As a child of a
        supervisor tree, after the server's child: the tree stops children in reverse order,
        so the connection closes before the server goes, instead of reconnecting to it."""
        try:
            await asyncio.Event().wait()
        finally:
            await self.close()

    async def close(self, drain: bool = True) -> None:
        """Close the connection; ``drain`` first lets in-flight messages finish (skip it when
        the server is already gone)."""
        if self.nc.is_closed:
            return
        if drain and self.nc.is_connected:
            await self.nc.drain()
            return
        if not self.nc.is_connected and isinstance(self.nc, _Client):
            self.nc.drop_pending()
        await self.nc.close()


async def connect(options: ConnectOptions | str | None = None) -> Bus:
    """Connect to NATS and return a :class:`Bus`.

    ``options`` may be a URL, a :class:`ConnectOptions`, or ``None`` for the environment.
    Reconnects are retried forever and logged; a first connection that fails raises
    :class:`~nerve.BusError` with the URL and the reason.
    """
    if options is None or isinstance(options, str):
        options = ConnectOptions.from_env(options)
    if options.creds_file and not options.creds_file.is_file():
        raise ConfigError(f"NATS credentials file {options.creds_file} does not exist",
                          path=str(options.creds_file))

    async def on_disconnect() -> None:
        if not (nc.is_closed or nc.is_draining):
            log.warning("disconnected from NATS; reconnecting")

    listeners: list[Callable[[], Awaitable[None]]] = []

    async def on_reconnect() -> None:
        url = nc.connected_url.geturl() if nc.connected_url else "?"
        log.warning("reconnected to NATS at %s", url)
        for listener in list(listeners):
            try:
                await listener()
            except Exception:
                log.exception("reconnect listener failed")

    async def on_error(exc: Exception) -> None:
        if nc.is_connected or nc.is_reconnecting:
            log.warning("NATS connection error: %r", exc)

    nc = _Client()
    try:
        await nc.connect(
            servers=options.servers,
            name=options.name,
            user=options.user,
            password=options.password,
            token=options.token,
            user_credentials=str(options.creds_file) if options.creds_file else None,
            tls=options.tls_context(),
            tls_hostname=options.tls_hostname,
            connect_timeout=options.connect_timeout,
            reconnect_time_wait=options.reconnect_wait,
            # A finite count for the first connection (nats-py applies it there too, and -1
            # would retry a wrong URL forever); switched to "forever" once connected.
            max_reconnect_attempts=options.initial_attempts,
            allow_reconnect=True,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
            error_cb=on_error,
        )
    except (OSError, NatsClientError, TimeoutError) as exc:
        raise BusError(
            f"cannot connect to NATS at {', '.join(options.servers)}: {exc!r}; check the URL "
            f"(--nats-url / {NATS_URL_ENV}) and that the server is running",
            servers=options.servers,
        ) from None
    nc.options["max_reconnect_attempts"] = -1
    return Bus(nc, Names(options.prefix), listeners)


__all__ = ["Bus", "ConnectOptions", "connect"]
