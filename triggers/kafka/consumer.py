"""One Kafka consumer for one (function, trigger): fetch a batch, hand it to the engine, commit, repeat."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Collection, TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaError, UnsupportedCodecError

from .client import RECORD_ERRORS, Settings, group_generation, new_client, sleep_unless, stop_client
from .engine import KafkaEngine
from .handoff import IN_FLIGHT, HandOff
from .health import Health
from .latest import resolve_latest
from .partitions import Partitions
from .positions import decide
from .security import refusal

__all__ = ["IN_FLIGHT", "KafkaEngine", "TopicConsumer"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class _Stopping(Exception):
    """Stop was asked for, or the engine is shutting down."""


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
        self._since = 0  # when start() was called, in ms since the epoch: "latest" counts from there
        self._settings = settings
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._health = Health(self.name, servers=settings.bootstrap_servers, group_id=group_id)
        self._held_wait = settings.backoff_min  # before records held back are fetched again (see _hold_back)
        self._parts = Partitions(
            engine,
            name=self.name,
            topic=topic,
            state_key=f"kafka:{group_id}:{topic}",
            mark_interval=settings.mark_interval,
        )
        self._handoff = HandOff(
            engine, self._parts, self._health, settings, self._stopping, function=function, topic=topic, name=self.name
        )

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start consuming in the background; never waits for (or fails on) the broker."""
        if self._task is not None:
            return
        await self._parts.load_marks()
        self._since = int(time.time() * 1000)
        self._stopping.clear()
        self._health.enter("connecting")
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
        self._health.enter("stopped")

    async def __aenter__(self) -> TopicConsumer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def state(self) -> dict[str, Any]:
        """What /healthz shows about this consumer."""
        return {
            "State": self._health.text(lambda: self._engine.backlog(self.function)),
            "Function": self.function,
            "Topic": self.topic,
            "GroupId": self.group_id,
            "Partitions": sorted(tp.partition for tp in self._parts.assignment),
            "Accepted": self._handoff.accepted,
            "Duplicates": self._handoff.duplicates,
        }

    def figures(self) -> dict[str, int]:
        """What /metrics shows about this consumer."""
        connected = self._health.connection == "connected"
        return {
            "connected": int(connected),
            "paused": int(connected and self._health.backpressure),
            "partitions": len(self._parts.assignment),
            "accepted": self._handoff.accepted,
            "duplicates": self._handoff.duplicates,
        }

    # -- the loop --------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = self._settings.backoff_min
        while not self._stopping.is_set():
            consumer = self._new_consumer()
            try:
                if self._latest and not self._parts.marks.started:
                    await self._unless_stopped(self._pin_latest())
                await self._unless_stopped(consumer.start())  # joins the group: seconds, with Tansu
                backoff = self._settings.backoff_min
                self._health.contact()
                await self._consume(consumer)
            except _Stopping:
                pass
            except KafkaConnectionError as exc:
                self._health.unreachable(exc, await self._why())
            except (KafkaError, asyncio.TimeoutError) as exc:
                self._health.unreachable(exc)
            except Exception as exc:  # never let the trigger die: start over with a new client
                logger.exception("kafka %s: consumer failed; starting a new one", self.name)
                self._health.unreachable(exc)
            finally:
                await self._close(consumer)
            await sleep_unless(self._stopping, backoff)
            backoff = min(backoff * 2, self._settings.backoff_max)

    def _new_consumer(self) -> AIOKafkaConsumer:
        self._parts.reset()
        self._handoff.uncommitted.clear()
        consumer = new_client(self._settings, function=self.function, group_id=self.group_id)
        consumer.subscribe([self.topic], listener=_Listener(self, consumer))
        return consumer

    async def _pin_latest(self) -> None:
        """Write down where starting_position "latest" puts each partition (see latest_offset).

        Done once, at the trigger's first start, before its consumer joins the group: the group
        may assign the partitions seconds later, and the records produced meanwhile are to be
        read. Partitions that appear later (all of them, when there is no topic yet) hold only
        records produced since the start: they are read from their beginning.
        """
        marks = self._parts.marks
        marks.latest = await resolve_latest(self._settings, function=self.function, topic=self.topic, since=self._since)
        marks.started = True
        await self._parts.save_marks(force=True)  # durable before any partition is read
        logger.debug("kafka %s: starting_position latest: %s", self.name, marks.latest or "no partitions yet")

    async def _consume(self, consumer: AIOKafkaConsumer) -> None:
        while not self._stopping.is_set():
            self._parts.assignment = frozenset(consumer.assignment())
            self._apply_pauses(consumer)
            if self._parts.pending:
                await self._position(consumer)
                continue
            generation = self._parts.generation
            try:
                batch = await consumer.getmany(
                    timeout_ms=int(self._settings.poll_interval * 1000), max_records=self._settings.batch_size
                )
            except RECORD_ERRORS as exc:
                await self._handoff.isolate_poison(consumer, exc)
                continue
            except UnsupportedCodecError as exc:
                await self._hold_back(consumer, exc)
                continue
            except KafkaError as exc:
                self._health.unreachable(exc, await self._why())
                await sleep_unless(self._stopping, self._settings.backoff_min)
                continue
            if not batch:
                await self._idle(consumer)
            elif self._health.connection == "unreachable":
                # Back after an outage: the broker may have lost its logs and offsets, so each
                # partition's start is decided again before anything read from it is accepted.
                self._parts.pending |= consumer.assignment()
            else:
                self._health.contact()
                await self._handoff.hand_off(consumer, batch, generation)
            await self._notice_new_logs(consumer, batch)

    async def _hold_back(self, consumer: AIOKafkaConsumer, exc: UnsupportedCodecError) -> None:
        """Records came compressed with a codec this install cannot read: say so, and read them again later.

        The broker answered, so this is no outage. The client drops the whole answer of that
        getmany, yet may already have moved other partitions past the records it drained for
        it: every partition goes back to where hand-offs stand, so no record is skipped. The
        batch fails again until the codec's library is installed (and eventrun restarted).
        """
        if self._health.connection == "unreachable":
            self._parts.pending |= consumer.assignment()  # back after an outage, as in _idle
        self._health.contact()
        self._health.hold_back(exc)
        parts = self._parts
        for tp in consumer.assignment():
            offset = parts.expected.get(tp.partition)
            if offset is not None and tp not in parts.pending:
                consumer.seek(tp, offset)
        await sleep_unless(self._stopping, self._held_wait)
        self._held_wait = min(self._held_wait * 2, self._settings.backoff_max)

    async def _notice_new_logs(self, consumer: AIOKafkaConsumer, fetched: Collection[TopicPartition]) -> None:
        """Start a partition again, under a new epoch, once its log ends before where reading stands.

        Apache Kafka answers a read past a log's end (a topic deleted and created again, a broker
        that lost its data) with offset-out-of-range, and the client goes back to the oldest
        record: judge() sees the offsets go backwards. Tansu answers with no records, and the
        new log would be read only from that position on, once it grew past it; but the high
        watermark in its answers (the log's end, known from a fetch at the client's position)
        tells. The partition's start is then decided again: the new log from its beginning.
        """
        parts = self._parts
        shorter: list[tuple[TopicPartition, int, int]] = []
        for tp in consumer.assignment():
            if tp in fetched or tp in parts.pending:
                continue
            end, expected = consumer.highwater(tp), parts.expected.get(tp.partition)
            if end is not None and expected is not None and end < expected:
                shorter.append((tp, end, expected))
        if not shorter:
            return
        await self._handoff.drain()  # the marks of what is in flight advance first, in the old epoch
        for tp, end, expected in shorter:
            if tp in consumer.assignment() and tp not in parts.pending:
                reason = f"its log ends at offset {end}, before offset {expected} where reading stood"
                parts.new_epoch(tp.partition, reason)
                parts.pending.add(tp)
                consumer.pause(tp)
        await parts.save_marks(force=True)  # durable before any id of the new epoch is used

    # -- rebalances ------------------------------------------------------------------------

    async def _revoked(self, consumer: AIOKafkaConsumer, revoked: set[TopicPartition]) -> None:
        # Waits for the hand-offs in progress, whose commits so land before the partitions
        # move. Should a commit still fail (the group moved on without us), the new owner reads
        # those records again: on this server acceptance is idempotent on (function, source, id),
        # so they map to the same RequestIds.
        await self._handoff.settle()
        async with self._handoff.lock:
            self._parts.generation += 1
            if self._handoff.uncommitted:
                await self._handoff.commit(consumer)
            self._handoff.uncommitted.clear()
            self._parts.pending -= revoked
        # Written down before the partitions move: their next holder reads their marks (and
        # epochs) from the store, here or on another server.
        await self._parts.release(tp.partition for tp in revoked)

    def _assigned(self, consumer: AIOKafkaConsumer, assigned: set[TopicPartition]) -> None:
        # Paused at once: nothing is read from a partition before its start is decided.
        self._parts.generation += 1
        self._parts.pending = set(assigned)
        self._parts.reload = {tp.partition for tp in assigned}  # another server may have moved them on
        self._parts.hold(group_generation(consumer), self._parts.reload)  # the fence their marks are written under
        self._parts.assignment = frozenset(assigned)
        if assigned:
            consumer.pause(*assigned)

    async def _position(self, consumer: AIOKafkaConsumer) -> None:
        """Decide where each newly assigned partition starts, and seek there."""
        await self._handoff.drain()
        parts = self._parts
        generation = parts.generation
        partitions = sorted(parts.pending & consumer.assignment())
        if not partitions:
            parts.pending.clear()
            return
        # Only after a rebalance: decided again after an outage or a new log, a partition stayed
        # here, and the marks this consumer holds are newer than the ones written down.
        await parts.reload_marks(tp.partition for tp in partitions if tp.partition in parts.reload)
        try:
            committed = {tp: await self._broker(consumer.committed(tp)) for tp in partitions}
            beginning = await self._broker(consumer.beginning_offsets(partitions))
        except (KafkaError, asyncio.TimeoutError) as exc:
            self._health.unreachable(exc)
            await sleep_unless(self._stopping, self._settings.backoff_min)
            return
        if generation != parts.generation:
            return  # a rebalance came in between: decide again for the new assignment
        parts.reload.difference_update(tp.partition for tp in partitions)
        pins: dict[TopicPartition, int] = {}
        marks = parts.marks
        for tp in partitions:
            p = tp.partition
            start = decide(marks.get(p), committed[tp], beginning[tp], started=marks.started, latest=marks.latest.get(p))
            offset = start.offset
            if start.pin is not None:
                marks.advance(p, start.pin, start.verify)
                pins[tp] = start.pin
            marks.latest.pop(p, None)  # from now on the group's offset or the mark says where
            consumer.seek(tp, offset)
            parts.expected[p] = offset
            if start.verify is not None:
                parts.verify[p] = (offset, start.verify)
            else:
                parts.verify.pop(p, None)
            logger.debug("kafka %s: partition %d starts at offset %d (%s)", self.name, p, offset, start.reason)
        parts.pending.difference_update(partitions)
        parts.marks.started = True
        # Durable before anything is read: that the trigger started, and where "latest" was.
        await parts.save_marks(force=True)
        if pins:
            async with self._handoff.lock:
                self._handoff.uncommitted.update(pins)
                await self._handoff.commit(consumer)
        self._health.contact()
        logger.info(
            "kafka %s: reading partitions %s of %r", self.name, ", ".join(str(tp.partition) for tp in partitions), self.topic
        )

    # -- backpressure, idling --------------------------------------------------------------

    def _apply_pauses(self, consumer: AIOKafkaConsumer) -> None:
        backlog = self._engine.backlog(self.function) + self._handoff.handing
        backpressure = self._health.pressure(backlog, self._settings.high_water_mark)
        assigned = consumer.assignment()
        want = set(assigned) if backpressure else self._parts.pending & assigned
        paused = consumer.paused() & assigned
        if want - paused:
            consumer.pause(*(want - paused))
        if paused - want:
            consumer.resume(*(paused - want))

    async def _idle(self, consumer: AIOKafkaConsumer) -> None:
        self._health.release()  # nothing left to read: nothing held back either
        self._held_wait = self._settings.backoff_min
        await self._handoff.drain()
        if self._handoff.uncommitted:
            async with self._handoff.lock:
                await self._handoff.commit(consumer)
        # The last batch's marks, which the hand-off's saves (once per mark interval) may have left
        # unwritten: should this server die, the next holder of its partitions checks by them.
        await self._parts.save_marks()
        if not self._health.probe_due(self._settings.probe_interval):
            return
        # The client retries quietly while the broker is away; ask it something to know.
        try:
            await self._broker(consumer.topics())
        except (KafkaError, asyncio.TimeoutError) as exc:
            self._health.probe_failed(exc, await self._why())
            return
        if self._health.connection == "unreachable":
            self._parts.pending |= consumer.assignment()  # the broker may have lost logs and offsets
        self._health.contact()

    # -- helpers ---------------------------------------------------------------------------

    async def _why(self) -> str | None:
        """Why the brokers do not answer, from one connection made here (None if one does).

        The client's own errors ("Unable to bootstrap", a timeout) say nothing of the cause: a
        refused connection, a certificate not trusted, a password refused.
        """
        settings = self._settings
        try:
            return await self._unless_stopped(
                refusal(settings.bootstrap_servers, settings.connection, settings.broker_timeout)
            )
        except _Stopping:
            return None

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

    async def _close(self, consumer: AIOKafkaConsumer) -> None:
        await self._handoff.drain()
        if self._handoff.uncommitted and self._health.connection == "connected":
            async with self._handoff.lock:
                await self._handoff.commit(consumer)
        # Before leaving the group (which gives the partitions to others at once, with no
        # revocation here), as when they are revoked.
        await self._parts.release()
        await stop_client(consumer, self._settings.client_stop_timeout)
        self._parts.assignment = frozenset()
