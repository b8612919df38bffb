"""A function that always fails, to show a FAILED run and instance recycling."""

from __future__ import annotations

import os
from typing import Any


def main_handler(event: dict[str, Any], context: Any) -> None:
    """Print a line, then raise: the run ends FAILED with ErrorType "ValueError"."""
    # The process id shows recycling: after an exception eventrun discards this
    # instance, so the next run of `fail` prints a different pid.
    print(f"about to fail (request {context.request_id}, instance pid {os.getpid()})")
    data = event.get("data")
    reason = data.get("reason", "no reason given") if isinstance(data, dict) else "no reason given"
    # Failed async runs are never retried automatically; invoke again to try again.
    raise ValueError(f"this function always fails: {reason}")
