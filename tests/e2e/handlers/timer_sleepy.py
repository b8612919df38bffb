"""Sleeps for data["seconds"] (default 3), then returns the slot it ran for."""

from __future__ import annotations

import time
from typing import Any


def main_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Take a while, so the next slots come while this run still goes."""
    data = event.get("data") or {}
    time.sleep(float(data.get("seconds", 3.0)))
    return {"id": event["id"]}
