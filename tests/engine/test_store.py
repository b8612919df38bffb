"""The SQLite invocation store: idempotent acceptance, transitions, recovery, listing."""

from __future__ import annotations

import base64
import fcntl
import os
import pickle
import sqlite3
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest

from eventrun.engine.api import Accepted, Status
from eventrun.engine import envelope as envelope_module
from eventrun.engine.envelope import expand, new_id, now_rfc3339, request_ids, request_seq, template_key, template_prefix
from eventrun.engine.errors import InvalidParameter, ManifestError, StoreError
from eventrun.engine.logs import LogHub
from eventrun.engine.store import Batch, NewInvocation, SQLiteStore, Unstarted
from eventrun.engine.writes import SCHEMA, SCHEMA_VERSION, by_request_id


def row(event_id: str, *, function: str = "f", source: str = "/http/f") -> NewInvocation:
    seq, (request_id,) = request_ids(1)
    return NewInvocation(
        request_id=request_id,
        function=function,
        source=source,
        event_id=event_id,
        trigger="http",
        created_at=now_rfc3339(),
        envelope=b'{"id":"%s"}' % event_id.encode(),
        seq=seq,
    )


async def test_acceptance_is_idempotent_on_function_source_and_id(store: SQLiteStore) -> None:
    first = row("e1")
    (accepted,) = await store.accept([first])
    assert accepted == Accepted(first.request_id, True)
    again = row("e1")
    assert await store.accept([again]) == [Accepted(first.request_id, False)]
    # Another function, or another source, is another event.
    other_fn, other_source = row("e1", function="g"), row("e1", source="/http/g")
    answers = await store.accept([other_fn, other_source])
    assert answers == [Accepted(other_fn.request_id, True), Accepted(other_source.request_id, True)]


async def test_a_batch_with_known_and_repeated_events_answers_each(store: SQLiteStore) -> None:
    (known,) = await store.accept([row("a")])
    batch = [row("a"), row("b"), row("b"), row("c")]
    answers = await store.accept(batch)
    assert answers[0] == Accepted(known.request_id, False)
    assert answers[1] == Accepted(batch[1].request_id, True)
    assert answers[2] == Accepted(batch[1].request_id, False)  # the same event twice in one batch
    assert answers[3] == Accepted(batch[3].request_id, True)
    assert all([(await store.get(a.request_id)) is not None for a in answers])
    assert (await store.get(batch[2].request_id)) is None  # the repeat got no row of its own


async def test_accepted_events_survive_reopening(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "eventrun.db")
    store.open()
    new = row("e1")
    await store.accept([new])
    store.close()
    reopened = SQLiteStore(tmp_path / "eventrun.db")
    reopened.open()
    try:
        invocation = await reopened.get(new.request_id)
        assert invocation is not None and invocation.status is Status.QUEUED
        assert (await reopened.envelope(new.request_id)) == new.envelope
        assert (await reopened.queued()) == [(new.request_id, "f")]
    finally:
        reopened.close()


async def test_a_run_starts_once_and_ends_once(store: SQLiteStore) -> None:
    new = row("e1")
    await store.accept([new])
    # (distinct start times: a start at the same time is the same start, tried again)
    assert await store.mark_running(new.request_id, "2026-01-01T00:00:00.000Z")
    assert not await store.mark_running(new.request_id, "2026-01-01T00:00:00.001Z")
    assert await store.finish(new.request_id, Status.FINISHED, now_rfc3339(), result={"ok": [1, 2]})
    # A late second outcome (e.g. terminate racing the end) does not overwrite the first.
    assert not await store.finish(new.request_id, Status.ABORTED, now_rfc3339(), error_type="Aborted")
    invocation = await store.get(new.request_id)
    assert invocation is not None
    assert invocation.status is Status.FINISHED
    assert invocation.result == {"ok": [1, 2]}
    assert invocation.error_type is None
    assert invocation.duration_ms is not None and invocation.duration_ms >= 0


