"""Prints a timestamped line every 0.2 s for data["seconds"] (or only sleeps: data["quiet"])."""

from __future__ import annotations

import os
import time
from typing import Any


def main_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Tick for a while; the lines carry the wall time they were printed at."""
    data = event.get("data") or {}
    seconds = float(data.get("seconds", 1.0))
    print(f"sleepy start pid={os.getpid()}", flush=True)
    context.logger.info("logger line for %s", context.request_id)
    if data.get("quiet"):
        time.sleep(seconds)  # prints nothing more, so a closed output pipe goes unnoticed
        return {"ticks": 0, "pid": os.getpid()}
    deadline = time.monotonic() + seconds
    tick = 0
    while time.monotonic() < deadline:
        print(f"tick {tick} at {time.time():.3f}", flush=True)
        tick += 1
        time.sleep(0.2)
    print("sleepy done", flush=True)
    return {"ticks": tick, "pid": os.getpid()}
