"""A consistent copy of a single node's store and its runs' logs, taken while the server serves,
and its restore into a data_dir no server runs on."""

from __future__ import annotations

import os
import shutil
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from .errors import EventrunError, StoreError
from .logs import LOGS_FOLDER
from .store import PRIVATE_FILE, PRIVATE_FOLDER, STORE_FILE, create_private, hold_lock
from .writes import SCHEMA_VERSION


class BackupError(EventrunError):
    """The backup could not be taken, or restored; the message says why and what to do."""


class RestoreRefused(BackupError):
    """The restore was refused, leaving the data_dir as it was: the message names the path and the fix."""


RESTORING = ".eventrun-restore"
"""The folder in the data_dir a restore fills before it moves the store and logs into place."""

# What a data_dir holds once a store has been opened in it: a restore writes over none of it.
_STORE_FILES = (STORE_FILE, f"{STORE_FILE}-wal", f"{STORE_FILE}-shm", f"{STORE_FILE}-journal", LOGS_FOLDER)

# SQLite's errors that say a database file is damaged, or no database.
_DAMAGED = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


@dataclass(frozen=True)
class Backup:
    """What a backup holds (or what a restore put in place: `folder` is then the data_dir)."""

    folder: Path
    runs: int
    store_bytes: int
    logs: int
    log_bytes: int


def take_backup(data_dir: Path, folder: Path) -> Backup:
    """Copy data_dir's store, then its logs, into `folder` (new or empty), for this user alone.

    The store is copied with SQLite's online backup, in one step: one read transaction, so the
    copy holds every run committed before it began and nothing half-written, and the server's
    commits go on meanwhile (WAL). The logs are copied after it, so every run in the copy has
    its log as far as it had been written then, or further.
    """
    source = data_dir / STORE_FILE
    if not source.is_file():
        raise BackupError(f"no store to back up: {source} does not exist (is data_dir right?)")
    _make_empty_folder(folder)
    target = folder / STORE_FILE
    create_private(target)
    try:
        # Read-only: the backup never writes to the store (nor checkpoints its WAL on closing).
        with closing(sqlite3.connect(f"{source.as_uri()}?mode=ro", uri=True)) as reader:
            with closing(sqlite3.connect(target)) as copy:
                reader.backup(copy)
                (runs,) = copy.execute("SELECT count(*) FROM invocations").fetchone()
    except sqlite3.Error as exc:
        raise BackupError(f"could not copy the store {source} to {target}: {exc}") from exc
    logs, log_bytes = _copy_logs(data_dir / LOGS_FOLDER, folder / LOGS_FOLDER)
    return Backup(folder, runs, target.stat().st_size, logs, log_bytes)


def _make_empty_folder(folder: Path) -> None:
    """`folder`, made for this user alone; an existing one must be an empty folder (a backup
    never writes over another, nor mixes with one)."""
    try:
        folder.mkdir(mode=PRIVATE_FOLDER, parents=True)
    except FileExistsError:
        if not folder.is_dir():
            raise BackupError(f"{folder} exists and is not a folder: name a new or empty folder") from None
        if any(folder.iterdir()):
            raise BackupError(f"{folder} is not empty: name a new or empty folder") from None
    except OSError as exc:
        raise BackupError(f"could not make the folder {folder}: {exc.strerror}") from exc


def _copy_logs(source: Path, target: Path) -> tuple[int, int]:
    """Copy every log file under `source` into the same place under `target`; the number of
    files and of bytes. A log retention removes meanwhile is passed over: its run is gone too."""
    files = size = 0
    for folder, _, names in os.walk(source):
        into = target / os.path.relpath(folder, source)
        into.mkdir(mode=PRIVATE_FOLDER, parents=True, exist_ok=True)
        for name in names:
            try:
                shutil.copyfile(os.path.join(folder, name), into / name)
            except FileNotFoundError:
                continue
            os.chmod(into / name, PRIVATE_FILE)
            files += 1
            size += (into / name).stat().st_size
    return files, size


def restore_backup(folder: Path, data_dir: Path) -> Backup:
    """Put the backup in `folder` in place as `data_dir`'s store and logs, for this user alone.

    The data_dir is held with the store's own lock throughout, so the restore is refused while a
    server runs on it and no server starts on it meanwhile; and it must hold no store. The store
    is copied with SQLite's backup API into a folder in the data_dir and checked whole, the logs
    are copied beside it, and both are moved into place last (the store after its logs). A
    restore that fails, or is interrupted, leaves the data_dir as it found it (one killed
    outright leaves that folder, which the next restore removes).
    """
    folder = folder.absolute()
    with closing(_open_backup(folder)) as reader:
        made = _missing_folders(data_dir)
        lock_path = data_dir / f"{STORE_FILE}.lock"  # the store's own lock (store._lock)
        lock_made = not os.path.lexists(lock_path)
        try:
            held = hold_lock(lock_path, f"the data_dir {data_dir}")
        except StoreError as exc:
            _remove_folders(made)
            raise RestoreRefused(f"cannot restore: {exc}") from None
        try:
            _refuse_a_store(data_dir)
            restored = _restore(reader, folder, data_dir)
        except BaseException:
            if lock_made:
                lock_path.unlink(missing_ok=True)
            held.release()
            _remove_folders(made)
            raise
        held.release()
    return restored


