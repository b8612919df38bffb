"""Returns the timer envelope it got, so tests can read the slot's id and time."""

from __future__ import annotations

from typing import Any


def main_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Answer with the whole event."""
    print(f"timer fired for slot {event['id']}", flush=True)
    return {"event": event}
