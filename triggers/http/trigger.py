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
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=self._engine.manifest.server.shutdown_grace)
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
        return {"Listening": self._runner is not None, "Port": self._port}

    async def stop(self) -> None:
        """Stop listening, end log streams, and let in-flight requests finish within the grace."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
            logger.info("HTTP gateway stopped")

    async def __aenter__(self) -> HttpTrigger:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
