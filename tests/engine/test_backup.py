"""engine/backup.py: a backup is whole or not there, holds every run's log, and a restore killed
half-way is undone by the next."""

from __future__ import annotations

import errno
import json
import os
import signal
import sqlite3
import stat
import time
from pathlib import Path

import pytest

from eventrun import cli
from eventrun.engine import backup as backups
from eventrun.engine.envelope import now_rfc3339
from eventrun.engine.backup import BACKUP_MARK, MOVING, RESTORING, BackupError, take_backup
from eventrun.engine.errors import StoreError
from eventrun.engine.store import SQLiteStore
from eventrun.engine.writes import SCHEMA_VERSION
from test_store import row

LONG_AGO = "2000-01-01T00:00:00.000Z"


async def a_data_dir(data_dir: Path, runs: int) -> list[str]:
    """A data_dir whose store holds `runs` runs ended now, each with a log of 48 bytes; their RequestIds."""
    store = SQLiteStore(data_dir / "eventrun.db")
    store.open()
    try:
        rows = [row(f"e{n}") for n in range(runs)]
        await store.accept(rows)
    finally:
        store.close()
    with closing_db(data_dir / "eventrun.db") as db:
        db.execute("UPDATE invocations SET status = 'FINISHED', ended_at = ?", (now_rfc3339(),))
    for r in rows:
        log = data_dir / "logs" / r.request_id[:6] / r.request_id[6:8] / f"{r.request_id}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"{r.request_id} said hello\n")
    return [r.request_id for r in rows]


def runs_in(store: Path) -> set[str]:
    with closing_db(store) as db:
        return {r for (r,) in db.execute("SELECT request_id FROM invocations")}


class closing_db:
    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path)

    def __enter__(self) -> sqlite3.Connection:
        return self.db

    def __exit__(self, *exc: object) -> None:
        self.db.commit()
        self.db.close()


def prune_live(data_dir: Path, request_ids: list[str]) -> None:
    """What retention does to the live store meanwhile: the rows go, then their logs."""
    with closing_db(data_dir / "eventrun.db") as db:
        db.executemany("DELETE FROM invocations WHERE request_id = ?", [(r,) for r in request_ids])
    for r in request_ids:
        (data_dir / "logs" / r[:6] / r[6:8] / f"{r}.log").unlink()


async def test_a_backup_leaves_out_the_runs_retention_pruned_while_it_copied_the_logs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "data"
    ids = await a_data_dir(data_dir, 7)
    # Pruned after the store was copied, before its logs were: two as the store's own rule finds
    # them in the copy, one owing a delivery in the copy (delivered since), one still RUNNING in
    # it (with a retention shorter than the copy took).
    owed, running, pruned, past, still_running, still_owed = ids[0], ids[1], ids[2:4], ids[4], ids[5], ids[6]
    with closing_db(data_dir / "eventrun.db") as db:
        db.executemany(
            "INSERT INTO outbox (request_id, function, kind, target) VALUES (?, 'f', 'callback', 'http://x')",
            [(owed,), (still_owed,)],
        )
        db.execute("INSERT INTO replays (request_id, replay_of) VALUES (?, ?)", (still_running, pruned[0]))
        db.executemany(
            "UPDATE invocations SET status = 'RUNNING', ended_at = NULL WHERE request_id = ?",
            [(running,), (still_running,)],
        )
    copy_logs = backups._copy_logs

    def pruned_meanwhile(source: Path, target: Path) -> tuple[int, int]:
        prune_live(data_dir, [owed, running, *pruned])
        return copy_logs(source, target)

    monkeypatch.setattr(backups, "_copy_logs", pruned_meanwhile)
    time.sleep(0.05)
    taken = take_backup(data_dir, tmp_path / "copy", retention=0.01)
    kept = runs_in(tmp_path / "copy" / "eventrun.db")
    assert kept == {still_running, still_owed}  # (`past` had its log, but retention deletes it any moment)
    assert {log.stem for log in (tmp_path / "copy" / "logs").rglob("*.log")} == kept  # every run has its log
    assert (taken.runs, taken.logs, taken.log_bytes, taken.left_out) == (2, 2, 96, 5)
    with closing_db(tmp_path / "copy" / "eventrun.db") as db:
        assert db.execute("SELECT request_id FROM outbox").fetchall() == [(still_owed,)]
        assert db.execute("SELECT count(*) FROM replays").fetchone() == (0,)
    mark = json.loads((tmp_path / "copy" / BACKUP_MARK).read_text())
    assert (mark["runs"], mark["logs"], mark["left_out"], mark["schema_version"]) == (2, 2, 5, SCHEMA_VERSION)
    assert past not in kept

    monkeypatch.undo()
    manifest = tmp_path / "eventrun.toml"
    manifest.write_text(f'[server]\ndata_dir = "{data_dir}"\nretention = "1h"\n')
    assert cli.main(["backup", str(tmp_path / "again"), "--config", str(manifest)]) == 0  # none to leave out
    size = (tmp_path / "again" / "eventrun.db").stat().st_size
    assert capsys.readouterr().out == (
        f"backed up 3 runs ({size:,} bytes) and 3 logs (144 bytes) from {data_dir} to {tmp_path / 'again'}\n"
    )
    monkeypatch.setattr(backups, "_copy_logs", lambda source, target: (prune_live(data_dir, [past]), copy_logs(source, target))[1])
    assert cli.main(["backup", str(tmp_path / "then"), "--config", str(manifest)]) == 0
    size = (tmp_path / "then" / "eventrun.db").stat().st_size
    assert capsys.readouterr().out == (
        f"backed up 2 runs ({size:,} bytes) and 2 logs (96 bytes) from {data_dir} to {tmp_path / 'then'}; "
        "it left out 1 run that [server] retention deleted, or could have, while it copied\n"
    )


