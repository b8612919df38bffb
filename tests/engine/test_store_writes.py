"""The store's write path: merged statements give each op the answer it would get alone."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any, Iterator

import pytest

from eventrun.engine.api import Accepted, Status
from eventrun.engine import writes
from eventrun.engine.envelope import dumps, now_rfc3339, request_ids, request_seq
from eventrun.engine.failures import FailureLog
from eventrun.engine.writes import (
    ALL_NEW, ROWS_PER_STATEMENT, SCHEMA, Batch, Ending, NewInvocation, Op, commit, groups, refused,
)


def row(event_id: str, *, request_id: str | None = None, function: str = "f") -> NewInvocation:
    if request_id is None:
        (request_id,) = request_ids(1)[1]
    return NewInvocation(
        request_id=request_id,
        function=function,
        source="kafka://orders",
        event_id=event_id,
        trigger="kafka",
        created_at=now_rfc3339(),
        envelope=b'{"id":"%s"}' % event_id.encode(),
        seq=request_seq(request_id) or 0,
    )


def ending(request_id: str, status: Status, **fields: Any) -> Ending:
    result = fields.get("result")
    return Ending(
        request_id, status.value, now_rfc3339(), dumps(result) if result is not None else None,
        fields.get("error_type"), fields.get("error_message"),
    )


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(tmp_path / "eventrun.db", isolation_level=None)
    conn.executescript(SCHEMA)
    try:
        yield conn
    finally:
        conn.close()


def ops(*specs: tuple[str, Any]) -> list[Op]:
    return [Op(kind, args) for kind, args in specs]


def status_of(conn: sqlite3.Connection, request_id: str) -> str:
    (status,) = conn.execute("SELECT status FROM invocations WHERE request_id = ?", (request_id,)).fetchone()
    return str(status)


def test_consecutive_ops_of_a_kind_merge_and_a_repeated_run_splits_them() -> None:
    batch = ops(
        ("accept", [row("a")]),
        ("accept", [row("b")]),
        ("running", ("r1", "t")),
        ("running", ("r2", "t")),
        ("finish", ending("r1", Status.FINISHED)),
        ("finish", ending("r1", Status.ABORTED)),  # the same run again: a new statement
        ("state", ("k", "1")),
        ("state", ("k", "2")),  # the same key again: upserts go in order, so one statement still
        ("state", ("j", "1")),
    )
    assert [(kind, len(group)) for kind, group in groups(batch)] == [
        ("accept", 2), ("running", 2), ("finish", 1), ("finish", 1), ("state", 3),
    ]


async def test_one_commit_answers_every_op_as_if_alone(conn: sqlite3.Connection) -> None:
    known = row("known")
    assert commit(conn, ops(("accept", [known]))) == [(True, ALL_NEW)]  # every row new: each keeps its RequestId
    first, again, repeat = row("new"), row("known"), row("new")
    outcomes = commit(
        conn,
        ops(
            ("accept", [first]),
            ("accept", [again, repeat]),  # both known by now: the answers name the first RequestIds
            ("running", (known.request_id, "2026-12-06T10:00:00.000Z")),
            ("running", (first.request_id, "2026-12-06T10:00:00.001Z")),
            ("running", (known.request_id, "2026-12-06T10:00:00.002Z")),  # already running: False
            ("running", (first.request_id, "2026-12-06T10:00:00.001Z")),  # the same start, tried again: True
            ("finish", ending(known.request_id, Status.FINISHED, result={"n": 1})),
            ("finish", ending(known.request_id, Status.ABORTED)),  # ended already: False
            ("finish", ending("no-such-run", Status.FAILED)),
        ),
    )
    assert outcomes == [
        (True, [Accepted(first.request_id, True)]),
        (True, [Accepted(known.request_id, False), Accepted(first.request_id, False)]),
        (True, True),
        (True, True),
        (True, False),
        (True, True),
        (True, True),
        (True, False),
        (True, False),
    ]
    assert status_of(conn, known.request_id) == "FINISHED"
    assert status_of(conn, first.request_id) == "RUNNING"
    (result, duration) = conn.execute(
        "SELECT result, duration_ms FROM invocations WHERE request_id = ?", (known.request_id,)
    ).fetchone()
    assert (result, duration >= 0) == (b'{"n":1}', True)


def test_interleaved_starts_and_ends_make_one_statement_each() -> None:
    batch = ops(
        ("running", ("r1", "t")),
        ("finish", ending("r1", Status.FINISHED)),
        ("running", ("r2", "t")),
        ("accept", [row("c")]),  # a new run: its acceptance goes before the steps of older ones
        ("finish", ending("r2", Status.FINISHED)),
        ("running", ("r3", "t")),
    )
    assert list(groups(batch)) == [("accept", [3]), ("running", [0, 2, 5]), ("finish", [1, 4])]


def test_a_step_that_could_not_go_ahead_of_an_end_of_its_run_closes_the_stretch() -> None:
    batch = ops(
        ("finish", ending("r1", Status.ABORTED)),  # terminated while queued
        ("running", ("r2", "t")),
        ("running", ("r1", "t")),  # its start must find it ended: after the end, not before
        ("finish", ending("r2", Status.FINISHED)),
        ("state", ("k", "1")),  # another kind closes the stretch too
        ("running", ("r3", "t")),
        ("running", ("r3", "t")),  # a second start of one run
    )
    assert list(groups(batch)) == [
        ("running", [1]), ("finish", [0]),
        ("running", [2]), ("finish", [3]),
        ("state", [4]),
        ("running", [5]),
        ("running", [6]),
    ]


def test_reordered_steps_answer_each_op_in_queue_order(conn: sqlite3.Connection) -> None:
    a, b, terminated = row("a"), row("b"), row("t")
    commit(conn, ops(("accept", [a, terminated])))
    fresh = row("fresh")
    outcomes = commit(
        conn,
        ops(
            ("running", (a.request_id, now_rfc3339())),
            ("finish", ending(a.request_id, Status.FINISHED, result={"a": 1})),
            ("finish", ending(terminated.request_id, Status.ABORTED)),
            ("accept", [b, fresh]),
            ("running", (terminated.request_id, now_rfc3339())),  # ended above: False
            ("running", (b.request_id, now_rfc3339())),
            ("finish", ending(b.request_id, Status.FAILED, error_type="E")),
            ("finish", ending(a.request_id, Status.ABORTED)),  # a's second end: False
        ),
    )
    assert outcomes == [(True, True), (True, True), (True, True), (True, ALL_NEW), (True, False), (True, True), (True, True), (True, False)]
    statuses = {r.request_id: status_of(conn, r.request_id) for r in (a, b, terminated, fresh)}
    assert statuses == {a.request_id: "FINISHED", b.request_id: "FAILED", terminated.request_id: "ABORTED", fresh.request_id: "QUEUED"}
    durations = conn.execute(
        "SELECT duration_ms >= 0 FROM invocations WHERE request_id IN (?, ?)", (a.request_id, b.request_id)
    ).fetchall()
    assert durations == [(1,), (1,)]  # each start was recorded before its end


async def test_batches_larger_than_one_statement_keep_every_row(conn: sqlite3.Connection) -> None:
    count = 2 * ROWS_PER_STATEMENT + 345  # two full statements, a cut at the hundreds, and the rest
    rows = [row(f"0-{offset}") for offset in range(count)]
    repeated = [row(f"0-{offset}") for offset in range(0, count, 7)]  # redelivered within the batch
    [(ok, answers)] = commit(conn, ops(("accept", rows + repeated)))
    assert ok
    assert answers[:count] == [Accepted(r.request_id, True) for r in rows]
    assert answers[count:] == [Accepted(rows[offset].request_id, False) for offset in range(0, count, 7)]
    assert conn.execute("SELECT COUNT(*) FROM invocations").fetchone() == (count,)

    started = commit(conn, ops(*(("running", (r.request_id, now_rfc3339())) for r in rows)))
    assert started == [(True, True)] * count
    ended = commit(conn, ops(*(("finish", ending(r.request_id, Status.FINISHED)) for r in rows)))
    assert ended == [(True, True)] * count
    assert conn.execute("SELECT status, COUNT(*) FROM invocations GROUP BY status").fetchall() == [("FINISHED", count)]


async def test_a_batch_by_column_is_stored_and_answered_as_its_rows_would_be(conn: sqlite3.Connection) -> None:
    count = 2 * ROWS_PER_STATEMENT + 345  # two full statements, a cut at the hundreds, and the rest

    def batch(*event_ids: str) -> Batch:
        first, ids = request_ids(len(event_ids))
        envelopes = [b'{"id":"%s"}\x00' % e.encode() for e in event_ids]
        return Batch("f", "kafka://orders", "kafka", now_rfc3339(), first, ids, list(event_ids), envelopes)

    fresh = batch(*(f"0-{offset}" for offset in range(count)))
    assert commit(conn, ops(("accept", fresh))) == [(True, ALL_NEW)]
    stored = conn.execute(
        "SELECT request_id, function, source, event_id, trigger, created_at, envelope, seq FROM invocations ORDER BY seq"
    ).fetchall()
    assert stored == fresh.rows()
    again = batch("0-0", "0-1234", "1-0")  # redelivered, and one new
    assert commit(conn, ops(("accept", again))) == [
        (True, [Accepted(fresh.request_ids[0], False), Accepted(fresh.request_ids[1234], False),
                Accepted(again.request_ids[2], True)])
    ]
    assert conn.execute("SELECT COUNT(*) FROM invocations").fetchone() == (count + 1,)


async def test_a_failing_op_gets_the_error_and_the_others_still_commit(conn: sqlite3.Connection) -> None:
    taken = row("a")
    commit(conn, ops(("accept", [taken])))
    good, clash, later = row("b"), row("c", request_id=taken.request_id), row("d")
    outcomes = commit(conn, ops(("accept", [good]), ("accept", [clash]), ("accept", [later])))
    assert outcomes[0] == (True, ALL_NEW)
    assert outcomes[1][0] is False and isinstance(outcomes[1][1], sqlite3.IntegrityError)
    assert outcomes[2] == (True, ALL_NEW)
    events = {e for (e,) in conn.execute("SELECT event_id FROM invocations")}
    assert events == {"a", "b", "d"}, "the clashing row left nothing behind, the others were kept"


async def test_rows_sharing_columns_are_stored_as_the_others_are(conn: sqlite3.Connection) -> None:
    now = now_rfc3339()
    usual = [row(f"u{i}")._replace(created_at=now) for i in range(250)]  # one function, source, trigger, time
    mixed = [row(f"m{i}", function="fg"[i % 2])._replace(created_at=now) for i in range(250)]
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    assert commit(conn, ops(("accept", usual))) == [(True, ALL_NEW)]
    shared = [s for s in statements if s.startswith("INSERT")]
    statements.clear()
    assert commit(conn, ops(("accept", mixed))) == [(True, ALL_NEW)]
    conn.set_trace_callback(None)
    assert shared and all(" SELECT column1, column2, " in s for s in shared), "the shared columns were bound once"
    assert not any(" SELECT column1, column2, " in s for s in statements if s.startswith("INSERT"))
    stored = conn.execute(
        "SELECT seq, request_id, function, source, event_id, trigger, status, created_at, envelope"
        " FROM invocations ORDER BY seq"
    ).fetchall()
    assert stored == [
        (r.seq, r.request_id, r.function, r.source, r.event_id, r.trigger, "QUEUED", r.created_at, r.envelope)
        for r in usual + mixed
    ]
    assert conn.execute("SELECT DISTINCT typeof(envelope) FROM invocations").fetchall() == [("blob",)]


async def test_a_template_is_kept_once_and_a_key_never_holds_two(conn: sqlite3.Connection) -> None:
    assert commit(conn, ops(("templates", [(b"k1", b"one")]), ("templates", [(b"k1", b"one"), (b"k2", b"two")]))) == [
        (True, None), (True, None)
    ]
    assert conn.execute("SELECT key, template FROM templates ORDER BY key").fetchall() == [(b"k1", b"one"), (b"k2", b"two")]
    clash = commit(conn, ops(("templates", [(b"k1", b"other")])))
    assert clash[0][0] is False and "another template" in str(clash[0][1])
    assert conn.execute("SELECT template FROM templates WHERE key = ?", (b"k1",)).fetchone() == (b"one",)


def test_a_store_refusing_commits_is_logged_once_a_while_and_once_when_it_takes_them_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A full disk refuses every commit, many a second: the writer's log says so once a while,
    # without a traceback (the refusal says it all), then once when commits go through again.
    monkeypatch.setattr(writes, "_refused_commits", FailureLog(writes.logger, every=60, counted="refused"))
    path = tmp_path / "eventrun.db"
    conn = sqlite3.connect(path, isolation_level=None, timeout=0)
    conn.executescript(SCHEMA)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # the store refuses this writer: "database is locked"
    try:
        with caplog.at_level(logging.WARNING, logger=writes.logger.name):
            for n in range(100):
                ((ok, error),) = commit(conn, ops(("accept", [row(f"e{n}")])))
                assert not ok and refused(error), error
            other.execute("ROLLBACK")
            assert commit(conn, ops(("accept", [row("later")]))) == [(True, ALL_NEW)]
            assert commit(conn, ops(("accept", [row("later still")]))) == [(True, ALL_NEW)]
    finally:
        other.close()
        conn.close()
    lines = [(r.levelno, r.getMessage(), r.exc_info) for r in caplog.records if r.name == writes.logger.name]
    assert lines == [
        (logging.ERROR, "the store refused a commit (database is locked); its 1 writes are answered with the error", None),
        (logging.WARNING, "the store takes commits again (99 more refused since the last such line)", None),
    ]


def test_a_refusal_is_what_the_store_says_of_itself_not_of_the_statement(conn: sqlite3.Connection) -> None:
    with pytest.raises(sqlite3.IntegrityError) as clash:
        conn.execute("INSERT INTO state (key, value) VALUES ('k', NULL)")
    assert not refused(clash.value), "a fault of the statement is eventrun's: logged with its traceback"
    assert not refused(ValueError("not SQLite's"))
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = sqlite3.SQLITE_FULL  # type: ignore[attr-defined]
    assert refused(full)
    io = sqlite3.OperationalError("disk I/O error")
    io.sqlite_errorcode = sqlite3.SQLITE_IOERR_WRITE  # type: ignore[attr-defined]  # (an extended code)
    assert refused(io)
