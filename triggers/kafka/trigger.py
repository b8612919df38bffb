"""The Kafka trigger: one consumer per (function, kafka trigger) of the manifest."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from eventrun.engine.errors import ManifestError
from eventrun.engine.manifest import KafkaTrigger as KafkaTriggerConfig
from eventrun.engine.manifest import Manifest, Problem, problems_text
from eventrun.engine.manifest_errors import dotted
from eventrun.engine.metrics import family, labels

from .client import Settings
from .consumer import TopicConsumer
from .engine import KafkaEngine

logger = logging.getLogger(__name__)


def manifest_problems(manifest: Manifest) -> list[Problem]:
    """What is wrong with the manifest's Kafka triggers: two of them consuming one topic as one group."""
    problems: list[Problem] = []
    seen: dict[tuple[str, str], str] = {}
    for function, config in manifest.functions.items():
        for index, trigger in enumerate(config.triggers):
            if not isinstance(trigger, KafkaTriggerConfig):
                continue
            group_id = _group_id(function, trigger)
            where = ["functions", function, "triggers", str(index)]
            if (group_id, trigger.topic) in seen:
                # Two consumers of one group on one topic split its partitions between them,
                # so each would see only part of the records.
                problems.append(
                    (
                        where,
                        f"topic {trigger.topic!r} with group_id {group_id!r} is already consumed by "
                        f"{seen[group_id, trigger.topic]}; give this trigger its own group_id",
                    )
                )
            else:
                seen[group_id, trigger.topic] = dotted(where)
    return problems


def _group_id(function: str, trigger: KafkaTriggerConfig) -> str:
    return trigger.group_id or f"eventrun-{function}"


class KafkaTrigger:
    """Every `type = "kafka"` trigger of the manifest, sharing the `[kafka]` connection settings."""

    def __init__(self, engine: KafkaEngine, manifest: Manifest, *, settings: Settings | None = None) -> None:
        self.settings = settings or Settings.from_manifest(manifest)
        kafka = manifest.kafka
        if kafka.security_protocol == "SASL_PLAINTEXT" and kafka.sasl_mechanism == "PLAIN":
            # The client says so too, but its logs are kept quiet (see _quiet_client_logs).
            logger.warning(
                "kafka: sasl_mechanism PLAIN over security_protocol SASL_PLAINTEXT sends the password "
                "unencrypted; use SASL_SSL, or a SCRAM mechanism"
            )
        if problems := manifest_problems(manifest):
            raise ManifestError(problems_text(problems))
        self.consumers = [
            TopicConsumer(
                engine,
                function=function,
                topic=trigger.topic,
                group_id=_group_id(function, trigger),
                starting_position=trigger.starting_position,
                settings=self.settings,
            )
            for function, config in manifest.functions.items()
            for trigger in config.triggers
            if isinstance(trigger, KafkaTriggerConfig)
        ]

    async def start(self) -> None:
        """Start every consumer in the background; a broker that is down delays nothing."""
        _quiet_client_logs()
        for consumer in self.consumers:
            await consumer.start()

    async def stop(self) -> None:
        """Stop every consumer: stop fetching, finish the hand-off, commit, leave the group."""
        await asyncio.gather(*(consumer.stop() for consumer in self.consumers))

    async def __aenter__(self) -> KafkaTrigger:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def state(self) -> dict[str, Any]:
        """Each consumer's state for /healthz, keyed "function:topic"."""
        return {consumer.name: consumer.state() for consumer in self.consumers}

    def metrics(self) -> str:
        """Each consumer's figures as Prometheus text, labelled by function, topic and group."""
        rows = [
            (labels(function=c.function, topic=c.topic, group=c.group_id), c.figures()) for c in self.consumers
        ]
        out: list[str] = []
        for name, kind, key, help_text in _FAMILIES:
            out += family(name, kind, help_text)
            out += [f"{name}{where} {figures[key]}" for where, figures in rows]
        return "\n".join(out) + "\n"


_FAMILIES = (
    ("eventrun_kafka_consumer_connected", "gauge", "connected",
     "1 while the consumer reaches the broker, 0 while it connects, the broker is unreachable or it is stopped."),
    ("eventrun_kafka_consumer_paused", "gauge", "paused",
     "1 while the consumer holds its partitions back because the function's backlog passed the high-water mark."),
    ("eventrun_kafka_partitions", "gauge", "partitions", "Partitions of the topic assigned to the consumer."),
    ("eventrun_kafka_records_accepted_total", "counter", "accepted",
     "Records durably accepted as new events (their offsets committed after) since the server started."),
    ("eventrun_kafka_records_duplicate_total", "counter", "duplicates",
     "Records read again whose events had been accepted before (no new run) since the server started."),
)  # fmt: skip


def _quiet_client_logs() -> None:
    # aiokafka logs every failed reconnect at ERROR, several times a second while a broker is
    # away; the consumers log one line per state change instead. Left alone if configured.
    client = logging.getLogger("aiokafka")
    if client.level == logging.NOTSET:
        client.setLevel(logging.CRITICAL)
