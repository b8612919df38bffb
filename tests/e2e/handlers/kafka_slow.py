"""Sleeps data.value.seconds (default 0.2 s), so records pile up behind a busy function."""

from __future__ import annotations

import time
from typing import Any


def main_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Sleep, then answer with the record's id."""
    value = (event.get("data") or {}).get("value")
    seconds = float(value.get("seconds", 0.2)) if isinstance(value, dict) else 0.2
    time.sleep(seconds)
    return {"id": event["id"]}
