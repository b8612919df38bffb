"""Timer example: runs on a cron schedule and reports the slot it was fired for.

    [functions.heartbeat]
    handler = "functions/heartbeat.py:main_handler"

    [[functions.heartbeat.triggers]]
    type = "timer"
    name = "every-minute"
    cron = "0 * * * * * *"        # SCF 7-field: second 0 of every minute
    payload = { note = "still here" }
"""

from __future__ import annotations

from typing import Any


def main_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Return the scheduled fire time and the trigger's configured payload."""
    # event["time"] is the scheduled slot, not the moment the process woke up, and
    # event["id"] is that slot too: a slot fires once even across restarts.
    print(f"heartbeat for {event['time']} from {event['source']}: {event.get('data')}")
    return {"scheduled": event["time"], "payload": event.get("data")}
