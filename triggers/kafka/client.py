"""The aiokafka client as the consumers use it: settings, construction, a stop that always ends."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Awaitable, Mapping

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import CorruptRecordException

from eventrun.engine.manifest import Manifest

from .security import connection_options

# What the client raises when it cannot decode a fetched record (a header name that is not
# UTF-8, a bad CRC). It raises it again on every fetch, so the partition would be stuck there.
RECORD_ERRORS = (CorruptRecordException, ValueError)


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Connection and pacing shared by every consumer of one server."""

    bootstrap_servers: str
    # aiokafka's keywords for TLS and SASL (security_protocol, ssl_context, sasl_*); none: plaintext
    connection: Mapping[str, Any] = field(default_factory=dict)
    high_water_mark: int = 10_000
    batch_size: int = 2000
    max_json: int = 6 * 1024 * 1024
    poll_interval: float = 0.2  # also how often the backlog is looked at while paused
    probe_interval: float = 1.0  # idle seconds between checks that the broker still answers
    broker_timeout: float = 5.0  # for one call to the broker made by eventrun itself
    backoff_min: float = 0.5
    backoff_max: float = 30.0
    stop_timeout: float = 10.0
    client_stop_timeout: float = 3.0  # for leaving the group cleanly, before closing by force
    session_timeout_ms: int = 10_000  # a server that died loses its partitions after this long
    heartbeat_interval_ms: int = 1_000
    mark_interval: float = 1.0  # how often the per-partition marks are written down
    # How much one fetch brings, per partition and in all. The client fetches a partition again
    # only once what it brought is used up, and while it waits for that answer the consumer
    # waits too: the client's 1 MiB a partition made that wait a third of the time of a burst.
    fetch_partition_bytes: int = 4 * 1024 * 1024
    fetch_bytes: int = 16 * 1024 * 1024  # also bounds what one consumer holds fetched
    # How long a broker may hold a fetch that finds nothing new. A broker answers as soon as
    # there is data, but one (Tansu) was seen holding fetches for records it had while offsets
    # were being committed: with the client's 500 ms, a third of a burst went waiting.
    fetch_wait_ms: int = 100

    @classmethod
    def from_manifest(cls, manifest: Manifest, **options: Any) -> Settings:
        """The settings `[kafka]` gives (ManifestError if its TLS files do not load); `options` override the rest."""
        return cls(
            bootstrap_servers=manifest.kafka.bootstrap_servers,
            connection=connection_options(manifest),
            high_water_mark=manifest.kafka.high_water_mark,
            max_json=manifest.server.max_body_size,
            **options,
        )


def new_client(settings: Settings, *, function: str, group_id: str | None) -> AIOKafkaConsumer:
    """A consumer of the group with manual commits; eventrun decides every start position.

    Without a group: a client that only looks things up (it joins nothing, assigns nothing).
    """
    return AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        **settings.connection,
        group_id=group_id,
        client_id=f"eventrun-{function}",
        enable_auto_commit=False,
        # Only a fallback: eventrun seeks every assigned partition itself (positions.py);
        # when the log no longer holds a position, the oldest record is the one to go on with.
        auto_offset_reset="earliest",
        isolation_level="read_committed",  # records of aborted transactions never run
        metadata_max_age_ms=5000,  # notice soon a topic created (again) while we wait for it
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
        retry_backoff_ms=200,
        max_partition_fetch_bytes=settings.fetch_partition_bytes,
        fetch_max_bytes=settings.fetch_bytes,
        fetch_max_wait_ms=settings.fetch_wait_ms,
    )


def group_generation(consumer: AIOKafkaConsumer) -> int | None:
    """The generation of the group the consumer joined last (None: none, or not known).

    aiokafka keeps it on its coordinator only, and forgets it (-1) once the group no longer
    knows the member (a session that expired): read it when the partitions are assigned.
    """
    generation = getattr(getattr(consumer, "_coordinator", None), "generation", None)
    return generation if isinstance(generation, int) and generation >= 0 else None


async def stop_client(consumer: AIOKafkaConsumer, grace: float) -> None:
    """consumer.stop(), which leaves the group; forced after `grace` seconds.

    stop() first waits for the group coordination in progress, and a JoinGroup request is held
    by the broker until the rebalance ends (after a crashed member's session timeout, say). It
    can also raise CancelledError (aiokafka#647). Either way the parts it did not get to are
    closed here, so no connection or background task is left behind.
    """
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is not None and getattr(coordinator, "generation", None) == 0 and getattr(coordinator, "member_id", ""):
        # Tansu numbers a group's first generation 0 and aiokafka sends LeaveGroup only for
        # generations above 0; without it the partitions stay with this member until its
        # session times out. (LeaveGroup carries no generation, so 1 changes nothing else.)
        coordinator.generation = 1
    if await _settle(consumer.stop(), grace):
        return
    closers = [
        getattr(coordinator, "_stop_heartbeat_task", None),
        getattr(coordinator, "_stop_commit_offsets_refresh_task", None),
        getattr(getattr(consumer, "_fetcher", None), "close", None),
        getattr(getattr(consumer, "_client", None), "close", None),
    ]
    for close in closers:
        if close is not None:
            await _settle(close(), grace)


async def _settle(call: Awaitable[Any], timeout: float) -> bool:
    """Run `call` in its own task for at most `timeout` seconds; whether it ended without error."""
    task = asyncio.ensure_future(call)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        task.cancel()
        await asyncio.wait({task}, timeout=timeout)
        return False
    return not task.cancelled() and task.exception() is None


async def sleep_unless(stopping: asyncio.Event, seconds: float) -> None:
    """Wait `seconds`, or less if `stopping` is set meanwhile (a consumer's stop cuts its waits short)."""
    try:
        await asyncio.wait_for(stopping.wait(), seconds)
    except asyncio.TimeoutError:
        pass
