"""An `async def` handler."""

from __future__ import annotations

import asyncio
from typing import Any


async def main_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Await something, then echo the data with the context's names."""
    await asyncio.sleep(0.1)
    return {
        "async": True,
        "data": event["data"],
        "request_id": context.request_id,
        "function_name": context.function_name,
    }
