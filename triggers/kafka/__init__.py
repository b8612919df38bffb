"""The Kafka trigger: records of a topic become envelopes, accepted in batches, then committed."""

from __future__ import annotations

from .client import Settings
from .consumer import TopicConsumer
from .engine import KafkaEngine
from .parser import record_id, to_envelope, to_envelopes
from .trigger import KafkaTrigger, manifest_problems

__all__ = ["KafkaEngine", "KafkaTrigger", "manifest_problems", "Settings", "TopicConsumer", "record_id", "to_envelope", "to_envelopes"]
