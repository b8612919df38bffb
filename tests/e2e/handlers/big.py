"""Returns a string of the requested size, and prints long lines without a newline break."""

from __future__ import annotations

import sys
from typing import Any

MIXED = "é€𝄞" * 30_000  # 270,000 bytes of 2-, 3- and 4-byte characters


def main_handler(event: dict[str, Any], context: Any) -> str:
    """A result of data["size"] characters."""
    print("y" * 200_000)
    sys.stdout.flush()
    sys.stdout.buffer.write(MIXED.encode() + b"\n")  # UTF-8 whatever the locale
    sys.stdout.buffer.flush()
    return "x" * int(event["data"]["size"])
