"""The store's write path: the schema, and the ops that change it, merged into few statements.

Writes are ops, plain data: accept these rows, mark this run RUNNING, record this end, register
the manifest's functions, recover after a stop, remember a trigger's state. The writer process
(writer.py) takes whatever is queued, up to a limit, and commits it in one transaction: one fsync
for the lot. Ops of one kind become one statement, so a batch of 2,000 Kafka records is two
multi-row INSERTs, not 2,000 executions, and the starts and ends of many runs, interleaved in
the queue, are two UPDATEs (see groups).

A run's row is its RequestId's sequence number (see envelope.request_ids), so a run is found by
its rowid and no index of RequestIds is filled on acceptance. A store made by an eventrun before
that keeps its unique index of RequestIds, and its runs are found through it (`by_request_id`).

Should a merged statement fail (it should not: conflicts on the dedupe key are expected and
handled), the transaction is rolled back and the same ops are done again one at a time, each
in a savepoint, so only the op at fault gets the error.
"""

from __future__ import annotations

import array
import functools
import itertools
import logging
import operator
import os
import sqlite3
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

from .api import Accepted
from .envelope import request_seq
from .failures import FailureLog

logger = logging.getLogger(__name__)

REFUSAL_LOG_EVERY = 5.0
"""Seconds between two lines of the writer's log while the store refuses commits, at least."""

_refused_commits = FailureLog(logger, every=REFUSAL_LOG_EVERY, counted="refused")
"""What the writer's log says of refused commits: a full disk refuses every one, many a second.
(One for the module: the writer process commits on one connection.)"""

ROWS_PER_STATEMENT = 1000  # 8 parameters a row at most: well under SQLite's 32,766 variables


class NewInvocation(NamedTuple):
    """One envelope about to be recorded (fields in the INSERT's column order)."""

    request_id: str
    function: str
    source: str
    event_id: str
    trigger: str
    created_at: str
    envelope: bytes
    seq: int  # the RequestId's sequence number (envelope.request_ids): the row's place in the store


class Batch(Sequence[tuple[Any, ...]]):
    """New invocations sharing their function, source, trigger and time of acceptance, by column.

    How the engine hands the store a batch of one trigger's events (a Kafka batch): no tuple is
    built per row, and the batch travels to the writer packed into a few strings and numbers
    (pack, unpack) rather than pickled a row at a time. It reads as the rows it stands for,
    plain tuples in NewInvocation's field order, with RequestIds following from first_seq.
    """

    __slots__ = ("function", "source", "trigger", "created_at", "first_seq", "request_ids", "event_ids", "envelopes")

    def __init__(
        self,
        function: str,
        source: str,
        trigger: str,
        created_at: str,
        first_seq: int,
        request_ids: list[str],
        event_ids: list[str],
        envelopes: list[bytes],
    ) -> None:
        if not len(request_ids) == len(event_ids) == len(envelopes):
            raise ValueError("a batch's columns differ in length")
        self.function = function
        self.source = source
        self.trigger = trigger
        self.created_at = created_at
        self.first_seq = first_seq
        self.request_ids = request_ids
        self.event_ids = event_ids
        self.envelopes = envelopes

    def __len__(self) -> int:
        return len(self.request_ids)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return self.rows()[index]
        i = range(len(self))[index]
        return (
            self.request_ids[i], self.function, self.source, self.event_ids[i],
            self.trigger, self.created_at, self.envelopes[i], self.first_seq + i,
        )

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        repeat = itertools.repeat
        return zip(
            self.request_ids, repeat(self.function), repeat(self.source), self.event_ids,
            repeat(self.trigger), repeat(self.created_at), self.envelopes, itertools.count(self.first_seq),
        )

    def rows(self) -> list[tuple[Any, ...]]:
        """The rows, as plain tuples."""
        return list(iter(self))

    def pack(self) -> tuple[Any, ...]:
        """The batch as a few strings and numbers, for unpack() in another process."""
        lengths = array.array("Q", map(len, self.envelopes))
        return (
            self.function, self.source, self.trigger, self.created_at, self.first_seq,
            _joined(self.request_ids), _joined(self.event_ids), b"".join(self.envelopes), lengths.tobytes(),
        )

    @staticmethod
    def unpack(packed: tuple[Any, ...]) -> Batch:
        """A packed batch again (its envelopes as bytearrays, which the store binds at once: see _blob)."""
        function, source, trigger, created_at, first_seq, request_ids, event_ids, envelopes, lengths = packed
        ends = list(itertools.accumulate(array.array("Q", lengths)))
        cut = map(slice, itertools.chain((0,), ends), ends)
        cuts: list[Any] = list(map(bytearray(envelopes).__getitem__, cut))
        return Batch(function, source, trigger, created_at, first_seq, _split(request_ids), _split(event_ids), cuts)


