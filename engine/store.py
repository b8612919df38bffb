"""The invocation store: SQLite (WAL) in data_dir; reads here, group commits in the writer process."""

from __future__ import annotations

import asyncio
import builtins
import fcntl
import functools
import logging
import os
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable, Collection, Concatenate, Mapping, ParamSpec, Protocol, Sequence, TypeVar

from .api import Accepted, Delivery, Invocation, Outbox, Status
from .envelope import dumps, expand, issue_after, request_seq, stored_template, template_key
from .errors import InvalidParameter, StoreError
from .metrics import StoreWrites
from .rows import (
    COLUMNS, COLUMNS_WITHOUT_RESULT, PAGE_BYTES, async_flag_flipped, counts as _counts, decode_cursor, encode_cursor,
    invocation, page_length,
)
from .writer import WriterProcess
from .writes import Batch, Ending, NewInvocation, Op, by_request_id, connect, refused, unopenable

__all__ = ["Batch", "InvocationStore", "NewInvocation", "SQLiteStore", "replay_event_id"]

logger = logging.getLogger(__name__)

_COLUMNS = f"{COLUMNS}, seq"
_ACTIVE = (Status.QUEUED.value, Status.RUNNING.value)
# A run's weight in a page of a list. length() of a BLOB reads the record's header, not the BLOB.
# Bytes, as PostgreSQL counts them (length() of TEXT counts characters; of a BLOB, bytes).
_SIZE_WITHOUT_RESULT = "coalesce(length(CAST(error_message AS BLOB)), 0)"
_SIZE = f"coalesce(length(result), 0) + {_SIZE_WITHOUT_RESULT}"


def replay_event_id(replay_of: str, key: str) -> str:
    """The event id of the replay of run `replay_of` made with Idempotency-Key `key` (its dedupe
    key: one such replay a run and key). A key may hold ':', so only the whole id names the pair."""
    return f"replay:{replay_of}:{key}"


class InvocationStore(Protocol):
    """What the engine needs of a store (SQLiteStore here, or postgres.PostgresStore)."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def register_functions(self, functions: Mapping[str, bool], now: str) -> None: ...
    async def keep_templates(self, templates: Collection[bytes]) -> None: ...
    async def accept(self, rows: Sequence[NewInvocation] | Batch) -> list[Accepted]: ...
    async def begin(self, request_id: str, started_at: str) -> bytes | None: ...
    async def mark_running(self, request_id: str, started_at: str) -> bool: ...
    async def finish(
        self,
        request_id: str,
        status: Status,
        ended_at: str,
        *,
        result: Any = None,
        error_type: str | None = None,
        error_message: str | None = None,
    ) -> bool: ...
    async def put_state(self, key: str, value: str) -> None: ...
    async def get_state(self, key: str) -> str | None: ...
    async def get(self, request_id: str) -> Invocation | None: ...
    async def envelope(self, request_id: str) -> bytes | None: ...
    async def list(
        self,
        *,
        function: str | None = None,
        status: Status | None = None,
        trigger: str | None = None,
        since: int | None = None,
        until: int | None = None,
        limit: int = 50,
        cursor: str | None = None,
        results: bool = True,
    ) -> tuple[builtins.list[Invocation], str | None]: ...
    async def count_active(self, function: str, source: str) -> int: ...
    async def find_event(self, function: str, source: str, event_id: str) -> str | None: ...
    async def counts(self) -> dict[str, dict[str, int]]: ...
    async def replay(self, row: NewInvocation, replay_of: str) -> str: ...
    async def replays_under(self, key: str, request_ids: Collection[str]) -> set[str]: ...
    async def links(self, request_id: str) -> tuple[str | None, builtins.list[str]]: ...
    async def prune(self, ended_before_ms: int) -> builtins.list[str]: ...
    async def set_destinations(self, destinations: Mapping[str, Sequence[tuple[str, str]]]) -> None: ...
    async def claim_deliveries(
        self, limit: int, lease: float, functions: Collection[str], *, strays_after: float = ..., busy: Collection[str] = ...
    ) -> builtins.list[Delivery]: ...
    async def settle_delivery(
        self, delivery_id: int, *, retry_in: float | None = None, error: str | None = None, give_up: bool = False
    ) -> None: ...
    async def release_deliveries(self) -> None: ...
    async def outbox(self) -> Outbox: ...
    async def next_delivery(self) -> float | None: ...


class Unstarted:
    """The envelopes of runs accepted here and not started yet, as stored, by RequestId.

    A run's start takes its envelope from here rather than reading it back from the store (a
    query on the event loop for every run, about a twentieth of the server's time per run under
    load). Bounded: at most `entries` envelopes of at most `size` bytes in all; past that, and
    after a restart, a start reads its envelope from the store.
    """

    def __init__(self, *, entries: int = 4096, size: int = 4 * 1024 * 1024) -> None:
        self._kept: dict[str, bytes] = {}
        self._entries = entries
        self._room = size

    def keep(self, rows: Sequence[NewInvocation] | Batch, answers: Sequence[Accepted]) -> None:
        """Keep the envelopes of the rows that became new runs (not those of known events)."""
        if rows.__class__ is Batch:
            kept = zip(rows.request_ids, rows.envelopes)  # type: ignore[union-attr]
        else:
            kept = ((row[0], row[6]) for row in rows)  # (a plain tuple in NewInvocation's order)
        for (request_id, stored), answer in zip(kept, answers):
            if len(self._kept) >= self._entries or len(stored) > self._room:
                return
            if answer.created:
                self._kept[request_id] = stored
                self._room -= len(stored)

    def take(self, request_id: str) -> bytes | None:
        """A run's envelope, no longer kept; None if it was not."""
        stored = self._kept.pop(request_id, None)
        if stored is not None:
            self._room += len(stored)
        return stored

    def __len__(self) -> int:
        return len(self._kept)


