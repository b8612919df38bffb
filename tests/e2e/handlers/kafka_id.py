"""Answers with the event's id and source at once, so tests can count records cheaply."""

from __future__ import annotations

from typing import Any


def main_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Return the record's id (and sleep data.value.sleep seconds first, if given)."""
    value = (event.get("data") or {}).get("value")
    if isinstance(value, dict) and value.get("sleep"):
        import time

        time.sleep(float(value["sleep"]))
    return {"id": event["id"], "source": event["source"]}