def _joined(texts: list[str]) -> str | list[str]:
    """Texts as one, NUL between them; as they are should one hold a NUL itself."""
    joined = "\x00".join(texts)
    return joined if joined.count("\x00") == len(texts) - 1 else texts


def _split(joined: str | list[str]) -> list[str]:
    return joined if joined.__class__ is list else joined.split("\x00")  # type: ignore[union-attr]


class Ending(NamedTuple):
    """A run's terminal state, as `finish` records it."""

    request_id: str
    status: str
    ended_at: str
    result: bytes | None
    error_type: str | None
    error_message: str | None


class Op(NamedTuple):
    """One write: what to do and with what."""

    kind: str  # a key of _RUN: "accept", "running", "finish", "register", "recover", "state", "templates", "replay", "prune", "destinations", "outbox_*"
    args: Any  # list[NewInvocation] | (request_id, started_at) | Ending | ... (see _RUN)


SCHEMA = """
CREATE TABLE IF NOT EXISTS functions (
    name TEXT PRIMARY KEY,
    async_execution INTEGER NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS invocations (
    seq INTEGER PRIMARY KEY,  -- the rowid: the RequestId's sequence number, ascending
    request_id TEXT NOT NULL,  -- unique, as it determines seq
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
CREATE TABLE IF NOT EXISTS replays (  -- a run made by replaying another: request_id replays replay_of
    request_id TEXT PRIMARY KEY,
    replay_of TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS replays_of ON replays (replay_of);
CREATE TABLE IF NOT EXISTS templates (  -- of envelopes stored as their fields (envelope.Templated)
    key BLOB PRIMARY KEY,  -- envelope.template_key(template)
    template BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS destinations (  -- where each function's ended runs go (the manifest's)
    function TEXT NOT NULL,
    kind TEXT NOT NULL,  -- 'callback': every end; 'on_failure': FAILED and TIMED_OUT
    target TEXT NOT NULL,  -- an http(s) URL, or kafka:TOPIC
    PRIMARY KEY (function, kind, target)
);
CREATE TABLE IF NOT EXISTS outbox (  -- deliveries owed, written by the same commit as the run's end
    id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,
    function TEXT NOT NULL,
    kind TEXT NOT NULL,
    target TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    due_at INTEGER NOT NULL DEFAULT 0,  -- Unix ms of the next attempt (or when a claim runs out)
    owner TEXT,  -- the node trying it now
    last_error TEXT,
    gave_up INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (due_at) WHERE gave_up = 0;
CREATE INDEX IF NOT EXISTS outbox_by_run ON outbox (request_id);
-- Every way a run ends (finish, recovery after a stop, terminate) goes through this: what is
-- owed for the end is committed with it, or neither is.
CREATE TRIGGER IF NOT EXISTS outbox_on_end AFTER UPDATE OF status ON invocations
WHEN OLD.status IN ('QUEUED', 'RUNNING') AND NEW.status NOT IN ('QUEUED', 'RUNNING')
BEGIN
    INSERT INTO outbox (request_id, function, kind, target)
    SELECT NEW.request_id, NEW.function, kind, target FROM destinations
    WHERE function = NEW.function AND (kind = 'callback' OR NEW.status IN ('FAILED', 'TIMED_OUT'));
END;
"""


SCHEMA_VERSION = 1
"""A store's `PRAGMA user_version`: raised with each change to SCHEMA an older eventrun could
misread, so that it refuses the store instead (stores made before the stamp read 0)."""


