"""Returns (or raises) what data["kind"] names: results the worker encodes by eventrun's rules."""

from __future__ import annotations

import datetime
from typing import Any


def main_handler(event: dict[str, Any], context: Any) -> Any:
    """One result shape per kind."""
    kind = event["data"]["kind"]
    if kind == "datetime":
        return {"at": datetime.datetime(2026, 11, 30, 12, 0, 0, tzinfo=datetime.timezone.utc)}
    if kind == "int-keys":
        return {1: "one", 2: "two"}
    if kind == "nan":
        return [float("nan")]
    if kind == "big-int":
        return {"n": 2**64, "largest": 2**64 - 1}
    if kind == "object":
        return object()
    if kind == "raise":
        raise ValueError("n\u00e4chster Versuch \ud800 fehlgeschlagen")
    raise AssertionError(f"unknown kind {kind!r}")
