"""Prints a lot: data["lines"] lines of 100 characters."""

from __future__ import annotations

import sys
from typing import Any


def main_handler(event: dict[str, Any], context: Any) -> int:
    """Write many lines fast, then report how many."""
    line = "z" * 99 + "\n"
    for _ in range(int(event["data"]["lines"])):
        sys.stdout.write(line)
    return int(event["data"]["lines"])
