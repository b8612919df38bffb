"""The invocation store: SQLite (WAL) in data_dir, with group commits on one writer thread."""

from __future__ import annotations

import asyncio
import base64
import logging
import sqlite3
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence, TypeVar

from .api import Accepted, Invocation, Status
from .envelope import dumps, loads
from .errors import InvalidParameter, ManifestError
from .writes import Ending, NewInvocation, Op, Writer

__all__ = ["InvocationStore", "NewInvocation", "SQLiteStore"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS functions (
    name TEXT PRIMARY KEY,
    async_execution INTEGER NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS invocations (
    seq INTEGER PRIMARY KEY,  -- the rowid: ascending, as rows are never deleted
    request_id TEXT NOT NULL UNIQUE,
    function TEXT NOT NULL,
    source TEXT NOT NULL,
    event_id TEXT NOT NULL,
    trigger TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at TEXT NOT NULL,
    started_at TEXT,
    ended_at TEXT,
    duration_ms INTEGER,
    result BLOB,
    error_type TEXT,
    error_message TEXT,
    envelope BLOB NOT NULL,
    UNIQUE (function, source, event_id)
);
CREATE INDEX IF NOT EXISTS invocations_by_function ON invocations (function, seq);
CREATE INDEX IF NOT EXISTS invocations_by_status ON invocations (status, seq);
CREATE TABLE IF NOT EXISTS state (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

_COLUMNS = (
    "request_id, function, trigger, status, created_at, started_at, ended_at, "
    "duration_ms, result, error_type, error_message, seq"
)
_ACTIVE = (Status.QUEUED.value, Status.RUNNING.value)


class InvocationStore(Protocol):
    """What the engine needs of a store."""

    async def accept(self, rows: Sequence[NewInvocation]) -> list[Accepted]: ...
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
    def get(self, request_id: str) -> Invocation | None: ...
    def envelope(self, request_id: str) -> bytes | None: ...


class SQLiteStore:
    """Durable invocations; every write is committed (and fsynced) before its await returns."""

    def __init__(self, path: Path, *, batch_limit: int = 2000) -> None:
        self.path = path
        self._batch_limit = batch_limit
        self._writer: Writer | None = None
        self._reader: sqlite3.Connection | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def open(self) -> None:
        """Create the schema and start the writer thread."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        writer = self._connect()
        writer.executescript(_SCHEMA)
        self._reader = self._connect()
        self._writer = Writer(writer, batch_limit=self._batch_limit)

    def close(self) -> None:
        """Finish queued writes and close the connections."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def _connect(self) -> sqlite3.Connection:
        # The writer's multi-row statements come in a few dozen sizes; keep them all prepared.
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=30, cached_statements=512
        )
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: each commit is fsynced, so an acknowledged event survives a power cut too.
        # Group commits keep that to one fsync per batch rather than one per request.
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    async def _submit(self, kind: str, args: Any) -> Any:
        if self._writer is None:
            raise RuntimeError("store is not open")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._writer.submit(Op(kind, args, future))
        return await future

    async def _write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run a piece of SQL in the writer's next transaction."""
        return await self._submit("sql", work)  # type: ignore[no-any-return]

    # -- writes ----------------------------------------------------------------------------

    async def accept(self, rows: Sequence[NewInvocation]) -> list[Accepted]:
        """Record new invocations; a known (function, source, id) gives back its RequestId."""
        return await self._submit("accept", rows)  # type: ignore[no-any-return]

    async def mark_running(self, request_id: str, started_at: str) -> bool:
        """QUEUED -> RUNNING; False if the run is no longer queued."""
        return await self._submit("running", (request_id, started_at))  # type: ignore[no-any-return]

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
        blob = dumps(result) if result is not None else None
        ending = Ending(request_id, status.value, ended_at, blob, error_type, error_message)
        return await self._submit("finish", ending)  # type: ignore[no-any-return]

    async def register_functions(self, functions: Mapping[str, bool], now: str) -> None:
        """Record new functions' async flag; refuse a manifest that flips a recorded one."""

        def work(conn: sqlite3.Connection) -> list[tuple[str, bool]]:
            recorded = dict(conn.execute("SELECT name, async_execution FROM functions").fetchall())
            flipped = [(n, bool(recorded[n])) for n, a in functions.items() if n in recorded and bool(recorded[n]) != a]
            if not flipped:
                conn.executemany(
                    "INSERT OR IGNORE INTO functions (name, async_execution, created_at) VALUES (?, ?, ?)",
                    [(n, int(a), now) for n, a in functions.items()],
                )
            return flipped

        flipped = await self._write(work)
        if flipped:
            raise ManifestError(
                "\n".join(
                    f"functions.{name}.async_execution: function {name!r} was created with "
                    f"async_execution = {str(was).lower()} and that can never change; "
                    f"deploy it under a new name (e.g. '{name}-{'sync' if was else 'async'}') instead"
                    for name, was in flipped
                )
            )

    async def recover(self, now: str, message: str) -> list[str]:
        """End runs left RUNNING by a stopped server as FAILED; return their RequestIds."""

        def work(conn: sqlite3.Connection) -> list[str]:
            ids = [r for (r,) in conn.execute("SELECT request_id FROM invocations WHERE status = 'RUNNING'")]
            conn.execute(
                "UPDATE invocations SET status = 'FAILED', ended_at = ?, error_type = 'ServerStopped',"
                " error_message = ?, duration_ms = CAST(ROUND((julianday(?) - julianday(started_at)) * 86400000)"
                " AS INTEGER) WHERE status = 'RUNNING'",
                (now, message, now),
            )
            return ids

        return await self._write(work)

    async def put_state(self, key: str, value: str) -> None:
        """Remember a small value (e.g. a trigger's last position)."""

        def work(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO state (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

        await self._write(work)

    # -- reads (on the caller's thread; WAL lets them run beside the writer) ----------------

    @property
    def _db(self) -> sqlite3.Connection:
        if self._reader is None:
            raise RuntimeError("store is not open")
        return self._reader

    def get_state(self, key: str) -> str | None:
        """A remembered value, or None."""
        row = self._db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def get(self, request_id: str) -> Invocation | None:
        """One invocation, or None."""
        row = self._db.execute(f"SELECT {_COLUMNS} FROM invocations WHERE request_id = ?", (request_id,)).fetchone()
        return _invocation(row) if row else None

    def envelope(self, request_id: str) -> bytes | None:
        """The recorded envelope JSON of one invocation."""
        row = self._db.execute("SELECT envelope FROM invocations WHERE request_id = ?", (request_id,)).fetchone()
        return bytes(row[0]) if row else None

    def list(
        self,
        *,
        function: str | None = None,
        status: Status | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[Invocation], str | None]:
        """Invocations newest first, and the cursor of the next page (None at the end)."""
        where, args = [], []
        if function is not None:
            where.append("function = ?")
            args.append(function)
        if status is not None:
            where.append("status = ?")
            args.append(status.value)
        if cursor:
            where.append("seq < ?")
            args.append(_decode_cursor(cursor))
        sql = f"SELECT {_COLUMNS} FROM invocations"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT ?"
        rows = self._db.execute(sql, (*args, limit + 1)).fetchall()
        page = [_invocation(r) for r in rows[:limit]]
        next_cursor = _encode_cursor(rows[limit - 1][-1]) if len(rows) > limit else None
        return page, next_cursor

    def queued(self) -> list[tuple[str, str]]:
        """(request_id, function) of every QUEUED run, oldest first."""
        return self._db.execute("SELECT request_id, function FROM invocations WHERE status = 'QUEUED' ORDER BY seq").fetchall()

    def count_active(self, function: str, source: str) -> int:
        """How many runs of this function from this source are QUEUED or RUNNING."""
        (n,) = self._db.execute(
            "SELECT COUNT(*) FROM invocations WHERE function = ? AND source = ? AND status IN (?, ?)",
            (function, source, *_ACTIVE),
        ).fetchone()
        return int(n)


def _invocation(row: tuple[Any, ...]) -> Invocation:
    return Invocation(
        request_id=row[0],
        function=row[1],
        trigger=row[2],
        status=Status(row[3]),
        created_at=row[4],
        started_at=row[5],
        ended_at=row[6],
        duration_ms=row[7],
        result=loads(row[8]) if row[8] is not None else None,
        error_type=row[9],
        error_message=row[10],
    )


def _encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        kind, _, value = text.partition(":")
        if kind != "seq":
            raise ValueError(text)
        return int(value)
    except (ValueError, UnicodeDecodeError):
        raise InvalidParameter(f"cursor {cursor!r} is not a cursor this server gave out") from None
