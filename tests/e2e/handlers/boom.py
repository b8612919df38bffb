"""Prints a line, then raises."""

from __future__ import annotations

import os
from typing import Any


def main_handler(event: dict[str, Any], context: Any) -> None:
    """Fail on purpose with a message naming this instance."""
    print("boom is about to fail", flush=True)
    raise ValueError(f"boom from pid {os.getpid()}")
