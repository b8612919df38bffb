"""Returns the event it received, so tests can compare it with the record produced.

A long `value_base64` is answered by its length and SHA-256 instead, to keep results small.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

LONG = 16 * 1024


def main_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Answer with the whole envelope (long base64 values summarised)."""
    data = event.get("data")
    if isinstance(data, dict) and isinstance(data.get("value_base64"), str) and len(data["value_base64"]) > LONG:
        raw = base64.b64decode(data["value_base64"])
        data["value_base64"] = {"length": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    return {"event": event}
