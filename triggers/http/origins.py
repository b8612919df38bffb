"""Requests that browsers send on behalf of other sites are refused.

A server on the user's machine is within reach of every page the user opens: a "simple" POST
(a form's content type, text/plain) needs no CORS preflight, so a page anywhere could invoke,
terminate or replay; and a page whose name was pointed at 127.0.0.1 (DNS rebinding) is the same
origin as the server to the browser, so it could read runs' results too. A ui_token stops both
(it is a header no other site can send); without one:

- a request with an Origin header (browsers send it with every cross-site request) that is not
  this server's own (the Host it was sent to, or [server] url's) is refused;
- a server listening on a loopback address answers only a Host that is an IP address, localhost
  or [server] url's host: a rebound name is none of them;
- a server listening on any other address (0.0.0.0 in a container, often published on
  127.0.0.1) is reached by other machines under names it cannot know (a service name such as
  http://eventrun:8080), so it looks at the Host of a browser's request only: one with Origin
  (every POST), Sec-Fetch-Site or Sec-Fetch-Mode (every request to https or localhost) or
  Accept-Language (every request: to a plain-http name, a rebound one, a GET carries no other
  mark, and a page may change the header's value but not leave it out). Such a request is
  answered only if its Host is an IP address, localhost, [server] url's host or this machine's
  own name (socket.gethostname(), socket.getfqdn()): a browser that reaches the server by
  another name needs it in [server] url.

Clients that are not browsers (curl, the CLI, MinIO's webhook, other nodes) send none of these
headers, and reach the server by an address or by any name it is given.

An origin in [server] cors_origins is not another site: the operator lets its pages call the API
(see cors.py), so its Origin is taken as the server's own. The Host check stays as it is: a
listed page calls the API by the API's name (https://eventrun.example.com from a page on
https://app.example.com), which is [server] url's host in a deployment, or by an address or
localhost; a rebound name is still refused, whoever's page sent the request.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import yarl
from aiohttp import hdrs, web

from eventrun.engine.manifest import ServerConfig

from .responses import error_response

_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_middleware(server: ServerConfig) -> Any:
    """Refuse other sites' requests (see the module's docstring) with 403 CrossSiteRequest."""
    own_url = yarl.URL(server.url) if server.url else None
    own = {_authority(own_url.scheme, own_url.raw_authority)} if own_url is not None and own_url.raw_host else set()
    named = {own_url.raw_host.lower()} if own_url is not None and own_url.raw_host else set()
    loopback = _is_loopback(server.host)
    if not loopback:  # (a browser on this machine may use its name; looked up once, getfqdn may ask DNS)
        named |= {name.lower() for name in (socket.gethostname(), socket.getfqdn()) if name}
    hosts: dict[str, bool] = {}  # Host header -> whether it names this machine (a client sends the same each time)
    listed = frozenset(server.cors_origins)  # (written as browsers write an Origin: see ServerConfig)

    @web.middleware
    async def refuse_other_sites(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        origin = request.headers.get(hdrs.ORIGIN)
        sent_to = request.headers.get(hdrs.HOST, "")
        if origin is not None and origin not in listed and not _same_site(origin, sent_to, request, own):
            return error_response(
                403,
                "CrossSiteRequest",
                f"a browser's request from another site (Origin {origin[:200]!r}) is refused: this server takes "
                "requests from its own dashboard and from clients that are not browsers (behind a proxy, set "
                "[server] url to the address the browser uses)",
            )
        if (loopback or _from_a_browser(request.headers, origin)) and not _checked(hosts, sent_to, named):
            return error_response(403, "CrossSiteRequest", _not_our_name(sent_to[:200], loopback))
        return await handler(request)

    return refuse_other_sites


def _from_a_browser(headers: Mapping[str, str], origin: str | None) -> bool:
    # (Sec-Fetch-* go only to https and localhost: Accept-Language is what marks a GET to a rebound name)
    return (
        origin is not None
        or "Sec-Fetch-Site" in headers
        or "Sec-Fetch-Mode" in headers
        or hdrs.ACCEPT_LANGUAGE in headers
    )


def _not_our_name(host: str, loopback: bool) -> str:
    if loopback:
        return (
            f"this server listens on a loopback address and answers requests sent to an IP address, localhost "
            f"or [server] url's host; Host {host!r} is none of them (set [server] url to the name clients use)"
        )
    return (
        f"this server answers a browser's requests sent to an IP address, localhost, this machine's name or "
        f"[server] url's host; Host {host!r} is none of them (a browser that reaches this server by a name needs "
        "that name in [server] url, or set a [server] ui_token)"
    )


def _same_site(origin: str, sent_to: str, request: web.Request, own: set[tuple[str, str]]) -> bool:
    try:
        url = yarl.URL(origin)
    except ValueError:
        return False
    if not url.raw_host or url.scheme not in _DEFAULT_PORTS:
        return False  # ("null": a sandboxed frame, a file)
    found = _authority(url.scheme, url.raw_authority)
    forwarded = request.headers.get("X-Forwarded-Host", "")
    return found in own or any(found[1] == _authority(url.scheme, host)[1] for host in (sent_to, forwarded) if host)


def _authority(scheme: str, authority: str) -> tuple[str, str]:
    """(scheme, host:port) in lower case, the scheme's default port left out."""
    authority = authority.lower()
    default = f":{_DEFAULT_PORTS.get(scheme, 0)}"
    return scheme, authority.removesuffix(default)


def _checked(hosts: dict[str, bool], host_header: str, named: set[str]) -> bool:
    """_names_this_machine, remembered for the first 256 Host headers (an answer costs a few µs)."""
    known = hosts.get(host_header)
    if known is None:
        known = _names_this_machine(host_header, named)
        if len(hosts) < 256:
            hosts[host_header] = known
    return known


def _names_this_machine(host_header: str, named: set[str]) -> bool:
    try:
        host = yarl.URL(f"http://{host_header}").raw_host if host_header else ""
    except ValueError:
        return False
    host = (host or "").lower().strip("[]")
    if not host:
        return True  # (HTTP/1.0 sends none: no browser page does)
    if host == "localhost" or host.endswith(".localhost") or host in named:
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
