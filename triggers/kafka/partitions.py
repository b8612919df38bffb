"""Where a consumer stands in the partitions it holds: shared by its loop, its rebalance callbacks and its hand-offs."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Iterable

from aiokafka import TopicPartition

from eventrun.engine.errors import StoreError
from eventrun.engine.failures import FailureLog

from .engine import KafkaEngine
from .positions import Mark, Marks

logger = logging.getLogger(__name__)

MARKS_LOG_EVERY = 60.0  # seconds between the log's lines about marks the store cannot take (an outage), at least


class Partitions:
    """The partitions of one consumer, where reading goes on in each, and the marks it keeps of them.

    The marks are kept in the engine's state under `{state_key}:{partition}`, one row per
    partition, and the trigger's start under `{state_key}:start`: servers of a cluster share the
    store and each holds some of the partitions, so each writes only the marks it changed. A
    partition a rebalance assigns has its mark read again from the store, where the server that
    held it before wrote it down when it let the partition go (its epoch goes with it). The one
    row an earlier eventrun kept under `{state_key}` is still read (its marks, for partitions
    with no row of their own yet), and no longer written.
    """

    def __init__(self, engine: KafkaEngine, *, name: str, topic: str, state_key: str, mark_interval: float) -> None:
        self.marks = Marks(None)
        self.generation = 0  # bumped by every rebalance: a batch fetched before one is dropped
        self.pending: set[TopicPartition] = set()  # assigned; start not decided yet (kept paused)
        self.reload: set[int] = set()  # assigned by a rebalance: marks to read again before their start is decided
        self.expected: dict[int, int] = {}  # next offset per partition, to notice a reset
        self.verify: dict[int, tuple[int, str]] = {}  # (offset, fingerprint) of the record read there before
        self.assignment: frozenset[TopicPartition] = frozenset()
        self._engine = engine
        self._name = name
        self._topic = topic
        self._state_key = state_key
        self._start_written: str | None = None  # the start as the store has it
        self._mark_interval = mark_interval
        self._marks_saved = 0.0
        self._saving = asyncio.Lock()  # one save at a time, so an older mark never lands after a newer one
        self._saves_failing = FailureLog(logger, every=MARKS_LOG_EVERY, level=logging.WARNING)
        self._reads_failing = FailureLog(logger, every=MARKS_LOG_EVERY, level=logging.WARNING)

    def reset(self) -> None:
        """A new client: nothing assigned yet, and whatever the previous one fetched is dropped."""
        self.generation += 1
        self.pending.clear()
        self.reload.clear()
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
        """Read the trigger's start back from the engine's state, and the marks an earlier eventrun kept in one row."""
        marks = Marks(await self._engine.get_state(self._state_key))
        start = await self._engine.get_state(f"{self._state_key}:start")
        if start is not None:
            written = Marks(start)
            marks.started, marks.latest = written.started, written.latest
        self.marks = marks
        self._start_written = start

    async def reload_marks(self, partitions: Iterable[int]) -> None:
        """Read the marks of these partitions again, as whoever held them last wrote them down (see Marks.adopt)."""
        try:
            for partition in partitions:
                raw = await self._engine.get_state(self._key(partition))
                self.marks.adopt(partition, None if raw is None else Mark.loads(raw))
        except StoreError as exc:  # (an outage) this server's own marks stand: it may have held them last
            self._reads_failing.log("kafka %s: could not read the partition marks (%s)", self._name, exc)
        except Exception:  # eventrun's own failure (a mark it cannot read back): its traceback, each time
            logger.exception("kafka %s: could not read the partition marks", self._name)
        else:
            self._reads_failing.recovered(f"kafka {self._name}: the partition marks are read again")

    async def save_marks(self, *, force: bool = False) -> None:
        """Write down the marks that changed, and the start if it did; unless forced, at most once per mark interval."""
        now = time.monotonic()
        if not force and now - self._marks_saved < self._mark_interval:
            return
        self._marks_saved = now
        async with self._saving:
            marks = self.marks
            changed = sorted(marks.changed)
            marks.changed.difference_update(changed)  # a mark changed from here on is written next time
            try:
                while changed:
                    partition = changed[0]
                    mark = marks.get(partition)
                    if mark is not None:
                        await self._engine.put_state(self._key(partition), mark.dumps())
                    changed.pop(0)
                start = marks.dumps()
                if start != self._start_written:
                    await self._engine.put_state(f"{self._state_key}:start", start)
                    self._start_written = start
            except StoreError as exc:  # the store cannot serve now (an outage): the next save writes them
                marks.changed.update(changed)
                self._saves_failing.log("kafka %s: could not write down the partition marks (%s)", self._name, exc)
            except Exception:  # eventrun's own failure: its traceback, each time
                marks.changed.update(changed)
                logger.exception("kafka %s: could not write down the partition marks", self._name)
            else:
                self._saves_failing.recovered(f"kafka {self._name}: the partition marks are written down again")

    async def release(self, partitions: Iterable[int] | None = None) -> None:
        """Write down the marks of partitions this consumer lets go (all, by default), before another holds them.

        Whatever the store could not take is dropped: the partitions' next holder writes their
        marks from now on, and a late write of this one's would go over them.
        """
        await self.save_marks(force=True)
        if partitions is None:
            self.marks.changed.clear()
        else:
            self.marks.changed.difference_update(partitions)

    def _key(self, partition: int) -> str:
        return f"{self._state_key}:{partition}"
