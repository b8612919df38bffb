"""Figures that take a pass over a large table: shared, reused, and never asked for too often."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable, Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Recount(Generic[T]):
    """A count that is a pass over a whole table (seconds for millions of rows).

    Callers that come while a count goes on share it, and a count is reused for REUSE times as
    long as it took (and at least `at_least` seconds): a few milliseconds on a small table, and
    on a large one the store is never counting more than a tenth of the time, however often
    the figure is asked for. A count that failed is not kept.
    """

    REUSE = 10

    def __init__(self, count: Callable[[], Awaitable[T]], *, at_least: float = 0.0) -> None:
        self._count = count
        self._at_least = at_least
        self.latest: T | None = None  # the last count, however old
        self._fresh_until = 0.0
        self._counting: asyncio.Future[T] | None = None

    async def result(self) -> T:
        """The count: the last one while it is fresh, else a new one (shared with other callers)."""
        if self.latest is not None and time.monotonic() < self._fresh_until:
            return self.latest
        return await asyncio.shield(self._start())

    def refresh(self) -> None:
        """Count again in the background should the last count have aged (`latest` meanwhile)."""
        if time.monotonic() >= self._fresh_until:
            self._start().add_done_callback(_log_failure)

    def cancel(self) -> None:
        """Cut off a count under way (on a stop)."""
        if self._counting is not None:
            self._counting.cancel()

    def _start(self) -> asyncio.Future[T]:
        if self._counting is None:
            self._counting = asyncio.ensure_future(self._recount())
        return self._counting

    async def _recount(self) -> T:
        started = time.monotonic()
        try:
            self.latest = await self._count()
        finally:
            self._counting = None
        ended = time.monotonic()
        self._fresh_until = ended + max(self._at_least, (ended - started) * self.REUSE)
        return self.latest


def _log_failure(counting: asyncio.Future[object]) -> None:
    if not counting.cancelled() and counting.exception() is not None:
        logger.warning("a count failed; the last one stands: %s", counting.exception())
