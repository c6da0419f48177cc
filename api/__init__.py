"""The front door: the HTTP API, resumable SSE streams, the read model and the web console.

* :class:`ApiServer` / :class:`ApiConfig`: the aiohttp server (``nerve worker --role api``).
* :class:`ReadModel`, :class:`Projector`, :func:`rebuild`: the aiosqlite projections of the
  run histories and their feed.
* :class:`ApiKeys`, :class:`Principal`: per-tenant API keys, stored hashed.
* :class:`ApiClient`: a small client for the API (the CLI's ``nerve logs -f``).
* :func:`document`: the OpenAPI 3.1 document.
"""

from api._client import ApiClient, SseEvent
from api._config import ApiConfig
from api._keys import ADMIN_KEY_ENV, ApiKeyRecord, ApiKeys, Principal, load_admin_key
from api._openapi import document
from api._projections import PROJECTIONS, Record
from api._projector import Projector, rebuild
from api._readmodel import ReadModel
from api._role import run_api
from api._server import ApiServer, ServerState

__all__ = [
    "ADMIN_KEY_ENV",
    "PROJECTIONS",
    "ApiClient",
    "ApiConfig",
    "ApiKeyRecord",
    "ApiKeys",
    "ApiServer",
    "Principal",
    "Projector",
    "ReadModel",
    "Record",
    "ServerState",
    "SseEvent",
    "document",
    "load_admin_key",
    "rebuild",
    "run_api",
]