def _open_backup(folder: Path) -> sqlite3.Connection:
    """A read-only connection to the store of the backup in `folder`; RestoreRefused if it is
    not one this eventrun can read."""
    source = folder / STORE_FILE
    hint = "(name a folder `eventrun backup` made)"
    if not source.is_file():
        raise RestoreRefused(f"{folder} is not a backup: {source} is not there {hint}")

    def unreadable(exc: sqlite3.Error) -> RestoreRefused:
        return RestoreRefused(f"{folder} is not a backup eventrun can read: {source}: {exc} {hint}")

    # A backup is read as a file nothing writes to (immutable): reading it writes no -wal or
    # -shm beside it, and it may be on a read-only medium. A store copied by hand with its
    # WAL beside it is read with that WAL, which holds runs too.
    immutable = "" if os.path.lexists(f"{source}-wal") else "&immutable=1"
    try:
        reader = sqlite3.connect(f"{source.as_uri()}?mode=ro{immutable}", uri=True)
    except sqlite3.Error as exc:
        raise unreadable(exc) from None
    try:
        (version,) = reader.execute("PRAGMA user_version").fetchone()
        reader.execute("SELECT 1 FROM invocations LIMIT 1").fetchall()
    except sqlite3.Error as exc:
        reader.close()
        raise unreadable(exc) from None
    if version > SCHEMA_VERSION:
        reader.close()
        raise RestoreRefused(
            f"{source} was written by a newer eventrun (schema version {version}; this one knows "
            f"{SCHEMA_VERSION}): restore it with that eventrun or a newer one"
        )
    return reader


def _refuse_a_store(data_dir: Path) -> None:
    """RestoreRefused if `data_dir` holds a store, or its runs' logs: a restore writes over no run."""
    for name in _STORE_FILES:
        if os.path.lexists(data_dir / name):
            raise RestoreRefused(
                f"the data_dir {data_dir} already holds a store ({data_dir / name}), and a restore writes over "
                "no run: move it away, or restore into an empty data_dir"
            )


def _restore(reader: sqlite3.Connection, folder: Path, data_dir: Path) -> Backup:
    """Copy the backup into data_dir/RESTORING, check it, and move its store and logs into place."""
    work = data_dir / RESTORING
    # Left by a restore killed outright: the data_dir's lock says no other restore is running.
    shutil.rmtree(work, ignore_errors=True)
    logs_in_place = False
    try:
        work.mkdir(mode=PRIVATE_FOLDER)
        copy = work / STORE_FILE
        create_private(copy)
        try:
            with closing(sqlite3.connect(copy)) as target:
                reader.backup(target)
                problems = [problem for (problem,) in target.execute("PRAGMA integrity_check")]
                (runs,) = target.execute("SELECT count(*) FROM invocations").fetchone()
        except sqlite3.Error as exc:
            if getattr(exc, "sqlite_errorcode", 0) & 0xFF in _DAMAGED:  # (the copy is new: the backup's)
                raise RestoreRefused(f"{folder / STORE_FILE} is damaged ({exc}): restore another backup") from None
            raise BackupError(f"could not copy the store {folder / STORE_FILE} to {copy}: {exc}") from exc
        if problems != ["ok"]:
            raise RestoreRefused(
                f"{folder / STORE_FILE} is damaged (integrity_check: {problems[0]}): restore another backup"
            )
        logs, log_bytes = _copy_logs(folder / LOGS_FOLDER, work / LOGS_FOLDER)
        if (work / LOGS_FOLDER).is_dir():
            os.rename(work / LOGS_FOLDER, data_dir / LOGS_FOLDER)
            logs_in_place = True
        os.rename(copy, data_dir / STORE_FILE)  # the restore's commit: the data_dir holds a store now
    except OSError as exc:
        _undo(work, data_dir, logs_in_place)
        raise BackupError(f"could not restore {folder} into {data_dir}: {exc}") from exc
    except BaseException:
        _undo(work, data_dir, logs_in_place)
        raise
    shutil.rmtree(work, ignore_errors=True)
    return Backup(data_dir, runs, (data_dir / STORE_FILE).stat().st_size, logs, log_bytes)


def _undo(work: Path, data_dir: Path, logs_in_place: bool) -> None:
    """Remove what a restore that did not end wrote (the logs it moved into place are its own:
    the data_dir held none before)."""
    shutil.rmtree(work, ignore_errors=True)
    if logs_in_place:
        shutil.rmtree(data_dir / LOGS_FOLDER, ignore_errors=True)


def _missing_folders(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist, innermost first (the lock makes them)."""
    missing = []
    while not os.path.lexists(folder) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_folders(folders: list[Path]) -> None:
    """Remove the folders a refused restore made, innermost first, as far as they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return
