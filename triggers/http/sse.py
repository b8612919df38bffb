"""A run's log as Server-Sent Events: live lines, keepalive comments, and an end event."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from aiohttp import hdrs, web

from eventrun.engine.api import Invocation, Status
from eventrun.engine.envelope import dumps
from eventrun.engine.errors import EventrunError, InvocationNotFound
from eventrun.engine.failures import FailureLog
from eventrun.engine.logs import LeftOut, closing_status

if TYPE_CHECKING:
    from eventrun.engine.core import Engine

logger = logging.getLogger(__name__)

_FIELD_ENDS = re.compile("\r\n|\r|\n")

SSE_KEEPALIVE = 15.0
"""Seconds of silence after which a log stream sends a comment line, so proxies keep it open."""

SSE_BATCH = 64 * 1024
"""Characters of events sent to a follower in one write at most: the lines that wait for it go together."""

SSE_STALL = 60.0
"""Seconds a write may wait for a follower to read; past them it is let go (its connection closed),
so a follower that stops reading holds its buffers no longer than that."""


_ENDED_SO = FailureLog(logger, every=60.0, level=logging.WARNING, counted="log streams ended so")
"""(Many followers at once fail alike: the store gone, no descriptor left.)"""


class _Stalled(Exception):
    """The follower read nothing for SSE_STALL seconds."""


async def stream_logs(
    request: web.Request, engine: Engine, invocation: Invocation, server_closing: asyncio.Event, *, tail: int | None = None
) -> web.StreamResponse:
    """Follow the run's log until it ends (then send its status) or server_closing is set.

    `invocation`: the run as it was when the follow began. `tail`: of the log so far, send only
    about its last `tail` bytes, after an `event: skipped` saying how many bytes come before them.
    """
    request_id = invocation.request_id
    lines = await engine.follow_log(request_id, tail=tail)  # (a run gone meanwhile is a 404 still: no header is out)
    response = web.StreamResponse(
        headers={
            hdrs.CONTENT_TYPE: "text/event-stream",
            hdrs.CACHE_CONTROL: "no-store",  # (as every answer: see routes._private)
            "X-Accel-Buffering": "no",  # nginx would otherwise hold events back
        }
    )
    await response.prepare(request)
    closing = asyncio.ensure_future(server_closing.wait())
    waiting = _Waiting()
    try:
        if await _pump(response, lines, waiting, closing):
            status = await _end_status(engine, invocation, waiting.last)
            end = dumps({"RequestId": request_id, "Status": status}).decode()
            await _send(response, f"event: end\ndata: {end}\n\n".encode())
        await response.write_eof()
    except ConnectionResetError:
        logger.debug("log follower of %s went away", request_id)
    except _Stalled:
        logger.info("log follower of %s read nothing for %g s: its connection is closed", request_id, SSE_STALL)
        if request.transport is not None:
            request.transport.abort()
    except Exception as exc:
        # Headers are out, so the middleware cannot answer any more; tell the client in-band:
        # an error of the API's (the store unavailable, say) as itself, any other as internal.
        if isinstance(exc, EventrunError):
            _ENDED_SO.log("log stream of %s ended: %s", request_id, exc)
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


async def _end_status(engine: Engine, started: Invocation, last_line: str) -> str:
    """The status the run ended with: as it was when the follow began, if it had ended then, else
    as the store has it now. Should retention have deleted the run since (its follower took
    longer than the retention), the one its closing line names (eventrun writes one for every
    end but FINISHED's)."""
    if started.status.ended:
        return started.status.value
    try:
        return (await engine.get(started.request_id)).status.value
    except InvocationNotFound:
        return closing_status(last_line) or Status.FINISHED.value


class _Waiting:
    """Events read from a run's log that its follower has not been sent yet; where the writer
    waits for them, and the reader for room (see _pump)."""

    __slots__ = ("events", "size", "last", "_loop", "_arrived", "_taken")

    def __init__(self) -> None:
        self.events: list[str] = []
        self.size = 0  # their characters
        self.last = ""  # the last line read, once the log has run out
        self._loop = asyncio.get_running_loop()
        self._arrived: asyncio.Future[bool] | None = None  # the writer's, while it waits
        self._taken: asyncio.Future[bool] | None = None  # the reader's, while SSE_BATCH wait

    def add(self, event: str) -> None:
        """One more event to send."""
        self.events.append(event)
        self.size += len(event)
        self.wake()

    def take(self) -> bytes:
        """Every event waiting, as the bytes of one write."""
        data = "".join(self.events).encode()
        self.events, self.size = [], 0
        _settle(self._taken, True)
        return data

    def wake(self, *_: object) -> None:
        """Wake the writer: an event came, the reader ended, or the server closes."""
        _settle(self._arrived, True)

    async def arrival(self, timeout: float) -> bool:
        """Until wake(); False if `timeout` seconds pass first."""
        self._arrived = arrived = self._loop.create_future()
        timer = self._loop.call_later(timeout, _settle, arrived, False)
        try:
            return await arrived
        finally:
            timer.cancel()

    async def room(self) -> None:
        """Until the writer has taken what waits."""
        self._taken = self._loop.create_future()
        await self._taken


def _settle(future: asyncio.Future[bool] | None, value: bool) -> None:
    if future is not None and not future.done():
        future.set_result(value)


async def _pump(
    response: web.StreamResponse, lines: AsyncIterator[str], waiting: _Waiting, closing: asyncio.Future[Any]
) -> bool:
    """Copy log lines to the stream; True once they ran out, False when the server is closing.

    The lines are read by a task of their own, so the writer sends whatever came while it
    wrote in one write: one send per batch of lines rather than per line, however many.
    """
    reader = asyncio.get_running_loop().create_task(_read(lines, waiting))
    reader.add_done_callback(waiting.wake)
    closing.add_done_callback(waiting.wake)
    try:
        while True:
            if waiting.events:
                await _send(response, waiting.take())
            elif reader.done():
                reader.result()  # (what the log raised, after the lines before it)
                return True
            elif closing.done():
                return False
            elif not await waiting.arrival(SSE_KEEPALIVE):
                await _send(response, b": keepalive\n\n")
    finally:
        closing.remove_done_callback(waiting.wake)
        reader.cancel()  # (nothing, once it is done)
        with contextlib.suppress(asyncio.CancelledError, Exception):  # (what it raised is told above, if anywhere)
            await reader


async def _send(response: web.StreamResponse, data: bytes) -> None:
    """Write to the follower; _Stalled if it has not read for SSE_STALL seconds."""
    try:
        async with asyncio.timeout(SSE_STALL):
            await response.write(data)
    except TimeoutError:
        raise _Stalled from None


async def _read(lines: AsyncIterator[str | LeftOut], waiting: _Waiting) -> None:
    """Turn log lines into events as they come, until they run out; while SSE_BATCH characters
    wait, wait for the writer (a follower that falls behind is the log's to handle, see LogHub)."""
    last = ""
    async for line in lines:
        if isinstance(line, LeftOut):
            waiting.add(f"event: skipped\ndata: {dumps({'Bytes': line.size}).decode()}\n\n")
            continue
        waiting.add(_event(line))
        last = line
        if waiting.size >= SSE_BATCH:
            await waiting.room()
    waiting.last = last


def _event(line: str) -> str:
    """A log line as an event. A field ends at a line feed or a carriage return (a progress bar's):
    each part goes in a field of its own, and the client joins them with line feeds."""
    if "\r" not in line and "\n" not in line:
        return f"data: {line}\n\n"
    return "".join(f"data: {part}\n" for part in _FIELD_ENDS.split(line)) + "\n"
