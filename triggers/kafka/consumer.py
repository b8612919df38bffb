"""One Kafka consumer for one (function, trigger): fetch a batch, hand it to the engine, commit, repeat."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Mapping, Protocol, Sequence, TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from eventrun.engine.api import Accepted
from eventrun.engine.envelope import Envelope
from eventrun.engine.errors import ShuttingDown

from .client import RECORD_ERRORS, Settings, new_client, stop_client
from .parser import RecordLike, fingerprint, to_envelopes, undecodable_envelope
from .positions import Marks, Verdict, check, decide

logger = logging.getLogger(__name__)

T = TypeVar("T")

IN_FLIGHT = 2
"""Hand-offs (accept, then commit) a consumer has going at once."""


class KafkaEngine(Protocol):
    """The part of the engine a Kafka consumer uses."""

    async def accept_batch(self, envelopes: Sequence[Envelope]) -> list[Accepted]: ...
    def backlog(self, function: str) -> int: ...
    def get_state(self, key: str) -> str | None: ...
    async def put_state(self, key: str, value: str) -> None: ...


class _Stopping(Exception):
    """Stop was asked for, or the engine is shutting down."""


@dataclass(frozen=True, slots=True)
class _Span:
    """The offsets one hand-off covers in one partition."""

    first: int
    next: int
    fingerprint: str | None  # of the record at next - 1, when it could be decoded

    @classmethod
    def of(cls, records: Sequence[RecordLike]) -> _Span:
        return cls(records[0].offset, records[-1].offset + 1, fingerprint(records[-1]))


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: TopicConsumer, consumer: AIOKafkaConsumer) -> None:
        self._owner = owner
        self._consumer = consumer

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._owner._revoked(self._consumer, revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._owner._assigned(self._consumer, assigned)


class TopicConsumer:
    """Hand-off, not hold: a record is done once the engine has durably accepted its envelope."""

    def __init__(
        self,
        engine: KafkaEngine,
        *,
        function: str,
        topic: str,
        group_id: str,
        starting_position: str,
        settings: Settings,
    ) -> None:
        self.function = function
        self.topic = topic
        self.group_id = group_id
        self.name = f"{function}:{topic}"
        self._engine = engine
        self._latest = starting_position == "latest"
        self._settings = settings
        self._state_key = f"kafka:{group_id}:{topic}"
        self._marks = Marks(None)
        self._marks_saved = 0.0
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        # Held by a hand-off (accept, then commit) and by the revocation callback, so a
        # partition leaves this server only once what was fetched from it is committed.
        self._lock = asyncio.Lock()
        self._generation = 0  # bumped by every rebalance: a batch fetched before one is dropped
        self._pending: set[TopicPartition] = set()  # assigned; start not decided yet (kept paused)
        self._expected: dict[int, int] = {}  # next offset per partition, to notice a reset
        self._verify: dict[int, tuple[int, str]] = {}
        self._uncommitted: dict[TopicPartition, int] = {}
        self._assignment: frozenset[TopicPartition] = frozenset()
        self._inflight: collections.deque[asyncio.Task[bool]] = collections.deque()  # oldest first
        self._handing = 0  # records in those hand-offs: not in the engine's backlog yet
        self._connection = "stopped"  # connecting | connected | unreachable | stopped
        self._error = ""
        self._backpressure = False
        self._last_contact = 0.0
        self._accepted = 0

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start consuming in the background; never waits for (or fails on) the broker."""
        if self._task is not None:
            return
        self._marks = Marks(self._engine.get_state(self._state_key))
        self._stopping.clear()
        self._connected("connecting")
        self._task = asyncio.create_task(self._run(), name=f"kafka-{self.name}")

    async def stop(self) -> None:
        """Stop fetching, finish the hand-off in progress, commit, leave the group."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        done, _ = await asyncio.wait({task}, timeout=self._settings.stop_timeout)
        if not done:
            logger.warning("kafka %s: still busy after %ss; cancelling", self.name, self._settings.stop_timeout)
            task.cancel()
            await asyncio.wait({task}, timeout=self._settings.stop_timeout)
        self._connected("stopped")

    async def __aenter__(self) -> TopicConsumer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def state(self) -> dict[str, Any]:
        """What /healthz shows about this consumer."""
        if self._connection == "unreachable":
            text = f"broker unreachable: {self._error}"
        elif self._connection == "connected":
            text = f"paused (backlog {self._engine.backlog(self.function)})" if self._backpressure else "consuming"
        else:
            text = self._connection
        return {
            "State": text,
            "Function": self.function,
            "Topic": self.topic,
            "GroupId": self.group_id,
            "Partitions": sorted(tp.partition for tp in self._assignment),
            "Accepted": self._accepted,
        }

    # -- the loop --------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = self._settings.backoff_min
        while not self._stopping.is_set():
            consumer = self._new_consumer()
            try:
                await self._unless_stopped(consumer.start())
                backoff = self._settings.backoff_min
                self._contact()
                await self._consume(consumer)
            except _Stopping:
                pass
            except KafkaError as exc:
                self._unreachable(exc)
            except Exception as exc:  # never let the trigger die: start over with a new client
                logger.exception("kafka %s: consumer failed; starting a new one", self.name)
                self._unreachable(exc)
            finally:
                await self._close(consumer)
            await self._sleep(backoff)
            backoff = min(backoff * 2, self._settings.backoff_max)
        await self._save_marks(force=True)

    def _new_consumer(self) -> AIOKafkaConsumer:
        self._generation += 1
        self._pending.clear()
        self._expected.clear()
        self._verify.clear()
        self._uncommitted.clear()
        self._assignment = frozenset()
        consumer = new_client(self._settings, function=self.function, group_id=self.group_id)
        consumer.subscribe([self.topic], listener=_Listener(self, consumer))
        return consumer

    async def _consume(self, consumer: AIOKafkaConsumer) -> None:
        while not self._stopping.is_set():
            self._assignment = frozenset(consumer.assignment())
            self._apply_pauses(consumer)
            if self._pending:
                await self._position(consumer)
                continue
            generation = self._generation
            try:
                batch = await consumer.getmany(
                    timeout_ms=int(self._settings.poll_interval * 1000), max_records=self._settings.batch_size
                )
            except RECORD_ERRORS as exc:
                await self._isolate_poison(consumer, exc)
                continue
            except KafkaError as exc:
                self._unreachable(exc)
                await self._sleep(self._settings.backoff_min)
                continue
            if not batch:
                await self._idle(consumer)
            elif self._connection == "unreachable":
                # Back after an outage: the broker may have lost its logs and offsets, so each
                # partition's start is decided again before anything read from it is accepted.
                self._pending |= consumer.assignment()
            else:
                self._contact()
                await self._hand_off(consumer, batch, generation)

    # -- rebalances ------------------------------------------------------------------------

    async def _revoked(self, consumer: AIOKafkaConsumer, revoked: set[TopicPartition]) -> None:
        # Waits for the hand-offs in progress, whose commits so land before the partitions
        # move. Should a commit still fail (the group moved on without us), the new owner reads
        # those records again: on this server acceptance is idempotent on (function, source, id),
        # so they map to the same RequestIds.
        if self._inflight:
            await asyncio.wait(set(self._inflight))
        async with self._lock:
            self._generation += 1
            if self._uncommitted:
                await self._commit(consumer)
            self._uncommitted.clear()
            self._pending -= revoked
        await self._save_marks(force=True)

    def _assigned(self, consumer: AIOKafkaConsumer, assigned: set[TopicPartition]) -> None:
        # Paused at once: nothing is read from a partition before its start is decided.
        self._generation += 1
        self._pending = set(assigned)
        self._assignment = frozenset(assigned)
        if assigned:
            consumer.pause(*assigned)

    async def _position(self, consumer: AIOKafkaConsumer) -> None:
        """Decide where each newly assigned partition starts, and seek there."""
        await self._drain()
        generation = self._generation
        partitions = sorted(self._pending & consumer.assignment())
        if not partitions:
            self._pending.clear()
            return
        end: dict[TopicPartition, int] = {}
        try:
            committed = {tp: await self._broker(consumer.committed(tp)) for tp in partitions}
            beginning = await self._broker(consumer.beginning_offsets(partitions))
            if self._latest and not self._marks.started:
                end = await self._broker(consumer.end_offsets(partitions))
        except (KafkaError, asyncio.TimeoutError) as exc:
            self._unreachable(exc)
            await self._sleep(self._settings.backoff_min)
            return
        if generation != self._generation:
            return  # a rebalance came in between: decide again for the new assignment
        pins: dict[TopicPartition, int] = {}
        for tp in partitions:
            p = tp.partition
            start = decide(
                self._marks.get(p), committed[tp], beginning[tp], started=self._marks.started, latest=self._latest
            )
            offset = end[tp] if start.pin else start.offset
            if start.pin:
                self._marks.advance(p, offset, None)
                pins[tp] = offset
            consumer.seek(tp, offset)
            self._expected[p] = offset
            if start.verify is not None:
                self._verify[p] = (offset, start.verify)
            else:
                self._verify.pop(p, None)
            logger.debug("kafka %s: partition %d starts at offset %d (%s)", self.name, p, offset, start.reason)
        self._pending.difference_update(partitions)
        self._marks.started = True
        # Durable before anything is read: that the trigger started, and where "latest" was.
        await self._save_marks(force=True)
        if pins:
            async with self._lock:
                self._uncommitted.update(pins)
                await self._commit(consumer)
        self._contact()
        logger.info(
            "kafka %s: reading partitions %s of %r", self.name, ", ".join(str(tp.partition) for tp in partitions), self.topic
        )

    def _new_epoch(self, partition: int, reason: str) -> None:
        epoch = self._marks.new_epoch(partition)
        logger.warning(
            "kafka %s: partition %d of %r started over (%s); its ids are now '%d-OFFSET-%d'",
            self.name, partition, self.topic, reason, partition, epoch,
        )

    # -- hand-off --------------------------------------------------------------------------
    #
    # Pipelined, so the engine's store writes one batch while the next is turned into
    # envelopes and rows: up to IN_FLIGHT hand-offs at once. The engine's store commits them in
    # the order they were handed over, and each waits for the one before it to commit its
    # offsets first, so offsets only ever move past records that are durably accepted.

    async def _hand_off(
        self, consumer: AIOKafkaConsumer, batch: Mapping[TopicPartition, Sequence[RecordLike]], generation: int
    ) -> None:
        envelopes: list[Envelope] = []
        spans: dict[TopicPartition, _Span] = {}
        new_epoch = False
        for tp, records in batch.items():
            if not records or generation != self._generation:
                continue
            p = tp.partition
            verdict = check(records, self._expected.get(p), self._verify.pop(p, None))
            if verdict is Verdict.RESTART:
                self._new_epoch(p, f"the record at offset {records[0].offset} is not the one read there before")
                new_epoch = True
                self._pending.add(tp)  # paused until its start is decided again
                consumer.pause(tp)
                continue
            if verdict is Verdict.NEW_LOG:
                self._new_epoch(p, f"offset {records[0].offset} came where {self._expected.get(p)} was next")
                new_epoch = True
            epoch = self._marks.epoch(p)
            max_json = self._settings.max_json
            envelopes += to_envelopes(records, self.function, epoch=epoch, max_json=max_json)
            spans[tp] = span = _Span.of(records)
            self._expected[p] = span.next
        if new_epoch:
            await self._drain()
            await self._save_marks(force=True)  # durable before any id of the new epoch is used
        while len(self._inflight) >= IN_FLIGHT:
            await self._inflight.popleft()
        if envelopes and generation == self._generation:
            previous = self._inflight[-1] if self._inflight else None
            task = asyncio.create_task(self._accept(consumer, envelopes, spans, generation, previous))
            self._handing += len(envelopes)
            self._inflight.append(task)

    async def _drain(self) -> None:
        """Wait for the accepts (and commits) in flight."""
        while self._inflight:
            await self._inflight.popleft()

    async def _accept(
        self,
        consumer: AIOKafkaConsumer,
        envelopes: Sequence[Envelope],
        spans: Mapping[TopicPartition, _Span],
        generation: int,
        previous: asyncio.Task[bool] | None = None,
    ) -> bool:
        """Accept durably, then commit; if the engine fails, read everything uncommitted again."""
        failure: Exception | None = None
        try:
            if generation != self._generation:
                # Fetched before a rebalance: these partitions restart from their committed
                # offsets, here or on another server, so the records are read again there.
                return False
            try:
                await self._engine.accept_batch(envelopes)
            except Exception as exc:
                failure = exc
        finally:
            self._handing -= len(envelopes)  # accepted ones are in the engine's backlog now
        if previous is not None:
            await asyncio.wait({previous})  # its offsets go first
        async with self._lock:
            if failure is not None:
                # Whatever was fetched after this batch is dropped too (new generation), and
                # every partition starts again from its committed offset: nothing is skipped.
                self._generation += 1
                self._pending |= consumer.assignment()
                if isinstance(failure, ShuttingDown):
                    self._stopping.set()
                    return False
                logger.error(
                    "kafka %s: the engine did not accept %d records; reading them again",
                    self.name, len(envelopes), exc_info=failure,
                )
                await self._sleep(self._settings.backoff_min)
                return False
            if generation != self._generation:
                return False  # a batch before this one failed, or a rebalance came: read again
            self._accepted += len(envelopes)
            for tp, span in spans.items():
                self._marks.advance(tp.partition, span.next, span.fingerprint)
                self._uncommitted[tp] = span.next
            await self._commit(consumer)
        await self._save_marks()
        return True

    async def _commit(self, consumer: AIOKafkaConsumer) -> None:
        offsets = dict(self._uncommitted)
        try:
            await self._broker(consumer.commit(offsets))
        except (CommitFailedError, IllegalStateError) as exc:
            # The group rebalanced first; whoever owns the partitions now starts at the last
            # committed offset. Here, records read again map to their RequestIds (idempotent).
            logger.warning("kafka %s: commit of %s refused (%s); those records may be read again",
                           self.name, _offsets(offsets), type(exc).__name__)
            self._uncommitted.clear()
            return
        except (KafkaError, asyncio.TimeoutError) as exc:
            self._unreachable(exc)  # kept: committed with the next batch, or when idle
            return
        for tp, offset in offsets.items():
            if self._uncommitted.get(tp) == offset:
                del self._uncommitted[tp]

    async def _isolate_poison(self, consumer: AIOKafkaConsumer, exc: Exception) -> None:
        """Find the partition whose next record the client cannot decode, hand that record over, go past it."""
        logger.warning("kafka %s: a fetched record cannot be decoded (%s: %s)", self.name, type(exc).__name__, exc)
        for tp in sorted(consumer.assignment() - consumer.paused()):
            await self._step_past(consumer, tp)

    async def _step_past(self, consumer: AIOKafkaConsumer, tp: TopicPartition) -> None:
        # One record at a time, the client returns the good records before the bad one. The
        # failed fetch is dropped by the client (its position did not move), hence the wait.
        generation = self._generation
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
            await self._hand_off(consumer, {tp: good}, generation)
        if error is None:
            return
        offset = await self._broker(consumer.position(tp))
        reason = f"{type(error).__name__}: {error}"
        envelope = undecodable_envelope(
            self.topic, tp.partition, offset, self.function, reason, epoch=self._marks.epoch(tp.partition)
        )
        await self._drain()
        self._expected[tp.partition] = offset + 1
        if await self._accept(consumer, [envelope], {tp: _Span(offset, offset + 1, None)}, generation):
            consumer.seek(tp, offset + 1)
            logger.warning("kafka %s: record %d-%d cannot be decoded (%s); handed over as %s",
                           self.name, tp.partition, offset, reason, envelope.type)

    # -- backpressure, health --------------------------------------------------------------

    def _apply_pauses(self, consumer: AIOKafkaConsumer) -> None:
        backlog = self._engine.backlog(self.function) + self._handing
        mark = self._settings.high_water_mark
        if self._backpressure and backlog <= mark // 2:
            self._backpressure = False
            logger.info("kafka %s: resumed (backlog %d, at most %d)", self.name, backlog, mark // 2)
        elif not self._backpressure and backlog > mark:
            self._backpressure = True
            logger.info("kafka %s: paused (backlog %d over the high-water mark %d)", self.name, backlog, mark)
        assigned = consumer.assignment()
        want = set(assigned) if self._backpressure else self._pending & assigned
        paused = consumer.paused() & assigned
        if want - paused:
            consumer.pause(*(want - paused))
        if paused - want:
            consumer.resume(*(paused - want))

    async def _idle(self, consumer: AIOKafkaConsumer) -> None:
        await self._drain()
        if self._uncommitted:
            async with self._lock:
                await self._commit(consumer)
        if time.monotonic() - self._last_contact < self._settings.probe_interval:
            return
        # The client retries quietly while the broker is away; ask it something to know.
        try:
            await self._broker(consumer.topics())
        except (KafkaError, asyncio.TimeoutError) as exc:
            self._unreachable(exc)
            self._last_contact = time.monotonic()  # the next probe after another interval
            return
        if self._connection == "unreachable":
            self._pending |= consumer.assignment()  # the broker may have lost logs and offsets
        self._contact()

    def _contact(self) -> None:
        self._last_contact = time.monotonic()
        self._connected("connected")

    def _unreachable(self, exc: BaseException) -> None:
        text, name = str(exc), type(exc).__name__
        self._error = text if text.startswith(name) else f"{name}: {text}" if text else name
        self._connected("unreachable")

    def _connected(self, connection: str) -> None:
        if connection == self._connection:
            return
        self._connection = connection
        servers = self._settings.bootstrap_servers
        if connection == "unreachable":
            logger.warning("kafka %s: broker %s unreachable (%s); retrying", self.name, servers, self._error)
        elif connection == "connected":
            logger.info("kafka %s: connected to %s as group %r", self.name, servers, self.group_id)
        elif connection == "connecting":
            logger.info("kafka %s: connecting to %s", self.name, servers)
        else:
            logger.info("kafka %s: stopped", self.name)

    # -- helpers ---------------------------------------------------------------------------

    async def _broker(self, call: Awaitable[T]) -> T:
        return await asyncio.wait_for(call, self._settings.broker_timeout)

    async def _unless_stopped(self, call: Awaitable[T]) -> T:
        """Await `call`, giving up (with _Stopping) as soon as stop() is asked for."""
        task = asyncio.ensure_future(call)
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
            raise _Stopping()
        return task.result()

    async def _save_marks(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._marks_saved < self._settings.mark_interval:
            return
        self._marks_saved = now
        try:
            await self._engine.put_state(self._state_key, self._marks.dumps())
        except Exception:
            logger.exception("kafka %s: could not write down the partition marks", self.name)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def _close(self, consumer: AIOKafkaConsumer) -> None:
        await self._drain()
        if self._uncommitted and self._connection == "connected":
            async with self._lock:
                await self._commit(consumer)
        await stop_client(consumer, self._settings.client_stop_timeout)
        self._assignment = frozenset()


def _offsets(offsets: Mapping[TopicPartition, int]) -> str:
    return ", ".join(f"{tp.partition}@{offset}" for tp, offset in sorted(offsets.items()))
