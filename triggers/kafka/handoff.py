"""Hand-off: fetched records become envelopes the engine accepts durably; only then are their offsets committed.

Pipelined, so the engine's store writes one batch while the next is turned into envelopes and
rows: up to IN_FLIGHT accepts at once. The engine's store commits them in the order they were
handed over, and each waits for the one before it to commit its offsets first, so offsets only
ever move past records that are durably accepted. The next accept does not wait for those
commits (a round trip to the broker each), only for an accept to end; at most UNCOMMITTED
hand-offs are under way, accepting or committing. A record the client cannot decode is handed
over too, as one undecodable envelope, so its partition is not stuck there.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import operator
from dataclasses import dataclass
from typing import Awaitable, Mapping, Sequence, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from eventrun.engine.envelope import AnyEnvelope, concatenated
from eventrun.engine.errors import ShuttingDown

from .client import RECORD_ERRORS, Settings, sleep_unless
from .engine import KafkaEngine
from .health import Health
from .parser import RecordLike, fingerprint, to_accept, undecodable_envelope
from .partitions import Partitions
from .peek import peek
from .positions import Verdict, judge

_created = operator.itemgetter(1)  # Accepted.created

logger = logging.getLogger(__name__)

T = TypeVar("T")

IN_FLIGHT = 2
"""Accepts a consumer has going at once; each hand-off then commits its offsets, in order."""

UNCOMMITTED = 2 * IN_FLIGHT
"""Hand-offs a consumer has going at once, accepting or waiting to commit (they hold their envelopes)."""


@dataclass(frozen=True, slots=True)
class _Span:
    """The offsets one hand-off covers in one partition."""

    first: int
    next: int
    fingerprint: str | None  # of the record at next - 1 (None: it could not be taken)

    @classmethod
    def of(cls, records: Sequence[RecordLike]) -> _Span:
        return cls(records[0].offset, records[-1].offset + 1, fingerprint(records[-1]))


class HandOff:
    """The hand-offs of one consumer in flight, and the offsets they have yet to commit."""

    def __init__(
        self,
        engine: KafkaEngine,
        partitions: Partitions,
        health: Health,
        settings: Settings,
        stopping: asyncio.Event,
        *,
        function: str,
        topic: str,
        name: str,
    ) -> None:
        self._engine = engine
        self._parts = partitions
        self._health = health
        self._settings = settings
        self._stopping = stopping  # set by stop(), and here when the engine is shutting down
        self._function = function
        self._topic = topic
        self._name = name
        # Held by a hand-off (accept, then commit) and by the revocation callback, so a
        # partition leaves this server only once what was fetched from it is committed.
        self.lock = asyncio.Lock()
        self.uncommitted: dict[TopicPartition, int] = {}
        self._inflight: collections.deque[asyncio.Task[bool]] = collections.deque()  # oldest first
        self._accepting: collections.deque[asyncio.Future[None]] = collections.deque()  # done once accepted
        self.handing = 0  # records in those hand-offs: not in the engine's backlog yet
        self.accepted = 0  # records whose events were new
        self.duplicates = 0  # records read again whose events had been accepted before

    async def hand_off(
        self, consumer: AIOKafkaConsumer, batch: Mapping[TopicPartition, Sequence[RecordLike]], generation: int
    ) -> None:
        """Check a fetched batch against the log read before and start its accept, at most IN_FLIGHT at once."""
        parts = self._parts
        converted: list[Sequence[AnyEnvelope]] = []  # each partition's records
        spans: dict[TopicPartition, _Span] = {}
        new_epoch = False
        for tp, records in batch.items():
            if not records or generation != parts.generation:
                continue
            p = tp.partition
            first = records[0]
            verdict = self._judge(consumer, tp, first.offset, fingerprint(first))
            new_epoch |= verdict in (Verdict.NEW_LOG, Verdict.RESTART)
            if verdict is Verdict.RESTART:
                continue
            if verdict is Verdict.REREAD:
                records = records[1:]  # the last record accepted, read again only to check the log
                parts.expected[p] = first.offset + 1
                if not records:
                    continue
            epoch = parts.marks.epoch(p)
            max_json = self._settings.max_json
            converted.append(to_accept(records, self._function, epoch=epoch, max_json=max_json))
            spans[tp] = span = _Span.of(records)
            parts.expected[p] = span.next
        envelopes = concatenated(converted)
        if new_epoch:
            await self.drain()
            await parts.save_marks(force=True)  # durable before any id of the new epoch is used
        while len(self._inflight) >= UNCOMMITTED:
            await self._inflight.popleft()
        accepting = self._accepting
        while accepting and (accepting[0].done() or len(accepting) >= IN_FLIGHT):
            await accepting.popleft()  # its commit need not wait: the next accept can start
        if envelopes and generation == parts.generation:
            previous = self._inflight[-1] if self._inflight else None
            accepted = asyncio.get_running_loop().create_future()
            task = asyncio.create_task(self._accept(consumer, envelopes, spans, generation, previous, accepted))
            accepting.append(accepted)
            self.handing += len(envelopes)
            self._inflight.append(task)
            # Let the accept start now: it builds its rows and sends them to the store's writer
            # before this consumer fetches and converts the next batch, so the two overlap. (A
            # fetch that finds records already buffered does not give the loop a turn.)
            await asyncio.sleep(0)

    async def drain(self) -> None:
        """Wait for the accepts (and commits) in flight."""
        while self._inflight:
            await self._inflight.popleft()

    async def settle(self) -> None:
        """Wait for the accepts (and commits) in flight, leaving them to whoever drains them."""
        if self._inflight:
            await asyncio.wait(set(self._inflight))

    async def _accept(
        self,
        consumer: AIOKafkaConsumer,
        envelopes: Sequence[AnyEnvelope],
        spans: Mapping[TopicPartition, _Span],
        generation: int,
        previous: asyncio.Task[bool] | None = None,
        accepted: asyncio.Future[None] | None = None,
    ) -> bool:
        """Accept durably, then commit; if the engine fails, read everything uncommitted again.

        `accepted` is set once the engine has answered (whatever it answered).
        """
        parts = self._parts
        failure: Exception | None = None
        new = 0  # of the records, those whose events were new
        try:
            if generation != parts.generation:
                # Fetched before a rebalance: these partitions restart from their committed
                # offsets, here or on another server, so the records are read again there.
                return False
            try:
                answers = await self._engine.accept_batch(envelopes)
            except Exception as exc:
                failure = exc
            else:
                new = sum(map(_created, answers))
        finally:
            self.handing -= len(envelopes)  # accepted ones are in the engine's backlog now
            if accepted is not None and not accepted.done():
                accepted.set_result(None)
        if previous is not None:
            await asyncio.wait({previous})  # its offsets go first
        async with self.lock:
            if failure is not None:
                # Whatever was fetched after this batch is dropped too (new generation), and
                # every partition starts again from its committed offset: nothing is skipped.
                parts.generation += 1
                parts.pending |= consumer.assignment()
                if isinstance(failure, ShuttingDown):
                    self._stopping.set()
                    return False
                logger.error(
                    "kafka %s: the engine did not accept %d records; reading them again",
                    self._name, len(envelopes), exc_info=failure,
                )
                await sleep_unless(self._stopping, self._settings.backoff_min)
                return False
            if generation != parts.generation:
                return False  # a batch before this one failed, or a rebalance came: read again
            self.accepted += new
            self.duplicates += len(envelopes) - new  # (read again: their runs were made before)
            for tp, span in spans.items():
                parts.marks.advance(tp.partition, span.next, span.fingerprint)
                self.uncommitted[tp] = span.next
            await self.commit(consumer)
        await parts.save_marks()
        return True

    def _judge(self, consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int, digest: str | None) -> Verdict:
        """What the first record fetched from a partition (at `offset`) says of its log (see positions.judge).

        A new log gets a new epoch; where another record stands than the one read there before,
        the partition also waits, paused, for its start to be decided again.
        """
        parts = self._parts
        p = tp.partition
        verdict = judge(offset, digest, parts.expected.get(p), parts.verify.pop(p, None))
        if verdict is Verdict.RESTART:
            parts.new_epoch(p, f"the record at offset {offset} is not the one read there before")
            parts.pending.add(tp)
            consumer.pause(tp)
        elif verdict is Verdict.NEW_LOG:
            parts.new_epoch(p, f"offset {offset} came where {parts.expected.get(p)} was next")
        return verdict

    async def commit(self, consumer: AIOKafkaConsumer) -> None:
        """Commit the offsets accepted so far; called with the lock held."""
        offsets = dict(self.uncommitted)
        try:
            await self._broker(consumer.commit(offsets))
        except (CommitFailedError, IllegalStateError) as exc:
            # The group rebalanced first; whoever owns the partitions now starts at the last
            # committed offset. Here, records read again map to their RequestIds (idempotent).
            logger.warning("kafka %s: commit of %s refused (%s); those records may be read again",
                           self._name, _offsets(offsets), type(exc).__name__)
            self.uncommitted.clear()
            return
        except (KafkaError, asyncio.TimeoutError) as exc:
            self._health.unreachable(exc)  # kept: committed with the next batch, or when idle
            return
        for tp, offset in offsets.items():
            if self.uncommitted.get(tp) == offset:
                del self.uncommitted[tp]

    # -- records the client cannot decode --------------------------------------------------

    async def isolate_poison(self, consumer: AIOKafkaConsumer, exc: Exception) -> None:
        """Find the partition whose next record the client cannot decode, hand that record over, go past it."""
        logger.warning("kafka %s: a fetched record cannot be decoded (%s: %s)", self._name, type(exc).__name__, exc)
        for tp in sorted(consumer.assignment() - consumer.paused()):
            await self._step_past(consumer, tp)

    async def _step_past(self, consumer: AIOKafkaConsumer, tp: TopicPartition) -> None:
        # One record at a time, the client returns the good records before the bad one. The
        # failed fetch is dropped by the client (its position did not move), hence the wait.
        generation = self._parts.generation
        good: list[RecordLike] = []
        error: Exception | None = None
        wait_ms = 1000
        while len(good) < self._settings.batch_size:
            try:
                one = await consumer.getmany(tp, timeout_ms=wait_ms, max_records=1)
            except RECORD_ERRORS as exc:
                error = exc
                break
            if not one:
                break
            good.extend(one.get(tp, ()))
            wait_ms = 0
        if good:
            await self.hand_off(consumer, {tp: good}, generation)
        if error is not None:
            await self._hand_over_undecodable(consumer, tp, error, generation)

    async def _hand_over_undecodable(
        self, consumer: AIOKafkaConsumer, tp: TopicPartition, error: Exception, generation: int
    ) -> None:
        """Hand over the undecodable record at the partition's position as one envelope, and go past it."""
        offset = await self._broker(consumer.position(tp))
        # Taken from the record's batch as the broker keeps it: checked like any other record's
        # when the partition is read again from here (a log that started over is noticed).
        digest = (await self._broker(peek(consumer, tp, offset))).fingerprint(offset)
        await self.drain()
        parts = self._parts
        if generation != parts.generation:
            return  # a rebalance came: the partition is read again from its committed offset
        verdict = self._judge(consumer, tp, offset, digest)
        if verdict in (Verdict.NEW_LOG, Verdict.RESTART):
            await parts.save_marks(force=True)  # durable before any id of the new epoch is used
        if verdict is Verdict.RESTART:
            return
        parts.expected[tp.partition] = offset + 1
        if verdict is Verdict.REREAD:
            consumer.seek(tp, offset + 1)  # handed over before: it was read again only to check the log
            return
        reason = f"{type(error).__name__}: {error}"
        epoch = parts.marks.epoch(tp.partition)
        envelope = undecodable_envelope(self._topic, tp.partition, offset, self._function, reason, epoch=epoch)
        if await self._accept(consumer, [envelope], {tp: _Span(offset, offset + 1, digest)}, generation):
            consumer.seek(tp, offset + 1)
            logger.warning("kafka %s: record %d-%d cannot be decoded (%s); handed over as %s",
                           self._name, tp.partition, offset, reason, envelope.type)

    # -- helpers ---------------------------------------------------------------------------

    async def _broker(self, call: Awaitable[T]) -> T:
        return await asyncio.wait_for(call, self._settings.broker_timeout)



def _offsets(offsets: Mapping[TopicPartition, int]) -> str:
    return ", ".join(f"{tp.partition}@{offset}" for tp, offset in sorted(offsets.items()))
