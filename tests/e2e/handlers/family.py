"""Describes the process it runs in: ids, parent, folder, environment; imports data["module"] if asked."""

from __future__ import annotations

import importlib
import os
from typing import Any


def main_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Who and where this instance is."""
    data = event.get("data") or {}
    out: dict[str, Any] = {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "pgid": os.getpgrp(),
        "sid": os.getsid(0),
        "cwd": os.getcwd(),
        "greeting": os.environ.get("GREETING"),
        "tz": os.environ.get("TZ"),
    }
    if data.get("module"):
        out["module"] = importlib.import_module(data["module"]).VALUE
    print(f"family pid={os.getpid()}", flush=True)
    return out
