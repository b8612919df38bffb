"""`eventrun backup` and `eventrun restore`: a copy of a serving node's store and logs, put in
place as another data_dir, and a server started on it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from server_process import Api, free_port, handler

pytestmark = pytest.mark.e2e


def eventrun(command: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "eventrun.cli", command, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, cwd=cwd)


def backup(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return eventrun("backup", *args, cwd=cwd)


def restore(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return eventrun("restore", *args, cwd=cwd)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


FUNCTIONS = {"chatty": {"handler": handler("chatty")}, "sleepy": {"handler": handler("sleepy")}}


async def back_up_while_serving(eventrun_server, http: aiohttp.ClientSession, folder: Path) -> tuple[str, str, str]:
    """A server with a FINISHED run and a RUNNING one, backed up into `folder`, then a run the
    backup does not hold, then stopped: the RequestIds of the three runs."""
    server = eventrun_server(FUNCTIONS)
    api = server.client(http)
    ended = await api.accepted("chatty", {"lines": 3})
    assert (await api.wait_ended(ended))["Status"] == "FINISHED"
    running = await api.accepted("sleepy", {"seconds": 60})
    await api.wait_for(running, {"RUNNING"}, timeout=20)

    taken = await asyncio.to_thread(backup, str(folder), "--config", str(server.manifest_path))
    assert taken.returncode == 0, taken.stderr
    assert taken.stdout.startswith("backed up 2 runs (") and f" to {folder}\n" in taken.stdout, taken.stdout
    assert (mode(folder), mode(folder / "eventrun.db")) == (0o700, 0o600)
    logs = sorted((folder / "logs").rglob("*.log"))
    assert [log.name for log in logs] == sorted([f"{ended}.log", f"{running}.log"])
    assert {mode(log) for log in logs} == {0o600}
    later = await api.accepted("chatty", {"lines": 1})  # after the backup: not in it
    await api.wait_ended(later)
    server.stop()
    return ended, running, later


async def assert_holds_the_backup(api: Api, ended: str, running: str, later: str) -> None:
    """The server started on a restored backup has its runs, results and logs, and no later run."""
    run = await api.status(ended)
    assert (run["Status"], run["Result"]) == ("FINISHED", 3)
    assert (await api.logs(ended)).count("z" * 99) == 3
    cut_short = await api.wait_ended(running)
    assert (cut_short["Status"], cut_short["ErrorType"]) == ("FAILED", "ServerStopped")
    assert "sleepy start" in await api.logs(running)
    assert (await api.request("GET", f"/invocations/{later}")).status == 404


async def test_a_backup_taken_while_serving_restores_what_it_held(eventrun_server, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    folder = tmp_path / "backups" / "monday"
    ended, running, later = await back_up_while_serving(eventrun_server, http, folder)

    restored = eventrun_server(FUNCTIONS, start=False)
    shutil.copytree(folder, restored.data_dir)  # by hand
    restored.start()
    await assert_holds_the_backup(restored.client(http), ended, running, later)


async def test_eventrun_restore_puts_a_backup_in_place_for_a_server(eventrun_server, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    folder = tmp_path / "backups" / "monday"
    ended, running, later = await back_up_while_serving(eventrun_server, http, folder)
    backed_up = sorted(folder.rglob("*"))

    restored = eventrun_server(FUNCTIONS, start=False)
    data_dir = restored.data_dir
    done = await asyncio.to_thread(restore, str(folder), "--config", str(restored.manifest_path))
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    size = (data_dir / "eventrun.db").stat().st_size
    log_bytes = sum(log.stat().st_size for log in (data_dir / "logs").rglob("*.log"))
    assert done.stdout == (
        f"restored 2 runs ({size:,} bytes) and 2 logs ({log_bytes:,} bytes) from {folder} to {data_dir}\n"
    )
    assert sorted(folder.rglob("*")) == backed_up  # (read as it is: no -wal or -shm beside it)
    assert sorted(p.name for p in data_dir.iterdir()) == ["eventrun.db", "eventrun.db.lock", "logs"]
    assert {mode(data_dir), *(mode(p) for p in data_dir.rglob("*") if p.is_dir())} == {0o700}
    assert {mode(p) for p in data_dir.rglob("*") if p.is_file()} == {0o600}
    with sqlite3.connect(data_dir / "eventrun.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]

    restored.start()
    await assert_holds_the_backup(restored.client(http), ended, running, later)


async def test_eventrun_restore_refuses_a_data_dir_a_server_runs_on_or_that_holds_a_store(eventrun_server, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    server = eventrun_server(FUNCTIONS)
    api = server.client(http)
    ended = await api.accepted("chatty", {"lines": 1})
    await api.wait_ended(ended)
    folder = tmp_path / "copy"
    assert (await asyncio.to_thread(backup, str(folder), "--config", str(server.manifest_path))).returncode == 0
    later = await api.accepted("chatty", {"lines": 2})  # not in the backup: a restore would lose it
    await api.wait_ended(later)

    serving = await asyncio.to_thread(restore, str(folder), "--config", str(server.manifest_path))
    assert (serving.returncode, serving.stdout) == (2, "")
    assert serving.stderr == (
        f"eventrun: cannot restore: the data_dir {server.data_dir} is in use by another eventrun server "
        f"(process {server.pid}); give this one a data_dir of its own, or stop the other\n"
    )
    assert not (server.data_dir / ".eventrun-restore").exists()
    assert (await api.status(later))["Result"] == 2  # the server serves on
    server.stop()

    stopped = await asyncio.to_thread(restore, str(folder), "--config", str(server.manifest_path))
    assert (stopped.returncode, stopped.stdout) == (2, "")
    assert stopped.stderr == (
        f"eventrun: the data_dir {server.data_dir} already holds a store ({server.data_dir / 'eventrun.db'}), "
        "and a restore writes over no run: move it away, or restore into an empty data_dir\n"
    )
    assert not (server.data_dir / ".eventrun-restore").exists()
    server.start()
    assert (await api.status(later))["Result"] == 2


def test_a_backup_is_refused_where_it_would_mix_or_has_nothing_to_copy(tmp_path: Path) -> None:
    manifest = tmp_path / "eventrun.toml"
    manifest.write_text('[server]\ndata_dir = "data"\n')
    missing = backup(str(tmp_path / "copy"), "--config", str(manifest))
    assert (missing.returncode, missing.stderr) == (
        1,
        f"eventrun: no store to back up: {tmp_path / 'data' / 'eventrun.db'} does not exist (is data_dir right?)\n",
    )
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "eventrun.db").touch()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "other.db").touch()
    full = backup(str(tmp_path / "full"), "--config", str(manifest))
    assert (full.returncode, full.stderr) == (1, f"eventrun: {tmp_path / 'full'} is not empty: name a new or empty folder\n")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["other.db"]

    manifest.write_text('[store]\nurl = "postgresql://eventrun@127.0.0.1:1/runs"\n')
    shared = backup(str(tmp_path / "copy"), cwd=tmp_path)  # (./eventrun.toml)
    assert shared.returncode == 2
    assert "the store is PostgreSQL ([store] url)" in shared.stderr and "pg_dump" in shared.stderr
    assert not (tmp_path / "copy").exists()


def fake_backup(folder: Path, *, rows: int = 1, user_version: int = 1) -> Path:
    """A folder holding an SQLite eventrun.db with a table of invocations, as a backup would."""
    folder.mkdir(parents=True)
    with sqlite3.connect(folder / "eventrun.db") as db:
        db.execute("CREATE TABLE invocations (seq INTEGER PRIMARY KEY, request_id TEXT)")
        db.execute("CREATE INDEX by_request_id ON invocations (request_id)")
        db.executemany("INSERT INTO invocations (request_id) VALUES (?)", [(f"req-{n:03}",) for n in range(rows)])
        db.execute(f"PRAGMA user_version = {user_version}")
    db.close()
    mark_whole(folder, runs=rows)
    return folder / "eventrun.db"


def mark_whole(folder: Path, runs: int = 1, logs: int = 0) -> None:
    """The mark `eventrun backup` ends a backup with (the runs and logs it was taken with)."""
    mark = {"eventrun_backup": 1, "schema_version": 1, "runs": runs, "logs": logs}
    (folder / "eventrun-backup.json").write_text(json.dumps(mark) + "\n")


def test_eventrun_restore_refuses_a_folder_that_is_no_backup_and_leaves_nothing_behind(tmp_path: Path) -> None:
    manifest = tmp_path / "eventrun.toml"
    manifest.write_text('[server]\ndata_dir = "srv/data"\n')
    data_dir = tmp_path / "srv" / "data"
    hint = "(name a folder `eventrun backup` made)"

    def refused(folder: Path) -> str:
        done = restore(str(folder), "--config", str(manifest))
        assert (done.returncode, done.stdout) == (2, ""), done
        assert not (tmp_path / "srv").exists()  # no data_dir (nor its parent) left behind
        return done.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    assert refused(empty) == f"eventrun: {empty} is not a backup: {empty / 'eventrun.db'} is not there {hint}\n"
    assert refused(tmp_path / "gone").startswith(f"eventrun: {tmp_path / 'gone'} is not a backup: ")

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "eventrun.db").write_bytes(b"not a database, " * 100)
    mark_whole(junk)
    assert refused(junk) == (
        f"eventrun: {junk} is not a backup eventrun can read: {junk / 'eventrun.db'}: file is not a database {hint}\n"
    )
    other = tmp_path / "other"
    other.mkdir()
    with sqlite3.connect(other / "eventrun.db") as db:
        db.execute("CREATE TABLE notes (text TEXT)")
    db.close()
    mark_whole(other)
    assert refused(other) == (
        f"eventrun: {other} is not a backup eventrun can read: {other / 'eventrun.db'}: "
        f"no such table: invocations {hint}\n"
    )
    assert sorted(p.name for p in other.iterdir()) == ["eventrun-backup.json", "eventrun.db"]  # (read as it is)

    newer = fake_backup(tmp_path / "newer", user_version=99)
    assert refused(newer.parent) == (
        f"eventrun: {newer} was written by a newer eventrun (schema version 99; this one knows 1): "
        "restore it with that eventrun or a newer one\n"
    )

    # Damaged past what opening it reads: the copy's integrity check finds it, after the restore
    # has begun writing; what it wrote goes.
    damaged = fake_backup(tmp_path / "damaged", rows=20)
    body = damaged.read_bytes()
    at = body.index(b"req-007")  # in the table's page, which comes before its index's
    damaged.write_bytes(body[:at] + b"REQ" + body[at + 3 :])
    (damaged.parent / "logs").mkdir()
    (damaged.parent / "logs" / "req-007.log").write_text("a log\n")
    assert refused(damaged.parent) == (
        f"eventrun: {damaged} is damaged (integrity_check: row 8 missing from index by_request_id): "
        "restore another backup\n"
    )


def test_eventrun_restore_writes_over_no_logs_and_refuses_a_postgresql_store(tmp_path: Path) -> None:
    folder = fake_backup(tmp_path / "copy").parent
    manifest = tmp_path / "eventrun.toml"
    manifest.write_text('[server]\ndata_dir = "data"\n')
    (tmp_path / "data").mkdir(mode=0o700)
    (tmp_path / "data" / "logs").mkdir()  # logs whose runs are elsewhere
    logs = restore(str(folder), "--config", str(manifest))
    assert (logs.returncode, logs.stderr) == (
        2,
        f"eventrun: the data_dir {tmp_path / 'data'} already holds runs' logs ({tmp_path / 'data' / 'logs'}), "
        "and a restore writes over no run: move them away, or restore into an empty data_dir\n",
    )
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["logs"]  # (its lock file gone too)

    (tmp_path / "data" / "logs").rmdir()
    restored = restore(str(folder), cwd=tmp_path)  # (./eventrun.toml)
    assert (restored.returncode, restored.stderr) == (0, "")
    assert restored.stdout.startswith("restored 1 runs (") and restored.stdout.endswith(
        f" and 0 logs (0 bytes) from {folder} to {tmp_path / 'data'}\n"
    )
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["eventrun.db", "eventrun.db.lock"]

    manifest.write_text('[store]\nurl = "postgresql://eventrun@127.0.0.1:1/runs"\n[server]\ndata_dir = "pg"\n')
    shared = restore(str(folder), cwd=tmp_path)
    assert (shared.returncode, shared.stderr) == (
        2,
        "eventrun: the store is PostgreSQL ([store] url): its runs and their logs are all in the database; "
        "restore it as PostgreSQL is (pg_restore or psql)\n",
    )
    assert not (tmp_path / "pg").exists()


def test_no_server_starts_on_a_data_dir_while_it_is_restored_and_an_interrupted_restore_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from eventrun.engine import backup as backups

    folder = fake_backup(tmp_path / "copy").parent
    (folder / "logs").mkdir()
    (folder / "logs" / "req-000.log").write_text("a log\n")
    manifest = tmp_path / "eventrun.toml"
    manifest.write_text(f'[server]\ndata_dir = "data"\nhost = "127.0.0.1"\nport = {free_port()}\n')
    data_dir = tmp_path / "data"
    starts: list[subprocess.CompletedProcess[str]] = []
    copy_logs = backups._copy_logs

    def start_a_server_then_interrupt(source: Path, target: Path) -> tuple[int, int]:
        copy_logs(source, target)
        assert sorted(p.name for p in (data_dir / ".eventrun-restore").iterdir()) == ["logs"]
        assert (data_dir / ".restore.db").is_file()  # (the store's work copy)
        starts.append(eventrun("serve", "--config", str(manifest)))
        raise KeyboardInterrupt  # Ctrl-C

    monkeypatch.setattr(backups, "_copy_logs", start_a_server_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        backups.restore_backup(folder, data_dir)
    [start] = starts
    assert start.returncode != 0
    assert (
        f"eventrun: cannot start: the store {data_dir / 'eventrun.db'} is in use by eventrun restore "
        f"(process {os.getpid()}): wait for it to end\n" == start.stderr
    ), start.stderr
    assert not data_dir.exists()

    monkeypatch.setattr(backups, "_copy_logs", copy_logs)
    restored = backups.restore_backup(folder, data_dir)
    assert (restored.folder, restored.runs, restored.logs, restored.log_bytes) == (data_dir, 1, 1, 6)
    assert (data_dir / "logs" / "req-000.log").read_text() == "a log\n"


def test_a_restore_holding_the_data_dir_is_named_to_a_second_restore(tmp_path: Path) -> None:
    from eventrun.engine.store import hold_lock

    folder = fake_backup(tmp_path / "copy").parent
    manifest = tmp_path / "eventrun.toml"
    manifest.write_text('[server]\ndata_dir = "data"\n')
    held = hold_lock(tmp_path / "data" / "eventrun.db.lock", "the data_dir", by="eventrun restore")
    try:
        second = restore(str(folder), "--config", str(manifest))
    finally:
        held.release()
    assert (second.returncode, second.stderr) == (
        2,
        f"eventrun: cannot restore: the data_dir {tmp_path / 'data'} is in use by eventrun restore "
        f"(process {os.getpid()}): wait for it to end\n",
    )


def a_store(data_dir: Path, rows: int) -> Path:
    """A data_dir with a store of `rows` runs (a table of invocations, as a store has)."""
    store = fake_backup(data_dir, rows=rows)
    (data_dir / "eventrun-backup.json").unlink()
    return store


def test_counts_are_printed_with_thousands_separators(tmp_path: Path) -> None:
    a_store(tmp_path / "data", rows=1204)
    manifest = tmp_path / "eventrun.toml"
    manifest.write_text('[server]\ndata_dir = "data"\n')
    taken = backup(str(tmp_path / "copy"), cwd=tmp_path)
    assert taken.returncode == 0 and taken.stdout.startswith("backed up 1,204 runs ("), taken
    manifest.write_text('[server]\ndata_dir = "restored"\n')
    done = restore(str(tmp_path / "copy"), cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("restored 1,204 runs ("), done


def test_a_backup_or_restore_inside_the_data_dir_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    a_store(data_dir, rows=1)
    (data_dir / "logs").mkdir()
    (data_dir / "logs" / "a.log").write_text("a log\n")
    manifest = tmp_path / "eventrun.toml"
    manifest.write_text(f'[server]\ndata_dir = "{data_dir}"\n')
    (tmp_path / "link").symlink_to(data_dir / "logs")
    for folder in (data_dir / "logs" / "bk", tmp_path / "link" / "bk", data_dir):
        refused = backup(str(folder), "--config", str(manifest))
        assert (refused.returncode, refused.stderr) == (
            2,
            f"eventrun: cannot back up into {folder}: it is inside the data_dir {data_dir}, which it copies: "
            "keep backups apart from what they copy\n",
        )
    assert sorted(p.name for p in (data_dir / "logs").iterdir()) == ["a.log"]

    # A restore from a folder inside the data_dir it restores into (its own leftover work folder).
    leftover = data_dir / ".eventrun-restore"
    leftover.mkdir()
    (data_dir / "eventrun.db").rename(leftover / "eventrun.db")
    shutil.rmtree(data_dir / "logs")
    mark_whole(leftover)
    refused = restore(str(leftover), "--config", str(manifest))
    assert (refused.returncode, refused.stderr) == (
        2,
        f"eventrun: cannot restore from {leftover}: it is inside the data_dir {data_dir}, which a restore fills "
        "(move it out of the data_dir first): keep backups apart from what they copy\n",
    )
    assert sorted(p.name for p in leftover.iterdir()) == ["eventrun-backup.json", "eventrun.db"]


def long_data_dir(base: Path, store_length: int) -> Path:
    """A data_dir under `base` whose eventrun.db has a path `store_length` bytes long."""
    data_dir = base
    while len(str(data_dir / "eventrun.db")) < store_length:
        data_dir = data_dir / ("d" * min(200, store_length - len(str(data_dir / "eventrun.db")) - 1))
    assert len(os.fsencode(data_dir / "eventrun.db")) == store_length
    return data_dir


def test_a_restore_works_for_every_data_dir_a_server_opens_and_refuses_the_others(tmp_path: Path) -> None:
    folder = fake_backup(tmp_path / "copy").parent
    base = Path(os.path.realpath(tmp_path))
    manifest = tmp_path / "eventrun.toml"
    longest = long_data_dir(base / "a", 504)
    manifest.write_text(f'[server]\ndata_dir = "{longest}"\n')
    done = restore(str(folder), "--config", str(manifest))
    assert (done.returncode, done.stderr) == (0, ""), done
    assert (longest / "eventrun.db").is_file()

    too_long = long_data_dir(base / "b", 505)
    manifest.write_text(f'[server]\ndata_dir = "{too_long}"\n')
    refused = restore(str(folder), "--config", str(manifest))
    assert (refused.returncode, refused.stderr) == (
        2,
        f"eventrun: cannot open the store {too_long / 'eventrun.db'}: its path is 505 bytes long, and SQLite opens "
        "paths of at most 504 bytes (absolute, links resolved): give data_dir a shorter path\n",
    )
    assert not (base / "b").exists()


def test_a_store_copied_with_its_wal_is_restored_without_writing_beside_it(tmp_path: Path) -> None:
    folder = tmp_path / "copy"
    folder.mkdir()
    source = tmp_path / "source.db"
    db = sqlite3.connect(source)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("CREATE TABLE invocations (seq INTEGER PRIMARY KEY, request_id TEXT)")
    db.commit()
    db.executemany("INSERT INTO invocations (request_id) VALUES (?)", [(f"req-{n}",) for n in range(3)])
    db.commit()
    shutil.copyfile(source, folder / "eventrun.db")  # by hand, with the WAL that holds the runs
    shutil.copyfile(f"{source}-wal", folder / "eventrun.db-wal")
    db.close()
    mark_whole(folder, runs=3)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    folder.chmod(0o555)
    try:
        manifest = tmp_path / "eventrun.toml"
        manifest.write_text('[server]\ndata_dir = "data"\n')
        done = restore(str(folder), "--config", str(manifest))
        after = {p.name: p.read_bytes() for p in folder.iterdir()}
    finally:
        folder.chmod(0o700)
    assert (done.returncode, done.stderr) == (0, ""), done
    assert done.stdout.startswith("restored 3 runs (")
    assert after == before  # (no -shm beside it, the WAL as it was)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["eventrun.db", "eventrun.db.lock"]


def test_a_backup_into_an_existing_empty_folder_makes_it_private(tmp_path: Path) -> None:
    a_store(tmp_path / "data", rows=1)
    manifest = tmp_path / "eventrun.toml"
    manifest.write_text('[server]\ndata_dir = "data"\n')
    folder = tmp_path / "open"
    folder.mkdir()
    folder.chmod(0o777)
    taken = backup(str(folder), cwd=tmp_path)
    assert taken.returncode == 0, taken
    assert mode(folder) == 0o700
