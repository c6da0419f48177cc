"""The OpenAPI 3.1 document (``GET /openapi.json``), built from the route table and the
pydantic models (whose JSON Schema is the 2020-12 dialect OpenAPI 3.1 uses)."""

from __future__ import annotations

import functools
from typing import Any

from pydantic import BaseModel

from api._models import ErrorBody
from api._routes import ROUTES, Route
from nerve import __version__

REF = "#/components/schemas/{model}"
_ERRORS = {400: "bad request (invalid JSON)", 401: "no valid API key",
           403: "not an admin key", 404: "no such run",
           413: "body too large", 422: "invalid request",
           503: "unavailable for now (NATS, the read model, or too many streams); see "
                "retry_after_ms"}


def _schemas(models: set[type[BaseModel]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for model in sorted(models, key=lambda mdl: mdl.__name__):
        schema = model.model_json_schema(ref_template=REF, mode="serialization")
        for name, sub in schema.pop("$defs", {}).items():
            out[name] = sub
        out[model.__name__] = schema
    return out


def _content(kind: type[BaseModel] | str | None) -> dict[str, Any] | None:
    if kind is None:
        return {"application/json": {"schema": {"$ref": REF.format(model="ErrorBody")}}}
    if isinstance(kind, str):
        schema: dict[str, Any] = {"type": "string"}
        if kind == "application/json":
            schema = {"type": "object"}
        return {kind: {"schema": schema}}
    return {"application/json": {"schema": {"$ref": REF.format(model=kind.__name__)}}}


def _operation(route: Route, models: set[type[BaseModel]]) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": route.op_id, "summary": route.summary,
                          "tags": [route.tag]}
    if route.description:
        op["description"] = route.description
    if route.auth == "none":
        op["security"] = []
    elif route.auth == "admin":
        op["description"] = (op.get("description", "") + " Needs an admin key.").strip()
    if route.params:
        op["parameters"] = [{"name": p.name, "in": p.where, "required": p.required,
                             "description": p.description, "schema": p.schema}
                            for p in route.params]
    if route.body is not None:
        models.add(route.body)
        op["requestBody"] = {"required": route.body_required, "content": {
            "application/json": {"schema": {"$ref": REF.format(model=route.body.__name__)}}}}
    responses: dict[str, Any] = {}
    for status, (kind, text) in sorted(route.responses.items()):
        if isinstance(kind, type):
            models.add(kind)
        responses[str(status)] = {"description": text, "content": _content(kind)}
    implied: list[int] = []
    if route.auth != "none":
        implied += [401, 503]
    if route.auth == "admin":
        implied.append(403)
    if route.params or route.body is not None:
        implied.append(422)
    if any(p.name == "run_id" and p.where == "path" for p in route.params):
        implied.append(404)
    if route.body is not None:
        implied += [400, 413]
    for status in implied:
        responses.setdefault(str(status), {"description": _ERRORS[status],
                                           "content": _content(None)})
    op["responses"] = responses
    return op


@functools.cache
def document() -> dict[str, Any]:
    """The API's OpenAPI 3.1 document."""
    models: set[type[BaseModel]] = {ErrorBody}
    paths: dict[str, Any] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, models)
    return {
        "openapi": "3.1.0",
        "info": {"title": "nerve API", "version": __version__,
                 "description": "Runs, their live events (SSE, resumable), signals and "
                                "approvals, forks, and tenant budgets. Errors are "
                                "`{\"error\": {\"code\", \"message\", \"retry_after_ms\"?}}`."},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "a tenant's API key (`nerve apikey create --tenant T`) or "
                               "the operator's admin key"}},
            "schemas": _schemas(models),
        },
    }


__all__ = ["document"]