def open_schema(db: sqlite3.Connection) -> None:
    """Make the store's tables (those it lacks) and stamp it with SCHEMA_VERSION; a store a newer
    eventrun stamped is refused (sqlite3.DatabaseError) before anything is written to it."""
    (found,) = db.execute("PRAGMA user_version").fetchone()
    if found > SCHEMA_VERSION:
        raise sqlite3.DatabaseError(
            f"it was written by a newer eventrun (schema version {found}; this one knows {SCHEMA_VERSION}):"
            " run that eventrun or a newer one"
        )
    db.executescript(SCHEMA)
    if found < SCHEMA_VERSION:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def connect(path: Path, **options: Any) -> sqlite3.Connection:
    """A connection to the store with its durability settings."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=30, **options)
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: each commit is fsynced, so an acknowledged event survives a power cut too.
    # Group commits keep that to one fsync per batch rather than one per request.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


SQLITE_PATH_LIMIT = 504
"""The longest store path, in bytes once absolute with its links resolved, that SQLite opens: its
unix VFS keeps a path and its journal's ("-journal") within 512 bytes."""


def unopenable(path: Path, exc: BaseException) -> str:
    """Why the store at `path` cannot be opened, in a line: SQLite's reason ("unable to open
    database file" says nothing of a path too long for it, so that is said instead)."""
    if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_CANTOPEN:
        length = len(os.fsencode(os.path.realpath(path)))
        if length > SQLITE_PATH_LIMIT:
            return (
                f"its path is {length} bytes long, and SQLite opens paths of at most {SQLITE_PATH_LIMIT} bytes"
                " (absolute, links resolved): give data_dir a shorter path"
            )
    return f"{type(exc).__name__}: {exc}"


def by_request_id(conn: sqlite3.Connection) -> bool:
    """Whether the store keeps an index of RequestIds (made by an eventrun before runs were keyed by seq)."""
    return any(
        [column for (column,) in conn.execute("SELECT name FROM pragma_index_info(?)", (index,))] == ["request_id"]
        for (index,) in conn.execute("SELECT name FROM pragma_index_list('invocations')")
    )


_REFUSALS = frozenset({
    sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_NOMEM, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_FULL, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_NOTADB,
})


def refused(exc: BaseException) -> bool:
    """Whether SQLite refused to go on for a reason of the store's own (a full disk, an I/O error,
    a damaged or read-only file, a lock held too long) rather than for what it was asked."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.Error) and code is not None and code & 0xFF in _REFUSALS


def commit(conn: sqlite3.Connection, batch: Sequence[Op], *, by_request_id: bool = False) -> list[tuple[bool, Any]]:
    """Do the ops in one transaction; (True, result) or (False, exception) for each.

    `by_request_id`: find runs through the index of RequestIds (a store made before runs were
    keyed by seq: see by_request_id()).
    """
    run = _RUN_BY_REQUEST_ID if by_request_id else _RUN
    try:
        conn.execute("BEGIN IMMEDIATE")
        outcomes: list[tuple[bool, Any]] = [(False, None)] * len(batch)
        for kind, positions in groups(batch):
            results = run[kind](conn, [batch[i].args for i in positions])
            for i, result in zip(positions, results):
                outcomes[i] = (True, result)
        conn.execute("COMMIT")
    except Exception:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        return _commit_one_by_one(conn, batch, run)
    _refused_commits.recovered("the store takes commits again")
    return outcomes


def _commit_one_by_one(conn: sqlite3.Connection, batch: Sequence[Op], run: _Statements) -> list[tuple[bool, Any]]:
    outcomes: list[tuple[bool, Any]] = []
    try:
        conn.execute("BEGIN IMMEDIATE")
        for op in batch:
            conn.execute("SAVEPOINT op")
            try:
                (result,) = run[op.kind](conn, [op.args])
                outcomes.append((True, result))
                conn.execute("RELEASE op")
            except Exception as exc:  # one bad op must not sink the batch
                conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
                outcomes.append((False, exc))
        conn.execute("COMMIT")
    except Exception as exc:
        _log_refused_commit(exc, len(batch))
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        return [(False, exc)] * len(batch)
    _refused_commits.recovered("the store takes commits again")
    return outcomes


def _log_refused_commit(exc: Exception, writes: int) -> None:
    # The store's own refusal (a full disk) says all in its message; anything else is a fault
    # of eventrun's, whose traceback tells where.
    _refused_commits.log(
        "the store refused a commit (%s); its %d writes are answered with the error", exc, writes,
        exc_info=None if refused(exc) else exc,
    )


_STEPS = ("accept", "running", "finish")
"""A run's steps, in the order they come for any one run."""


