"""The store's writer process: writes survive its stop, a dead writer is named and replaced."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import signal
import sqlite3
import time
import tracemalloc
from pathlib import Path
from typing import Iterator

import pytest

from eventrun.engine.api import Accepted, Status
from eventrun.engine.envelope import now_rfc3339, request_ids
from eventrun.engine.errors import StoreError
from eventrun.engine.store import NewInvocation, SQLiteStore
from eventrun.engine.writer import SEND_AT_ONCE, Checkpointer, take
from eventrun.engine.writes import SCHEMA, Op, connect


@pytest.fixture
def store(sqlite_store: SQLiteStore) -> SQLiteStore:
    """The writer process is the SQLite store's."""
    return sqlite_store


def row(event_id: str) -> NewInvocation:
    seq, (request_id,) = request_ids(1)
    return NewInvocation(request_id, "f", "/http/f", event_id, "http", now_rfc3339(), b'{"id":"%s"}' % event_id.encode(), seq)


async def test_writes_queued_at_close_are_committed_and_answered(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "eventrun.db")
    store.open()
    rows = [row(str(i)) for i in range(50)]
    tasks = [asyncio.create_task(store.accept([r])) for r in rows]
    await asyncio.sleep(0)  # every accept is sent, none answered yet
    store.close()
    assert await asyncio.gather(*tasks) == [[Accepted(r.request_id, True)] for r in rows]
    reopened = SQLiteStore(tmp_path / "eventrun.db")
    reopened.open()
    try:
        assert [rid for rid, _ in await reopened.queued()] == [r.request_id for r in rows]
    finally:
        reopened.close()


async def test_a_killed_writer_fails_its_writes_by_name_and_a_new_one_takes_over(store: SQLiteStore) -> None:
    first = row("1")
    await store.accept([first])
    pid = store.writer_pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    pending = asyncio.create_task(store.accept([row("2")]))
    await asyncio.sleep(0.1)
    assert not pending.done()
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(StoreError, match=rf"writer process {pid} was killed by signal 9"):
        await pending
    second = row("3")
    assert await store.accept([second]) == [Accepted(second.request_id, True)]
    assert store.writer_pid not in (None, pid)
    assert await store.mark_running(first.request_id, now_rfc3339())
    invocation = await store.get(first.request_id)
    assert invocation is not None and invocation.status is Status.RUNNING


async def test_a_writer_gone_before_the_first_write_is_replaced_without_losing_it(store: SQLiteStore) -> None:
    pid = store.writer_pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # gone (not reaped), before anything was sent to it
    new = row("1")
    assert await store.accept([new]) == [Accepted(new.request_id, True)]
    assert store.writer_pid not in (None, pid)


async def test_the_writer_ignores_interrupts_meant_for_the_server(store: SQLiteStore) -> None:
    # Ctrl-C reaches every process of the terminal's group; the server decides when the writer stops.
    pid = store.writer_pid
    assert pid is not None
    os.kill(pid, signal.SIGINT)
    os.kill(pid, signal.SIGTERM)
    new = row("1")
    assert await store.accept([new]) == [Accepted(new.request_id, True)]
    assert store.writer_pid == pid


async def test_a_large_accept_is_committed_while_the_event_loop_is_still_busy(store: SQLiteStore) -> None:
    # A Kafka batch goes to the writer as it is submitted, not at the end of the loop's turn, so
    # the writer commits it while the server builds the next one.
    rows = [row(str(i)) for i in range(SEND_AT_ONCE)]
    accepting = asyncio.create_task(store.accept(rows))
    await asyncio.sleep(0)  # the accept's first step has run: its op is submitted
    reader = sqlite3.connect(store.path)
    try:
        deadline = time.monotonic() + 10
        count = 0
        while count < len(rows) and time.monotonic() < deadline:  # the loop gets no turn meanwhile
            time.sleep(0.01)
            (count,) = reader.execute("SELECT COUNT(*) FROM invocations").fetchone()
        assert count == len(rows), "the accept waited for the event loop's next turn to be sent"
    finally:
        reader.close()
    assert await accepting == [Accepted(r.request_id, True) for r in rows]


def test_a_commit_takes_what_is_queued_up_to_the_row_limit() -> None:
    ops: queue.SimpleQueue[Op | None] = queue.SimpleQueue()
    first = Op("accept", [row(f"a{i}") for i in range(3)])
    second = Op("accept", [row(f"b{i}") for i in range(3)])
    singles = [Op("running", (f"r{i}", now_rfc3339())) for i in range(5)]
    for op in (first, second, *singles, None):
        ops.put(op)
    assert take(ops, 3) == [first]  # not merged with the next accept: answered on its own
    assert take(ops, 3) == [second]
    assert take(ops, 3) == singles[:3]
    assert take(ops, 3) == singles[3:]  # the stop mark after them is left for the next take
    assert take(ops, 3) == []
    ops.put(Op("accept", [row(f"c{i}") for i in range(5)]))
    assert len(take(ops, 3)[0].args) == 5  # one op larger than the limit still goes whole


