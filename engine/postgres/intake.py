"""Acceptance into the shared store, committed in groups.

Accepts that arrive while one statement is being committed wait and go together in the next:
one statement and one commit (one WAL flush) for all of them, as the SQLite store's writer
merges what is queued. Under load a statement carries dozens of HTTP events; alone, an event
goes at once. Should a merged statement fail, its accepts are done again one at a time, so
only the one at fault gets the error.

An event's id is kept as bytes (`bytea`): PostgreSQL text cannot hold a NUL character, and an
S3 object key, say, may decode to one.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Sequence

import asyncpg

from ..api import Accepted
from ..errors import StoreError
from ..writes import Batch, NewInvocation

logger = logging.getLogger(__name__)

Rows = Sequence[NewInvocation] | Batch

_INSERT_BATCH = (
    "INSERT INTO invocations (request_id, function, source, event_id, trigger, status, created_at, envelope)"
    " SELECT r::uuid, $1, $2, e, $3, 'QUEUED', $4, v FROM unnest($5::text[], $6::bytea[], $7::bytea[]) AS u(r, e, v)"
    " ON CONFLICT (function, source, event_id) DO NOTHING"
    " RETURNING request_id::text"
)
_INSERT_ROWS = (
    "INSERT INTO invocations (request_id, function, source, event_id, trigger, status, created_at, envelope)"
    " SELECT r::uuid, f, s, e, t, 'QUEUED', c, v"
    " FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], $5::text[], $6::text[], $7::bytea[])"
    " AS u(r, f, s, e, t, c, v)"
    " ON CONFLICT (function, source, event_id) DO NOTHING"
    " RETURNING request_id::text"
)
_KNOWN = (
    "SELECT i.request_id::text, i.function, i.source, i.event_id FROM invocations i"
    " JOIN unnest($1::text[], $2::text[], $3::bytea[]) AS u(f, s, e)"
    " ON i.function = u.f AND i.source = u.s AND i.event_id = u.e"
)


def event_key(event_id: str) -> bytes:
    """How an event's id is stored."""
    return event_id.encode("utf-8", "surrogatepass")


class Intake:
    """Records new invocations, merging the accepts that wait into one statement."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._waiting: list[tuple[Rows, asyncio.Future[list[Accepted]]]] = []
        self._committing: asyncio.Task[None] | None = None

    async def accept(self, rows: Rows) -> list[Accepted]:
        """Record the rows (with the accepts waiting beside them); each row's answer."""
        future: asyncio.Future[list[Accepted]] = asyncio.get_running_loop().create_future()
        self._waiting.append((rows, future))
        if self._committing is None or self._committing.done():
            self._committing = asyncio.get_running_loop().create_task(self._commit_waiting())
        return await future

    async def _commit_waiting(self) -> None:
        while self._waiting:
            taken, self._waiting = self._waiting, []
            try:
                answers = await commit(self._pool, [rows for rows, _ in taken])
            except Exception:
                if len(taken) > 1:
                    logger.warning("a merged accept of %d failed; committing them one at a time", len(taken))
                await self._one_by_one(taken)  # (a lone one tries once more, and gets the error)
                continue
            for (_, future), answer in zip(taken, answers):
                if not future.done():  # (its caller may have gone away)
                    future.set_result(answer)

    async def _one_by_one(self, taken: list[tuple[Rows, asyncio.Future[list[Accepted]]]]) -> None:
        for rows, future in taken:
            try:
                (answer,) = await commit(self._pool, [rows])
            except Exception as exc:
                if not future.done():
                    future.set_exception(exc)
            else:
                if not future.done():
                    future.set_result(answer)


async def commit(pool: asyncpg.Pool, ops: list[Rows]) -> list[list[Accepted]]:
    """Insert the rows of every op in one statement; each op's answers."""
    if len(ops) == 1 and ops[0].__class__ is Batch:
        batch: Batch = ops[0]  # type: ignore[assignment]
        request_ids = batch.request_ids
        event_ids = list(map(event_key, batch.event_ids))
        new = await pool.fetch(
            _INSERT_BATCH, batch.function, batch.source, batch.trigger, batch.created_at,
            request_ids, event_ids, [bytes(e) for e in batch.envelopes],
        )
        if len(new) == len(request_ids):
            return [[Accepted(request_id, True) for request_id in request_ids]]
        functions = [batch.function] * len(request_ids)
        sources = [batch.source] * len(request_ids)
    else:
        rows: list[Any] = [row for op in ops for row in op]
        columns = list(zip(*rows))
        request_ids, functions, sources = (list(c) for c in columns[:3])
        event_ids = list(map(event_key, columns[3]))
        new = await pool.fetch(
            _INSERT_ROWS, request_ids, functions, sources, event_ids,
            list(columns[4]), list(columns[5]), [bytes(e) for e in columns[6]],
        )
        if len(new) == len(request_ids):
            return _split(ops, [Accepted(request_id, True) for request_id in request_ids])
    # Some were known (redelivery, another node, or one event twice): each gets the RequestId kept.
    known = {
        (r["function"], r["source"], bytes(r["event_id"])): r["request_id"]
        for r in await pool.fetch(_KNOWN, functions, sources, event_ids)
    }
    answers = []
    for request_id, key in zip(request_ids, zip(functions, sources, event_ids)):
        kept = known.get(key)
        if kept is None:
            raise StoreError(f"event {key[2].decode(errors='replace')!r} of {key[1]} was neither recorded nor found")
        answers.append(Accepted(kept, kept == request_id))
    return _split(ops, answers)


def _split(ops: list[Rows], answers: list[Accepted]) -> list[list[Accepted]]:
    out = []
    start = 0
    for op in ops:
        out.append(answers[start : start + len(op)])
        start += len(op)
    return out
