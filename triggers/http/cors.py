"""Pages of the origins in [server] cors_origins may call the API from a browser (CORS).

A browser lets a page read an answer from another origin only if the answer names the page's
origin in Access-Control-Allow-Origin, and sends a request with an Authorization or a JSON
Content-Type only after a preflight (OPTIONS, with no Authorization) was answered 2xx naming
its origin, method and headers. For a listed origin:

- a preflight is answered 204 here, before the ui_token is asked for or the route is looked at
  (the request it announces gets those answers, with headers the page can read);
- every answer (errors, a log stream prepared early, a plain-text log) names the origin and the
  headers the page may read; no answer allows credentials (eventrun sets no cookie: a page sends
  the ui_token itself, in Authorization).

Every answer of a server with origins listed says it varies by Origin, so that no cache gives
one origin's answer to another. An unlisted origin's preflight goes on as any request does (403
CrossSiteRequest without a ui_token, 401 with one) and gets no CORS header: its page cannot send.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from typing import Any

from aiohttp import hdrs, web

ALLOW_METHODS = "GET, HEAD, POST"
ALLOW_HEADERS = "Authorization, Content-Type, Idempotency-Key, X-Invocation-Type"
"""The request headers eventrun reads (a page needs no other: the rest are the browser's own)."""
EXPOSE_HEADERS = "X-Request-Id, Retry-After, WWW-Authenticate"
"""The answer headers a client reads beyond those every page may (Content-Type, Content-Length...)."""
MAX_AGE = "600"  # seconds a browser may keep a preflight's answer

Hook = Callable[[web.Request, web.StreamResponse], Awaitable[None]]


def preflight_middleware(origins: Collection[str]) -> Any:
    """Answer a listed origin's preflight 204, before any other middleware or the router may refuse it."""
    listed = frozenset(origins)

    @web.middleware
    async def answer_preflight(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if (
            request.method == hdrs.METH_OPTIONS
            and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers
            and request.headers.get(hdrs.ORIGIN) in listed
        ):
            return web.Response(
                status=204,
                headers={
                    hdrs.ACCESS_CONTROL_ALLOW_METHODS: ALLOW_METHODS,
                    hdrs.ACCESS_CONTROL_ALLOW_HEADERS: ALLOW_HEADERS,
                    hdrs.ACCESS_CONTROL_MAX_AGE: MAX_AGE,
                },
            )
        return await handler(request)

    return answer_preflight


def cors_headers(origins: Collection[str]) -> Hook:
    """An on_response_prepare hook: `Vary: Origin` on every answer, and a listed origin's headers on its own."""
    listed = frozenset(origins)

    async def allow_listed(request: web.Request, response: web.StreamResponse) -> None:
        _vary_by_origin(response)
        origin = request.headers.get(hdrs.ORIGIN)
        if origin in listed:
            response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
            response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = EXPOSE_HEADERS

    return allow_listed


def _vary_by_origin(response: web.StreamResponse) -> None:
    vary = response.headers.get(hdrs.VARY, "")
    named = {part.strip().lower() for part in vary.split(",")}
    if "origin" not in named and "*" not in named:
        response.headers[hdrs.VARY] = f"{vary}, Origin" if vary.strip() else "Origin"