def groups(batch: Sequence[Op]) -> Iterator[tuple[str, list[int]]]:
    """The ops of a batch in groups of one kind, each becoming one statement: (kind, positions).

    A run's steps come in one order (accepted, running, ended), so in a stretch of such ops the
    accepts go first, then the starts, then the ends: starts and ends interleaved in the queue
    make two statements, not one each, and each op's outcome is the one it would have had in
    queue order. Where that would not hold, the stretch closes: at a start or end of a run that
    already ended in it (the start of a terminated run must find it ended, the second of two
    ends must find the first), at a second start of one run (one UPDATE cannot say which of two
    rows for the same run came first), and at an op of another kind. Ops of the other kinds
    group while consecutive.
    """
    stretch: dict[str, list[int]] = {}
    started: set[str] = set()
    ended: set[str] = set()
    other: list[int] = []
    for i, op in enumerate(batch):
        kind = op.kind
        if kind in _STEPS:
            if other:
                yield batch[other[0]].kind, other
                other = []
            if kind != "accept":
                request_id = op.args[0]
                if request_id in ended or (kind == "running" and request_id in started):
                    yield from _in_step_order(stretch)
                    stretch, started, ended = {}, set(), set()
                (started if kind == "running" else ended).add(request_id)
            stretch.setdefault(kind, []).append(i)
        else:
            if stretch:
                yield from _in_step_order(stretch)
                stretch, started, ended = {}, set(), set()
            if other and batch[other[0]].kind != kind:
                yield batch[other[0]].kind, other
                other = []
            other.append(i)
    yield from _in_step_order(stretch)
    if other:
        yield batch[other[0]].kind, other


def _in_step_order(stretch: dict[str, list[int]]) -> Iterator[tuple[str, list[int]]]:
    return ((kind, stretch[kind]) for kind in _STEPS if kind in stretch)


# -- the statements ------------------------------------------------------------------------


ALL_NEW = "all-new"
"""What an accept op gets when every row was new: each keeps the RequestId it came with."""


def _accept(conn: sqlite3.Connection, ops: list[Sequence[NewInvocation] | Batch]) -> list[list[Accepted] | str]:
    before = conn.total_changes
    if len(ops) == 1 and ops[0].__class__ is Batch:  # a Kafka batch alone: bound column by column
        rows: Sequence[Any] = ops[0]
        _insert_batch(conn, ops[0])  # type: ignore[arg-type]
    else:
        rows = [row for rows in ops for row in rows]
        _insert_rows(conn, rows)
    if conn.total_changes - before == len(rows):
        return [ALL_NEW] * len(ops)
    # Some were known (redelivery, or one event twice): each gets the RequestId it was given.
    # (Rows may come as plain tuples, in NewInvocation's field order.)
    answers = []
    for request_id, function, source, event_id, *_ in rows:
        (known,) = conn.execute(
            "SELECT request_id FROM invocations WHERE function = ? AND source = ? AND event_id = ?",
            (function, source, event_id),
        ).fetchone()
        answers.append(Accepted(known, known == request_id))
    out: list[list[Accepted] | str] = []
    start = 0
    for op_rows in ops:
        out.append(answers[start : start + len(op_rows)])
        start += len(op_rows)
    return out


def _insert_batch(conn: sqlite3.Connection, batch: Batch) -> None:
    common = (batch.function, batch.source, batch.trigger, batch.created_at)
    envelopes: list[Any] = batch.envelopes
    if envelopes and envelopes[0].__class__ is not bytearray:
        envelopes = list(map(_blob, envelopes))
    for chunk in _chunks(range(len(batch))):
        start, stop = chunk.start, chunk.stop  # type: ignore[attr-defined]
        own = zip(
            range(batch.first_seq + start, batch.first_seq + stop),
            batch.request_ids[start:stop], batch.event_ids[start:stop], envelopes[start:stop],
        )
        conn.execute(_insert_shared_sql(stop - start), [*common, *itertools.chain.from_iterable(own)])


def _insert_rows(conn: sqlite3.Connection, rows: list[Any]) -> None:
    shared = set(map(_SHARED, rows))
    if len(shared) == 1:  # the usual batch: one function, source and trigger, one time of acceptance
        (common,) = shared
        for chunk in _chunks(rows):
            params = [*common, *itertools.chain.from_iterable(map(_OWN, chunk))]
            params[7::4] = map(_blob, params[7::4])  # each row's envelope
            conn.execute(_insert_shared_sql(len(chunk)), params)
    else:
        for chunk in _chunks(rows):
            params = list(itertools.chain.from_iterable(chunk))
            params[6::8] = map(_blob, params[6::8])  # each row's envelope
            conn.execute(_insert_sql(len(chunk)), params)


