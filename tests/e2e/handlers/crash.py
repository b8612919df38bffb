"""Kills its own instance without any cleanup."""

from __future__ import annotations

import os
from typing import Any


def main_handler(event: dict[str, Any], context: Any) -> None:
    """Exit the process with status 3, as a segfaulting extension would end it."""
    print("crash is about to exit", flush=True)
    os._exit(3)
