"""The http trigger: the gateway application served on host:port between start() and stop()."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from eventrun.engine.failures import FailureLog

from .routes import build_app

if TYPE_CHECKING:
    from eventrun.engine.core import Engine

logger = logging.getLogger(__name__)

ANSWER_GRACE = 1.0
"""Seconds stop() gives requests still in flight before it cuts them off (aiohttp may wait twice
this: once for the handler, once more after cancelling it). The server stops the gateway once
the engine has ended every run, so a sync call then only has its answer to write."""

IDLE_TIMEOUT = 75.0
"""Seconds a connection may stay open with no request in hand: from its opening (or the end of its
last answer) until the headers of a request are in. A client that sends nothing, or drips its
headers, is closed then; a request being handled (a sync call, a log follow) is never cut by it.
Longer than the 60 s after which proxies commonly drop an idle upstream connection, so that a
proxy in front closes first and never reuses a connection the gateway has just closed."""

BAD_REQUEST_LOG_EVERY = 60.0
"""Seconds between two lines of the log about requests aiohttp could not parse, at least."""

_SERVER_LOG = logging.getLogger("aiohttp.server")
_GIST = 200  # characters of a bad request's error message the log line keeps at most


class BadRequestLines(logging.Filter):
    """On aiohttp's server logger: a request it could not parse (a bad request line or header, a
    line too long) is one short line of the gateway's log, at most every BAD_REQUEST_LOG_EVERY
    seconds, instead of an error with a traceback each (a scanner would write megabytes). Every
    other record passes as it is, a handler's bug with its traceback."""

    def __init__(self) -> None:
        super().__init__()
        self._bad_requests = FailureLog(logger, every=BAD_REQUEST_LOG_EVERY, level=logging.INFO, counted="bad requests")

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if record.levelno < logging.ERROR or not isinstance(exc, HttpProcessingError):
            return True
        # aiohttp logs them as "Error handling request from %s", the peer's address.
        peer = record.args[0] if isinstance(record.args, tuple) and len(record.args) == 1 else "a client"
        # Its messages quote the bytes, a line with a caret under the bad one: the words and the quote are enough.
        lines = (line.strip() for line in exc.message.splitlines())
        gist = " ".join(line for line in lines if line.strip("^"))
        if len(gist) > _GIST:
            gist = gist[: _GIST - 3] + "..."
        self._bad_requests.log("bad request from %s: %s: %s", peer, type(exc).__name__, gist)
        return False


OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Listener(socket.socket):
    """A listening socket that, once out of descriptors, answers "none waiting" for a moment.

    Out of descriptors, asyncio (3.11) stops watching the socket and tries again in a second, but
    goes on accepting in the same pass, up to the listen backlog, and schedules a retry for each
    failure: the retries multiply (9,000 failed accepts a second after 3 minutes, 10 % of a
    core). After the first failure this socket says that nothing waits, which ends the pass:
    one retry a second, as asyncio means, while connections wait in the listen queue.
    """

    _out_at = -1.0  # (monotonic) when an accept last failed for want of descriptors

    def accept(self) -> tuple[socket.socket, Any]:
        if time.monotonic() - self._out_at < ACCEPT_PAUSE:
            raise BlockingIOError(errno.EAGAIN, "out of descriptors a moment ago")
        try:
            return super().accept()
        except OSError as exc:
            if exc.errno in OUT_OF_RESOURCES:
                self._out_at = time.monotonic()
            raise


ACCEPT_PAUSE = 0.5
"""Seconds a Listener answers "none waiting" after an accept failed for want of descriptors
(asyncio tries again after a second)."""


async def listeners(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for every address of host:port, made as asyncio's create_server makes
    them (address reuse, IPv6 sockets for IPv6 alone, its bind error), each a Listener."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = Listener(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                reason = (exc.strerror or str(exc)).lower()
                raise OSError(exc.errno, f"error while attempting to bind on address {address!r}: {reason}") from None
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class HttpTrigger:
    """The gateway as a trigger: serves build_app(engine) on host:port until stopped."""

    def __init__(
        self,
        engine: Engine,
        host: str | None = None,
        port: int | None = None,
        *,
        extra_routes: Iterable[web.AbstractRouteDef] = (),
        openapi_paths: Mapping[str, Any] | None = None,
    ) -> None:
        self._engine = engine
        self._host = host if host is not None else engine.manifest.server.host
        self._port = port if port is not None else engine.manifest.server.port
        self._extra_routes = list(extra_routes)
        self._openapi_paths = openapi_paths
        self._runner: web.AppRunner | None = None
        self._bad_requests: BadRequestLines | None = None

    @property
    def port(self) -> int:
        """The bound port once started (the configured one before)."""
        return self._port

    async def start(self) -> None:
        """Bind and serve; a port of 0 picks a free one."""
        if self._runner is not None:
            return
        app = build_app(self._engine, extra_routes=self._extra_routes, openapi_paths=self._openapi_paths)
        # No per-request access log: it costs more than accepting the event; /metrics counts instead.
        # aiohttp's keep-alive timer runs only while a connection waits for a request's headers.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=ANSWER_GRACE, keepalive_timeout=IDLE_TIMEOUT)
        await runner.setup()
        self._bad_requests = BadRequestLines()
        _SERVER_LOG.addFilter(self._bad_requests)
        try:
            for sock in await listeners(self._host, self._port):
                await web.SockSite(runner, sock).start()
        except BaseException:
            await runner.cleanup()
            self._remove_log_filter()
            raise
        self._runner = runner
        self._port = runner.addresses[0][1]
        logger.info("HTTP gateway listening on %s:%s", self._host, self._port)

    def state(self) -> dict[str, Any]:
        """What /healthz may report about the gateway."""
        return {"Listening": self._runner is not None and bool(self._runner.sites), "Port": self._port}

    async def close(self) -> None:
        """Stop intake: take no new connection and end log streams; requests in flight go on."""
        runner = self._runner
        if runner is None or not runner.sites:
            return
        # A site's stop closes its listening socket only; connections open stay, their handlers
        # going on: a sync call in flight is answered once the engine has ended its run.
        for site in list(runner.sites):
            await site.stop()
        await runner.shutdown()  # on_shutdown: log followers get their closing (stop() sends it again)
        logger.info("HTTP gateway closed to new connections")

    async def stop(self) -> None:
        """Close, let requests in flight finish within ANSWER_GRACE, then close every connection."""
        await self.close()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
            self._remove_log_filter()
            logger.info("HTTP gateway stopped")

    def _remove_log_filter(self) -> None:
        if self._bad_requests is not None:
            _SERVER_LOG.removeFilter(self._bad_requests)
            self._bad_requests = None

    async def __aenter__(self) -> HttpTrigger:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
