"""Whether the store takes writes, for /healthz and /metrics (refused since when, how many,
writable again at the next commit that goes through), and runs ended by start-up recovery
counted in eventrun_runs_total."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import signal
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Awaitable, Callable

import pytest

from eventrun.engine.api import Status
from eventrun.engine.core import Engine
from eventrun.engine.envelope import now_rfc3339, request_ids
from eventrun.engine.errors import StoreError
from eventrun.engine.metrics import StoreWrites
from eventrun.engine.postgres import PostgresStore
from eventrun.engine.store import NewInvocation, SQLiteStore
from eventrun.engine import writer as writer_module
from eventrun.engine.writer import WriterProcess

from postgres_service import Link
from server_process import pid_alive

REFUSED = re.compile(r"the store refused the write \((.+)\); nothing of it was recorded")
StartEngine = Callable[..., Awaitable[Engine]]
NOOP = {"noop.py": "def main_handler(event, context):\n    return None\n"}


def row(event_id: str, function: str = "f") -> NewInvocation:
    seq, (request_id,) = request_ids(1)
    return NewInvocation(
        request_id=request_id, function=function, source=f"/http/{function}", event_id=event_id, trigger="http",
        created_at=now_rfc3339(), envelope=b'{"id":"%s"}' % event_id.encode(), seq=seq,
    )


def seconds_ago(stamp: str) -> float:
    return time.time() - datetime.fromisoformat(stamp).timestamp()


@contextmanager
def files_cannot_grow(pid: int) -> Iterator[None]:
    """The process cannot write past the first byte of a file: every commit fails, as on a full disk."""
    soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (1, hard))
    try:
        yield
    finally:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (soft, hard))


def metric(text: str, name: str) -> float:
    (value,) = [line.split(" ")[1] for line in text.splitlines() if line.split(" ")[0] == name]
    return float(value)


# -- the record ----------------------------------------------------------------------------


def test_refusals_are_counted_timed_from_the_first_and_cleared_by_the_next_commit() -> None:
    writes = StoreWrites()
    assert writes.view() == {"Writes": "ok", "RefusedSince": None, "WritesRefused": 0, "WritesUnanswered": 0}
    writes.refused("database or disk is full", 3)
    since = writes.view()["RefusedSince"]
    assert since.endswith("Z") and abs(seconds_ago(since)) < 5, since  # RFC 3339, UTC
    writes.refused("disk I/O error")
    assert writes.view() == {"Writes": "refused: disk I/O error", "RefusedSince": since, "WritesRefused": 4, "WritesUnanswered": 0}
    assert not writes.writable
    assert writes.render().splitlines() == [
        "# HELP eventrun_store_writes_refused_total Writes the store refused (nothing of them recorded).",
        "# TYPE eventrun_store_writes_refused_total counter",
        "eventrun_store_writes_refused_total 4",
        "# HELP eventrun_store_writes_unanswered_total Writes the store's writer process died or stalled holding "
        "(SQLite; each may or may not be recorded).",
        "# TYPE eventrun_store_writes_unanswered_total counter",
        "eventrun_store_writes_unanswered_total 0",
        "# HELP eventrun_store_writable 1 while the store takes writes, 0 from a refused write until the next commit.",
        "# TYPE eventrun_store_writable gauge",
        "eventrun_store_writable 0",
    ]
    writes.went_through()
    assert writes.view() == {"Writes": "ok", "RefusedSince": None, "WritesRefused": 4, "WritesUnanswered": 0}
    assert "eventrun_store_writable 1" in writes.render().splitlines()


def full() -> sqlite3.OperationalError:
    error = sqlite3.OperationalError("database or disk is full")
    error.sqlite_errorcode = sqlite3.SQLITE_FULL  # type: ignore[attr-defined]  (as SQLite sets it)
    return error


@pytest.mark.parametrize(
    ("outcomes", "view"),
    [
        # A commit SQLite refused: each of its writes answered with the error.
        ([(False, full()), (False, full())], {"Writes": "refused: database or disk is full", "WritesRefused": 2}),
        # Written one by one, one op refused and the commit through: counted, the store writable.
        ([(True, None), (False, full())], {"Writes": "ok", "WritesRefused": 1}),
        # An op that failed for what it asked (not the store's refusal): the commit went through.
        ([(False, sqlite3.IntegrityError("UNIQUE constraint failed"))], {"Writes": "ok", "WritesRefused": 0}),
        ([(False, ValueError("a bug"))], {"Writes": "ok", "WritesRefused": 0}),
    ],
)
def test_a_commit_is_refused_when_sqlite_refused_its_writes_and_none_went_through(
    outcomes: list[tuple[bool, Any]], view: dict[str, Any]
) -> None:
    writer = SimpleNamespace(writes=StoreWrites())
    WriterProcess._note_commit(writer, outcomes)  # type: ignore[arg-type]
    seen = writer.writes.view()
    assert {key: seen[key] for key in view} == view
    assert (seen["RefusedSince"] is None) == (view["Writes"] == "ok")


# -- a real SQLite store -------------------------------------------------------------------


async def test_a_sqlite_store_that_refuses_commits_says_why_until_one_goes_through(sqlite_store: SQLiteStore) -> None:
    store = sqlite_store
    await store.put_state("k", "1")
    assert store.writes.view() == {"Writes": "ok", "RefusedSince": None, "WritesRefused": 0, "WritesUnanswered": 0}
    assert store.writer_pid is not None
    with files_cannot_grow(store.writer_pid):
        for value in ("2", "3"):
            with pytest.raises(StoreError) as refused:
                await store.put_state("k", value)
        match = REFUSED.fullmatch(str(refused.value))
        assert match, refused.value
        view = store.writes.view()
        assert view["Writes"] == f"refused: {match.group(1)}", (view, refused.value)  # the reason the 503 gives
        assert view["WritesRefused"] == 2 and 0 <= seconds_ago(view["RefusedSince"]) < 30, view
    await store.put_state("k", "4")
    assert store.writes.view() == {"Writes": "ok", "RefusedSince": None, "WritesRefused": 2, "WritesUnanswered": 0}
    assert await store.get_state("k") == "4"


async def test_a_stopped_writer_is_killed_its_writes_fail_and_the_next_write_starts_a_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A function could SIGSTOP the writer (it runs as the same user): every request then waited
    # for ever, /healthz said "ok", and a stop of the server never ended.
    monkeypatch.setattr(writer_module, "STALLED_AFTER", 1.0)
    store = SQLiteStore(tmp_path / "eventrun.db")
    store.open()
    try:
        await _a_stopped_writer_is_replaced(store)
    finally:
        store.close()


async def _a_stopped_writer_is_replaced(store: SQLiteStore) -> None:
    await store.put_state("k", "1")
    stopped = store.writer_pid
    assert stopped is not None
    os.kill(stopped, signal.SIGSTOP)
    try:
        began = time.monotonic()
        with pytest.raises(StoreError) as unanswered:
            await asyncio.wait_for(store.put_state("k", "2"), 20)
        assert time.monotonic() - began < 10
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stopped, signal.SIGCONT)
    said = f"the store's writer process {stopped} answered no commit for 1 s (stopped, or stuck on its disk) and was killed"
    assert str(unanswered.value) == said
    view = store.writes.view()
    assert (view["Writes"], view["WritesRefused"], view["WritesUnanswered"]) == (f"refused: {said}", 0, 1), view
    await store.put_state("k", "3")  # a new writer
    assert store.writer_pid != stopped and await store.get_state("k") == "3"
    assert not pid_alive(stopped)
    assert store.writes.view()["Writes"] == "ok"
    assert "eventrun_store_writes_unanswered_total 1" in store.writes.render()


async def test_a_stopped_writer_does_not_hold_up_the_stores_close(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer_module, "STALLED_AFTER", 1.0)
    store = SQLiteStore(tmp_path / "eventrun.db")
    store.open()
    await store.put_state("k", "1")
    stopped = store.writer_pid
    assert stopped is not None
    os.kill(stopped, signal.SIGSTOP)
    writing = asyncio.ensure_future(store.put_state("k", "2"))
    await asyncio.sleep(0.1)
    began = time.monotonic()
    store.close()  # (was: waited for ever)
    assert time.monotonic() - began < 10 and not pid_alive(stopped)
    with pytest.raises(StoreError, match="answered no commit for 1 s"):
        await writing


# -- an engine's /healthz and /metrics ---------------------------------------------------------


async def test_a_sqlite_engine_s_health_and_metrics_show_refused_writes_and_the_recovery(
    start_engine: StartEngine, tmp_path: Path
) -> None:
    before = time.time()
    engine = await start_engine(
        f'[server]\ndata_dir = "{tmp_path / "data"}"\n\n[functions.f]\nhandler = "noop.py:main_handler"\n', NOOP, paused=True
    )
    health = engine.health()
    assert health["Status"] == "ok" and health["Store"] == {"Writes": "ok", "RefusedSince": None, "WritesRefused": 0, "WritesUnanswered": 0}, health
    text = engine.metrics_text()
    assert metric(text, "eventrun_store_writable") == 1 and metric(text, "eventrun_store_writes_refused_total") == 0
    assert before - 1 <= metric(text, "process_start_time_seconds") <= time.time()
    assert "# TYPE process_start_time_seconds gauge" in text.splitlines()

    assert isinstance(engine.store, SQLiteStore) and engine.store.writer_pid is not None
    with files_cannot_grow(engine.store.writer_pid):
        with pytest.raises(StoreError) as refused:
            await engine.store.put_state("k", "v")
    health = engine.health()
    assert health["Status"] == "ok", health  # (a restart would not help: the store says why)
    assert health["Store"]["Writes"] == "refused: " + REFUSED.fullmatch(str(refused.value)).group(1), health  # type: ignore[union-attr]
    assert health["Store"]["WritesRefused"] == 1 and health["Store"]["RefusedSince"], health
    text = engine.metrics_text()
    assert metric(text, "eventrun_store_writable") == 0 and metric(text, "eventrun_store_writes_refused_total") == 1

    await engine.store.put_state("k", "v")
    assert engine.health()["Store"] == {"Writes": "ok", "RefusedSince": None, "WritesRefused": 1, "WritesUnanswered": 0}
    text = engine.metrics_text()
    assert metric(text, "eventrun_store_writable") == 1 and metric(text, "eventrun_store_writes_refused_total") == 1


async def test_runs_that_start_up_recovery_ends_are_counted_as_failed(start_engine: StartEngine, tmp_path: Path) -> None:
    # eventrun_runs_total left them out: 20 runs interrupted by kill -9 and ended FAILED at the
    # next start, and the metric said 0.
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    store = SQLiteStore(data / "eventrun.db")
    store.open()
    try:
        runs = [row(f"e{i}") for i in range(3)] + [row("g0", function="g")]
        await store.accept(runs)
        for run in runs:
            await store.mark_running(run.request_id, now_rfc3339())
    finally:
        store.close()
    engine = await start_engine(
        f'[server]\ndata_dir = "{data}"\n\n[functions.f]\nhandler = "noop.py:main_handler"\n\n'
        '[functions.g]\nhandler = "noop.py:main_handler"\n',
        NOOP,
        paused=True,
    )
    text = engine.metrics_text()
    assert 'eventrun_runs_total{function="f",status="FAILED"} 3' in text.splitlines(), text
    assert 'eventrun_runs_total{function="g",status="FAILED"} 1' in text.splitlines(), text
    for run in runs:
        assert (await engine.get(run.request_id)).status is Status.FAILED


# -- a PostgreSQL store --------------------------------------------------------------------


async def test_a_postgres_store_counts_the_writes_an_outage_refuses(postgres: str, postgres_link: Link) -> None:
    store = PostgresStore(postgres_link.url(postgres), "node-a")
    await store.open()
    try:
        await store.put_state("k", "1")
        assert store.writes.writable and store.writes.refused_total == 0
        postgres_link.cut()
        with pytest.raises(StoreError) as refused:
            await store.put_state("k", "2")
        with pytest.raises(StoreError):
            await store.get_state("k")  # a read: not counted
        with pytest.raises(StoreError):
            await store.heartbeat()  # the heartbeat's: Cluster.Store in /healthz, not counted twice
        view = store.writes.view()
        assert f"({view['Writes'].removeprefix('refused: ')})" in str(refused.value), (view, refused.value)
        assert view["WritesRefused"] == 1 and view["RefusedSince"], view
        assert "eventrun_store_writable 0" in store.writes.render().splitlines()
        postgres_link.mend()
        await store.put_state("k", "3")
        assert store.writes.view() == {"Writes": "ok", "RefusedSince": None, "WritesRefused": 1, "WritesUnanswered": 0}
    finally:
        await store.close()