_BY_SEQ = "invocations.seq = v.column1 AND invocations.request_id = v.column2"
_BY_REQUEST_ID = "invocations.request_id = v.column2"  # a store with an index of RequestIds
"""How an UPDATE finds the rows of its VALUES (seq, request_id, ...)."""


def _running(conn: sqlite3.Connection, ops: list[tuple[str, str]], match: str = _BY_SEQ) -> list[bool]:
    changed = _update(conn, functools.partial(_running_sql, match=match), ops)
    return [rid in changed for rid, _ in ops]


def _finish(conn: sqlite3.Connection, ops: list[Ending], match: str = _BY_SEQ) -> list[bool]:
    changed = _update(conn, functools.partial(_finish_sql, match=match), ops)
    return [ending.request_id in changed for ending in ops]


def _update(conn: sqlite3.Connection, sql: Callable[[int], str], ops: Sequence[Sequence[Any]]) -> set[str]:
    """Run an UPDATE ... RETURNING request_id over ops led by a RequestId; the RequestIds it changed."""
    params = [(request_seq(op[0]), *op) for op in ops]
    changed: set[str] = set()
    for chunk in _chunks(params):
        changed.update(rid for (rid,) in conn.execute(sql(len(chunk)), list(itertools.chain.from_iterable(chunk))))
    return changed


def _register(conn: sqlite3.Connection, ops: list[tuple[Mapping[str, bool], str]]) -> list[list[tuple[str, bool]]]:
    """Record new functions' async flag; each op gets the recorded flags its manifest would flip."""
    out = []
    for functions, now in ops:
        recorded = dict(conn.execute("SELECT name, async_execution FROM functions").fetchall())
        flipped = [(n, bool(recorded[n])) for n, a in functions.items() if n in recorded and bool(recorded[n]) != a]
        if not flipped:
            conn.executemany(
                "INSERT OR IGNORE INTO functions (name, async_execution, created_at) VALUES (?, ?, ?)",
                [(n, int(a), now) for n, a in functions.items()],
            )
        out.append(flipped)
    return out


PRUNE_AT_ONCE = 5000  # runs deleted in one op, so one prune does not hold the writer long


def _prune(conn: sqlite3.Connection, ops: list[tuple[int, str]]) -> list[list[str]]:
    """Delete ended runs that ended before a time (and their replay links and given-up deliveries);
    each op gets their RequestIds. A run with a delivery still owed stays until it is delivered.

    Each op is (the first seq after that time, the time as RFC 3339 text): a run that ended
    before it was accepted before it, so the key bounds the search before ended_at is read.
    """
    out = []
    for below, ended_before in ops:
        ids = [
            r for (r,) in conn.execute(
                "DELETE FROM invocations WHERE seq IN (SELECT seq FROM invocations WHERE seq < ?"
                " AND status NOT IN ('QUEUED', 'RUNNING') AND ended_at < ?"
                " AND NOT EXISTS (SELECT 1 FROM outbox WHERE outbox.request_id = invocations.request_id AND gave_up = 0)"
                " ORDER BY seq LIMIT ?)"
                " RETURNING request_id",
                (below, ended_before, PRUNE_AT_ONCE),
            )
        ]
        delete_links(conn, ids)
        out.append(ids)
    return out


def prune(conn: sqlite3.Connection, op: tuple[int, str]) -> list[str]:
    """One op of _prune, outside the writer (a backup's copy): the RequestIds it deleted."""
    [ids] = _prune(conn, [op])
    return ids


def delete_runs(conn: sqlite3.Connection, request_ids: list[str]) -> None:
    """Delete these runs, with their replay links and deliveries."""
    conn.executemany("DELETE FROM invocations WHERE request_id = ?", [(r,) for r in request_ids])
    delete_links(conn, request_ids)


def delete_links(conn: sqlite3.Connection, request_ids: list[str]) -> None:
    """Delete what refers to these runs, deleted: their replay links (either way) and deliveries."""
    conn.executemany("DELETE FROM replays WHERE request_id = ? OR replay_of = ?", [(r, r) for r in request_ids])
    conn.executemany("DELETE FROM outbox WHERE request_id = ?", [(r,) for r in request_ids])


