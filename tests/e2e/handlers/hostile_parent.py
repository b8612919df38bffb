"""Kills its instance's parent (the spawner) with SIGKILL, then sleeps."""

from __future__ import annotations

import os
import signal
import time
from typing import Any


def main_handler(event: dict[str, Any], context: Any) -> None:
    """Name the parent in the log, kill it, and wait to be ended with it."""
    parent = os.getppid()
    print(f"hostile_parent kills {parent} from pid {os.getpid()}", flush=True)
    os.kill(parent, signal.SIGKILL)
    time.sleep(3600)
