"""Returns a string of the requested size, and prints a long line without a newline break."""

from __future__ import annotations

from typing import Any


def main_handler(event: dict[str, Any], context: Any) -> str:
    """A result of data["size"] characters."""
    print("y" * 200_000)
    return "x" * int(event["data"]["size"])
