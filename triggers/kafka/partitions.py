"""Where a consumer stands in the partitions it holds: shared by its loop, its rebalance callbacks and its hand-offs."""

from __future__ import annotations

import logging
import time

from aiokafka import TopicPartition

from eventrun.engine.errors import StoreError
from eventrun.engine.failures import FailureLog

from .engine import KafkaEngine
from .positions import Marks

logger = logging.getLogger(__name__)

MARKS_LOG_EVERY = 60.0  # seconds between the log's lines about marks the store cannot take (an outage), at least


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
        self._saves_failing = FailureLog(logger, every=MARKS_LOG_EVERY, level=logging.WARNING)

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
        except StoreError as exc:  # the store cannot serve now (an outage): the next save writes them
            self._saves_failing.log("kafka %s: could not write down the partition marks (%s)", self._name, exc)
        except Exception:  # eventrun's own failure: its traceback, each time
            logger.exception("kafka %s: could not write down the partition marks", self._name)
        else:
            self._saves_failing.recovered(f"kafka {self._name}: the partition marks are written down again")
