"""Kills its own instance the hard way: os.abort(), or a read through a null pointer."""

from __future__ import annotations

import ctypes
import os
from typing import Any


def main_handler(event: dict[str, Any], context: Any) -> None:
    """data["how"] is "abort" (SIGABRT) or "segv" (SIGSEGV)."""
    how = (event.get("data") or {}).get("how")
    print(f"hostile_crash {how} in pid {os.getpid()}", flush=True)
    if how == "abort":
        os.abort()
    ctypes.string_at(0)  # reads address 0: SIGSEGV
