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
        self._failures = 0  # counts failed in a row (logged: the first, and the recovery)

    async def result(self) -> T:
        """The count: the last one while it is fresh, else a new one (shared with other callers)."""
        if self.latest is not None and time.monotonic() < self._fresh_until:
            return self.latest
        return await asyncio.shield(self._start())

    def refresh(self) -> None:
        """Count again in the background should the last count have aged (`latest` meanwhile)."""
        if time.monotonic() >= self._fresh_until:
            self._start().add_done_callback(_retrieved)

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
        except Exception as exc:
            # While the store cannot count (an outage), every caller would fail alike: one line.
            if not self._failures:
                logger.warning("a count failed; the last one stands, and so do further failures until one succeeds: %s", exc)
            self._failures += 1
            raise
        finally:
            self._counting = None
        if self._failures:
            logger.warning("counts succeed again, after %d failed", self._failures)
            self._failures = 0
        ended = time.monotonic()
        self._fresh_until = ended + max(self._at_least, (ended - started) * self.REUSE)
        return self.latest


def _retrieved(counting: asyncio.Future[object]) -> None:
    """A background count's failure is logged by the count itself (see Recount._recount)."""
    if not counting.cancelled():
        counting.exception()
