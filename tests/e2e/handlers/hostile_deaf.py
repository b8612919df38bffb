"""Stops reading events: stops its whole process after a run, or blocks in one for ever."""

from __future__ import annotations

import os
import signal
import time
from typing import Any


def _stop(signum: int, frame: Any) -> None:
    os.kill(os.getpid(), signal.SIGSTOP)


def main_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """With data["stop"], set a timer that stops this process just after the run ends (so it
    never reads the next event; a thread left running would get the instance discarded); with
    data["block"], sleep for an hour."""
    data = event.get("data") or {}
    if data.get("stop"):
        signal.signal(signal.SIGALRM, _stop)
        signal.setitimer(signal.ITIMER_REAL, 0.3)
    if data.get("block"):
        time.sleep(3600)
    return {"pid": os.getpid(), "size": len(str(data.get("padding", "")))}