_P = ParamSpec("_P")
_T = TypeVar("_T")


def _read(
    method: Callable[Concatenate[SQLiteStore, _P], Awaitable[_T]],
) -> Callable[Concatenate[SQLiteStore, _P], Awaitable[_T]]:
    """A read of the store, whose refusal by SQLite (a damaged file, an I/O error) is a StoreError,
    as a refused write is: the store cannot serve now, eventrun is not at fault."""

    @functools.wraps(method)
    async def read(self: SQLiteStore, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return await method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            if not refused(exc):
                raise
            raise StoreError(f"the store {self.path} refused a read ({exc})") from exc

    return read


class SQLiteStore:
    """Durable invocations; every write is committed (and fsynced) before its await returns."""

    page_bytes = PAGE_BYTES  # what the results of one page of list() may hold (rows.PAGE_BYTES)

    def __init__(self, path: Path, *, batch_limit: int = 2000) -> None:
        self.path = path
        self._batch_limit = batch_limit
        self._writer: WriterProcess | None = None
        self._reader: sqlite3.Connection | None = None
        self._reader_renewals = 0  # the writer's renewals (WriterProcess.renewals) the reader has followed
        self._by_request_id = False  # a store made before runs were keyed by seq (writes.by_request_id)
        self._lock: HeldLock | None = None  # the store's data_dir, held
        self._templates: dict[bytes, bytes] = {}  # the templates of Templated envelopes, by key
        self._unstarted = Unstarted()
        self.writes = StoreWrites()  # whether commits go through now, and those refused (for /healthz, /metrics)

    # -- lifecycle -------------------------------------------------------------------------

    def open(self) -> None:
        """Lock the store, start the writer process (which creates the schema), open the reading connection."""
        self._lock = _lock(self.path)
        try:
            _refuse_a_restore_left_half_done(self.path.parent)
            create_private(self.path)
            self._writer = WriterProcess(self.path, batch_limit=self._batch_limit, writes=self.writes)
            self._open_reader()
        except BaseException:
            self.close()
            raise

    def _open_reader(self) -> None:
        # The writer opens a file whose first pages are whole; the first read of its runs finds
        # the damage further in.
        try:
            self._reader = connect(self.path, check_same_thread=False)
            self._by_request_id = by_request_id(self._reader)
            (last,) = self._reader.execute("SELECT max(seq) FROM invocations").fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the store {self.path}: {unopenable(self.path, exc)}") from exc
        issue_after(last or 0)  # new RequestIds, hence rows, come after every row the store holds

    async def start(self) -> None:
        """open(), as the engine calls it."""
        self.open()

    async def stop(self) -> None:
        """close(), as the engine calls it."""
        self.close()

    def close(self) -> None:
        """Finish queued writes, stop the writer process and close the reading connection."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    @property
    def writer_pid(self) -> int | None:
        """The process id of the writer process, while the store is open."""
        return self._writer.pid if self._writer is not None else None

    async def _submit(self, kind: str, args: Any) -> Any:
        return await self._send(kind, args)

    def _send(self, kind: str, args: Any) -> asyncio.Future[Any]:
        """Queue one write for the writer process; the future settles once it is committed."""
        writer = self._writer
        if writer is None:
            raise RuntimeError("store is not open")
        if not writer.alive:
            # It died (the error went to whatever was waiting on it); writes go on with a new one.
            writer.close()
            try:
                writer = self._writer = WriterProcess(self.path, batch_limit=self._batch_limit, writes=self.writes)
            except StoreError as exc:  # (the store cannot be opened again: the write is refused)
                self.writes.refused(str(exc))
                raise
            logger.warning("store writer restarted as process %s", writer.pid)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        writer.submit(Op(kind, args), future)
        return future

    # -- writes ----------------------------------------------------------------------------

    async def keep_templates(self, templates: Collection[bytes]) -> None:
        """Record the templates of Templated envelopes about to be accepted (each once)."""
        new = {key: template for template in templates if (key := template_key(template)) not in self._templates}
        if new:
            await self._submit("templates", list(new.items()))
            self._templates.update(new)

    async def accept(self, rows: Sequence[NewInvocation] | Batch) -> list[Accepted]:
        """Record new invocations; a known (function, source, id) gives back its RequestId."""
        answers: list[Accepted] = await self._submit("accept", rows)
        self._unstarted.keep(rows, answers)
        return answers

    async def mark_running(self, request_id: str, started_at: str) -> bool:
        """QUEUED -> RUNNING; False if the run is no longer queued."""
        return await self._submit("running", (request_id, started_at))  # type: ignore[no-any-return]

    async def begin(self, request_id: str, started_at: str) -> bytes | None:
        """QUEUED -> RUNNING, and the run's envelope; None if it is no longer queued (terminated)."""
        stored = self._unstarted.take(request_id)
        envelope = await self.envelope(request_id) if stored is None else self._expand(stored)
        if envelope is None or not await self.mark_running(request_id, started_at):
            return None
        return envelope

    async def finish(
        self,
        request_id: str,
        status: Status,
        ended_at: str,
        *,
        result: Any = None,
        error_type: str | None = None,
        error_message: str | None = None,
    ) -> bool:
        """Record a terminal state once; False if the run had already ended."""
        self._unstarted.take(request_id)  # (should it end without having started)
        blob = dumps(result) if result is not None else None
        ending = Ending(request_id, status.value, ended_at, blob, error_type, error_message)
        return await self._submit("finish", ending)  # type: ignore[no-any-return]

    # -- a sync call's record, written behind its run (see Engine.call) --------------------

    def accept_behind(self, rows: Batch) -> asyncio.Future[Any]:
        """accept(), without waiting: the future settles once committed."""
        return self._send("accept", rows)

    def start_behind(self, request_id: str, started_at: str) -> asyncio.Future[Any]:
        """mark_running(), without waiting: the future settles once committed."""
        return self._send("running", (request_id, started_at))

    def finish_behind(self, ending: Ending) -> asyncio.Future[Any]:
        """finish(), without waiting: the future settles (True, or False if it had ended) once committed."""
        return self._send("finish", ending)

    async def replay(self, row: NewInvocation, replay_of: str) -> str:
        """Record a new run replaying another (its row, and the link between the two) in one commit;
        the RequestId of the run its event id names (another's, if that replay was recorded first)."""
        return await self._submit("replay", (tuple(row), replay_of))  # type: ignore[no-any-return]

    async def prune(self, ended_before_ms: int) -> builtins.list[str]:
        """Delete up to writes.PRUNE_AT_ONCE runs that ended before this time (Unix ms); their RequestIds."""
        ended_before = datetime.fromtimestamp(ended_before_ms / 1000, timezone.utc).isoformat(timespec="milliseconds")
        pruned = await self._submit("prune", ((ended_before_ms + 1) << 12, ended_before.replace("+00:00", "Z")))
        return pruned  # type: ignore[no-any-return]

    # -- the outbox: deliveries owed for ended runs (written by the end's own commit) ------

    async def set_destinations(self, destinations: Mapping[str, Sequence[tuple[str, str]]]) -> None:
        """Where each function's runs go when they end, from now on: {function: [(kind, target)]}.

        A function not given (dropped from the manifest) keeps the destinations it had: what its
        runs' ends owe (a restart ends them FAILED) is held until a manifest has it again, or
        given up after a day, as with a shared store.
        """
        rows = [(function, kind, target) for function, pairs in destinations.items() for kind, target in pairs]
        await self._submit("destinations", (sorted(destinations), rows))

    async def claim_deliveries(
        self,
        limit: int,
        lease: float,
        functions: Collection[str],
        *,
        strays_after: float = 0.0,
        busy: Collection[str] = (),
    ) -> builtins.list[Delivery]:
        """Up to `limit` due deliveries, oldest first, held for this server for `lease` seconds;
        none to a `busy` target (one the deliverer has as many attempts under way to as it allows).

        This server is the store's only one: a delivery of a function not among `functions`
        (gone from its manifest) has no other server to go to, so it is claimed as soon as it is
        due, whatever `strays_after` (see PostgresStore.claim_deliveries)."""
        rows = await self._submit("outbox_claim", (_OWNER, _now_ms(), int(lease * 1000), limit, sorted(busy)))
        return [Delivery(*row) for row in rows]

    async def settle_delivery(
        self, delivery_id: int, *, retry_in: float | None = None, error: str | None = None, give_up: bool = False
    ) -> None:
        """Record an attempt: delivered (no retry_in, no give_up), to try again in `retry_in` s, or given up."""
        due_at = _now_ms() + int(retry_in * 1000) if retry_in is not None else None
        await self._submit("outbox_settle", (delivery_id, due_at, error, give_up))

    async def release_deliveries(self) -> None:
        """Make deliveries claimed before a stop (cut off mid-attempt) due at once."""
        await self._submit("outbox_release", _OWNER)

    @_read
    async def outbox(self) -> Outbox:
        """How many deliveries are pending and given up (when the next is due comes from
        next_delivery()): a pass over the whole outbox, so on a thread of its own with a
        connection of its own."""
        return Outbox(*await asyncio.to_thread(self._read_outbox))

    def _read_outbox(self) -> tuple[int, int]:
        conn = connect(self.path)
        try:
            return conn.execute(  # type: ignore[no-any-return]
                "SELECT count(*) FILTER (WHERE gave_up = 0), count(*) FILTER (WHERE gave_up = 1) FROM outbox"
            ).fetchone()
        finally:
            conn.close()

    @_read
    async def next_delivery(self) -> float | None:
        """Seconds until the next pending delivery is due (<= 0: due now), None if none is pending
        (the index of pending deliveries by due time: no pass over the outbox)."""
        (due_at,) = self._db.execute("SELECT min(due_at) FROM outbox WHERE gave_up = 0").fetchone()
        return None if due_at is None else (due_at - _now_ms()) / 1000

    @_read
    async def links(self, request_id: str) -> tuple[str | None, builtins.list[str]]:
        """The run a run replays (or None), and the runs that replay it, oldest first."""
        found = self._db.execute("SELECT replay_of FROM replays WHERE request_id = ?", (request_id,)).fetchone()
        replays = self._db.execute(
            "SELECT request_id FROM replays WHERE replay_of = ? ORDER BY request_id", (request_id,)
        ).fetchall()
        return (found[0] if found else None), [r for (r,) in replays]

    @_read
    async def replays_under(self, key: str, request_ids: Collection[str]) -> set[str]:
        """Those of these runs that are replays made with Idempotency-Key `key` (see replay_event_id)."""
        ids = list(request_ids)
        if not ids:
            return set()
        links = self._db.execute(
            f"SELECT request_id, replay_of FROM replays WHERE request_id IN ({', '.join('?' * len(ids))})", ids
        ).fetchall()
        return {
            request_id for request_id, replay_of in links
            if (found := self._find("event_id", request_id)) and found[0] == replay_event_id(replay_of, key)
        }

    async def register_functions(self, functions: Mapping[str, bool], now: str) -> None:
        """Record new functions' async flag; refuse a manifest that flips a recorded one."""
        flipped = await self._submit("register", (dict(functions), now))
        if flipped:
            raise async_flag_flipped(flipped)

    async def recover(self, now: str, message: str) -> list[str]:
        """End runs left RUNNING by a stopped server as FAILED; return their RequestIds."""
        return await self._submit("recover", (now, message))  # type: ignore[no-any-return]

    async def put_state(self, key: str, value: str) -> None:
        """Remember a small value (e.g. a trigger's last position)."""
        await self._submit("state", (key, value))

    # -- reads (on the caller's thread; WAL lets them run beside the writer) ----------------

    @property
    def _db(self) -> sqlite3.Connection:
        writer = self._writer
        if writer is None:
            raise RuntimeError("store is not open")
        if self._reader is None or writer.renewals != self._reader_renewals:
            self._renew_reader(writer.renewals)
        return self._reader  # type: ignore[return-value]

    def _renew_reader(self, renewals: int) -> None:
        """Open the reading connection again, as the writer opened the store again (its -wal or
        -shm file was removed): the old one would read the removed files, failing or stale."""
        if self._reader is not None:
            # Closed first: a connection opened beside it would share its (removed) -shm.
            self._reader.close()
            self._reader = None
        self._reader = connect(self.path, check_same_thread=False)  # (should it fail, the next read tries again)
        self._reader_renewals = renewals
        logger.warning("the store %s was opened again by its writer (see its log); so was its reading connection", self.path)

    @_read
    async def get_state(self, key: str) -> str | None:
        """A remembered value, or None."""
        row = self._db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    @_read
    async def get(self, request_id: str) -> Invocation | None:
        """One invocation, or None."""
        row = self._find(_COLUMNS, request_id)
        return invocation(row) if row else None

    @_read
    async def envelope(self, request_id: str) -> bytes | None:
        """The recorded envelope JSON of one invocation."""
        row = self._find("envelope", request_id)
        if not row:
            return None
        return self._expand(bytes(row[0]))

    def _expand(self, stored: bytes) -> bytes:
        """An envelope as the store keeps it, whole (see envelope.Templated)."""
        key = stored_template(stored)
        return stored if key is None else expand(stored, self._template(key))

    def _template(self, key: bytes) -> bytes:
        template = self._templates.get(key)
        if template is None:
            row = self._db.execute("SELECT template FROM templates WHERE key = ?", (key,)).fetchone()
            if row is None:
                raise StoreError(f"a stored envelope refers to a template the store does not hold ({key.hex()})")
            template = self._templates[key] = bytes(row[0])
        return template

    def _find(self, columns: str, request_id: str) -> tuple[Any, ...] | None:
        if self._by_request_id:
            return self._db.execute(  # type: ignore[no-any-return]
                f"SELECT {columns} FROM invocations WHERE request_id = ?", (request_id,)
            ).fetchone()
        seq = request_seq(request_id)
        if seq is None:
            return None  # not a RequestId this store gave out
        return self._db.execute(  # type: ignore[no-any-return]
            f"SELECT {columns} FROM invocations WHERE seq = ? AND request_id = ?", (seq, request_id)
        ).fetchone()

    @_read
    async def list(
        self,
        *,
        function: str | None = None,
        status: Status | None = None,
        trigger: str | None = None,
        since: int | None = None,
        until: int | None = None,
        limit: int = 50,
        cursor: str | None = None,
        results: bool = True,
    ) -> tuple[list[Invocation], str | None]:
        """Invocations newest first, and the cursor of the next page (None at the end).

        `since` and `until` (Unix milliseconds) bound when they were accepted, found through
        their RequestIds, which begin with that millisecond: the key itself, no other index.
        A page holds fewer than `limit` runs when their results would pass `page_bytes`.
        Without `results`, no result is read (each is None) nor counted against `page_bytes`.
        """
        where: list[str] = []
        args: list[Any] = []
        if function is not None:
            where.append("function = ?")
            args.append(function)
        if status is not None:
            where.append("status = ?")
            args.append(status.value)
        if trigger is not None:
            where.append("trigger = ?")
            args.append(trigger)
        if since is not None:
            where.append("seq >= ?")
            args.append(since << 12)  # (a RequestId's sequence number: its millisecond, then a 12-bit counter)
        if until is not None:
            where.append("seq < ?")
            args.append(until << 12)
        if cursor:
            where.append("seq < ?")
            args.append(_seq_cursor(cursor))
        where_sql = "".join(f" AND {term}" for term in where)
        weight, columns = (_SIZE, _COLUMNS) if results else (_SIZE_WITHOUT_RESULT, COLUMNS_WITHOUT_RESULT)
        db = self._db
        # Two reads of one snapshot: how much each run of the page holds (read from the rows'
        # headers, not their results), then the runs that go in, whole; those past the budget
        # are never read. (In the small case this costs less than a window sum in SQL.)
        db.execute("BEGIN")
        try:
            sizes = db.execute(
                f"SELECT seq, {weight} FROM invocations WHERE 1{where_sql} ORDER BY seq DESC LIMIT ?", (*args, limit + 1)
            ).fetchall()
            taken = page_length((size for _, size in sizes), limit, self.page_bytes)
            if not taken:
                return [], None
            first, last = sizes[0][0], sizes[taken - 1][0]
            rows = db.execute(
                f"SELECT {columns} FROM invocations WHERE seq <= ? AND seq >= ?{where_sql} ORDER BY seq DESC",
                (first, last, *args),
            )
            page = [invocation(row) for row in rows]  # (a row at a time)
        finally:
            db.execute("COMMIT")
        return page, encode_cursor("seq", last) if len(sizes) > taken else None

    @_read
    async def queued(self) -> builtins.list[tuple[str, str]]:  # (`list` is a method of this class)
        """(request_id, function) of every QUEUED run, oldest first."""
        return self._db.execute("SELECT request_id, function FROM invocations WHERE status = 'QUEUED' ORDER BY seq").fetchall()

    @_read
    async def counts(self) -> dict[str, dict[str, int]]:
        """How many runs each function has in each status: a pass over every run, so on a thread of
        its own with a connection of its own, while the event loop goes on."""
        return _counts(await asyncio.to_thread(self._count_all))

    def _count_all(self) -> builtins.list[tuple[str, str, int]]:
        conn = connect(self.path)
        try:
            return conn.execute("SELECT function, status, count(*) FROM invocations GROUP BY function, status").fetchall()
        finally:
            conn.close()

    @_read
    async def count_active(self, function: str, source: str) -> int:
        """How many runs of this function from this source are QUEUED or RUNNING (replays of its
        runs not counted: they are not the source's)."""
        (n,) = self._db.execute(
            "SELECT COUNT(*) FROM invocations i WHERE function = ? AND source = ? AND status IN (?, ?)"
            " AND NOT EXISTS (SELECT 1 FROM replays r WHERE r.request_id = i.request_id)",
            (function, source, *_ACTIVE),
        ).fetchone()
        return int(n)

    @_read
    async def find_event(self, function: str, source: str, event_id: str) -> str | None:
        """The RequestId the event (function, source, id) was accepted under, or None."""
        row = self._db.execute(
            "SELECT request_id FROM invocations WHERE function = ? AND source = ? AND event_id = ?",
            (function, source, event_id),
        ).fetchone()
        return row[0] if row else None


_OWNER = "local"  # who holds a claimed delivery: this server is the store's only one


def _now_ms() -> int:
    return int(time.time() * 1000)


RESTORING = ".eventrun-restore"
"""The folder in the data_dir a restore fills with the logs before it moves them into place."""

RESTORED_STORE = ".restore.db"
"""A restore's work copy of the store, in the data_dir: a name as long as STORE_FILE's, so a
restore opens every data_dir a server opens, and no other (SQLite's path limit)."""


def _refuse_a_restore_left_half_done(data_dir: Path) -> None:
    """StoreError if a restore into `data_dir` was killed before it ended: a server started there
    would serve an empty store beside the logs it had moved in, and it could not be run again."""
    for name in (RESTORING, RESTORED_STORE):
        if os.path.lexists(data_dir / name):
            raise StoreError(
                f"a restore into the data_dir {data_dir} was stopped before it ended ({data_dir / name} is there):"
                " run the same `eventrun restore FOLDER` again, which removes what it left and ends it"
            )


def _lock(path: Path) -> HeldLock:
    """Hold the store's folder for this process: one server at a time runs the store's runs.

    A second server on the same data_dir would take the first one's RUNNING runs for left over
    and start its QUEUED ones a second time. The lock goes with the process, however it ends.
    """
    return hold_lock(path.with_name(f"{path.name}.lock"), f"the store {path}")


class HeldLock:
    """A data_dir held by this process until release(): the folder's own lock and its lock file's."""

    def __init__(self) -> None:
        self._fds: list[int] = []

    def hold(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    def release(self) -> None:
        """Let go of the data_dir (closing the descriptors lets go of their locks)."""
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def hold_lock(lock_path: Path, what: str, by: str = "") -> HeldLock:
    """Hold the folder of `lock_path` for this process, and `lock_path`, writing the process's id
    in it (and on a second line `by`, what holds it if not a server: "eventrun restore"); StoreError
    naming the holder if another holds either, or naming the path if it cannot be held.

    The folder's own lock (flock on the folder) cannot be taken away by removing a file, as a
    lock file left over from a stop may invite; the lock file's is the one eventrun took before
    (up to 2026-12-06), so that an older server and a newer one on one data_dir (an upgrade
    while the old one drains) keep each other out as well.
    """
    folder = lock_path.parent
    held = HeldLock()
    try:
        folder.mkdir(mode=PRIVATE_FOLDER, parents=True, exist_ok=True)
        _take(held.hold(_open(folder, os.O_RDONLY | os.O_DIRECTORY, what)), what, lock_path)
        lock_file = held.hold(_open(lock_path, os.O_RDWR | os.O_CREAT, what))
        _take(lock_file, what, lock_path)
        holder = f"{os.getpid()}\n{by}\n".encode() if by else f"{os.getpid()}\n".encode()
        os.pwrite(lock_file, holder, 0)
        os.ftruncate(lock_file, len(holder))
    except OSError as exc:
        held.release()
        raise _unlockable(what, lock_path, exc) from exc
    except BaseException:
        held.release()
        raise
    _warn_if_open_to_others(folder)
    return held


STORE_FILE = "eventrun.db"
"""The SQLite store's file in the data_dir."""

PRIVATE_FOLDER = 0o700
PRIVATE_FILE = 0o600
"""The modes of the data_dir eventrun makes and of the files it makes in it (its store, its runs'
logs): they hold every event, result and log, for its user alone."""


def _warn_if_open_to_others(folder: Path) -> None:
    """Say so if other users of the machine can read or enter the data_dir (one made before, or by
    someone else): eventrun does not change the modes of a folder it did not make."""
    try:
        mode = folder.stat().st_mode & 0o777
    except OSError:
        return
    if mode & 0o005:
        logger.warning(
            "the data_dir %s can be read by other users of this machine (mode %03o), and it holds every event, result "
            "and log: `chmod 700 %s` keeps them out", folder, mode, folder,
        )


def create_private(path: Path) -> None:
    """Make the file `path` for this user alone if it is not there (SQLite gives the -wal and -shm
    files it makes beside a database the database file's mode). If it cannot be made, SQLite's
    own opening says why."""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE))
    except OSError:
        pass


