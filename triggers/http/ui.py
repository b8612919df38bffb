"""The dashboard: static files shipped in the package (ui/), served at /ui/ with no build step."""

from __future__ import annotations

import importlib.resources

from aiohttp import hdrs, web

# The page runs only its own script and style and talks only to this server: a payload or a
# log line that slipped into the page as markup still could not run or load anything.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

_FILES = {
    "": ("index.html", "text/html"),
    "index.html": ("index.html", "text/html"),
    "app.js": ("app.js", "text/javascript"),
    "app.css": ("app.css", "text/css"),
}


def ui_routes() -> list[web.RouteDef]:
    """GET /ui (to /ui/) and the dashboard's files."""
    return [web.get("/ui", _to_index), web.get("/ui/{name:.*}", _serve)]


async def _to_index(request: web.Request) -> web.Response:
    raise web.HTTPFound("/ui/")


async def _serve(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in _FILES:
        raise web.HTTPNotFound(text=f"the dashboard has no file {name!r}")
    file, content_type = _FILES[name]
    body = importlib.resources.files(__package__).joinpath("ui", file).read_bytes()
    return web.Response(
        body=body,
        content_type=content_type,
        charset="utf-8",
        headers={
            hdrs.CACHE_CONTROL: "no-cache",
            "Content-Security-Policy": CONTENT_SECURITY_POLICY,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )
