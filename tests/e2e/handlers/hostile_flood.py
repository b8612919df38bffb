"""Floods its output: data["bytes"] bytes written to fd 1 in big chunks, as fast as it can."""

from __future__ import annotations

import os
import time
from typing import Any

CHUNK = 1024 * 1024


def main_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Write the flood, then say how long it took; data["shape"] picks the bytes.

    "lines": 1 MB lines; "endless": one line with no newline at all; "marked": like
    "endless", but starting with the byte eventrun's frames begin with.
    """
    data = event.get("data") or {}
    total = int(data["bytes"])
    shape = data.get("shape", "lines")
    chunk = memoryview(b"f" * (CHUNK - 1) + (b"\n" if shape == "lines" else b"f"))
    if shape == "marked":
        os.write(1, b"\x1e")
    started = time.monotonic()
    written = 0
    while written < total:
        written += os.write(1, chunk[: min(CHUNK, total - written)])
    return {"written": written, "seconds": round(time.monotonic() - started, 3)}
