"""The API's JSON shapes: JSON answers, the PascalCase records, and the one error table."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from typing import Any

from aiohttp import hdrs, web

from eventrun.engine.api import Invocation
from eventrun.engine.envelope import dumps, too_deep_to_serve
from eventrun.engine.errors import (
    EventrunError, FunctionNotFound, InvalidParameter, InvocationActive, InvocationEnded, InvocationNotFound,
    NodeNotAnswering, ShuttingDown, StoreError, Throttled,
)
from eventrun.engine.manifest import FunctionConfig
from eventrun.engine.worker import MAX_RESULT_NESTING

# The one place HTTP status codes are chosen for engine errors (looked up along the MRO).
ERROR_STATUS: dict[type[EventrunError], int] = {
    InvalidParameter: 400,
    FunctionNotFound: 404,
    InvocationNotFound: 404,
    InvocationEnded: 409,
    InvocationActive: 409,
    NodeNotAnswering: 409,
    Throttled: 429,
    ShuttingDown: 503,
    StoreError: 503,
}


# What a run's "Result" becomes in a document that could not be written with it: a result stored
# before results were held to MAX_RESULT_NESTING levels (see worker.py) and nested deeper.
UNSERVABLE_RESULT = {
    "Result": None,
    "ErrorType": "ResultNotSerializable",
    "ErrorMessage": f"the stored result nests deeper than {MAX_RESULT_NESTING} levels and cannot be returned",
}


SEND_TIME = 60.0
"""Seconds a large answer may take to reach its client, plus one for each SEND_RATE bytes of it."""
SEND_RATE = 64 * 1024
SEND_FREE = 64 * 1024
"""Bytes of an answer that are sent without a time limit (they fit in the connection's buffers)."""


class Answer(web.Response):
    """A Response that lets go of its body once written, or once the client has gone.

    A client that hangs up while a large answer waits to be sent (a sync call's 5 MB result, say)
    makes aiohttp's send fail with a ConnectionError whose traceback holds the frames that hold
    the body, and the future that holds the error is held by one of those frames: a cycle, which
    only a full collection frees, and eventrun's collector runs those rarely (see tune_collector).
    Each such client kept its answer's memory (40 clients of a 5 MB result: 196 MB more, for good).

    A client that reads a large answer slower than SEND_RATE a second (or not at all) past
    SEND_TIME is cut off, so that its answer is not held for as long as it keeps the connection.
    """

    _request: web.BaseRequest | None = None

    async def prepare(self, request: web.BaseRequest) -> Any:
        self._request = request
        return await super().prepare(request)

    async def write_eof(self, data: bytes = b"") -> None:
        size = self.content_length or 0
        try:
            if size <= SEND_FREE:
                await super().write_eof(data)
            else:
                async with asyncio.timeout(SEND_TIME + size / SEND_RATE):
                    await super().write_eof(data)
        except ConnectionError as exc:
            raise forgotten(exc) from None  # (the frames go, and the body with them)
        except TimeoutError as exc:
            forgotten(exc)
            transport = self._request.transport if self._request is not None else None
            if transport is not None:
                transport.abort()  # (closing would wait for the client to read what is buffered)
            raise ConnectionResetError(f"the client read less than {SEND_RATE} bytes a second") from None
        finally:
            self.body = None


def forgotten(exc: BaseException) -> BaseException:
    """`exc` without its traceback, nor those of the errors it was raised while handling."""
    seen: BaseException | None = exc
    while seen is not None:
        seen.with_traceback(None)
        seen = seen.__context__
    return exc


def json_response(value: Any, *, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    """A JSON answer encoded with eventrun's one JSON encoder."""
    return Answer(body=document_json(value), status=status, content_type="application/json", headers=headers)


def document_json(value: Any) -> bytes:
    """An answer's JSON (or a callback's): a run whose stored result nests too deep to be written
    in it has that result replaced (UNSERVABLE_RESULT), not the whole document refused."""
    try:
        return dumps(value)
    except TypeError:  # orjson's "Recursion limit reached" (anything else fails again below)
        return dumps(_servable(value))


def _servable(value: Any) -> Any:
    """`value` with every "Result" nested deeper than MAX_RESULT_NESTING levels replaced; a
    document's own containers are walked, never a result."""
    if isinstance(value, list):
        return [_servable(item) for item in value]
    if not isinstance(value, dict):
        return value
    servable = {key: item if key == "Result" else _servable(item) for key, item in value.items()}
    if "Result" in value and too_deep_to_serve(value["Result"]):
        servable.update(UNSERVABLE_RESULT)
    return servable


def error_response(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    """The one error shape: {"Error": {"Code", "Message"}}."""
    return json_response({"Error": {"Code": code, "Message": message}}, status=status, headers=headers)


def invocation_json(invocation: Invocation, *, result: bool = True) -> dict[str, Any]:
    """An invocation in the API's PascalCase shape; without `result`, it has no "Result" at all."""
    answer = {
        "RequestId": invocation.request_id,
        "FunctionName": invocation.function,
        "Trigger": invocation.trigger,
        "Status": invocation.status.value,
        "CreatedAt": invocation.created_at,
        "StartedAt": invocation.started_at,
        "EndedAt": invocation.ended_at,
        "DurationMs": invocation.duration_ms,
        "Result": invocation.result,
        "ErrorType": invocation.error_type,
        "ErrorMessage": invocation.error_message,
    }
    if not result:
        del answer["Result"]
    return answer


def function_json(name: str, config: FunctionConfig) -> dict[str, Any]:
    """A registry entry in the API's PascalCase shape (environment and callback stay private)."""
    triggers = []
    for trigger in config.triggers:
        # A timer's payload can be large and is the event data, not the trigger's shape.
        fields = trigger.model_dump(mode="json", exclude={"payload"})
        triggers.append({_pascal(key): value for key, value in fields.items()})
    return {
        "FunctionName": name,
        "AsyncExecution": config.async_execution,
        "Timeout": config.timeout,
        "Concurrency": config.concurrency,
        "QpsLimit": config.qps_limit,
        "Handler": config.handler,
        "Triggers": triggers,
    }


def _pascal(snake: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in snake.split("_"))


def map_error(exc: EventrunError) -> web.Response | None:
    """The answer ERROR_STATUS gives an engine error, or None when the table has no entry for it."""
    status = next((ERROR_STATUS[cls] for cls in type(exc).__mro__ if cls in ERROR_STATUS), None)
    if status is None:
        return None
    headers: dict[str, str] = {}
    if isinstance(exc, Throttled):
        headers[hdrs.RETRY_AFTER] = str(max(1, math.ceil(exc.retry_after)))
    return error_response(status, exc.code, str(exc), headers)
