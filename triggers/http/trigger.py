"""The http trigger: the gateway application served on host:port between start() and stop()."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .routes import build_app

if TYPE_CHECKING:
    from eventrun.engine.core import Engine

logger = logging.getLogger(__name__)

ANSWER_GRACE = 1.0
"""Seconds stop() gives requests still in flight before it cuts them off (aiohttp may wait twice
this: once for the handler, once more after cancelling it). The server stops the gateway once
the engine has ended every run, so a sync call then only has its answer to write."""


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
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=ANSWER_GRACE)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._port)
            await site.start()
        except BaseException:
            await runner.cleanup()
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
            logger.info("HTTP gateway stopped")

    async def __aenter__(self) -> HttpTrigger:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
