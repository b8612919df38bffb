"""The store's write path: one thread commits what the event loop queues, many writes per commit.

Writes arrive as ops (accept these rows, mark this run RUNNING, record this end, or any other
piece of SQL). The writer thread takes whatever is queued, up to a limit, and commits it in one
transaction: one fsync for the lot. Consecutive ops of one kind become one statement, so a
batch of 2,000 Kafka records is two multi-row INSERTs, not 2,000 executions.

That matters beyond the statement count. The sqlite3 module lets go of the GIL only while
SQLite itself works, and takes it back after every statement (for executemany, after every
row). While the event loop is busy, each take-back can wait a whole switch interval (5 ms),
so a writer issuing many small statements crawls exactly when the server is loaded. A few
large statements keep the writer off the GIL nearly all the time.

Should a merged statement fail (it should not: conflicts on the dedupe key are expected and
handled), the transaction is rolled back and the same ops are done again one at a time, each
in a savepoint, so only the op at fault gets the error.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import sqlite3
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, NamedTuple, Sequence

from .api import Accepted

logger = logging.getLogger(__name__)

ROWS_PER_STATEMENT = 1000  # 7 parameters a row: well under SQLite's 32,766 variables


class NewInvocation(NamedTuple):
    """One envelope about to be recorded (fields in the INSERT's column order)."""

    request_id: str
    function: str
    source: str
    event_id: str
    trigger: str
    created_at: str
    envelope: bytes


class Ending(NamedTuple):
    """A run's terminal state, as `finish` records it."""

    request_id: str
    status: str
    ended_at: str
    result: bytes | None
    error_type: str | None
    error_message: str | None


Work = Callable[[sqlite3.Connection], Any]


@dataclass(slots=True)
class Op:
    """One queued write and the future of its outcome."""

    kind: str  # "accept" | "running" | "finish" | "sql"
    args: Any  # list[NewInvocation] | (request_id, started_at) | Ending | Work
    future: asyncio.Future[Any] = field(repr=False)


class Writer:
    """The writer thread and its queue."""

    def __init__(self, conn: sqlite3.Connection, *, batch_limit: int) -> None:
        self._conn = conn
        self._batch_limit = batch_limit
        self._ops: queue.SimpleQueue[Op | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="eventrun-store", daemon=True)
        self._thread.start()

    def submit(self, op: Op) -> None:
        """Queue one op; its future settles on the op's event loop once committed."""
        self._ops.put(op)

    def close(self) -> None:
        """Commit what is queued, then stop and close the connection."""
        self._ops.put(None)
        self._thread.join()

    def _loop(self) -> None:
        stop = False
        while not stop:
            first = self._ops.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < self._batch_limit:
                try:
                    op = self._ops.get_nowait()
                except queue.Empty:
                    break
                if op is None:
                    stop = True
                    break
                batch.append(op)
            _settle(batch, commit(self._conn, batch))
        self._conn.close()


def commit(conn: sqlite3.Connection, batch: Sequence[Op]) -> list[tuple[bool, Any]]:
    """Do the ops in one transaction; (True, result) or (False, exception) for each."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        outcomes: list[tuple[bool, Any]] = []
        for kind, ops in groups(batch):
            outcomes.extend((True, result) for result in _RUN[kind](conn, [op.args for op in ops]))
        conn.execute("COMMIT")
        return outcomes
    except Exception:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    return _commit_one_by_one(conn, batch)


def _commit_one_by_one(conn: sqlite3.Connection, batch: Sequence[Op]) -> list[tuple[bool, Any]]:
    outcomes: list[tuple[bool, Any]] = []
    try:
        conn.execute("BEGIN IMMEDIATE")
        for op in batch:
            conn.execute("SAVEPOINT op")
            try:
                (result,) = _RUN[op.kind](conn, [op.args])
                outcomes.append((True, result))
                conn.execute("RELEASE op")
            except Exception as exc:  # one bad op must not sink the batch
                conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
                outcomes.append((False, exc))
        conn.execute("COMMIT")
        return outcomes
    except Exception as exc:
        logger.exception("store commit failed")
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        return [(False, exc)] * len(batch)


def groups(batch: Sequence[Op]) -> Iterator[tuple[str, list[Op]]]:
    """Runs of consecutive ops of one kind, in queue order, each becoming one statement.

    A run's transitions split a group where a RequestId comes again (two ends of one run):
    one UPDATE cannot say which of two rows for the same run came first.
    """
    current: list[Op] = []
    seen: set[str] = set()
    for op in batch:
        kind = op.kind
        key = op.args[0] if kind in ("running", "finish") else None
        if current and (kind != current[0].kind or kind == "sql" or key in seen):
            yield current[0].kind, current
            current, seen = [], set()
        current.append(op)
        if key is not None:
            seen.add(key)
    if current:
        yield current[0].kind, current


# -- the statements ------------------------------------------------------------------------


def _accept(conn: sqlite3.Connection, ops: list[list[NewInvocation]]) -> list[list[Accepted]]:
    rows = [row for rows in ops for row in rows]
    before = conn.total_changes
    for chunk in _chunks(rows):
        conn.execute(_insert_sql(len(chunk)), list(itertools.chain.from_iterable(chunk)))
    if conn.total_changes - before == len(rows):
        answers = [Accepted(row.request_id, True) for row in rows]
    else:
        # Some were known (redelivery, or one event twice): each gets the RequestId it was given.
        answers = []
        for row in rows:
            (known,) = conn.execute(
                "SELECT request_id FROM invocations WHERE function = ? AND source = ? AND event_id = ?",
                (row.function, row.source, row.event_id),
            ).fetchone()
            answers.append(Accepted(known, known == row.request_id))
    out, start = [], 0
    for op_rows in ops:
        out.append(answers[start : start + len(op_rows)])
        start += len(op_rows)
    return out


def _running(conn: sqlite3.Connection, ops: list[tuple[str, str]]) -> list[bool]:
    changed: set[str] = set()
    for chunk in _chunks(ops):
        changed.update(
            rid for (rid,) in conn.execute(_running_sql(len(chunk)), list(itertools.chain.from_iterable(chunk)))
        )
    return [rid in changed for rid, _ in ops]


def _finish(conn: sqlite3.Connection, ops: list[Ending]) -> list[bool]:
    changed: set[str] = set()
    for chunk in _chunks(ops):
        changed.update(
            rid for (rid,) in conn.execute(_finish_sql(len(chunk)), list(itertools.chain.from_iterable(chunk)))
        )
    return [ending.request_id in changed for ending in ops]


def _sql(conn: sqlite3.Connection, ops: list[Work]) -> list[Any]:
    return [work(conn) for work in ops]


_RUN: dict[str, Callable[[sqlite3.Connection, list[Any]], list[Any]]] = {
    "accept": _accept,
    "running": _running,
    "finish": _finish,
    "sql": _sql,
}


def _chunks(items: Sequence[Any]) -> Iterator[Sequence[Any]]:
    """Slices of at most ROWS_PER_STATEMENT; a short rest is cut at a hundred, so few statement shapes recur."""
    start = 0
    while len(items) - start >= ROWS_PER_STATEMENT:
        yield items[start : start + ROWS_PER_STATEMENT]
        start += ROWS_PER_STATEMENT
    rest = len(items) - start
    if rest >= 100:
        yield items[start : start + rest - rest % 100]
        start += rest - rest % 100
    if start < len(items):
        yield items[start:]


_NEW_ROW = "(?, ?, ?, ?, ?, 'QUEUED', ?, ?)"


def _values(rows: int, row: str) -> str:
    return ",".join(itertools.repeat(row, rows))


# Statements are cached by their text (the connection's statement cache): one shape per size.
def _insert_sql(rows: int) -> str:
    return (
        "INSERT INTO invocations (request_id, function, source, event_id, trigger, status, created_at, envelope)"
        f" VALUES {_values(rows, _NEW_ROW)}"
        " ON CONFLICT (function, source, event_id) DO NOTHING"
    )


def _running_sql(rows: int) -> str:
    return (
        "UPDATE invocations SET status = 'RUNNING', started_at = v.column2"
        f" FROM (VALUES {_values(rows, '(?, ?)')}) AS v"
        " WHERE invocations.request_id = v.column1 AND invocations.status = 'QUEUED'"
        " RETURNING invocations.request_id"
    )


def _finish_sql(rows: int) -> str:
    return (
        "UPDATE invocations SET status = v.column2, ended_at = v.column3, result = v.column4,"
        " error_type = v.column5, error_message = v.column6,"
        " duration_ms = CASE WHEN invocations.started_at IS NULL THEN NULL ELSE"
        " CAST(ROUND((julianday(v.column3) - julianday(invocations.started_at)) * 86400000) AS INTEGER) END"
        f" FROM (VALUES {_values(rows, '(?, ?, ?, ?, ?, ?)')}) AS v"
        " WHERE invocations.request_id = v.column1 AND invocations.status IN ('QUEUED', 'RUNNING')"
        " RETURNING invocations.request_id"
    )


def _settle(batch: Sequence[Op], outcomes: Sequence[tuple[bool, Any]]) -> None:
    # One wake-up of each event loop per batch, not one per op.
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
    for op, (ok, value) in zip(batch, outcomes):
        by_loop.setdefault(op.future.get_loop(), []).append((op.future, ok, value))
    for loop, settled in by_loop.items():
        if not loop.is_closed():
            loop.call_soon_threadsafe(_settle_all, settled)


def _settle_all(settled: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for future, ok, value in settled:
        if future.done():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
