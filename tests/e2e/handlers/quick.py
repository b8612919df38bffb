"""Returns what it got, and which instance ran it."""

from __future__ import annotations

import os
from typing import Any


def main_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Echo the event data with this instance's pid."""
    print(f"quick ran in pid={os.getpid()}", flush=True)
    return {"data": event["data"], "pid": os.getpid()}
