"""Outcome callbacks: POST each ended run of a function to its `callback_url`."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp

from eventrun.engine.api import Invocation
from eventrun.engine.core import Engine
from eventrun.engine.envelope import dumps
from eventrun.engine.manifest import Manifest
from eventrun.triggers.http import invocation_json

logger = logging.getLogger(__name__)

ATTEMPTS = 3


class CallbackNotifier:
    """Sends the final invocation (the GET /invocations/{id} document) to callback URLs.

    Delivery is best effort: a few attempts with backoff, then a log line. The run's outcome
    is already durable in the store, so a lost callback loses no data.
    """

    def __init__(self, engine: Engine, manifest: Manifest, *, backoff: float = 1.0) -> None:
        self._engine = engine
        self._urls = {name: f.callback_url for name, f in manifest.functions.items() if f.callback_url}
        self._backoff = backoff
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.sent = 0
        self.failed = 0

    async def start(self) -> None:
        """Listen for ended runs (only when some function has a callback_url)."""
        if not self._urls:
            return
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        self._engine.add_listener(self._on_end)

    async def stop(self) -> None:
        """Give pending callbacks a moment, then drop them and close the client."""
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def state(self) -> dict[str, Any]:
        """Counts for /healthz."""
        return {"functions": sorted(self._urls), "sent": self.sent, "failed": self.failed}

    def _on_end(self, invocation: Invocation) -> None:
        url = self._urls.get(invocation.function)
        if url is None or self._session is None:
            return
        task = asyncio.get_running_loop().create_task(self._post(url, invocation))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post(self, url: str, invocation: Invocation) -> None:
        assert self._session is not None
        body = dumps(invocation_json(invocation))
        headers = {"Content-Type": "application/json", "X-Request-Id": invocation.request_id}
        problem = ""
        for attempt in range(ATTEMPTS):
            if attempt:
                await asyncio.sleep(self._backoff * 2 ** (attempt - 1))
            try:
                async with self._session.post(url, data=body, headers=headers) as response:
                    if response.status < 300:
                        self.sent += 1
                        return
                    problem = f"HTTP {response.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
        self.failed += 1
        logger.warning(
            "callback for %s of %s to %s failed after %d attempts (%s)",
            invocation.request_id,
            invocation.function,
            url,
            ATTEMPTS,
            problem,
        )
