"""What a consumer reports about itself: its connection to the broker and its backpressure, one log line per change."""

from __future__ import annotations

import logging
import time
from typing import Callable

from .security import describe

logger = logging.getLogger(__name__)


class Health:
    """The connection state and backpressure of one consumer, as /healthz and the log show them."""

    def __init__(self, name: str, *, servers: str, group_id: str) -> None:
        self.name = name
        self.connection = "stopped"  # connecting | connected | unreachable | stopped
        self.error = ""
        self.backpressure = False
        self.held_back = ""  # why records the broker sent cannot be read here (a codec missing), if they cannot
        self._servers = servers
        self._group_id = group_id
        self._last_contact = 0.0

    def text(self, backlog: Callable[[], int]) -> str:
        """The consumer's "State" for /healthz; `backlog` is asked only when it is shown."""
        if self.connection == "unreachable":
            return f"broker unreachable: {self.error}"
        if self.connection == "connected":
            if self.held_back:
                return f"records held back: {self.held_back}"
            return f"paused (backlog {backlog()})" if self.backpressure else "consuming"
        return self.connection

    def enter(self, connection: str) -> None:
        """Move to `connection`; a change is logged once, a repeat not at all."""
        if connection == self.connection:
            return
        self.connection = connection
        servers = self._servers
        if connection == "unreachable":
            logger.warning("kafka %s: broker %s unreachable (%s); retrying", self.name, servers, self.error)
        elif connection == "connected":
            logger.info("kafka %s: connected to %s as group %r", self.name, servers, self._group_id)
        elif connection == "connecting":
            logger.info("kafka %s: connecting to %s", self.name, servers)
        else:
            logger.info("kafka %s: stopped", self.name)

    def contact(self) -> None:
        """The broker answered."""
        self._last_contact = time.monotonic()
        self.enter("connected")

    def unreachable(self, exc: BaseException, reason: str | None = None) -> None:
        """The broker did not answer; `exc` (and `reason`, if known) say why, on /healthz and in the log."""
        error = describe(exc)
        self.error = f"{error} ({reason})" if reason else error
        self.enter("unreachable")

    def hold_back(self, exc: BaseException) -> None:
        """The broker answered with records this install cannot decompress (UnsupportedCodecError).

        Not an outage: the connection stays as it is. The state and the log (once a change)
        name the codec and what to install.
        """
        reason = f"{describe(exc)} (install the codec libraries, cramjam, as eventrun's dependency aiokafka[lz4,snappy,zstd] brings them, then restart)"
        if reason != self.held_back:
            logger.error("kafka %s: records cannot be read: %s; they wait, and nothing after them runs", self.name, reason)
        self.held_back = reason

    def release(self) -> None:
        """Records are read again: what held them back is gone."""
        if self.held_back:
            self.held_back = ""
            logger.info("kafka %s: records are read again", self.name)

    def probe_due(self, interval: float) -> bool:
        """Whether the broker said nothing for `interval` seconds, so it is time to ask it something."""
        return time.monotonic() - self._last_contact >= interval

    def probe_failed(self, exc: BaseException, reason: str | None = None) -> None:
        """A probe got no answer: unreachable, and the next probe only after another interval."""
        self.unreachable(exc, reason)
        self._last_contact = time.monotonic()

    def pressure(self, backlog: int, mark: int) -> bool:
        """Whether fetching pauses: once `backlog` is over `mark`, until it is down to half of it."""
        if self.backpressure and backlog <= mark // 2:
            self.backpressure = False
            logger.info("kafka %s: resumed (backlog %d, at most %d)", self.name, backlog, mark // 2)
        elif not self.backpressure and backlog > mark:
            self.backpressure = True
            logger.info("kafka %s: paused (backlog %d over the high-water mark %d)", self.name, backlog, mark)
        return self.backpressure
