"""A run's log as Server-Sent Events: live lines, keepalive comments, and an end event."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from aiohttp import hdrs, web

from eventrun.engine.envelope import dumps
from eventrun.engine.errors import EventrunError

if TYPE_CHECKING:
    from eventrun.engine.core import Engine

logger = logging.getLogger(__name__)

_FIELD_ENDS = re.compile("\r\n|\r|\n")

SSE_KEEPALIVE = 15.0
"""Seconds of silence after which a log stream sends a comment line, so proxies keep it open."""


async def stream_logs(
    request: web.Request, engine: Engine, request_id: str, server_closing: asyncio.Event
) -> web.StreamResponse:
    """Follow the run's log until it ends (then send its status) or server_closing is set."""
    response = web.StreamResponse(
        headers={
            hdrs.CONTENT_TYPE: "text/event-stream",
            hdrs.CACHE_CONTROL: "no-cache",
            "X-Accel-Buffering": "no",  # nginx would otherwise hold events back
        }
    )
    await response.prepare(request)
    lines = await engine.follow_log(request_id)
    closing = asyncio.ensure_future(server_closing.wait())
    try:
        ended = await _pump(response, lines, closing)
        if ended:
            status = (await engine.get(request_id)).status.value
            end = dumps({"RequestId": request_id, "Status": status}).decode()
            await response.write(f"event: end\ndata: {end}\n\n".encode())
        await response.write_eof()
    except ConnectionResetError:
        logger.debug("log follower of %s went away", request_id)
    except Exception as exc:
        # Headers are out, so the middleware cannot answer any more; tell the client in-band:
        # an error of the API's (the store unavailable, say) as itself, any other as internal.
        if isinstance(exc, EventrunError):
            logger.warning("log stream of %s ended: %s", request_id, exc)
            error = dumps({"Error": {"Code": exc.code, "Message": str(exc)}})
        else:
            logger.exception("log stream of %s failed", request_id)
            error = dumps({"Error": {"Code": "InternalError", "Message": "internal error; see the server log"}})
        with contextlib.suppress(ConnectionResetError):
            await response.write(b"event: error\ndata: " + error + b"\n\n")
    finally:
        closing.cancel()
        aclose = getattr(lines, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except Exception:
                logger.exception("closing the log iterator of %s failed", request_id)
    return response


async def _pump(response: web.StreamResponse, lines: AsyncIterator[str], closing: asyncio.Future[Any]) -> bool:
    """Copy log lines to the stream; True once they ran out, False when the server is closing."""
    iterator = aiter(lines)
    pending: asyncio.Future[str] | None = None
    try:
        while True:
            # Waiting on a task rather than wait_for(anext()) keeps a keepalive from
            # cancelling (and so finalising) the log iterator.
            if pending is None:
                pending = asyncio.ensure_future(anext(iterator))
            done, _ = await asyncio.wait({pending, closing}, timeout=SSE_KEEPALIVE, return_when=asyncio.FIRST_COMPLETED)
            if pending in done:
                try:
                    line = pending.result()
                except StopAsyncIteration:
                    pending = None
                    return True
                pending = None
                # A field ends at a line feed or a carriage return (a progress bar's): each part
                # goes in a field of its own, and the client joins them with line feeds.
                fields = "".join(f"data: {part}\n" for part in _FIELD_ENDS.split(line))
                await response.write(f"{fields}\n".encode())
            elif closing in done:
                return False
            else:
                await response.write(b": keepalive\n\n")
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await pending
