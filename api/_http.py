"""The HTTP plumbing every handler shares: errors as JSON, auth, bodies, request ids.

Errors are answered as ``{"error": {"code", "message", "retry_after_ms"?, "request_id"}}``.
Which error becomes which status is decided here, in one table (:func:`status_of`).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, TypeVar

from aiohttp import web
from nats.errors import Error as NatsClientError
from pydantic import BaseModel, ValidationError

from actors import new_id
from api._keys import Principal
from nerve._errors import (
    ApiError,
    BudgetError,
    BusError,
    CodecError,
    ConfigError,
    HistoryError,
    InvalidRequest,
    LedgerUnavailable,
    NerveError,
    PermissionDenied,
    ReadModelError,
    RunNotFound,
    TaskRejected,
    TenantKilled,
    UnknownTenant,
    WorkflowNotFound,
)

log = logging.getLogger("nerve.api.http")

T = TypeVar("T", bound=BaseModel)
PRINCIPAL: web.RequestKey[Principal] = web.RequestKey("nerve_principal", Principal)
REQUEST_ID: web.RequestKey[str] = web.RequestKey("nerve_request_id", str)


def status_of(exc: NerveError) -> tuple[int, str, int | None]:
    """HTTP status, error code and ``retry_after_ms`` for an error of the tree."""
    retry = getattr(exc, "retry_after_ms", None)
    if isinstance(exc, ApiError):
        return exc.status, exc.code, retry
    if isinstance(exc, RunNotFound):
        return 404, "run_not_found", None
    if isinstance(exc, WorkflowNotFound):
        return 422, "workflow_not_found", None
    if isinstance(exc, TaskRejected):
        return 422, "task_rejected", None
    if isinstance(exc, ConfigError | CodecError):
        return 422, "invalid_request", None
    if isinstance(exc, UnknownTenant):
        return 404, "tenant_not_found", None
    if isinstance(exc, TenantKilled):
        return 409, "tenant_killed", None
    if isinstance(exc, LedgerUnavailable):
        return 503, "budget_unavailable", retry or 1000
    if isinstance(exc, BudgetError):
        return 409, "budget", None
    if isinstance(exc, ReadModelError):
        return 503, "read_model_unavailable", retry or 500
    if isinstance(exc, BusError) or (isinstance(exc, HistoryError) and exc.retryable):
        return 503, "unavailable", retry or 1000
    return 500, "internal", None


def error_response(status: int, code: str, message: str, *, retry_after_ms: int | None = None,
                   request_id: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    detail: dict[str, Any] = {"code": code, "message": message}
    if retry_after_ms is not None:
        detail["retry_after_ms"] = retry_after_ms
    if request_id is not None:
        detail["request_id"] = request_id
    hdrs = dict(headers or {})
    if retry_after_ms is not None:
        hdrs["Retry-After"] = str(max(1, round(retry_after_ms / 1000)))
    return web.json_response({"error": detail}, status=status, headers=hdrs)


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None,
                  ) -> web.Response:
    if isinstance(data, BaseModel):
        text = data.model_dump_json()
    else:
        text = json.dumps(data, default=str, separators=(",", ":"))
    return web.Response(text=text, status=status, content_type="application/json",
                        headers=headers)


async def read_body(request: web.Request, model: type[T], *, optional: bool = False) -> T:
    """The request's JSON body validated as ``model``; clear 4xx errors otherwise."""
    raw = await request.read()  # bounded by the app's client_max_size (413 beyond)
    if not raw.strip():
        if optional:
            return model()
        raise InvalidRequest(f"this request needs a JSON body ({model.__name__}); see "
                             "/openapi.json", status=400)
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad_json(str(exc)) from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequest(f"invalid {model.__name__}: {describe(exc)}",
                             errors=exc.error_count()) from None


def _bad_json(why: str) -> InvalidRequest:
    err = InvalidRequest(f"the body is not valid JSON ({why})")
    err.status, err.code = 400, "invalid_json"
    return err


