"""Opens /dev/null until no file descriptor is left, and returns holding them all."""

from __future__ import annotations

import os
import resource
from typing import Any

LIMIT = 1024  # the soft limit it lowers its instance's to first, so as not to open tens of thousands


def main_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """data["hold"]: hold every descriptor as it returns; else open none."""
    data = event.get("data") or {}
    opened = 0
    if data.get("hold"):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, LIMIT), hard))
        try:
            while True:
                os.open(os.devnull, os.O_RDONLY)
                opened += 1
        except OSError:
            pass
    return {"pid": os.getpid(), "opened": opened}
