"""The seams: what triggers and the gateway see of the engine."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, Sequence

from .envelope import Envelope


class Status(str, enum.Enum):
    """The life of one invocation."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    TIMED_OUT = "TIMED_OUT"
    ABORTED = "ABORTED"

    @property
    def ended(self) -> bool:
        """True for the terminal states."""
        return self not in (Status.QUEUED, Status.RUNNING)


SERVER_STOPPED = (
    "the server stopped during execution; the run was not retried (async execution never retries)"
)
"""The error message of a run its server stopped (or crashed) during."""


class Accepted(NamedTuple):
    """The answer to one accepted envelope."""

    request_id: str
    created: bool  # False when the same (function, source, id) was accepted before


class Delivery(NamedTuple):
    """One delivery owed for an ended run (a row of the store's outbox), as a node claims it."""

    id: int
    request_id: str
    function: str
    kind: str  # "callback" or "on_failure"
    target: str  # an http(s) URL, or kafka:TOPIC
    attempts: int  # made before this one


class Outbox(NamedTuple):
    """What the outbox holds."""

    pending: int
    given_up: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Invocation:
    """One invocation as the store records it."""

    request_id: str
    function: str
    trigger: str
    status: Status
    created_at: str
    started_at: str | None = None
    ended_at: str | None = None
    duration_ms: int | None = None
    result: Any = None
    error_type: str | None = None
    error_message: str | None = None


class Acceptor(Protocol):
    """What a trigger needs: hand in envelopes, get RequestIds once they are durable."""

    async def accept(self, envelope: Envelope, *, throttle: bool = True) -> Accepted:
        """Record one envelope durably and queue its run; raises Throttled or FunctionNotFound."""
        ...

    async def accept_batch(self, envelopes: Sequence[Envelope]) -> list[Accepted]:
        """Record many envelopes in one durable commit; never throttled."""
        ...