def describe(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors()[:6]:
        where = ".".join(str(p) for p in e["loc"]) or "(body)"
        parts.append(f"{where}: {e['msg']}")
    more = exc.error_count() - 6
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def principal(request: web.Request) -> Principal:
    p = request.get(PRINCIPAL)
    if p is None:  # a handler behind auth always has one; this is a wiring bug
        raise PermissionDenied("this endpoint needs an API key")
    return p


def require_admin(p: Principal) -> None:
    if not p.admin:
        raise PermissionDenied(f"only an operator's admin key may do this (this key belongs to "
                               f"tenant {p.tenant})")


def require_tenant(p: Principal, tenant: str) -> None:
    if not p.may_act_for(tenant):
        raise PermissionDenied(f"this key belongs to tenant {p.tenant}; it cannot act for "
                               f"tenant {tenant}")


def query_int(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"?{name}= must be an integer, got {raw[:40]!r}",
                             field=name) from None
    if not lo <= value <= hi:
        raise InvalidRequest(f"?{name}= must be between {lo} and {hi}, got {value}", field=name)
    return value


def query_bool(request: web.Request, name: str, default: bool) -> bool:
    raw = request.query.get(name)
    if raw is None:
        return default
    value = raw.lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no"):
        return False
    raise InvalidRequest(f"?{name}= must be true or false, got {raw[:40]!r}", field=name)


def query_choice(request: web.Request, name: str, choices: tuple[str, ...],
                 default: str | None = None) -> str | None:
    raw = request.query.get(name)
    if raw is None:
        return default
    if raw not in choices:
        raise InvalidRequest(f"?{name}= must be one of {', '.join(choices)}; got {raw[:40]!r}",
                             field=name)
    return raw


def make_error_middleware(on_request: Any = None) -> Any:
    """Turns every failure into the JSON error shape, stamps request ids, counts requests."""

    @web.middleware
    async def errors(request: web.Request, handler: Any) -> web.StreamResponse:
        rid = request.headers.get("X-Request-Id", "")[:64] or new_id("req-")
        request[REQUEST_ID] = rid
        t0 = time.perf_counter()
        status = 500
        try:
            resp = await handler(request)
            status = resp.status
        except NerveError as exc:
            status, code, retry = status_of(exc)
            if status >= 500:
                log.warning("%s %s failed: %s", request.method, request.path, exc.message)
            headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
            resp = error_response(status, code, exc.message, retry_after_ms=retry,
                                  request_id=rid, headers=headers)
        except web.HTTPRequestEntityTooLarge as exc:
            status = 413
            limit = request.app.get(MAX_BODY_KEY, 0)
            resp = error_response(413, "payload_too_large",
                                  f"the body is larger than the {limit} bytes this API accepts "
                                  f"({exc.text or ''})".replace(" ()", ""), request_id=rid)
        except web.HTTPException as exc:
            status = exc.status
            if status == 404:
                message = (f"no such endpoint: {request.method} {request.path}; the API is "
                           "described at /openapi.json")
            elif status == 405:
                allowed = exc.headers.get("Allow", "")
                message = f"{request.method} is not allowed on {request.path} (allowed: {allowed})"
            else:
                message = exc.reason or exc.text or "error"
            code = {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")
            if status < 400:
                raise
            resp = error_response(status, code, message, request_id=rid,
                                  headers={k: v for k, v in exc.headers.items()
                                           if k in ("Allow",)})
        except (ConnectionResetError, BrokenPipeError):
            raise
        except (NatsClientError, TimeoutError) as exc:
            # The bus is away (a reconnect, a restarting server): nothing was decided.
            status = 503
            log.warning("%s %s: NATS unavailable (%r)", request.method, request.path, exc)
            resp = error_response(503, "unavailable", "the message bus (NATS) did not answer; "
                                  "retry shortly", retry_after_ms=1000, request_id=rid)
        except Exception:
            log.exception("%s %s failed (request %s)", request.method, request.path, rid)
            resp = error_response(500, "internal", "internal error; the server log has the "
                                  f"details under request id {rid}", request_id=rid)
        finally:
            if on_request is not None:
                on_request(request, status, time.perf_counter() - t0)
        if not resp.prepared:
            resp.headers["X-Request-Id"] = rid
        return resp

    return errors


MAX_BODY_KEY: web.AppKey[int] = web.AppKey("max_body", int)

__all__ = [
    "MAX_BODY_KEY",
    "PRINCIPAL",
    "describe",
    "error_response",
    "json_response",
    "make_error_middleware",
    "principal",
    "query_bool",
    "query_choice",
    "query_int",
    "read_body",
    "require_admin",
    "require_tenant",
    "status_of",
]
