"""Returns the whole event dict, as the handler received it."""

from __future__ import annotations

from typing import Any


def main_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Answer with the envelope and the RequestId the context carries."""
    return {"event": event, "request_id": context.request_id}
