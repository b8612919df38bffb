"""Sleeps, and handles SIGTERM itself: data["on_term"] "exit" cleans up and exits with 1, "return"
returns a partial result, "ignore" says so and sleeps on (until SIGKILL)."""

from __future__ import annotations

import signal
import sys
import time
from typing import Any


def main_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Sleep for data["seconds"], or until SIGTERM comes."""
    data = event["data"]
    stopped = False

    def on_term(signum: int, frame: Any) -> None:
        nonlocal stopped
        print("cleaning up", flush=True)
        if data["on_term"] == "exit":
            sys.exit(1)
        stopped = data["on_term"] != "ignore"

    signal.signal(signal.SIGTERM, on_term)
    print("cleanup start", flush=True)
    deadline = time.monotonic() + float(data["seconds"])
    while not stopped and time.monotonic() < deadline:
        time.sleep(0.05)
    return {"partial": stopped}