def _recover(conn: sqlite3.Connection, ops: list[tuple[str, str]]) -> list[list[str]]:
    """End runs left RUNNING as FAILED (ServerStopped); each op gets the RequestIds it ended."""
    out = []
    for now, message in ops:
        ids = [r for (r,) in conn.execute("SELECT request_id FROM invocations WHERE status = 'RUNNING'")]
        conn.execute(
            "UPDATE invocations SET status = 'FAILED', ended_at = ?, error_type = 'ServerStopped',"
            " error_message = ?, duration_ms = CAST(ROUND((julianday(?) - julianday(started_at)) * 86400000)"
            " AS INTEGER) WHERE status = 'RUNNING'",
            (now, message, now),
        )
        out.append(ids)
    return out


def _replay(conn: sqlite3.Connection, ops: list[tuple[Sequence[Any], str]]) -> list[str]:
    """Record replays: each op a new run's row (in NewInvocation's order) and the run it replays;
    the RequestId under each row's event id (an earlier replay's, for a key used before)."""
    recorded: list[str] = []
    for row, replay_of in ops:
        params = list(row)
        params[6] = _blob(params[6])
        if conn.execute(_insert_sql(1), params).rowcount:
            conn.execute("INSERT INTO replays (request_id, replay_of) VALUES (?, ?)", (row[0], replay_of))
            recorded.append(row[0])
        else:
            (earlier,) = conn.execute(
                "SELECT request_id FROM invocations WHERE function = ? AND source = ? AND event_id = ?", params[1:4]
            ).fetchone()
            recorded.append(earlier)
    return recorded


def _destinations(conn: sqlite3.Connection, ops: list[tuple[list[str], list[tuple[str, str, str]]]]) -> list[None]:
    """Set the destinations of functions: each op (the functions, all their (function, kind,
    target)). Functions not given keep theirs (see SQLiteStore.set_destinations)."""
    for functions, rows in ops:
        conn.executemany("DELETE FROM destinations WHERE function = ?", [(f,) for f in functions])
        conn.executemany("INSERT OR IGNORE INTO destinations (function, kind, target) VALUES (?, ?, ?)", rows)
    return [None] * len(ops)


def _outbox_claim(
    conn: sqlite3.Connection, ops: list[tuple[str, int, int, int, list[str]]]
) -> list[list[tuple[Any, ...]]]:
    """Take due deliveries: each op (owner, now ms, lease ms, limit, busy targets) gets its rows,
    none to a busy target, held until the lease runs out."""
    out = []
    for owner, now, lease, limit, busy in ops:
        busy_marks = ", ".join(["?"] * len(busy))  # (SQLite takes an empty list: NOT IN () holds for all)
        rows = conn.execute(
            "UPDATE outbox SET owner = ?, due_at = ? WHERE id IN"
            " (SELECT id FROM outbox WHERE gave_up = 0 AND due_at <= ?"
            f" AND target NOT IN ({busy_marks}) ORDER BY due_at, id LIMIT ?)"
            " RETURNING id, request_id, function, kind, target, attempts",
            (owner, now + lease, now, *busy, limit),
        ).fetchall()
        out.append(sorted(rows))
    return out


def _outbox_settle(conn: sqlite3.Connection, ops: list[tuple[int, int | None, str | None, bool]]) -> list[None]:
    """Record attempts: each op (id, next attempt's Unix ms or None when delivered, error, gave up)."""
    for delivery_id, due_at, error, gave_up in ops:
        if due_at is None and not gave_up:
            conn.execute("DELETE FROM outbox WHERE id = ?", (delivery_id,))
        else:
            conn.execute(
                "UPDATE outbox SET attempts = attempts + 1, due_at = ?, owner = NULL, last_error = ?, gave_up = ?"
                " WHERE id = ?",
                (due_at or 0, error, int(gave_up), delivery_id),
            )
    return [None] * len(ops)


def _outbox_release(conn: sqlite3.Connection, ops: list[str]) -> list[None]:
    """Make the deliveries an owner was trying when it stopped due at once (each op an owner)."""
    conn.executemany("UPDATE outbox SET owner = NULL, due_at = 0 WHERE owner = ? AND gave_up = 0", [(o,) for o in ops])
    return [None] * len(ops)


def _state(conn: sqlite3.Connection, ops: list[tuple[str, str]]) -> list[None]:
    conn.executemany(
        "INSERT INTO state (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value", ops
    )
    return [None] * len(ops)


