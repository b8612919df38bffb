"""Waits data["wait"] seconds, prints data["lines"] numbered lines at once, a progress bar's
line (carriage returns), then after a pause its last line."""

from __future__ import annotations

import sys
import time
from typing import Any


def main_handler(event: dict[str, Any], context: Any) -> int:
    """Write a burst of lines faster than a follower takes them, then a tail."""
    data = event["data"]
    time.sleep(float(data["wait"]))
    lines = int(data["lines"])
    sys.stdout.write("".join(f"line {n}\n" for n in range(lines)))
    sys.stdout.write("progress 10%\rprogress 50%\n")
    sys.stdout.flush()
    time.sleep(1.0)
    print("tail", flush=True)
    return lines
