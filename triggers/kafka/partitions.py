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
from .positions import Marks, fence_for, read_row

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

    Each partition's row is written under a fence (see fence_for), from the group generation
    that assigned the partition here: a server whose session expired while it held a partition
    (paused, cut off) may write its marks when it comes back, and the store must not let them go
    over those of the server that holds the partition now. A row without a fence (written by an
    earlier eventrun) is read all the same, and written over.
    """

    def __init__(self, engine: KafkaEngine, *, name: str, topic: str, state_key: str, mark_interval: float) -> None:
        self.marks = Marks(None)
        self.generation = 0  # bumped by every rebalance: a batch fetched before one is dropped
        self.pending: set[TopicPartition] = set()  # assigned; start not decided yet (kept paused)
        self.reload: set[int] = set()  # assigned by a rebalance: marks to read again before their start is decided
        self.expected: dict[int, int] = {}  # next offset per partition, to notice a reset
        self.verify: dict[int, tuple[int, str]] = {}  # (offset, fingerprint) of the record read there before
        self.assignment: frozenset[TopicPartition] = frozenset()
        # The group generation of the last assignment (None: the client tells none), and the
        # fence each partition's mark is written under (none: written without, as before fences).
        self.holder_generation: int | None = None
        self.fences: dict[int, int] = {}
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
        self.holder_generation = None

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

    def hold(self, generation: int | None, partitions: Iterable[int]) -> None:
        """The group assigned these partitions here in `generation` (None: the client tells none): fences to write under.

        Above the fence this server held each under before; reload_marks raises it above its row's.
        """
        self.holder_generation = generation
        for partition in partitions:
            if generation is None:
                self.fences.pop(partition, None)  # written without a fence, as before fences
            else:
                self.fences[partition] = fence_for(self.fences.get(partition), generation)

    async def reload_marks(self, partitions: Iterable[int]) -> None:
        """Read the marks of these partitions again, as whoever held them last wrote them down (see Marks.adopt).

        A partition whose row holds a greater fence than the one it is held under here (written
        in an earlier life of the group: see fence_for) gets a fence above it; a row under a
        lesser one is written again at the next save, so a holder the group replaced is refused
        from then on.
        """
        try:
            for partition in partitions:
                raw = await self._engine.get_state(self._key(partition))
                stored, fence = (None, None) if raw is None else read_row(raw)
                self.marks.adopt(partition, stored)
                self._fence_above(partition, fence)
        except StoreError as exc:  # (an outage) this server's own marks stand: it may have held them last
            self._reads_failing.log("kafka %s: could not read the partition marks (%s)", self._name, exc)
        except Exception:  # eventrun's own failure (a mark it cannot read back): its traceback, each time
            logger.exception("kafka %s: could not read the partition marks", self._name)
        else:
            self._reads_failing.recovered(f"kafka {self._name}: the partition marks are read again")

    def _fence_above(self, partition: int, stored: int | None) -> None:
        """Hold the partition above the fence its row has (`stored`), and claim the row if it is below."""
        held, generation = self.fences.get(partition), self.holder_generation
        if held is None or generation is None:
            return
        if stored is not None and stored > held:
            self.fences[partition] = held = fence_for(stored, generation)
        if (stored is None or stored < held) and self.marks.get(partition) is not None:
            self.marks.changed.add(partition)

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
                        await self._engine.put_state(self._key(partition), mark.stamped(self.fences.get(partition)))
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
