"""The store's writer process: every write to the SQLite file is committed there.

The server process queues ops (writes.Op) and gets each outcome back once it is committed. The
writer runs in a process of its own rather than a thread because of the GIL: a thread binding
thousands of parameters and building rows had to take turns with the event loop, so under load
the two shared one core; as a process it has the other core to itself.

Frames on a socket pair, each a pickle: the server sends the ops of each event-loop turn as one
frame, except that a large accept (a Kafka batch) goes at once, so the writer commits it while
the server builds the next one. The writer commits up to `batch_limit` rows at a time and
answers each commit with the outcomes in the order the ops came, `(True, result)` or
`(False, exception)`. An accept whose rows all were new is answered ALL_NEW, so the answer
does not carry thousands of RequestIds back that the server already knows. Rows travel as
plain tuples (pickling a named tuple calls back into Python for every row), and a Batch (a Kafka
batch's rows by column) packed into a few strings: pickling a tuple a row cost the server about
half a microsecond a row, as much as building the rows.

The writer ignores SIGINT and SIGTERM: it stops when the server says so, after committing what
was queued, or when the server's end of the socket closes.

Should the store's -wal or -shm file be removed (or replaced) under it, SQLite would go on
writing to the removed file, and a crash would lose every commit it held. The writer notices
it after each commit, before answering (see Checkpointer.moved), copies the removed WAL into
the database file, opens the store again, and tells the server (the frame RENEWED), whose
reading connection then opens it again too.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
import operator
import os
import pickle
import queue
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable, Sequence

from .api import Accepted
from .errors import StoreError
from .failures import FailureLog
from .metrics import StoreWrites
from .text import log_to_stderr
from .undumpable import undumpable
from .writes import (
    ALL_NEW, REFUSAL_LOG_EVERY, Batch, Op, by_request_id, commit, connect, open_schema, refused, unopenable,
)

logger = logging.getLogger(__name__)

_READY = "ready"
RENEWED = "renewed"
"""A frame that is no answer: the writer opened the store's files again (its -wal or -shm was removed)."""
_START_TIMEOUT = 60.0

STALLED_AFTER = 30.0
"""Seconds the writer may hold writes without answering a commit before it is taken for stuck
(stopped, or hung on its disk): it is then killed, its writes fail, and the next write starts a new one."""

SEND_AT_ONCE = 100
"""An accept of this many rows or more is sent to the writer at once rather than at the end of the loop's turn."""


