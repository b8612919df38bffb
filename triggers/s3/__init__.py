"""The s3 trigger: MinIO webhook (POST /triggers/s3) and S3 -> SQS, turned into envelopes."""

from __future__ import annotations

from .parser import (
    BadNotification,
    S3Event,
    decode_key,
    event_matches,
    matches,
    normalise_event_name,
    parse_body,
    parse_record,
    records_from_body,
    to_envelope,
    to_envelopes,
)
from .trigger import S3Trigger
from .webhook import PATH, check_authorization

__all__ = [
    "PATH",
    "BadNotification",
    "S3Event",
    "S3Trigger",
    "check_authorization",
    "decode_key",
    "event_matches",
    "matches",
    "normalise_event_name",
    "parse_body",
    "parse_record",
    "records_from_body",
    "to_envelope",
    "to_envelopes",
]
