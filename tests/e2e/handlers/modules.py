"""Tells which heavy modules its instance has loaded."""

from __future__ import annotations

import sys
from typing import Any


def main_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Whether asyncio is loaded in this instance."""
    return {"asyncio": "asyncio" in sys.modules}