def test_a_store_that_cannot_be_opened_says_which_and_why(tmp_path: Path) -> None:
    (tmp_path / "eventrun.db").mkdir()  # a folder where the file should be
    store = SQLiteStore(tmp_path / "eventrun.db")
    with pytest.raises(StoreError, match=r"cannot open the store .*eventrun\.db: OperationalError"):
        store.open()


def test_the_wal_stays_bounded_while_writes_go_on(tmp_path: Path) -> None:
    path = tmp_path / "eventrun.db"
    db = connect(path)
    db.executescript(SCHEMA)
    db.execute("PRAGMA wal_autocheckpoint=0")  # as in the writer: checkpoints are the Checkpointer's
    limit = 256 * 1024
    checkpoints = Checkpointer(path, limit=limit)
    batch = 100 * 1024  # bytes of envelopes a commit
    try:
        for n in range(60):
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                "INSERT INTO state (key, value) VALUES (?, ?)", [(f"{n}-{i}", "x" * 1024) for i in range(batch // 1024)]
            )
            db.execute("COMMIT")
            checkpoints.committed(db)
        wal = Path(f"{path}-wal").stat().st_size
        assert wal <= limit + 2 * batch, f"the WAL grew to {wal} bytes"
    finally:
        checkpoints.close()
        db.close()
    assert not Path(f"{path}-wal").exists() or Path(f"{path}-wal").stat().st_size == 0
    reopened = connect(path)
    try:
        assert reopened.execute("SELECT COUNT(*) FROM state").fetchone() == (60 * (batch // 1024),)
    finally:
        reopened.close()


def test_the_checkpoint_thread_copies_commits_into_the_database_file(tmp_path: Path) -> None:
    # Between checkpoints the committed pages live only in the WAL; the database file grows as
    # the thread copies them over, with no checkpoint on the commit path itself.
    path = tmp_path / "eventrun.db"
    db = connect(path)
    db.executescript(SCHEMA)
    db.execute("PRAGMA wal_autocheckpoint=0")
    checkpoints = Checkpointer(path, interval=0.01, limit=1 << 30)
    empty = path.stat().st_size
    try:
        for n in range(20):
            db.execute("BEGIN IMMEDIATE")
            db.executemany("INSERT INTO state (key, value) VALUES (?, ?)", [(f"{n}-{i}", "x" * 1024) for i in range(100)])
            db.execute("COMMIT")
            checkpoints.committed(db)
        deadline = time.monotonic() + 10
        while path.stat().st_size < empty + 20 * 100 * 1024 and time.monotonic() < deadline:
            time.sleep(0.02)
            checkpoints.committed(db)  # as the next commits would
        assert path.stat().st_size >= empty + 20 * 100 * 1024, "no checkpoint copied the commits"
        assert Path(f"{path}-wal").stat().st_size > 0  # PASSIVE ones: the WAL file is reused, not emptied
    finally:
        checkpoints.close()
        db.close()


async def test_the_server_keeps_nothing_per_write_once_it_is_answered(store: SQLiteStore) -> None:
    # The server's end of the writer once kept a record of every frame sent and answered: its
    # memory grew with every write for as long as it served.
    async def writes(n: int) -> None:
        for i in range(n):  # (one at a time: a frame each way per write)
            await store.accept([row(str(i))])

    await writes(200)  # (warmed up: caches, the deque's blocks)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        await writes(3_000)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    kept = [
        stat for stat in after.compare_to(before, "filename")
        if stat.traceback[0].filename.endswith(os.path.join("engine", "writer.py"))
    ]
    assert sum(stat.size_diff for stat in kept) < 64 * 1024, kept


class RefusingConnection:
    """A connection whose every statement the store refuses, as on a full disk."""

    def execute(self, sql: str) -> sqlite3.Cursor:
        error = sqlite3.OperationalError("database or disk is full")
        error.sqlite_errorcode = sqlite3.SQLITE_FULL  # type: ignore[attr-defined]
        raise error


def test_failing_checkpoints_are_logged_once_a_while_and_once_when_one_goes_through(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "eventrun.db"
    db = connect(path)
    db.executescript(SCHEMA)
    db.close()
    checkpoints = Checkpointer(path, interval=60)  # (its thread waits for a commit, which never comes)
    working = checkpoints._conn
    try:
        with caplog.at_level(logging.WARNING, logger="eventrun.engine.writer"):
            checkpoints._conn = RefusingConnection()  # type: ignore[assignment]
            for _ in range(50):
                checkpoints._checkpoint()
            checkpoints._conn = working
            checkpoints._checkpoint()
            checkpoints._checkpoint()
    finally:
        checkpoints._conn = working
        checkpoints.close()
    lines = [(r.levelno, r.getMessage(), r.exc_info) for r in caplog.records if r.name == "eventrun.engine.writer"]
    assert lines == [
        (logging.ERROR, "checkpoint failed (database or disk is full); the next commit tries again", None),
        (logging.WARNING, "checkpoints go through again (49 more failed since the last such line)", None),
    ]


def test_a_checkpoint_emptying_an_oversized_wal_that_fails_leaves_the_writer_going(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The checkpoint on the commit path (the WAL past its limit) let SQLite's refusal out of
    # committed(), which ended the writer process.
    path = tmp_path / "eventrun.db"
    db = connect(path)
    db.executescript(SCHEMA)
    db.execute("PRAGMA wal_autocheckpoint=0")
    checkpoints = Checkpointer(path, interval=60, limit=0)  # (every commit finds the WAL oversized)
    try:
        db.execute("INSERT INTO state (key, value) VALUES ('k', 'v')")
        with caplog.at_level(logging.WARNING, logger="eventrun.engine.writer"):
            for _ in range(3):
                checkpoints.committed(RefusingConnection())  # type: ignore[arg-type]
        checkpoints.committed(db)  # and the next one goes through
        assert Path(f"{path}-wal").stat().st_size == 0, "the WAL was emptied"
    finally:
        checkpoints.close()
        db.close()
    # (Once a while: the thread's own checkpoints, going through meanwhile, may end a series.)
    failed = {r.getMessage() for r in caplog.records if "checkpoint failed" in r.getMessage()}
    assert failed == {"checkpoint failed (database or disk is full); the next commit tries again"}, failed


def crash_copy(path: Path, into: Path) -> sqlite3.Connection:
    """What a crash (kill -9) would leave of the store: its file and the WAL at its path (the
    -shm is only an index SQLite rebuilds), opened elsewhere."""
    into.mkdir()
    for suffix in ("", "-wal"):
        source = Path(f"{path}{suffix}")
        if source.exists():
            (into / f"{path.name}{suffix}").write_bytes(source.read_bytes())
    return sqlite3.connect(into / path.name)


@contextlib.contextmanager
def logged_store(path: Path) -> Iterator[SQLiteStore]:
    """An open SQLite store (opened in the test's body, so that capfd captures its writer's log)."""
    store = SQLiteStore(path)
    store.open()
    try:
        yield store
    finally:
        store.close()


async def test_a_wal_removed_under_the_writer_loses_no_commit_and_is_made_again(
    capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # SQLite goes on writing to a removed WAL (an operator cleaning up, a backup tool), and a
    # crash then lost every commit it held that no checkpoint had copied yet.
    with logged_store(tmp_path / "eventrun.db") as store:
        await _remove_the_wal(store, tmp_path)
    lines = [line for line in capfd.readouterr().err.splitlines() if "eventrun store writer" in line]
    wal = f"{tmp_path / 'eventrun.db'}-wal"
    assert len(lines) == 1 and f"{wal} was removed while the store was open" in lines[0], lines
    assert "nothing was lost" in lines[0]


async def _remove_the_wal(store: SQLiteStore, tmp_path: Path) -> None:
    first, second, third = row("1"), row("2"), row("3")
    await store.accept([first])  # (the checkpoint thread copies it now, then waits its interval)
    wal = Path(f"{store.path}-wal")
    removed = wal.stat().st_ino
    wal.unlink()
    await store.accept([second])
    pid = store.writer_pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # nothing more happens in the writer: a crash now
    try:
        crashed = crash_copy(store.path, tmp_path / "crashed")
        ids = {rid for (rid,) in crashed.execute("SELECT request_id FROM invocations")}
        crashed.close()
    finally:
        os.kill(pid, signal.SIGCONT)
    assert ids == {first.request_id, second.request_id}
    assert wal.exists() and wal.stat().st_ino != removed
    await store.accept([third])  # written to the new WAL, and read through it
    got = await store.get(third.request_id)
    assert got is not None and got.status is Status.QUEUED


async def test_a_shm_removed_under_the_writer_leaves_no_reader_on_the_old_one(
    capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # With the writer on a new -shm and the server's reader on the removed one, the reader would
    # no longer see new commits, and answer as if they had not been made.
    shm = Path(f"{tmp_path / 'eventrun.db'}-shm")
    with logged_store(tmp_path / "eventrun.db") as store:
        await store.accept([row("1")])
        shm.unlink()
        await store.accept([row("2")])
        later = row("3")
        await store.accept([later])
        got = await store.get(later.request_id)
        assert got is not None and got.request_id == later.request_id
        assert shm.exists()
    lines = [line for line in capfd.readouterr().err.splitlines() if "eventrun store writer" in line]
    assert len(lines) == 1 and f"{shm} was removed while the store was open" in lines[0], lines


def test_a_store_path_too_long_for_sqlite_says_so(tmp_path: Path) -> None:
    # SQLite's own word is "unable to open database file", which says nothing of the cause.
    folder = tmp_path
    while len(str(folder)) < 600:
        folder = folder / ("d" * 100)
    store = SQLiteStore(folder / "eventrun.db")
    length = len(os.fsencode(store.path))
    with pytest.raises(StoreError) as raised:
        store.open()
    assert str(raised.value) == (
        f"cannot open the store {store.path}: its path is {length} bytes long, and SQLite opens paths of at most"
        " 504 bytes (absolute, links resolved): give data_dir a shorter path"
    )