async def test_a_run_starts_with_the_envelope_kept_from_its_acceptance(
    sqlite_store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    (known,) = await sqlite_store.accept([row("known")])
    kept, again, terminated = row("kept"), row("known"), row("terminated")
    await sqlite_store.accept([kept, again, terminated])  # `again` is a known event: no run of its own
    assert await sqlite_store.finish(terminated.request_id, Status.ABORTED, now_rfc3339())  # ended unstarted
    assert len(sqlite_store._unstarted) == 2  # known and kept

    def no_reads(*_: object) -> None:
        raise AssertionError("the envelope was read back from the store")

    with monkeypatch.context() as patched:
        patched.setattr(sqlite_store, "_find", no_reads)
        assert await sqlite_store.begin(kept.request_id, "2026-01-01T00:00:00.000Z") == kept.envelope
    assert len(sqlite_store._unstarted) == 1
    assert await sqlite_store.begin(terminated.request_id, now_rfc3339()) is None  # ended: read, and not started
    # started once only (a start at another time; at the same time it is the same start, tried again)
    assert await sqlite_store.begin(kept.request_id, "2026-01-01T00:00:00.001Z") is None


async def test_past_its_bounds_a_start_reads_its_envelope_from_the_store(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "eventrun.db")
    store._unstarted = Unstarted(entries=2, size=1000)
    store.open()
    try:
        rows = [row(f"e{n}") for n in range(4)]
        large = row("large")._replace(envelope=b"x" * 1001)
        await store.accept(rows + [large])
        assert len(store._unstarted) == 2  # the first two
        for new in rows + [large]:
            assert await store.begin(new.request_id, now_rfc3339()) == new.envelope
        assert len(store._unstarted) == 0
        kept = Unstarted(entries=10, size=10)
        kept.keep([r._replace(envelope=b"12345") for r in rows], [Accepted(r.request_id, True) for r in rows])
        assert len(kept) == 2  # 10 bytes in all
        assert kept.take(rows[0].request_id) == b"12345" and kept.take(rows[0].request_id) is None
    finally:
        store.close()


async def test_recovery_fails_running_runs_and_keeps_queued_ones(sqlite_store: SQLiteStore) -> None:
    store = sqlite_store
    running, queued = row("r"), row("q")
    await store.accept([running, queued])
    await store.mark_running(running.request_id, now_rfc3339())
    assert await store.recover(now_rfc3339(), "the server stopped") == [running.request_id]
    ended = await store.get(running.request_id)
    assert ended is not None
    assert (ended.status, ended.error_type, ended.error_message) == (Status.FAILED, "ServerStopped", "the server stopped")
    assert (await store.queued()) == [(queued.request_id, "f")]


async def test_the_async_flag_is_locked_at_creation(store: SQLiteStore) -> None:
    await store.register_functions({"f": True, "g": False}, now_rfc3339())
    await store.register_functions({"f": True, "g": False, "h": True}, now_rfc3339())  # unchanged: fine
    with pytest.raises(ManifestError) as caught:
        await store.register_functions({"f": False}, now_rfc3339())
    message = str(caught.value)
    assert "functions.f.async_execution" in message and "new name" in message


async def test_listing_pages_newest_first_with_a_cursor(store: SQLiteStore) -> None:
    rows = [row(f"e{i}") for i in range(5)]
    for new in rows:
        await store.accept([new])
    seen: list[str] = []
    cursor: str | None = None
    sizes = []
    while True:
        page, cursor = await store.list(limit=2, cursor=cursor)
        sizes.append(len(page))
        seen += [i.request_id for i in page]
        if cursor is None:
            break
    assert sizes == [2, 2, 1]
    assert seen == [r.request_id for r in reversed(rows)]
    await store.finish(rows[0].request_id, Status.ABORTED, now_rfc3339())
    aborted, _ = await store.list(status=Status.ABORTED)
    assert [i.request_id for i in aborted] == [rows[0].request_id]
    with pytest.raises(InvalidParameter):
        (await store.list(cursor="not-a-cursor"))


async def test_a_page_of_large_results_ends_at_the_budget_and_the_cursor_goes_on(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Newest first, each run holds: 402, 402, 1502, 600 (an error message), 0 (queued), 402, 402 bytes.
    rows = [row(f"e{i}") for i in range(7)]
    await store.accept(rows)
    big, small = "b" * 1500, "s" * 400
    results = {0: small, 1: small, 4: big, 5: small, 6: small}
    for i, result in results.items():
        await store.finish(rows[i].request_id, Status.FINISHED, now_rfc3339(), result=result)
    await store.finish(rows[3].request_id, Status.FAILED, now_rfc3339(), error_type="E", error_message="m" * 600)
    monkeypatch.setattr(store, "page_bytes", 1000)
    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        page, cursor = await store.list(limit=5, cursor=cursor)
        pages.append([i.request_id for i in page])
        for invocation in page:  # (every result whole)
            index = next(n for n, r in enumerate(rows) if r.request_id == invocation.request_id)
            assert invocation.result == results.get(index)
        if cursor is None:
            break
    ids = [r.request_id for r in reversed(rows)]
    # The first run of a page always goes in (even one past the budget on its own); a page
    # ends before the run that would take it past; no run is lost or repeated.
    assert pages == [ids[0:2], ids[2:3], ids[3:5], ids[5:7]]
    monkeypatch.setattr(store, "page_bytes", 10_000)
    page, cursor = await store.list(limit=5)
    assert [i.request_id for i in page] == ids[:5] and cursor is not None  # within the budget: `limit` rules
    page, cursor = await store.list(function="f", status=Status.FINISHED, limit=5, cursor=cursor)
    assert [i.request_id for i in page] == ids[5:7] and cursor is None


async def test_a_page_without_results_neither_reads_nor_counts_them(store: SQLiteStore) -> None:
    # Newest first: a failed run (its error message counts still), then four results of 3 MiB.
    rows = [row(f"e{i}") for i in range(5)]
    await store.accept(rows)
    big = "r" * (3 * 1024 * 1024)
    for new in rows[:4]:
        await store.finish(new.request_id, Status.FINISHED, now_rfc3339(), result=big)
    await store.finish(rows[4].request_id, Status.FAILED, now_rfc3339(), error_type="E", error_message="m" * 600)
    ids = [r.request_id for r in reversed(rows)]
    page, cursor = await store.list(limit=5)
    assert [i.request_id for i in page] == ids[:3] and cursor is not None  # the 8 MiB budget cuts it
    page, cursor = await store.list(limit=5, results=False)
    assert [i.request_id for i in page] == ids and cursor is None  # results count nothing: `limit` rules
    assert [i.result for i in page] == [None] * 5
    assert (page[0].status, page[0].error_type, page[0].error_message) == (Status.FAILED, "E", "m" * 600)
    assert [i.status for i in page[1:]] == [Status.FINISHED] * 4
    page, cursor = await store.list(status=Status.FINISHED, limit=2, results=False)
    assert [i.request_id for i in page] == ids[1:3] and cursor is not None
    page, cursor = await store.list(status=Status.FINISHED, limit=2, cursor=cursor, results=False)
    assert [i.request_id for i in page] == ids[3:5] and cursor is None


async def test_a_page_budget_counts_an_error_message_in_bytes(store: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    # SQLite counted a message's characters: pages of 4-byte characters went far past 8 MiB.
    rows = [row(f"e{i}") for i in range(2)]
    await store.accept(rows)
    for new in rows:
        await store.finish(new.request_id, Status.FAILED, now_rfc3339(), error_type="E", error_message="\U0001f600" * 200)
    monkeypatch.setattr(store, "page_bytes", 1000)  # 200 characters, 800 bytes a message: one a page
    for results in (True, False):
        page, cursor = await store.list(limit=5, results=results)
        assert len(page) == 1 and cursor is not None, (results, len(page))


async def test_sqlite_reads_no_result_for_a_page_without_results(sqlite_store: SQLiteStore) -> None:
    store = sqlite_store
    new = row("e1")
    await store.accept([new])
    await store.finish(new.request_id, Status.FINISHED, now_rfc3339(), result={"big": "r" * 100_000})
    read: set[str] = set()

    def note_reads(action: int, table: str | None, column: str | None, *_: object) -> int:
        if action == sqlite3.SQLITE_READ and table == "invocations" and column:
            read.add(column)
        return sqlite3.SQLITE_OK

    store._db.set_authorizer(note_reads)  # (every column a statement reads, as SQLite prepares it)
    try:
        (listed,), _ = await store.list(results=False)
        assert listed.request_id == new.request_id and listed.result is None
        assert "error_message" in read and "result" not in read
        await store.list()
        assert "result" in read  # (what the authorizer sees of a list with results)
    finally:
        store._db.set_authorizer(None)


@pytest.mark.parametrize("value", ["seq:99999999999999999999999", "seq:9223372036854775808", "seq:\u00b2", "id:\u00b2"])
async def test_a_forged_cursor_is_refused_as_one(store: SQLiteStore, value: str) -> None:
    cursor = base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")
    with pytest.raises(InvalidParameter, match="is not a cursor this server gave out"):
        await store.list(cursor=cursor)


async def test_trigger_state_is_remembered(store: SQLiteStore) -> None:
    assert (await store.get_state("timer:f/nightly")) is None
    await store.put_state("timer:f/nightly", "2026-01-01T02:00:00Z")
    await store.put_state("timer:f/nightly", "2026-01-02T02:00:00Z")
    assert (await store.get_state("timer:f/nightly")) == "2026-01-02T02:00:00Z"


async def test_active_runs_are_counted_per_source(store: SQLiteStore) -> None:
    a, b, c = row("1", source="timer://f/t"), row("2", source="timer://f/t"), row("3", source="/http/f")
    await store.accept([a, b, c])
    await store.finish(a.request_id, Status.FINISHED, now_rfc3339())
    assert (await store.count_active("f", "timer://f/t")) == 1
    assert (await store.count_active("f", "/http/f")) == 1
    # A replay of a timer's run is not that timer's run: it does not hold up its next slot.
    await store.replay(row("replay-of-1", source="timer://f/t"), a.request_id)
    assert (await store.count_active("f", "timer://f/t")) == 1


async def test_a_run_is_found_by_its_request_id_without_an_index_of_them(sqlite_store: SQLiteStore) -> None:
    store = sqlite_store
    new = row("e1")
    await store.accept([new])
    db = sqlite3.connect(store.path)
    indexed = {tuple(c for (c,) in db.execute("SELECT name FROM pragma_index_info(?)", (i,))) for (i,) in
               db.execute("SELECT name FROM pragma_index_list('invocations')")}
    assert ("request_id",) not in indexed and not by_request_id(db)
    assert db.execute("SELECT seq FROM invocations").fetchall() == [(new.seq,)]  # the row is the RequestId's seq
    db.close()
    assert (await store.get(new.request_id)) is not None and (await store.envelope(new.request_id)) == new.envelope
    # Same seq, another random part; not a RequestId at all: neither is found.
    forged = new.request_id[:-1] + ("0" if new.request_id[-1] != "0" else "1")
    assert (await store.get(forged)) is None and (await store.envelope(forged)) is None
    assert (await store.get("not-a-request-id")) is None
    assert await store.mark_running(forged, now_rfc3339()) is False
    assert await store.mark_running(new.request_id, now_rfc3339()) is True
    assert await store.finish(forged, Status.FINISHED, now_rfc3339()) is False
    assert await store.finish(new.request_id, Status.FINISHED, now_rfc3339()) is True


# The schema as eventrun made it before runs were keyed by their RequestId's seq: the same,
# but for a unique index of RequestIds.
_NOW_REQUEST_ID = "request_id TEXT NOT NULL,  -- unique, as it determines seq"
_EARLIER_SCHEMA = SCHEMA.replace(_NOW_REQUEST_ID, "request_id TEXT NOT NULL UNIQUE,")


async def test_a_store_made_before_keeps_finding_runs_by_request_id(tmp_path: Path) -> None:
    path = tmp_path / "eventrun.db"
    assert _NOW_REQUEST_ID in SCHEMA
    db = sqlite3.connect(path)
    db.executescript(_EARLIER_SCHEMA)
    earlier = [new_id(), new_id()]  # RequestIds as they were given out: random below the millisecond
    db.executemany(
        "INSERT INTO invocations (seq, request_id, function, source, event_id, trigger, status, created_at, envelope)"
        " VALUES (?, ?, 'f', '/http/f', ?, 'http', 'QUEUED', ?, ?)",
        [(n + 1, rid, f"old{n}", now_rfc3339(), b"{}") for n, rid in enumerate(earlier)],
    )
    db.commit()
    assert by_request_id(db)
    db.close()
    store = SQLiteStore(path)
    store.open()
    try:
        assert [r for r, _ in (await store.queued())] == earlier
        assert (await store.get(earlier[0])) is not None and (await store.envelope(earlier[1])) == b"{}"
        assert await store.mark_running(earlier[0], now_rfc3339()) is True
        assert await store.finish(earlier[0], Status.FINISHED, now_rfc3339()) is True
        new = row("new")
        assert await store.accept([new, row("old0", source="/http/f")]) == [
            Accepted(new.request_id, True), Accepted(earlier[0], False),  # dedupe spans old and new rows
        ]
        assert await store.mark_running(new.request_id, now_rfc3339()) is True
        assert (await store.get(new.request_id)).status is Status.RUNNING  # type: ignore[union-attr]
        assert (await store.get(earlier[0])).status is Status.FINISHED  # type: ignore[union-attr]
        page, _ = await store.list()
        assert [i.request_id for i in page] == [new.request_id, earlier[1], earlier[0]]  # newest first
    finally:
        store.close()


async def test_request_ids_given_out_after_opening_come_after_every_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "eventrun.db"
    store = SQLiteStore(path)
    store.open()
    monkeypatch.setattr(envelope_module, "_issued", [(time.time_ns() // 1_000_000 + 3_600_000) << 12])
    ahead = row("ahead")  # given out by a server whose clock was an hour ahead
    await store.accept([ahead])
    store.close()
    monkeypatch.setattr(envelope_module, "_issued", [0])  # a new process
    store.open()
    try:
        later = row("later")
        assert later.seq > ahead.seq
        await store.accept([later])
        page, _ = await store.list()
        assert [i.request_id for i in page] == [later.request_id, ahead.request_id]
        assert (await store.get(ahead.request_id)) is not None
    finally:
        store.close()


async def test_a_store_in_use_is_refused_until_let_go(tmp_path: Path) -> None:
    first = SQLiteStore(tmp_path / "eventrun.db")
    first.open()
    second = SQLiteStore(tmp_path / "eventrun.db")
    try:
        with pytest.raises(StoreError, match=rf"is in use by another eventrun server \(process {os.getpid()}\)"):
            second.open()
        assert second.writer_pid is None, "nothing was started for the refused store"
        assert await first.accept([row("e1")])  # the first goes on
    finally:
        first.close()
    second.open()
    second.close()



async def test_removing_the_lock_file_leaves_the_store_held(tmp_path: Path) -> None:
    # The file only names the holder; left behind by a stop it looks stale, and may be removed.
    first, second = SQLiteStore(tmp_path / "eventrun.db"), SQLiteStore(tmp_path / "eventrun.db")
    first.open()
    try:
        (tmp_path / "eventrun.db.lock").unlink()
        with pytest.raises(StoreError, match=r"is in use by another eventrun server; give this one"):
            second.open()
    finally:
        second.close()
        first.close()


def test_a_store_held_by_an_older_eventrun_is_refused(tmp_path: Path) -> None:
    # eventrun up to 2026-12-06 locked the lock file alone: an upgrade started while the old
    # server still drained its runs served the same store beside it.
    lock = os.open(tmp_path / "eventrun.db.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(lock, b"4242\n")
        store = SQLiteStore(tmp_path / "eventrun.db")
        with pytest.raises(StoreError, match=r"is in use by another eventrun server \(process 4242\); give this one"):
            store.open()
        assert store.writer_pid is None
    finally:
        os.close(lock)


@pytest.mark.parametrize(
    "block, reason",
    [
        ("a file where the folder goes", r"\(.*/data: File exists\)"),
        ("a folder where the lock file goes", r"\(.*/data/eventrun\.db\.lock: Is a directory\)"),
        ("a full disk", r"\(.*/data/eventrun\.db\.lock: No space left on device\)"),
    ],
)
def test_a_data_dir_that_cannot_be_locked_is_refused_in_one_line_naming_the_path(
    tmp_path: Path, block: str, reason: str
) -> None:
    data = tmp_path / "data"
    if block == "a file where the folder goes":
        data.write_text("")
    elif block == "a folder where the lock file goes":
        (data / "eventrun.db.lock").mkdir(parents=True)
    else:
        data.mkdir()
        (data / "eventrun.db.lock").symlink_to("/dev/full")  # every write: ENOSPC
    store = SQLiteStore(data / "eventrun.db")
    with pytest.raises(StoreError, match=rf"^cannot lock the store .*/data/eventrun\.db {reason}$"):
        store.open()
    assert store.writer_pid is None


def checkpoint(path: Path) -> None:
    """Copy the WAL into the database file and empty it: reads then go to the file."""
    db = sqlite3.connect(path)
    try:
        while db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]:  # busy: the writer's own runs
            time.sleep(0.01)
    finally:
        db.close()


def cut_after_first_page(path: Path) -> None:
    """Truncate the store after its first page (the schema): its runs' pages are gone."""
    db = sqlite3.connect(path)
    (page_size,) = db.execute("PRAGMA page_size").fetchone()
    db.close()
    os.truncate(path, page_size)


def damage_table(path: Path, table: str) -> None:
    """Overwrite the root page of a table with garbage, leaving the first page (the schema) whole."""
    db = sqlite3.connect(path)
    (root,) = db.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()
    (page_size,) = db.execute("PRAGMA page_size").fetchone()
    db.close()
    with open(path, "r+b") as file:
        file.seek((root - 1) * page_size)
        file.write(b"\xff" * page_size)


async def test_a_store_damaged_past_its_first_page_is_refused_at_open_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "eventrun.db"
    store = SQLiteStore(path)
    store.open()
    await store.accept([row(f"e{n}") for n in range(10)])
    store.close()
    damage_table(path, "invocations")  # the writer opens it (its schema is whole); a read of its runs fails
    for _ in range(2):  # nothing is left held by the first try: the second says the same
        store = SQLiteStore(path)
        with pytest.raises(StoreError, match=r"^cannot open the store .*eventrun\.db: DatabaseError: database disk image is malformed$"):
            store.open()
        assert store.writer_pid is None


_READS: dict[str, Callable[[SQLiteStore, str], Awaitable[Any]]] = {
    "get": lambda store, request_id: store.get(request_id),
    "envelope": lambda store, request_id: store.envelope(request_id),
    "list": lambda store, _: store.list(),
    "queued": lambda store, _: store.queued(),
    "count_active": lambda store, _: store.count_active("f", "/http/f"),
    "find_event": lambda store, _: store.find_event("f", "/http/f", "e1"),
    "counts": lambda store, _: store.counts(),
}


@pytest.mark.parametrize("read", _READS)
async def test_a_read_of_a_store_cut_short_while_open_is_a_store_error_with_the_reason(
    sqlite_store: SQLiteStore, read: str
) -> None:
    # A StoreError is answered 503 StoreUnavailable, as a refused write is (not 500 InternalError).
    (accepted,) = await sqlite_store.accept([row("e1")])
    checkpoint(sqlite_store.path)
    cut_after_first_page(sqlite_store.path)
    with pytest.raises(StoreError, match=r"^the store .*eventrun\.db refused a read \(database disk image is malformed\)$"):
        await _READS[read](sqlite_store, accepted.request_id)

async def test_an_envelope_stored_as_fields_is_read_whole_after_reopening(tmp_path: Path) -> None:
    template = b'{"id":"%(0)b","n":%(1)b}'
    stored = template_prefix(template) + b"e1\x007"
    store = SQLiteStore(tmp_path / "eventrun.db")
    store.open()
    try:
        await store.keep_templates({template})
        await store.keep_templates({template})  # known: nothing to write
        (accepted,) = await store.accept([row("e1")._replace(envelope=stored)])
        assert (await store.envelope(accepted.request_id)) == b'{"id":"e1","n":7}'
    finally:
        store.close()
    store = SQLiteStore(tmp_path / "eventrun.db")  # a new process knows no template until it reads one
    store.open()
    try:
        assert (await store.envelope(accepted.request_id)) == b'{"id":"e1","n":7}' == expand(stored, template)
        # A stored form whose template the store does not hold says so.
        (lost,) = await store.accept([row("e2")._replace(envelope=template_prefix(b"gone") + b"x")])
        with pytest.raises(StoreError, match=template_key(b"gone").hex()):
            (await store.envelope(lost.request_id))
    finally:
        store.close()


def batch(*event_ids: str, envelopes: list[bytes] | None = None) -> Batch:
    first, ids = request_ids(len(event_ids))
    if envelopes is None:
        envelopes = [b'{"id":"%s"}' % e.encode() for e in event_ids]
    return Batch("f", "kafka://orders", "kafka", now_rfc3339(), first, ids, list(event_ids), envelopes)


def test_a_batch_reads_as_its_rows_and_travels_packed() -> None:
    # Envelopes hold NUL bytes (a stored form does) or nothing; an id may hold a NUL too.
    b = batch("0-1", "0-2", "a\x00b", envelopes=[b"\x00k\x001\x002", b"", b"{}"])
    rows = [
        (rid, "f", "kafka://orders", eid, "kafka", b.created_at, env, b.first_seq + i)
        for i, (rid, eid, env) in enumerate(zip(b.request_ids, b.event_ids, b.envelopes))
    ]
    assert list(b) == b.rows() == rows and len(b) == 3 and b[1] == rows[1] and b[-1] == rows[2] and b[1:] == rows[1:]
    unpacked = Batch.unpack(pickle.loads(pickle.dumps(b.pack())))
    assert unpacked.rows() == rows and all(type(e) is bytearray for e in unpacked.envelopes)
    one = batch("0-7")
    assert Batch.unpack(one.pack()).rows() == one.rows()
    packed = batch(*(f"0-{i}" for i in range(2000))).pack()
    assert all(not isinstance(part, list) for part in packed), "columns without a NUL go as one string each"
    with pytest.raises(ValueError, match="differ in length"):
        Batch("f", "s", "kafka", now_rfc3339(), 1, ["r"], ["a", "b"], [b""])


async def test_a_batch_is_accepted_as_its_rows_would_be(store: SQLiteStore) -> None:
    (known,) = await store.accept([row("0-1", source="kafka://orders")])
    fresh = batch("0-2", "0-3")
    answers = await store.accept(fresh)
    assert answers == [Accepted(rid, True) for rid in fresh.request_ids]
    redelivered = batch("0-1", "0-2", "0-4")
    answers = await store.accept(redelivered)
    assert answers == [
        Accepted(known.request_id, False),
        Accepted(fresh.request_ids[0], False),
        Accepted(redelivered.request_ids[2], True),
    ]
    for rid, envelope in [(fresh.request_ids[1], b'{"id":"0-3"}'), (redelivered.request_ids[2], b'{"id":"0-4"}')]:
        invocation = await store.get(rid)
        assert invocation is not None and invocation.status is Status.QUEUED
        assert (await store.envelope(rid)) == envelope


async def test_listing_filters_by_trigger_and_time_of_acceptance(store: SQLiteStore) -> None:
    early = row("e1")
    await store.accept([early])
    time.sleep(0.005)  # (the next RequestIds begin with a later millisecond)
    middle = row("e2")._replace(trigger="kafka")
    await store.accept([middle])
    time.sleep(0.005)
    late = row("e3")
    await store.accept([late])
    millis = [request_seq(r.request_id) >> 12 for r in (early, middle, late)]  # type: ignore[operator]
    assert [i.request_id for i in (await store.list(trigger="kafka"))[0]] == [middle.request_id]
    assert [i.request_id for i in (await store.list(since=millis[1]))[0]] == [late.request_id, middle.request_id]
    assert [i.request_id for i in (await store.list(until=millis[1]))[0]] == [early.request_id]
    between, _ = await store.list(since=millis[1], until=millis[2])
    assert [i.request_id for i in between] == [middle.request_id]


async def test_counts_are_per_function_and_status_with_every_status(store: SQLiteStore) -> None:
    a1, a2, b1 = row("1", function="a"), row("2", function="a"), row("1", function="b")
    await store.accept([a1, a2, b1])
    await store.finish(a1.request_id, Status.ABORTED, now_rfc3339())
    counts = await store.counts()
    assert counts["a"] == {"QUEUED": 1, "RUNNING": 0, "FINISHED": 0, "FAILED": 0, "TIMED_OUT": 0, "ABORTED": 1}
    assert counts["b"]["QUEUED"] == 1 and sum(counts["b"].values()) == 1


async def test_runs_that_ended_before_a_time_are_pruned_with_their_links(store: SQLiteStore) -> None:
    old_a, old_b, queued = row("a"), row("b"), row("q")
    await store.accept([old_a, old_b, queued])
    await store.finish(old_a.request_id, Status.FINISHED, now_rfc3339())
    await store.finish(old_b.request_id, Status.FAILED, now_rfc3339())
    time.sleep(0.005)
    cutoff = int(time.time() * 1000)
    time.sleep(0.005)
    late = row("l")
    await store.replay(late, old_a.request_id)
    await store.finish(late.request_id, Status.FINISHED, now_rfc3339())
    assert sorted(await store.prune(cutoff)) == sorted([old_a.request_id, old_b.request_id])
    assert await store.get(old_a.request_id) is None and await store.get(old_b.request_id) is None
    assert await store.get(queued.request_id) is not None, "a run that has not ended stays"
    assert await store.get(late.request_id) is not None, "a run that ended after the time stays"
    assert await store.links(late.request_id) == (None, []), "the link to a pruned run goes with it"
    assert await store.prune(cutoff) == []


async def test_a_replay_under_an_event_id_recorded_before_answers_that_run_and_adds_nothing(store: SQLiteStore) -> None:
    original = row("o")
    await store.accept([original])
    await store.finish(original.request_id, Status.FAILED, now_rfc3339())
    first, again = row("replay:o:key-1"), row("replay:o:key-1")
    assert await store.replay(first, original.request_id) == first.request_id
    assert await store.replay(again, original.request_id) == first.request_id
    assert await store.get(again.request_id) is None, "no second run"
    assert await store.links(original.request_id) == (None, [first.request_id]), "no second link"


def test_a_store_is_stamped_with_its_schema_version_and_one_a_newer_eventrun_stamped_is_refused(tmp_path: Path) -> None:
    # A store carried no version: an older eventrun opened whatever a newer one had written.
    path = tmp_path / "eventrun.db"
    store = SQLiteStore(path)
    store.open()
    store.close()
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    finally:
        db.close()
    newer = SQLiteStore(path)
    with pytest.raises(StoreError, match=rf"written by a newer eventrun \(schema version {SCHEMA_VERSION + 1}; this one knows {SCHEMA_VERSION}\)"):
        newer.open()
    assert newer.writer_pid is None


async def test_a_new_data_dir_and_what_eventrun_writes_in_it_are_its_user_s_alone(tmp_path: Path) -> None:
    # They hold every event, result and log: with the usual umask (022) other users could read them all.
    old = os.umask(0o022)
    try:
        data_dir = tmp_path / "data"
        store = SQLiteStore(data_dir / "eventrun.db")
        store.open()
        try:
            await store.accept([row("e1")])
            hub = LogHub(data_dir / "logs", 1000)
            hub.write("r1", ["a line"])
            hub.close("r1")
            modes = {
                path.name: path.stat().st_mode & 0o777
                for path in [data_dir, *data_dir.glob("eventrun.db*"), *data_dir.rglob("*.log")]
            }
        finally:
            store.close()
    finally:
        os.umask(old)
    assert modes == {
        "data": 0o700, "eventrun.db": 0o600, "eventrun.db-wal": 0o600, "eventrun.db-shm": 0o600,
        "eventrun.db.lock": 0o600, "r1.log": 0o600,
    }, {name: oct(mode) for name, mode in modes.items()}


def test_a_data_dir_others_can_read_is_said_and_left_as_it_is(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data_dir = tmp_path / "shared"
    data_dir.mkdir()
    data_dir.chmod(0o755)
    store = SQLiteStore(data_dir / "eventrun.db")
    store.open()
    store.close()
    assert data_dir.stat().st_mode & 0o777 == 0o755, "a folder eventrun did not make keeps its mode"
    (warning,) = [r.getMessage() for r in caplog.records if "other users" in r.getMessage()]
    assert warning == (
        f"the data_dir {data_dir} can be read by other users of this machine (mode 755), and it holds every event, "
        f"result and log: `chmod 700 {data_dir}` keeps them out"
    )