async def test_a_backup_ends_with_its_mark_and_one_that_fails_or_is_stopped_removes_what_it_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "data"
    await a_data_dir(data_dir, 3)
    manifest = tmp_path / "eventrun.toml"
    manifest.write_text(f'[server]\ndata_dir = "{data_dir}"\n')
    copy_logs = backups._copy_logs

    def full_disk(source: Path, target: Path) -> tuple[int, int]:
        copy_logs(source, target)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target / "x.log"))

    monkeypatch.setattr(backups, "_copy_logs", full_disk)
    folder = tmp_path / "backups" / "monday"
    assert cli.main(["backup", str(folder), "--config", str(manifest)]) == 1
    assert capsys.readouterr().err == (
        f"eventrun: could not back up {data_dir} into {folder}: {folder / 'logs' / 'x.log'}: No space left on device; "
        "what it had copied was removed\n"
    )
    assert not (tmp_path / "backups").exists()

    def terminated(source: Path, target: Path) -> tuple[int, int]:
        copy_logs(source, target)
        os.kill(os.getpid(), signal.SIGTERM)  # (handled as Ctrl-C)
        raise AssertionError("not interrupted")

    monkeypatch.setattr(backups, "_copy_logs", terminated)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["backup", str(empty), "--config", str(manifest)]) == 130
    assert "the backup was interrupted" in capsys.readouterr().err
    assert list(empty.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

    monkeypatch.setattr(backups, "_copy_logs", copy_logs)
    assert cli.main(["backup", str(folder), "--config", str(manifest)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == [BACKUP_MARK, "eventrun.db", "logs"]
    assert stat.S_IMODE((folder / BACKUP_MARK).stat().st_mode) == 0o600

    # One killed outright (SIGKILL) leaves its folder, without the mark: restore refuses it.
    (folder / BACKUP_MARK).unlink()
    assert cli.main(["restore", str(folder), "--config", str(manifest_for(tmp_path, "restored"))]) == 2
    assert capsys.readouterr().err == (
        f"eventrun: {folder} is not a whole backup: {folder / BACKUP_MARK}, which `eventrun backup` writes last, "
        "is missing or incomplete, so the backup was interrupted or failed, or the folder was made by hand or by "
        "eventrun before 2026-12-08 (which wrote no mark): take a new backup if the data_dir is still there; else "
        "restore the folder by hand, as the README says\n"
    )
    assert not (tmp_path / "restored").exists()


def manifest_for(tmp_path: Path, data_dir: str) -> Path:
    manifest = tmp_path / f"{data_dir}.toml"
    manifest.write_text(f'[server]\ndata_dir = "{tmp_path / data_dir}"\n')
    return manifest


async def test_a_restore_killed_between_moving_the_logs_and_the_store_is_undone_by_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data"
    ids = await a_data_dir(data_dir, 2)
    take_backup(data_dir, tmp_path / "copy")
    restored = tmp_path / "restored"
    rename = os.rename

    def killed_after_the_logs(source: str | Path, target: str | Path) -> None:
        if Path(target).name == "eventrun.db":
            raise SystemExit("killed")  # (stands for SIGKILL: nothing of the restore's own undo runs)
        rename(source, target)

    monkeypatch.setattr(backups, "_undo", lambda *args: None)
    monkeypatch.setattr(os, "rename", killed_after_the_logs)
    with pytest.raises(SystemExit):
        backups.restore_backup(tmp_path / "copy", restored)
    monkeypatch.undo()
    assert (restored / "logs").is_dir() and not (restored / "eventrun.db").exists()
    assert (restored / RESTORING / MOVING).exists()

    again = backups.restore_backup(tmp_path / "copy", restored)
    assert (again.runs, again.logs) == (2, 2)
    assert sorted(p.name for p in restored.iterdir()) == ["eventrun.db", "eventrun.db.lock", "logs"]
    assert {log.stem for log in (restored / "logs").rglob("*.log")} == set(ids)


async def test_a_copy_of_a_backup_cut_short_is_refused_naming_what_it_lacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Its mark said it was whole; a copy of it without its logs/ (a partial rsync) restored with
    # no log at all.
    data_dir = tmp_path / "data"
    await a_data_dir(data_dir, 3)
    folder = tmp_path / "copy"
    take_backup(data_dir, folder)
    for log in sorted((folder / "logs").rglob("*.log"))[:2]:
        log.unlink()
    assert cli.main(["restore", str(folder), "--config", str(manifest_for(tmp_path, "restored"))]) == 2
    assert capsys.readouterr().err == (
        f"eventrun: {folder} holds 3 runs and 1 logs, and {BACKUP_MARK} says the backup was taken with 3 and 3:"
        " this copy of it is cut short; restore a whole one\n"
    )
    assert not (tmp_path / "restored").exists()


def test_a_server_does_not_start_on_a_restore_stopped_half_way(tmp_path: Path) -> None:
    # It started on an empty store beside the logs the restore had moved in, and the restore could
    # not be run again (the data_dir then held a store).
    data_dir = tmp_path / "data"
    (data_dir / RESTORING).mkdir(parents=True)
    store = SQLiteStore(data_dir / "eventrun.db")
    with pytest.raises(StoreError, match=r"a restore into the data_dir .* was stopped before it ended .*: run the same"):
        store.open()
    store.close()
    assert not (data_dir / "eventrun.db").exists()
