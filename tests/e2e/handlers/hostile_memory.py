"""Eats memory 16 MB at a time until it is stopped."""

from __future__ import annotations

import os
from typing import Any


def main_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Hold ever more memory; with data["upto"] (MB), stop there and report instead."""
    data = event.get("data") or {}
    print(f"hostile_memory pid={os.getpid()} memory_limit_in_mb={context.memory_limit_in_mb}", flush=True)
    upto = data.get("upto")
    hoard = []
    while upto is None or len(hoard) * 16 < upto:
        hoard.append(bytearray(16 * 1024 * 1024))  # zeroed, so touched: it is resident too
    return {"held_mb": len(hoard) * 16, "memory_limit_in_mb": context.memory_limit_in_mb, "pid": os.getpid()}
