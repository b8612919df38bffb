"""The HTTP gateway: the invocation API over aiohttp, one error table, SSE log streaming."""

from __future__ import annotations

from .parser import to_envelope
from .responses import ERROR_STATUS, error_response, function_json, invocation_json, json_response
from .routes import ENGINE_KEY, build_app, error_middleware
from .trigger import HttpTrigger

__all__ = [
    "ENGINE_KEY",
    "ERROR_STATUS",
    "HttpTrigger",
    "build_app",
    "error_middleware",
    "error_response",
    "function_json",
    "invocation_json",
    "json_response",
    "to_envelope",
]
