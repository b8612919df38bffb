"""The part of the engine the Kafka consumers use: one small Protocol, handed in at construction."""

from __future__ import annotations

from typing import Protocol, Sequence

from eventrun.engine.api import Accepted
from eventrun.engine.envelope import AnyEnvelope


class KafkaEngine(Protocol):
    """Durable batch acceptance, each function's backlog, and a little state kept across restarts."""

    async def accept_batch(self, envelopes: Sequence[AnyEnvelope]) -> list[Accepted]: ...
    def backlog(self, function: str) -> int: ...
    async def get_state(self, key: str) -> str | None: ...
    async def put_state(self, key: str, value: str) -> None: ...
