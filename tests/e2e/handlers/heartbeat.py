"""Returns a large result while a thread of its own prints as fast as it can (until 0.5 s later)."""

from __future__ import annotations

import threading
import time
from typing import Any


def main_handler(event: dict[str, Any], context: Any) -> dict[str, str]:
    """A result of data["size"] characters, reported while the thread still prints."""
    stop = threading.Event()

    def chatter() -> None:
        i = 0
        while not stop.is_set():
            print(f"heartbeat {i}")
            i += 1

    threading.Thread(target=chatter, daemon=True).start()
    time.sleep(0.05)
    threading.Timer(0.5, stop.set).start()
    return {"blob": "z" * int(event["data"]["size"])}
