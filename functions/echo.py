"""A sync function that echoes the event envelope back, to show what a handler receives."""

from __future__ import annotations

from typing import Any


async def main_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Return the payload and the CloudEvents attributes that identify this event."""
    # Handlers may be `async def`; eventrun awaits them inside the instance.
    context.logger.info("echoing event %s from %s", event["id"], event["source"])
    return {
        "id": event["id"],          # the Idempotency-Key header, or a fresh uuid
        "source": event["source"],  # /http/echo for the HTTP gateway
        "type": event["type"],      # eventrun.http.request
        "time": event["time"],
        "data": event.get("data"),  # the JSON body exactly as sent
    }