class WriterProcess:
    """The server's end: start the writer, send it ops, settle their futures as batches commit.

    Used from one event loop, which both sends (the ops of one loop iteration go as one frame)
    and reads the answers (the socket is watched by the loop: no thread, no wake-up of another).
    """

    def __init__(
        self, path: Path, *, batch_limit: int, writes: StoreWrites | None = None, stalled_after: float | None = None
    ) -> None:
        ours, theirs = socket.socketpair()
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-P", "-m", __name__, str(theirs.fileno()), str(path), str(batch_limit)],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._conn = Connection(ours.detach())
        self._pending: collections.deque[tuple[Op, asyncio.Future[Any]]] = collections.deque()
        self._outbox: list[tuple[Op, asyncio.Future[Any]]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._failed = False
        self._stalled_after = STALLED_AFTER if stalled_after is None else stalled_after
        self._stalled = False  # killed for answering nothing for stalled_after seconds
        self._watchdog: asyncio.TimerHandle | None = None
        self._answers = 0  # frames answered, for the watchdog to tell a writer that moves on
        self.renewals = 0  # how often the writer opened the store's files again (RENEWED)
        self.writes = StoreWrites() if writes is None else writes  # (the store's, kept across restarts)
        self._wait_ready(path)

    @property
    def pid(self) -> int:
        """The writer process's id."""
        return self._process.pid

    @property
    def alive(self) -> bool:
        """False once the writer is gone (its socket broke) or is being closed."""
        if self._closing or self._failed:
            return False
        if self._loop is None and self._process.poll() is not None:
            # Gone before the first write: no loop watches its socket yet to notice.
            self._failed = True
            return False
        return True

    def submit(self, op: Op, future: asyncio.Future[Any]) -> None:
        """Queue one op; it is sent when the loop next gets a turn, and `future` settles once committed."""
        if self._closing:
            raise StoreError("the store is closed")
        loop = future.get_loop()
        if loop is not self._loop:
            self._watch(loop)
        if not self._outbox:
            loop.call_soon(self._flush)
        self._outbox.append((op, future))
        if op.kind == "accept" and len(op.args) >= SEND_AT_ONCE:
            # Waiting for the end of the loop's turn would let the next large accept join this
            # one: the two would be committed and answered together while the server waits,
            # then built together while the writer waits. Sent alone, they overlap.
            self._flush()

    def close(self) -> None:
        """Let the writer commit what is queued and exit; answer what it answers; wait for it."""
        if self._closing:
            return
        self._flush()
        self._closing = True
        self._unwatch()
        try:
            self._conn.send_bytes(pickle.dumps(None))
        except OSError:
            pass  # gone already
        while self._pending:
            if not self._conn.poll(self._stalled_after):
                self._kill_stalled()
                break
            if not self._answer():
                break
        self._fail_pending()
        try:
            self._process.wait(_START_TIMEOUT)
        except subprocess.TimeoutExpired:
            logger.error("store writer %s did not exit; killing it", self._process.pid)
            self._process.kill()
            self._process.wait()
        self._conn.close()

    def _wait_ready(self, path: Path) -> None:
        try:
            answer = pickle.loads(self._conn.recv_bytes()) if self._conn.poll(_START_TIMEOUT) else None
        except (EOFError, OSError):
            answer = None
        if answer != _READY:
            self._process.kill()
            self._process.wait()
            self._conn.close()
            detail = answer if isinstance(answer, str) else self._exit_text()
            raise StoreError(f"cannot open the store {path}: {detail}")

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is not None and not self._loop.is_closed():
            raise RuntimeError("the store is in use by another event loop")
        self._loop = loop
        loop.add_reader(self._conn.fileno(), self._readable)

    def _unwatch(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._conn.fileno())

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        if not outbox or self._closing:
            return
        self._pending.extend(outbox)
        try:
            self._conn.send_bytes(pickle.dumps([_plain(op) for op, _ in outbox], pickle.HIGHEST_PROTOCOL))
        except OSError:
            self._lost()
            return
        if self._watchdog is None:
            self._watch_for_stall()

    def _watch_for_stall(self) -> None:
        """In stalled_after seconds, see whether the writer answered anything meanwhile (one timer
        at a time, while writes wait)."""
        assert self._loop is not None
        self._watchdog = self._loop.call_later(self._stalled_after, self._check_stalled, self._answers)

    def _check_stalled(self, answers_then: int) -> None:
        self._watchdog = None
        if not self._pending or self._failed or self._closing:
            return
        if self._answers != answers_then:
            self._watch_for_stall()
            return
        self._kill_stalled()
        self._lost()

    def _kill_stalled(self) -> None:
        """Stopped (SIGSTOP), or stuck: a write waiting on it would wait for ever, and so would its
        client. SIGKILL ends a stopped process too; the next write starts a new one."""
        self._stalled = True
        logger.error("the store's writer process %s answered no commit for %g s: killing it", self._process.pid, self._stalled_after)
        self._process.kill()

    def _readable(self) -> None:
        # One frame a call: the loop calls again while more are waiting. (The writer sends each
        # frame whole, so reading one never waits long.)
        if not self._answer():
            self._lost()

    def _answer(self) -> bool:
        """Read one batch of outcomes and settle its ops; False at the end of the stream."""
        try:
            outcomes = pickle.loads(self._conn.recv_bytes())
        except (EOFError, OSError):
            return False
        self._answers += 1
        if outcomes == RENEWED:  # (the answers of the commit that found the files gone follow)
            self.renewals += 1
            return True
        self._note_commit(outcomes)  # (before the futures wake anyone: whoever is told sees it)
        for outcome in outcomes:
            op, future = self._pending.popleft()
            _settle(op, future, outcome)
        return True

    def _note_commit(self, outcomes: list[tuple[bool, Any]]) -> None:
        """Whether the store took this commit: refused if SQLite refused its writes for a reason of
        the store's own (a full disk), none of them went through; writable again otherwise."""
        if all(map(_first, outcomes)):  # (the usual case, at C speed)
            self.writes.went_through()
            return
        refusals = [value for ok, value in outcomes if not ok and refused(value)]
        if refusals:
            self.writes.refused(str(refusals[-1]), len(refusals))
        if not refusals or any(map(_first, outcomes)):
            self.writes.went_through()

    def _lost(self) -> None:
        self._failed = True
        self._unwatch()
        self._fail_pending()

    def _fail_pending(self) -> None:
        unanswered = [*self._pending, *self._outbox]
        self._pending.clear()
        self._outbox.clear()
        if unanswered or not self._closing:
            text = self._exit_text()
            logger.error("%s; %d writes are left without an answer", text, len(unanswered))
            if not self._closing:
                self.writes.unanswered(text, len(unanswered))
            error = StoreError(text)
            for op, future in unanswered:
                _settle(op, future, (False, error))

    def _exit_text(self) -> str:
        if self._stalled:
            return (
                f"the store's writer process {self._process.pid} answered no commit for {self._stalled_after:g} s "
                "(stopped, or stuck on its disk) and was killed"
            )
        try:
            code = self._process.wait(1.0)
        except subprocess.TimeoutExpired:
            return f"the store's writer process {self._process.pid} stopped answering"
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        return f"the store's writer process {self._process.pid} {how}"


def _plain(op: Op) -> tuple[str, Any]:
    # Rows go as plain tuples in a list (pickling a named tuple calls back into Python for every
    # row), a Batch packed into a tuple (see _receive).
    if op.kind == "accept":
        rows = op.args
        return op.kind, rows.pack() if rows.__class__ is Batch else list(map(tuple, rows))
    return op.kind, op.args


_new_answer = functools.partial(tuple.__new__, Accepted)  # Accepted(...) without its Python-level __new__
_first = operator.itemgetter(0)


def _settle(op: Op, future: asyncio.Future[Any], outcome: tuple[bool, Any]) -> None:
    ok, value = outcome
    if future.done() or future.get_loop().is_closed():
        return
    if not ok:
        if isinstance(value, sqlite3.Error):  # its transaction was rolled back: nothing of it is recorded
            value = StoreError(f"the store refused the write ({value}); nothing of it was recorded")
        future.set_exception(value)
    elif value == ALL_NEW:
        rows = op.args
        ids = rows.request_ids if rows.__class__ is Batch else map(_first, rows)
        future.set_result(list(map(_new_answer, zip(ids, itertools.repeat(True)))))
    else:
        future.set_result(value)


# -- the writer's end ----------------------------------------------------------------------


def serve(conn: Connection, path: Path, batch_limit: int) -> None:
    """Open the store, then commit queued ops, up to `batch_limit` rows at a time, until told to stop."""
    try:
        db = open_writer(path)
        open_schema(db)
        keyed_by_request_id = by_request_id(db)
        checkpoints = Checkpointer(path)
    except (OSError, sqlite3.Error) as exc:
        conn.send_bytes(pickle.dumps(unopenable(path, exc)))
        return
    conn.send_bytes(pickle.dumps(_READY))
    ops: queue.SimpleQueue[Op | None] = queue.SimpleQueue()
    threading.Thread(target=_receive, args=(conn, ops), name="receive", daemon=True).start()
    try:
        while batch := take(ops, batch_limit):
            outcomes = commit(db, batch, by_request_id=keyed_by_request_id)
            try:
                if checkpoints.moved():  # before the answer: what it acknowledges must not stay in a removed WAL
                    db = checkpoints.renew(db, functools.partial(open_writer, path))
                    conn.send_bytes(pickle.dumps(RENEWED))
                conn.send_bytes(_dumps(outcomes))
            except OSError:
                break  # the server is gone; what was committed stays committed
            checkpoints.committed(db)
    finally:
        checkpoints.close()
        db.close()


def open_writer(path: Path) -> sqlite3.Connection:
    """The writer's connection to the store."""
    db = connect(path, cached_statements=512)  # the multi-row statements come in a few dozen sizes
    db.execute("PRAGMA wal_autocheckpoint=0")  # the Checkpointer's work, off the commit path
    return db


class Checkpointer:
    """Copies committed WAL pages into the database file on a thread of its own.

    SQLite would do it inside every thousandth page's COMMIT, holding up the writes queued
    behind it. Here a thread with its own connection runs PASSIVE checkpoints (which never
    block the writer), at most one every `interval` seconds while commits go on: a page written
    many times meanwhile (a run's row: queued, running, ended) is copied and synced once, not
    after each commit. Should the WAL outgrow `limit` bytes all the same, the writer waits for
    the thread's checkpoint to end, then runs one that empties the file (SQLite answers "busy"
    at once to a second concurrent checkpoint).
    """

    def __init__(self, path: Path, *, interval: float = 0.2, limit: int = 64 * 1024 * 1024) -> None:
        self._path = path
        self._wal = f"{path}-wal"
        self._shm = f"{path}-shm"
        self._interval = interval
        self._limit = limit
        self._conn = connect(path, check_same_thread=False)
        self._files = self._identities()  # the -wal and -shm files the connections opened
        self._wal_size: int | None = None  # as `moved` found it, for `committed`
        self._due = threading.Event()  # commits since the last checkpoint
        self._stopping = threading.Event()
        self._running = threading.Lock()  # held while a checkpoint runs
        self._failing = FailureLog(logger, every=REFUSAL_LOG_EVERY)  # (a full disk fails every one)
        self._renewing = FailureLog(logger, every=REFUSAL_LOG_EVERY)  # (tried again after each commit)
        self._thread = threading.Thread(target=self._loop, name="checkpoint", daemon=True)
        self._thread.start()

    def _identities(self) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
        return _identity(self._wal), _identity(self._shm)

    def moved(self) -> bool:
        """Whether the store's -wal or -shm file was removed or replaced since the connections
        opened it (two stat calls, about a microsecond each: cheap enough for every commit)."""
        try:
            wal = os.stat(self._wal)
            shm = os.stat(self._shm)
        except FileNotFoundError:
            return True
        except OSError:
            return False  # (cannot tell: a file SQLite could not reach either would fail the commit)
        self._wal_size = wal.st_size
        return (wal.st_dev, wal.st_ino) != self._files[0] or (shm.st_dev, shm.st_ino) != self._files[1]

    def renew(self, db: sqlite3.Connection, reopen: Callable[[], sqlite3.Connection]) -> sqlite3.Connection:
        """After `moved`: copy every commit into the database file (the connections still see the
        removed WAL), then open the store again, which makes a new -wal and -shm; the writer's new
        connection, or `db` should the copy not go through (the next commit tries again)."""
        seen = dict(zip((self._wal, self._shm), self._files))
        moved = " and ".join(
            f"{name} was {'removed' if now is None else 'replaced'}"
            for name, now in zip(seen, self._identities()) if now != seen[name]
        ) or f"{self._wal} was removed"
        with self._running:
            error: sqlite3.Error | None = None
            try:
                busy, _, _ = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            except sqlite3.Error as exc:
                busy, error = 1, exc
            if busy:
                self._renewing.log(
                    "%s while the store is open, and the commits SQLite went on writing to the removed WAL could not "
                    "be copied into %s yet (%s): a crash would lose them; the next commit tries again",
                    moved, self._path, error or "readers kept the checkpoint busy",
                )
                return db
            self._conn.close()
            db.close()
            db = reopen()
            self._conn = connect(self._path, check_same_thread=False)
            self._files = self._identities()
        self._renewing.recovered("the store's commits are in its database file again")
        logger.error(
            "%s while the store was open. SQLite goes on using a removed file: a crash loses the commits a removed WAL "
            "holds, and a removed -shm leaves whatever opens the store next out of step with it. Every commit was "
            "copied into %s and the store opened again with new files: nothing was lost. Do not remove the -wal or "
            "-shm file of a running store.",
            moved, self._path,
        )
        return db

    def committed(self, db: sqlite3.Connection) -> None:
        """After a commit: have the thread copy it in time; rein the WAL in if it grew too large."""
        self._due.set()
        size, self._wal_size = self._wal_size, None  # (measured by `moved` just before, if it was called)
        if size is None:
            try:
                size = os.stat(self._wal).st_size
            except OSError:
                return
        if size > self._limit:
            self._empty_wal(db)

    def _empty_wal(self, db: sqlite3.Connection) -> None:
        """A checkpoint that empties the WAL, on the commit path; a failure (a full disk) is
        logged as the thread's are, and the next commit tries again: the writer goes on."""
        try:
            with self._running:
                busy, _, _ = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error as exc:
            self._failing.log(
                "checkpoint failed (%s); the next commit tries again", exc, exc_info=None if refused(exc) else exc
            )
            return
        if busy:
            logger.warning("the WAL passed %d bytes and readers kept it from being emptied", self._limit)

    def close(self) -> None:
        """Stop the thread (closing the last connection checkpoints what is left)."""
        self._stopping.set()
        self._due.set()
        self._thread.join()
        self._conn.close()

    def _loop(self) -> None:
        while True:
            self._due.wait()
            if self._stopping.is_set():
                return
            self._due.clear()
            self._checkpoint()
            if self._stopping.wait(self._interval):
                return

    def _checkpoint(self) -> None:
        try:
            with self._running:
                self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:
            self._failing.log(
                "checkpoint failed (%s); the next commit tries again", exc, exc_info=None if refused(exc) else exc
            )
        else:
            self._failing.recovered("checkpoints go through again")


def _identity(path: str) -> tuple[int, int] | None:
    """The file at `path` (its device and inode), None if there is none."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino


def take(ops: queue.SimpleQueue[Op | None], limit: int) -> list[Op]:
    """The next commit's ops: whatever is queued, up to `limit` rows (an accept counts its rows,
    any other op one), waiting for the first; empty once the stop mark (None) comes first.

    The first op is taken whatever its size. Bounding by rows, two large accepts queued together
    are committed and answered one after the other, so the first one's answer does not wait for
    the second one's rows. A stop mark after some ops is put back, for the next call to see.
    """
    first = ops.get()
    if first is None:
        return []
    batch = [first]
    rows = _rows(first)
    while rows < limit:
        try:
            op = ops.get_nowait()
        except queue.Empty:
            break
        if op is None:
            ops.put(None)  # nothing comes after it
            break
        batch.append(op)
        rows += _rows(op)
    return batch


def _rows(op: Op) -> int:
    return len(op.args) if op.kind == "accept" else 1


def _receive(conn: Connection, ops: queue.SimpleQueue[Op | None]) -> None:
    # Reads all the time, so the server never waits on a full socket while a batch commits.
    while True:
        try:
            frame = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            frame = None
        if frame is None:
            ops.put(None)
            return
        for kind, args in frame:
            if kind == "accept" and args.__class__ is tuple:
                args = Batch.unpack(args)
            ops.put(Op(kind, args))


def _dumps(outcomes: list[tuple[bool, Any]]) -> bytes:
    try:
        return pickle.dumps(outcomes, pickle.HIGHEST_PROTOCOL)
    except Exception:  # an exception that does not pickle: send its text instead
        return pickle.dumps(
            [(ok, value if ok else StoreError(f"{type(value).__name__}: {value}")) for ok, value in outcomes],
            pickle.HIGHEST_PROTOCOL,
        )


def main(argv: Sequence[str]) -> None:
    """`python -m eventrun.engine.writer FD PATH BATCH_LIMIT`, as WriterProcess starts it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    undumpable()  # (it holds the store open: no function is to reach its descriptors)
    log_to_stderr(logging.WARNING, "eventrun store writer")
    fd, path, batch_limit = argv
    serve(Connection(int(fd)), Path(path), int(batch_limit))


if __name__ == "__main__":
    main(sys.argv[1:])
