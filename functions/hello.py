"""The smallest eventrun function: greet whoever the event names."""

from __future__ import annotations

from typing import Any


def main_handler(event: dict[str, Any], context: Any) -> dict[str, str]:
    """Return a greeting for event["data"]["name"] (default "world")."""
    # event is the CloudEvents envelope; what the caller sent is in event["data"].
    data = event.get("data")
    name = data.get("name", "world") if isinstance(data, dict) else "world"
    # print() goes to this run's log: `eventrun logs REQUEST_ID` shows it.
    print(f"saying hello to {name} (request {context.request_id})")
    # The return value becomes the run's Result, so it must be JSON-serialisable.
    return {"greeting": f"hello {name}"}
