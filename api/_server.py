"""``ApiServer``: the aiohttp application, its read model and feed, its lifecycle."""

from __future__ import annotations

import asyncio
import enum
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from aiohttp import web

from api._appkeys import SERVICES
from api._config import ApiConfig
from api._console import add_console
from api._http import MAX_BODY_KEY, PRINCIPAL, make_error_middleware
from api._keys import ApiKeys
from api._metrics import Metrics
from api._projector import Projector
from api._readmodel import ReadModel
from api._routes import NEEDS_BUS, add_routes
from api._services import Services
from api._tail import Tails
from bus import Bus
from nerve._errors import ApiError, ConfigError, NerveError, Overloaded
from workflow import NerveClient

log = logging.getLogger("nerve.api")


class ServerState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


@web.middleware
async def _bus_check(request: web.Request, handler: Any) -> web.StreamResponse:
    # Fail fast while NATS is away: a request that needs it would wait for a timeout.
    if request.match_info.route.name in NEEDS_BUS and \
            not request.app[SERVICES].bus.nc.is_connected:
        raise Overloaded("the message bus (NATS) is unreachable from this API process; "
                         "retry shortly", retry_after_ms=1000)
    return await handler(request)


@web.middleware
async def _auth(request: web.Request, handler: Any) -> web.StreamResponse:
    if request.path.startswith("/v1/"):
        svc: Services = request.app[SERVICES]
        header = request.headers.get("Authorization", "")
        scheme, _, key = header.partition(" ")
        if header and scheme.lower() != "bearer":
            from nerve._errors import Unauthenticated

            raise Unauthenticated("use `Authorization: Bearer <key>`")
        request[PRINCIPAL] = await svc.keys.authenticate(key.strip() or None)
    return await handler(request)


class ApiServer:
    """The HTTP API and console of one process, on ``config.host:config.port``.

    ``start()`` opens the read model, starts its feed and the listener; ``stop()`` undoes
    it in reverse order. ``url`` is where it listens once started.
    """

    def __init__(self, bus: Bus, config: ApiConfig | None = None) -> None:
        self.bus = bus
        self.config = config or ApiConfig()
        self.state = ServerState.NEW
        self.metrics = Metrics()
        self._tmpdir: Path | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.services: Services | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise ApiError("the API server has not been started")
        host = self.config.host if self.config.host not in ("0.0.0.0", "::") else "127.0.0.1"
        return f"http://{host}:{self.port}"

    def _db_path(self) -> Path:
        if self.config.db_path is not None:
            return self.config.db_path
        self._tmpdir = Path(tempfile.mkdtemp(prefix="nerve-readmodel-"))
        return self._tmpdir / "readmodel.db"

    def _on_request(self, request: web.Request, status: int, seconds: float) -> None:
        route = request.match_info.route
        name = route.name or ("console" if request.path.startswith(("/runs", "/console"))
                              or request.path == "/" else "unmatched")
        self.metrics.inc("nerve_api_requests_total", route=name, status=str(status),
                         method=request.method)
        if name != "streamEvents":
            self.metrics.observe("nerve_api_request_seconds", seconds, route=name)

    def build_app(self, services: Services) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body,
                              middlewares=[make_error_middleware(self._on_request),
                                           _bus_check, _auth])
        app[SERVICES] = services
        app[MAX_BODY_KEY] = self.config.max_body
        add_routes(app)
        if self.config.console:
            add_console(app)
        return app

    async def start(self) -> None:
        if self.state is not ServerState.NEW:
            raise ApiError(f"the API server is {self.state.value}; make a new one")
        cfg = self.config
        model = await ReadModel(self._db_path()).open()
        projector = Projector(self.bus, model, instance=cfg.instance)
        tails = Tails(self.bus, ring_size=cfg.ring_size, linger=cfg.tail_linger)
        keys = ApiKeys(self.bus, cfg.admin_keys, cache_ttl=cfg.key_cache_ttl)
        services = Services(self.bus, cfg, model, projector, keys, tails, self.metrics,
                            NerveClient(self.bus))
        self.services = services
        self._describe_metrics(services)
        try:
            projector.start()
            await keys.watch()
            self.bus.on_reconnect(tails.restart_all)
            self._runner = web.AppRunner(self.build_app(services), access_log=None,
                                         handler_cancellation=False, shutdown_timeout=2.0)
            await self._runner.setup()
            self._site = web.TCPSite(self._runner, cfg.host, cfg.port, reuse_address=True)
            try:
                await self._site.start()
            except OSError as exc:
                # Restarting would fail the same way: a ConfigError, which supervisors do not
                # retry (`nerve up` stops and says why).
                raise ConfigError(f"the API cannot listen on {cfg.host}:{cfg.port}: "
                                  f"{exc.strerror or exc}; choose another port (nerve up "
                                  f"--http-port, or --set port=...)") from None
        except BaseException:
            await self._teardown()
            raise
        sockets = self._runner.addresses
        self.port = int(sockets[0][1]) if sockets else cfg.port
        self.state = ServerState.RUNNING
        log.info("API listening on %s (read model %s)", self.url, model.path)

    def _describe_metrics(self, svc: Services) -> None:
        m = self.metrics
        m.describe("nerve_api_requests_total", "counter", "HTTP requests by route and status")
        m.describe("nerve_api_request_seconds", "histogram", "HTTP request latency")
        m.describe("nerve_api_sse_events_total", "counter", "events sent to SSE clients")
        m.describe("nerve_api_sse_resumes_total", "counter", "SSE streams resumed after an id")
        m.describe("nerve_api_sse_stream_reads_total", "counter",
                   "batches read from the stream by clients behind the live ring")
        m.gauge_fn("nerve_api_sse_streams", lambda: svc.streams)
        m.gauge_fn("nerve_api_tails", lambda: len(svc.tails))
        m.gauge_fn("nerve_api_tail_events_total", lambda: svc.tails.events_in)
        m.gauge_fn("nerve_readmodel_position", lambda: svc.model.position)
        m.gauge_fn("nerve_readmodel_records_applied", lambda: svc.projector.applied)

    async def stop(self) -> None:
        if self.state is not ServerState.RUNNING:
            return
        self.state = ServerState.STOPPING
        await self._teardown()
        self.state = ServerState.STOPPED

    async def _teardown(self) -> None:
        errors: list[BaseException] = []
        svc = self.services
        steps: list[Any] = []
        if svc is not None:
            svc.stopping.set()
            steps.append(svc.tails.close)  # wakes every stream, which then ends
        if self._runner is not None:
            steps.append(self._runner.cleanup)
        if svc is not None:
            steps += [lambda: svc.projector.stop(), svc.model.close, svc.keys.close, svc.close]
        for step in steps:
            try:
                await step()
            except (NerveError, OSError, RuntimeError) as exc:
                errors.append(exc)
        self._runner = None
        if self._tmpdir is not None:
            await asyncio.to_thread(shutil.rmtree, self._tmpdir, True)
            self._tmpdir = None
        for exc in errors:
            log.warning("API shutdown: %r", exc)

    async def __aenter__(self) -> ApiServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def serve_forever(self) -> None:
        """Start, serve until cancelled, stop (a supervisor child)."""
        await self.start()
        try:
            await asyncio.Future()
        finally:
            await self.stop()


__all__ = ["ApiServer", "ServerState"]
