"""Tells which modules its instance had loaded when the handler was called."""

from __future__ import annotations

import sys
from typing import Any

WATCHED = ("asyncio", "orjson", "logging", "inspect", "dataclasses", "eventrun")


def main_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """For each watched module, whether it is loaded in this instance."""
    return {name: name in sys.modules for name in WATCHED}
