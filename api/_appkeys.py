"""The keys under which the aiohttp application holds what its handlers share."""

from __future__ import annotations

from aiohttp import web

from api._services import Services

SERVICES: web.AppKey[Services] = web.AppKey("nerve_services", Services)

__all__ = ["SERVICES"]