def _open(path: Path, flags: int, what: str) -> int:
    try:
        return os.open(path, flags, PRIVATE_FILE)
    except OSError as exc:
        raise _unlockable(what, path, exc) from exc


def _take(fd: int, what: str, lock_path: Path) -> None:
    """Lock `fd` for this process; StoreError naming the holder (as `lock_path` has it) if another has it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        process, by = _holder(lock_path)
        if by:
            raise StoreError(f"{what} is in use by {by}{process}: wait for it to end") from None
        raise StoreError(
            f"{what} is in use by another eventrun server{process}; "
            "give this one a data_dir of its own, or stop the other"
        ) from None


_HOLDERS = frozenset({"eventrun restore"})
"""What hold_lock's `by` names, besides a server: what a lock file is believed to say."""


def _holder(lock_path: Path) -> tuple[str, str]:
    """(' (process N)', what holds it if not a server) as `lock_path` names the holder; blanks if it does not."""
    try:
        lines = lock_path.read_text(errors="replace").split("\n")
    except OSError:
        return "", ""
    process = lines[0].strip()
    by = lines[1].strip() if len(lines) > 1 else ""
    return (f" (process {process})" if process.isdigit() else ""), (by if by in _HOLDERS else "")


def _unlockable(what: str, path: Path, exc: OSError) -> StoreError:
    """One line: what could not be held, the path at fault and why (a read-only file system, a full disk)."""
    return StoreError(f"cannot lock {what} ({exc.filename or path}: {exc.strerror or exc})")


def _seq_cursor(cursor: str) -> int:
    value = decode_cursor(cursor, "seq")
    # A run's row number: ASCII digits, within SQLite's 64-bit integers.
    if not (value.isascii() and value.isdigit() and int(value) < 1 << 63):
        raise InvalidParameter(f"cursor {cursor!r} is not a cursor this server gave out")
    return int(value)