def _templates(conn: sqlite3.Connection, ops: list[list[tuple[bytes, bytes]]]) -> list[None]:
    """Keep templates by key; a key already holding another template is an error (it never should)."""
    for pairs in ops:
        for key, template in pairs:
            conn.execute("INSERT INTO templates (key, template) VALUES (?, ?) ON CONFLICT (key) DO NOTHING", (key, template))
            (kept,) = conn.execute("SELECT template FROM templates WHERE key = ?", (key,)).fetchone()
            if kept != template:
                raise sqlite3.IntegrityError(f"the store holds another template under the key {key.hex()}")
    return [None] * len(ops)


_Statements = dict[str, Callable[[sqlite3.Connection, list[Any]], list[Any]]]

_RUN: _Statements = {
    "accept": _accept,
    "running": _running,
    "finish": _finish,
    "register": _register,
    "recover": _recover,
    "state": _state,
    "templates": _templates,
    "replay": _replay,
    "prune": _prune,
    "destinations": _destinations,
    "outbox_claim": _outbox_claim,
    "outbox_settle": _outbox_settle,
    "outbox_release": _outbox_release,
}
_RUN_BY_REQUEST_ID: _Statements = {
    **_RUN,
    "running": functools.partial(_running, match=_BY_REQUEST_ID),
    "finish": functools.partial(_finish, match=_BY_REQUEST_ID),
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


_blob = bytearray
"""What a bytes parameter is bound as: the sqlite3 module of Python 3.11 binds a bytearray at once,
but looks up an adapter for bytes first (a quarter of a microsecond against three quarters)."""

_NEW_ROW = "(?, ?, ?, ?, ?, 'QUEUED', ?, ?, ?)"  # in NewInvocation's order, status put in
_SHARED = operator.itemgetter(1, 2, 4, 5)  # function, source, trigger, created_at: one per usual batch
_OWN = operator.itemgetter(7, 0, 3, 6)  # seq, request_id, event_id, envelope: the rest of a row


def _values(rows: int, row: str) -> str:
    return ",".join(itertools.repeat(row, rows))


# Statements are cached by their text (the connection's statement cache): one shape per size.
def _insert_sql(rows: int) -> str:
    return (
        "INSERT INTO invocations"
        " (request_id, function, source, event_id, trigger, status, created_at, envelope, seq)"
        f" VALUES {_values(rows, _NEW_ROW)}"
        " ON CONFLICT (function, source, event_id) DO NOTHING"
    )


def _insert_shared_sql(rows: int) -> str:
    # The columns rows share are bound once (?1 to ?4); each row binds only its own four.
    return (
        "INSERT INTO invocations"
        " (seq, request_id, function, source, event_id, trigger, status, created_at, envelope)"
        " SELECT column1, column2, ?1, ?2, column3, ?3, 'QUEUED', ?4, column4"
        f" FROM (VALUES {_values(rows, '(?, ?, ?, ?)')})"
        " WHERE true"  # (SQLite's parser needs it before an upsert's ON CONFLICT)
        " ON CONFLICT (function, source, event_id) DO NOTHING"
    )


def _running_sql(rows: int, match: str) -> str:
    return (
        "UPDATE invocations SET status = 'RUNNING', started_at = v.column3"
        f" FROM (VALUES {_values(rows, '(?, ?, ?)')}) AS v"
        f" WHERE {match} AND (invocations.status = 'QUEUED'"
        # (this very start, recorded by a commit whose answer was lost: see Engine._execute)
        " OR (invocations.status = 'RUNNING' AND invocations.started_at = v.column3))"
        " RETURNING invocations.request_id"
    )


def _finish_sql(rows: int, match: str) -> str:
    return (
        "UPDATE invocations SET status = v.column3, ended_at = v.column4, result = v.column5,"
        " error_type = v.column6, error_message = v.column7, duration_ms = CASE"
        " WHEN invocations.started_at IS NULL THEN NULL ELSE"
        " CAST(ROUND((julianday(v.column4) - julianday(invocations.started_at)) * 86400000) AS INTEGER) END"
        f" FROM (VALUES {_values(rows, '(?, ?, ?, ?, ?, ?, ?)')}) AS v"
        f" WHERE {match} AND invocations.status IN ('QUEUED', 'RUNNING')"
        " RETURNING invocations.request_id"
    )
