"""starting_position "latest": where each partition of a topic starts, looked up once, at the trigger's first start."""

from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

from aiokafka import AIOKafkaConsumer, TopicPartition

from .client import Settings, new_client, stop_client
from .peek import Peek, peek
from .positions import Mark, latest_offset

T = TypeVar("T")


async def resolve_latest(settings: Settings, *, function: str, topic: str, since: int) -> dict[int, Mark]:
    """Where "latest" puts each partition the topic has (none, when there is no topic yet), by partition.

    Each is latest_offset() of the partition, as of `since` (ms since the epoch), with the
    fingerprint of the record before it, to check the log by when reading starts there.
    """
    client = new_client(settings, function=function, group_id=None)
    try:
        await client.start()
        # What consumer.topics() asks for, the partitions included (it keeps only the names).
        cluster = await _within(settings, client._client.fetch_all_metadata())
        partitions = [TopicPartition(topic, p) for p in sorted(cluster.partitions_for_topic(topic) or ())]
        if not partitions:
            return {}
        leaders = {tp: cluster.leader_for_partition(tp) for tp in partitions}
        listed = await _within(settings, client.end_offsets(partitions))
        # Tansu gives ListOffsets' end short (the last batch's base offset + 1): a fetch there
        # answers the true end, its high watermark (and on Tansu the last batch too). The ends
        # come before the look-up by time, which so finds any record produced in between.
        ends = {tp: await _within(settings, peek(client, tp, listed[tp], leader=leaders[tp])) for tp in partitions}
        found = await _within(settings, client.offsets_for_times({tp: since for tp in partitions}))
        latest: dict[int, Mark] = {}
        for tp in partitions:
            at = found.get(tp)
            end = max(listed[tp], ends[tp].end)
            offset = latest_offset(end, since, None if at is None else (at.offset, at.timestamp))
            digest = await _fingerprint_before(settings, client, tp, leaders[tp], offset, ends[tp])
            latest[tp.partition] = Mark(offset, digest)
        return latest
    finally:
        await stop_client(client, settings.client_stop_timeout)


async def _fingerprint_before(
    settings: Settings, client: AIOKafkaConsumer, tp: TopicPartition, leader: int | None, offset: int, at_end: Peek
) -> str | None:
    """The fingerprint of the record before `offset` (from the peek at the end, if it holds it); None if there is none."""
    if offset == 0:
        return None
    digest = at_end.fingerprint(offset - 1)
    if digest is None:  # (on Apache Kafka, a fetch at the end brings no record)
        digest = (await _within(settings, peek(client, tp, offset - 1, leader=leader))).fingerprint(offset - 1)
    return digest


async def _within(settings: Settings, call: Awaitable[T]) -> T:
    return await asyncio.wait_for(call, settings.broker_timeout)
