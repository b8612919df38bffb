"""A sync function's handler: returns the envelope it received."""

from __future__ import annotations

from typing import Any


def main_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Answer with the event itself."""
    return event
