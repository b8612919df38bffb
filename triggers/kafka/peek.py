"""A fetch eventrun makes itself, beside its consumer's: a partition's true end, and a record as the broker keeps it.

Two things the client's own calls do not give. The end of a log: Tansu answers
ListOffsets(latest) with the last record batch's base offset plus one, not the offset after its
last record, while the high watermark of a fetch answer is right there as on Apache Kafka. And
the fingerprint of a record the client cannot decode (a header name that is not UTF-8, a bad
checksum): the client raises on it, but its batch still has a checksum over its records' bytes
and timestamps, which tells it from another record at its offset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError, LeaderNotAvailableError, OffsetOutOfRangeError, for_code
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.record.memory_records import MemoryRecords

from .client import RECORD_ERRORS
from .parser import fingerprint, undecodable_fingerprint

PEEK_BYTES = 1024 * 1024
PEEK_WAIT_MS = 10  # how long the broker may wait for records at the end (Tansu answers nothing to a wait of 0)
_READ_COMMITTED = 1  # as the consumers read: records of open or aborted transactions are not theirs


@dataclass(frozen=True, slots=True)
class Peek:
    """One partition's answer to a fetch at an offset."""

    end: int  # the high watermark: the offset after the log's last record (-1 if the broker gave none)
    records: bytes  # the record batches from the one holding the offset on, as the broker sent them

    def fingerprint(self, offset: int) -> str | None:
        """The fingerprint of the record at `offset`, as handing it over gives it; None if the peek lacks it."""
        batches = MemoryRecords(self.records)
        while batches.has_next():
            batch = batches.next_batch()
            if batch is None or batch.next_offset <= offset or batch.is_control_batch:
                continue
            return _fingerprint_in(batch, offset)
        return None


def _fingerprint_in(batch: Any, offset: int) -> str | None:
    """The fingerprint of the record at `offset` in a batch that ends past it, read as the client reads it."""
    crc = getattr(batch, "crc", None)  # (the batches of the old message formats have none)
    if not batch.validate_crc():
        return None if crc is None else undecodable_fingerprint(offset, crc)
    try:
        for record in batch:
            if record.offset == offset:
                return fingerprint(record)
            if record.offset > offset:
                return None  # not in the log (compacted away)
    except RECORD_ERRORS:  # where the client fails too: the record at `offset` is undecodable for it
        return None if crc is None else undecodable_fingerprint(offset, crc)
    return None


async def peek(consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int, *, leader: int | None = None) -> Peek:
    """Fetch `tp` at `offset` from its leader (`leader`, or the one the consumer knows), outside the consumer's position.

    An offset the log does not hold answers with no records (and the end if the broker gives it).
    """
    client = consumer._client  # the consumer's connections; aiokafka has no public call for one fetch
    if leader is None:
        leader = client.cluster.leader_for_partition(tp)
    if leader is None or leader < 0:
        raise LeaderNotAvailableError(f"no leader known for partition {tp.partition} of {tp.topic!r}")
    request = FetchRequest(PEEK_WAIT_MS, 1, PEEK_BYTES, _READ_COMMITTED, [(tp.topic, [(tp.partition, offset, PEEK_BYTES)])])
    response = await client.send(leader, request)
    for topic, partitions in response.topics:
        for partition, error_code, highwater, *rest in partitions:
            if (topic, partition) != (tp.topic, tp.partition):
                continue
            error = for_code(error_code)
            if error is OffsetOutOfRangeError:
                return Peek(highwater, b"")
            if error_code:
                raise error(f"fetching partition {partition} of {topic!r} at offset {offset}")
            return Peek(highwater, rest[-1] or b"")
    raise KafkaError(f"no answer for partition {tp.partition} of {tp.topic!r}")
