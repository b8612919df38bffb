"""Where a consumer stands in the partitions it holds: shared by its loop, its rebalance callbacks and its hand-offs."""

from __future__ import annotations

import logging
import time

from aiokafka import TopicPartition

from .engine import KafkaEngine
from .positions import Marks

logger = logging.getLogger(__name__)


class Partitions:
    """The partitions of one consumer, where reading goes on in each, and the marks it keeps of them."""

    def __init__(self, engine: KafkaEngine, *, name: str, topic: str, state_key: str, mark_interval: float) -> None:
        self.marks = Marks(None)
        self.generation = 0  # bumped by every rebalance: a batch fetched before one is dropped
        self.pending: set[TopicPartition] = set()  # assigned; start not decided yet (kept paused)
        self.expected: dict[int, int] = {}  # next offset per partition, to notice a reset
        self.verify: dict[int, tuple[int, str]] = {}  # (offset, fingerprint) of the record read there before
        self.assignment: frozenset[TopicPartition] = frozenset()
        self._engine = engine
        self._name = name
        self._topic = topic
        self._state_key = state_key
        self._mark_interval = mark_interval
        self._marks_saved = 0.0

    def reset(self) -> None:
        """A new client: nothing assigned yet, and whatever the previous one fetched is dropped."""
        self.generation += 1
        self.pending.clear()
        self.expected.clear()
        self.verify.clear()
        self.assignment = frozenset()

    def new_epoch(self, partition: int, reason: str) -> None:
        """The partition's log started over: its ids get a new epoch from here on."""
        epoch = self.marks.new_epoch(partition)
        logger.warning(
            "kafka %s: partition %d of %r started over (%s); its ids are now '%d-OFFSET-%d'",
            self._name, partition, self._topic, reason, partition, epoch,
        )

    async def load_marks(self) -> None:
        """Read the marks back from the engine's state, as the last run left them."""
        self.marks = Marks(await self._engine.get_state(self._state_key))

    async def save_marks(self, *, force: bool = False) -> None:
        """Write the marks down; unless forced, at most once per mark interval."""
        now = time.monotonic()
        if not force and now - self._marks_saved < self._mark_interval:
            return
        self._marks_saved = now
        try:
            await self._engine.put_state(self._state_key, self.marks.dumps())
        except Exception:
            logger.exception("kafka %s: could not write down the partition marks", self._name)
