"""The timer trigger: SCF-style cron with seconds, time zones, and no slot fired twice."""

from __future__ import annotations

from .parser import (
    EVENT_TYPE,
    last_slot,
    next_slot,
    parse_cron,
    parse_slot,
    parse_timezone,
    slot_id,
    to_envelope,
)
from .trigger import MISFIRE_GRACE, TimerEngine, TimerTrigger, manifest_problems

__all__ = [
    "EVENT_TYPE",
    "MISFIRE_GRACE",
    "TimerEngine",
    "TimerTrigger",
    "last_slot",
    "manifest_problems",
    "next_slot",
    "parse_cron",
    "parse_slot",
    "parse_timezone",
    "slot_id",
    "to_envelope",
]
