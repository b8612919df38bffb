"""Returns its instance's pid; raises instead when data says {"fail": true}."""

from __future__ import annotations

import os
from typing import Any


def main_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Name the instance that ran, or fail on demand."""
    data = event.get("data") or {}
    if data.get("fail"):
        raise ValueError(f"failing on demand in pid {os.getpid()}")
    return {"pid": os.getpid()}
