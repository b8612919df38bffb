"""What the server's log says of a failure that repeats: a line once a while, and one when it ends."""

from __future__ import annotations

import logging
import time


class FailureLog:
    """Failures of one kind in a row (a store refusing runs' ends, heartbeats that do not reach
    it), logged once a while rather than once each, and the recovery once, with the failures no
    line has counted yet. Whatever fails keeps its own back-off; this is only what the log says."""

    def __init__(self, logger: logging.Logger, *, every: float, level: int = logging.ERROR, counted: str = "failed") -> None:
        self.logger = logger
        self.every = every  # seconds between two lines of failures, at least
        self.level = level
        self._counted = counted  # the failures as the lines count them: "(and 3 more refused since ...)"
        self._quiet_until = 0.0
        self._unlogged = 0
        self._failing = False
        self._told = False  # a line told of the failures going on

    def log(self, text: str, *args: object, exc_info: BaseException | None = None) -> None:
        """One more failure: a line (with `exc_info`'s traceback, if given), unless one was logged
        less than `every` seconds ago."""
        now = time.monotonic()
        self._failing = True
        if now < self._quiet_until:
            self._unlogged += 1
            return
        if self._unlogged:
            text, args = text + f" (and %d more {self._counted} since the last such line)", (*args, self._unlogged)
        self.logger.log(self.level, text, *args, exc_info=exc_info)
        self._quiet_until, self._unlogged, self._told = now + self.every, 0, True

    def recovered(self, text: str) -> None:
        """It worked after failures: say so once, as a warning, if a line told of them. Failures
        no line told of (they came less than `every` seconds after the last) end unsaid, and the
        next line counts them: something that fails and recovers over and over costs the log
        two lines every `every` seconds at most."""
        if not self._failing:
            return
        self._failing = False
        if not self._told:
            return
        if self._unlogged:
            text += f" ({self._unlogged} more {self._counted} since the last such line)"
        self.logger.warning(text)
        self._unlogged, self._told = 0, False
