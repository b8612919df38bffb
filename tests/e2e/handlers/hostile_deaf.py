"""Stops reading events: stops its whole process after a run, or blocks in one for ever."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any


def _stop_soon() -> None:
    time.sleep(0.3)
    os.kill(os.getpid(), signal.SIGSTOP)


def main_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """With data["stop"], leave a thread that stops this process just after the run ends (so
    it never reads the next event); with data["block"], sleep for an hour."""
    data = event.get("data") or {}
    if data.get("stop"):
        threading.Thread(target=_stop_soon, daemon=True).start()
    if data.get("block"):
        time.sleep(3600)
    return {"pid": os.getpid(), "size": len(str(data.get("padding", "")))}
