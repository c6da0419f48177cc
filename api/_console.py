"""The web console: static HTML, CSS and JavaScript served by the API server (no build step).

``/`` is the runs list (live status, pending approvals, tenant spend, the kill button, a
form to start a run), ``/runs/<id>`` a run's page (its live token stream, resumed after a
network drop, the history as a timeline, approvals to approve or reject). The pages call
the same ``/v1`` API with the key the person pastes in (kept in the browser's
``localStorage``, sent as ``Authorization: Bearer``; no cookies, so no CSRF).
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC = Path(__file__).parent / "console"
_SECURITY_HEADERS = {
    # Everything the console needs comes from this origin; nothing may frame it.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _page(name: str):
    async def serve(request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / name, headers=_SECURITY_HEADERS)

    return serve


@web.middleware
async def _headers(request: web.Request, handler):  # type: ignore[no-untyped-def]
    resp = await handler(request)
    if request.path.startswith("/console/"):
        resp.headers.update(_SECURITY_HEADERS)
    return resp


def add_console(app: web.Application) -> None:
    app.router.add_get("/", _page("index.html"), name="console")
    app.router.add_get("/runs/{run_id}", _page("run.html"), name="consoleRun")
    app.router.add_static("/console/", STATIC, name="consoleStatic", show_index=False,
                          append_version=False)
    app.middlewares.append(_headers)


__all__ = ["STATIC", "add_console"]
