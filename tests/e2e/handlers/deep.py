"""Returns a value nested data["levels"] deep: lists (as JSON "[[...]]"), dicts, or tuples."""

from __future__ import annotations

from typing import Any


def main_handler(event: dict[str, Any], context: Any) -> Any:
    """data: {"levels": n, "kind": "list" | "dict" | "tuple"}; levels 0 is a plain number."""
    data = event["data"]
    kind = data.get("kind", "list")
    value: Any = 7
    for _ in range(data["levels"]):
        value = {"a": value} if kind == "dict" else (value,) if kind == "tuple" else [value]
    return value
