"""A consistent copy of a single node's store and its runs' logs, taken while the server serves,
and its restore into a data_dir no server runs on."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any

from .errors import EventrunError, StoreError
from .logs import LOGS_FOLDER, LogHub
from .store import PRIVATE_FILE, PRIVATE_FOLDER, RESTORED_STORE, RESTORING, STORE_FILE, create_private, hold_lock
from .writes import PRUNE_AT_ONCE, SCHEMA_VERSION, SQLITE_PATH_LIMIT, delete_runs, prune, unopenable


class BackupError(EventrunError):
    """The backup could not be taken, or restored; the message says why and what to do."""


class BackupRefused(BackupError):
    """The backup or restore was refused before it wrote anything: the message names the path and the fix."""


class RestoreRefused(BackupRefused):
    """The restore was refused, leaving the data_dir as it was: the message names the path and the fix."""


BACKUP_MARK = "eventrun-backup.json"
"""The file `backup` writes last, once all else is written and on disk: a folder without it is
no whole backup (one interrupted, failed, or made by hand), and `restore` refuses it."""


MOVING = "moving"
"""The file in RESTORING a restore writes before it moves anything into place: the next restore
knows by it that logs it finds without a store are that restore's own, and removes them."""

# What a data_dir holds once a store has been opened in it: a restore writes over none of it.
_STORE_FILES = (STORE_FILE, f"{STORE_FILE}-wal", f"{STORE_FILE}-shm", f"{STORE_FILE}-journal")

# SQLite's errors that say a database file is damaged, or no database.
_DAMAGED = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)

_APART = "keep backups apart from what they copy"


@dataclass(frozen=True)
class Backup:
    """What a backup holds (or what a restore put in place: `folder` is then the data_dir)."""

    folder: Path
    runs: int
    store_bytes: int
    logs: int
    log_bytes: int
    left_out: int = 0  # ended runs retention deleted (or was about to) while the logs were copied


@contextmanager
def terminated_as_interrupted() -> Iterator[None]:
    """SIGTERM handled as SIGINT (KeyboardInterrupt) meanwhile: a backup or restore stopped
    either way removes what it wrote."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def take_backup(data_dir: Path, folder: Path, retention: float = 0.0) -> Backup:
    """Copy data_dir's store, then its logs, into `folder` (new or empty), for this user alone,
    and mark it whole last; one that fails or is interrupted removes what it wrote.

    The store is copied with SQLite's online backup, in one step: one read transaction, so the
    copy holds every run committed before it began and nothing half-written, and the server's
    commits go on meanwhile (WAL). The logs are copied after it, so every run in the copy has
    its log as far as it had been written then, or further: the runs [server] `retention` (in
    seconds) deleted, or could have, while they were copied are left out of the copy.
    """
    source = data_dir / STORE_FILE
    _refuse_inside(
        folder, data_dir, f"cannot back up into {folder}: it is inside the data_dir {data_dir}, which it copies"
    )
    if not source.is_file():
        raise BackupError(f"no store to back up: {source} does not exist (is data_dir right?)")
    made = _missing_folders(folder)
    _make_empty_folder(folder)
    try:
        return _take(source, data_dir, folder, retention)
    except OSError as exc:
        _clear(folder, made)
        raise BackupError(
            f"could not back up {data_dir} into {folder}: {_reason(exc)}; what it had copied was removed"
        ) from None
    except BaseException:
        _clear(folder, made)
        raise


def _take(source: Path, data_dir: Path, folder: Path, retention: float) -> Backup:
    target = folder / STORE_FILE
    create_private(target)
    try:
        # Read-only: the backup never writes to the store (nor checkpoints its WAL on closing).
        with closing(sqlite3.connect(f"{source.as_uri()}?mode=ro", uri=True)) as reader:
            with closing(sqlite3.connect(target)) as copy:
                reader.backup(copy)
    except sqlite3.Error as exc:
        raise BackupError(f"could not copy the store {source} to {target}: {exc}") from exc
    logs, log_bytes = _copy_logs(data_dir / LOGS_FOLDER, folder / LOGS_FOLDER)
    try:
        with closing(sqlite3.connect(target.as_uri(), uri=True)) as copy:
            left_out = _leave_out_pruned(copy, source, retention)
            (runs,) = copy.execute("SELECT count(*) FROM invocations").fetchone()
    except sqlite3.Error as exc:
        raise BackupError(f"could not leave the runs retention deleted out of {target}: {exc}") from exc
    if left_out:  # their logs go with them, as retention's own go
        hub = LogHub(folder / LOGS_FOLDER, 0)
        for request_id in left_out:
            hub.prune(request_id)
        logs, log_bytes = _count_logs(folder / LOGS_FOLDER)
    taken = Backup(folder, runs, target.stat().st_size, logs, log_bytes, len(left_out))
    _write_mark(taken)
    return taken


def _leave_out_pruned(copy: sqlite3.Connection, source: Path, retention: float) -> list[str]:
    """Delete from the copy the runs whose logs retention may have deleted since the store was
    copied; their RequestIds. First those it could have (ended before now - retention), by the store's
    own pruning; then any other the store no longer holds (one owing a delivery when copied, or
    still running, with a retention shorter than the copy took): retention deletes a run's row
    before its log, so a run the store holds now had its log when the logs were copied."""
    left_out: list[str] = []
    if retention > 0:
        ended_before_ms = int((time.time() - retention) * 1000)
        ended_before = datetime.fromtimestamp(ended_before_ms / 1000, timezone.utc).isoformat(timespec="milliseconds")
        op = ((ended_before_ms + 1) << 12, ended_before.replace("+00:00", "Z"))  # (as SQLiteStore.prune)
        while True:
            with copy:
                pruned = prune(copy, op)
            left_out += pruned
            if len(pruned) < PRUNE_AT_ONCE:
                break
    copy.execute("ATTACH DATABASE ? AS live", (f"{source.as_uri()}?mode=ro",))
    try:
        gone = [
            r for (r,) in copy.execute(
                "SELECT request_id FROM invocations WHERE seq NOT IN (SELECT seq FROM live.invocations)"
            )
        ]
    finally:
        copy.execute("DETACH DATABASE live")
    if not gone:
        return left_out
    with copy:
        delete_runs(copy, gone)
    return left_out + gone


def _write_mark(taken: Backup) -> None:
    """Write BACKUP_MARK in the backup, on disk with all before it: the backup is whole."""
    mark = {
        "eventrun_backup": 1,
        "schema_version": SCHEMA_VERSION,
        "runs": taken.runs,
        "store_bytes": taken.store_bytes,
        "logs": taken.logs,
        "log_bytes": taken.log_bytes,
        "left_out": taken.left_out,
    }
    _sync_file_system(taken.folder)  # (the logs and their folders: one sync, not one a file)
    fd = os.open(taken.folder / BACKUP_MARK, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    with open(fd, "wb") as file:
        file.write(json.dumps(mark, indent=1).encode() + b"\n")
        file.flush()
        os.fsync(file.fileno())
    _fsync(taken.folder)


def _sync_file_system(folder: Path) -> None:
    """Everything written to the file system `folder` is on, on disk (syncfs; sync where there is
    none). A log at a time took 100,000 fsyncs for 100,000 runs, most of a backup's time."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syncfs(fd) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(folder))
    except AttributeError:  # no syncfs (not Linux)
        os.sync()
    finally:
        os.close(fd)


def _fsync(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _refuse_inside(folder: Path, data_dir: Path, refusal: str) -> None:
    """BackupRefused if `folder` is the data_dir or inside it, links resolved: a backup there
    copies itself, and a restore from there removes what it restores from."""
    inner, outer = Path(os.path.realpath(folder)), Path(os.path.realpath(data_dir))
    if inner == outer or outer in inner.parents:
        raise BackupRefused(f"{refusal}: {_APART}")


def _make_empty_folder(folder: Path) -> None:
    """`folder`, made for this user alone; an existing one must be an empty folder (a backup
    never writes over another, nor mixes with one), and is made this user's alone."""
    try:
        folder.mkdir(mode=PRIVATE_FOLDER, parents=True)
    except FileExistsError:
        if not folder.is_dir():
            raise BackupError(f"{folder} exists and is not a folder: name a new or empty folder") from None
        if any(folder.iterdir()):
            raise BackupError(f"{folder} is not empty: name a new or empty folder") from None
        try:
            os.chmod(folder, PRIVATE_FOLDER)
        except OSError as exc:
            raise BackupRefused(
                f"cannot make {folder} this user's alone (mode 700), as a backup is: {_reason(exc)}; "
                "name a folder of your own"
            ) from None
    except OSError as exc:
        raise BackupError(f"could not make the folder {folder}: {exc.strerror}") from exc


def _clear(folder: Path, made: list[Path]) -> None:
    """Remove what a backup that did not end wrote: the folders it made, or what it put in the
    empty folder it was given."""
    if made:
        shutil.rmtree(folder, ignore_errors=True)
        _remove_folders(made[1:])
        return
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _reason(exc: OSError) -> str:
    """An OSError in a line: the path at fault and why (a full disk, a folder not writable)."""
    return f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc)


def _copy_logs(source: Path, target: Path) -> tuple[int, int]:
    """Copy every log file under `source` into the same place under `target`, each on disk; the
    number of files and of bytes. A log retention removes meanwhile is passed over (its run is
    left out of a backup: _leave_out_pruned)."""
    files = size = 0
    for folder, _, names in os.walk(source):
        into = target / os.path.relpath(folder, source)
        into.mkdir(mode=PRIVATE_FOLDER, parents=True, exist_ok=True)
        for name in names:
            try:
                log = open(os.path.join(folder, name), "rb")
            except FileNotFoundError:
                continue
            with log, open(os.open(into / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE), "wb") as copy:
                os.fchmod(copy.fileno(), PRIVATE_FILE)
                shutil.copyfileobj(log, copy)
                size += copy.tell()
            files += 1
    return files, size


def _count_logs(folder: Path) -> tuple[int, int]:
    """The number of log files under `folder`, and of their bytes."""
    files = size = 0
    for into, _, names in os.walk(folder):
        for name in names:
            files += 1
            size += os.stat(os.path.join(into, name)).st_size
    return files, size


def restore_backup(folder: Path, data_dir: Path) -> Backup:
    """Put the backup in `folder` in place as `data_dir`'s store and logs, for this user alone.

    The data_dir is held with the store's own lock throughout, so the restore is refused while a
    server runs on it and no server starts on it meanwhile; and it must hold no store. The store
    is copied with SQLite's backup API into the data_dir and checked whole, the logs are copied
    into a folder beside it, and both are moved into place last (the store after its logs). A
    restore that fails, or is interrupted, leaves the data_dir as it found it (one killed
    outright leaves what it wrote, which the next restore removes, logs it moved in included).
    """
    folder = folder.absolute()
    _refuse_inside(
        folder, data_dir,
        f"cannot restore from {folder}: it is inside the data_dir {data_dir}, which a restore fills "
        "(move it out of the data_dir first)",
    )
    with closing(_open_backup(folder)) as reader:
        made = _missing_folders(data_dir)
        lock_path = data_dir / f"{STORE_FILE}.lock"  # the store's own lock (store._lock)
        lock_made = not os.path.lexists(lock_path)
        try:
            held = hold_lock(lock_path, f"the data_dir {data_dir}", by="eventrun restore")
        except StoreError as exc:
            _remove_folders(made)
            raise RestoreRefused(f"cannot restore: {exc}") from None
        try:
            _undo_a_killed_restore(data_dir)
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


class _WalBeside:
    """Stands for the reader of a backup whose store has a WAL beside it: it is read from a
    private copy of the two in the data_dir (_restore), so nothing is written beside it."""

    def close(self) -> None:
        pass


def _open_backup(folder: Path) -> sqlite3.Connection | _WalBeside:
    """A read-only connection to the store of the backup in `folder`; RestoreRefused if it is
    not a whole backup this eventrun can read."""
    source = folder / STORE_FILE
    if not source.is_file():
        raise RestoreRefused(f"{folder} is not a backup: {source} is not there (name a folder `eventrun backup` made)")
    _check_mark(folder)
    if os.path.lexists(f"{source}-wal"):  # (copied by hand with the WAL, which holds runs too)
        return _WalBeside()
    # A backup is read as a file nothing writes to (immutable): reading it writes no -wal or
    # -shm beside it, and it may be on a read-only medium.
    try:
        reader = sqlite3.connect(f"{source.as_uri()}?mode=ro&immutable=1", uri=True)
    except sqlite3.Error as exc:
        raise _unreadable(folder, exc) from None
    try:
        _check_schema(reader, folder)
    except BaseException:
        reader.close()
        raise
    return reader


def _check_mark(folder: Path) -> dict[str, Any]:
    """The BACKUP_MARK a whole backup ends with; RestoreRefused unless `folder` holds one."""
    try:
        mark: Any = json.loads((folder / BACKUP_MARK).read_bytes())
    except (OSError, ValueError):
        mark = None
    if not (isinstance(mark, dict) and isinstance(mark.get("runs"), int) and isinstance(mark.get("logs"), int)):
        raise RestoreRefused(
            f"{folder} is not a whole backup: {folder / BACKUP_MARK}, which `eventrun backup` writes last, is "
            "missing or incomplete, so the backup was interrupted or failed, or the folder was made by hand or by "
            "eventrun before 2026-12-08 (which wrote no mark): take a new backup if the data_dir is still there; "
            "else restore the folder by hand, as the README says"
        )
    return mark


def _check_counts(folder: Path, runs: int, logs: int) -> None:
    """RestoreRefused if the backup holds fewer runs or logs than its mark says it was taken with
    (a copy of it cut short: a partial rsync, a lost logs/)."""
    mark = _check_mark(folder)
    if runs != mark["runs"] or logs < mark["logs"]:
        raise RestoreRefused(
            f"{folder} holds {runs:,} runs and {logs:,} logs, and {BACKUP_MARK} says the backup was taken with"
            f" {mark['runs']:,} and {mark['logs']:,}: this copy of it is cut short; restore a whole one"
        )


def _unreadable(folder: Path, exc: sqlite3.Error) -> RestoreRefused:
    return RestoreRefused(
        f"{folder} is not a backup eventrun can read: {folder / STORE_FILE}: {exc} (name a folder `eventrun backup` made)"
    )


def _check_schema(reader: sqlite3.Connection, folder: Path) -> None:
    """RestoreRefused if the store `reader` reads is no eventrun store, or one a newer eventrun wrote."""
    try:
        (version,) = reader.execute("PRAGMA user_version").fetchone()
        reader.execute("SELECT 1 FROM invocations LIMIT 1").fetchall()
    except sqlite3.Error as exc:
        raise _unreadable(folder, exc) from None
    if version > SCHEMA_VERSION:
        raise RestoreRefused(
            f"{folder / STORE_FILE} was written by a newer eventrun (schema version {version}; this one knows "
            f"{SCHEMA_VERSION}): restore it with that eventrun or a newer one"
        )


def _undo_a_killed_restore(data_dir: Path) -> None:
    """Remove what a restore killed outright left (the data_dir's lock says no other runs): its
    work copies, and the logs it had moved into place if it did not move the store after them."""
    work = data_dir / RESTORING
    if os.path.lexists(work / MOVING) and not os.path.lexists(data_dir / STORE_FILE):
        shutil.rmtree(data_dir / LOGS_FOLDER, ignore_errors=True)  # its own: the data_dir held none before
    shutil.rmtree(work, ignore_errors=True)
    _remove_store_copy(data_dir)


def _remove_store_copy(data_dir: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        (data_dir / f"{RESTORED_STORE}{suffix}").unlink(missing_ok=True)


def _refuse_a_store(data_dir: Path) -> None:
    """RestoreRefused if `data_dir` holds a store, or its runs' logs: a restore writes over no run."""
    for name in _STORE_FILES:
        if os.path.lexists(data_dir / name):
            raise RestoreRefused(
                f"the data_dir {data_dir} already holds a store ({data_dir / name}), and a restore writes over "
                "no run: move it away, or restore into an empty data_dir"
            )
    if os.path.lexists(data_dir / LOGS_FOLDER):
        raise RestoreRefused(
            f"the data_dir {data_dir} already holds runs' logs ({data_dir / LOGS_FOLDER}), and a restore writes "
            "over no run: move them away, or restore into an empty data_dir"
        )


def _restore(reader: sqlite3.Connection | _WalBeside, folder: Path, data_dir: Path) -> Backup:
    """Copy the backup's store to data_dir/RESTORED_STORE and its logs into data_dir/RESTORING,
    check the store, and move the logs and the store into place."""
    work = data_dir / RESTORING
    copy = data_dir / RESTORED_STORE
    source = folder / STORE_FILE
    logs_in_place = False
    try:
        work.mkdir(mode=PRIVATE_FOLDER)
        if isinstance(reader, _WalBeside):  # the private copy of the two is the work copy
            _copy_file(source, copy)
            _copy_file(Path(f"{source}-wal"), Path(f"{copy}-wal"))
        else:
            create_private(copy)
        try:
            with closing(sqlite3.connect(copy)) as target:
                if isinstance(reader, sqlite3.Connection):
                    reader.backup(target)
                else:
                    _check_schema(target, folder)
                problems = [problem for (problem,) in target.execute("PRAGMA integrity_check")]
                (runs,) = target.execute("SELECT count(*) FROM invocations").fetchone()
        except sqlite3.Error as exc:
            store = data_dir / STORE_FILE
            if len(os.fsencode(os.path.realpath(store))) > SQLITE_PATH_LIMIT:  # (as long as the copy's)
                raise RestoreRefused(f"cannot open the store {store}: {unopenable(store, exc)}") from None
            if getattr(exc, "sqlite_errorcode", 0) & 0xFF in _DAMAGED:  # (the copy is new: the backup's)
                raise RestoreRefused(f"{source} is damaged ({exc}): restore another backup") from None
            raise BackupError(f"could not copy the store {source} to {copy}: {exc}") from exc
        if problems != ["ok"]:
            raise RestoreRefused(f"{source} is damaged (integrity_check: {problems[0]}): restore another backup")
        logs, log_bytes = _copy_logs(folder / LOGS_FOLDER, work / LOGS_FOLDER)
        _check_counts(folder, runs, logs)
        _sync_file_system(data_dir)  # (the copies on disk before they are moved into place)
        _touch_on_disk(work / MOVING)
        if (work / LOGS_FOLDER).is_dir():
            os.rename(work / LOGS_FOLDER, data_dir / LOGS_FOLDER)
            logs_in_place = True
        os.rename(copy, data_dir / STORE_FILE)  # the restore's commit: the data_dir holds a store now
        _fsync(data_dir)
    except OSError as exc:
        _undo(work, data_dir, logs_in_place)
        raise BackupError(f"could not restore {folder} into {data_dir}: {_reason(exc)}") from None
    except BaseException:
        _undo(work, data_dir, logs_in_place)
        raise
    shutil.rmtree(work, ignore_errors=True)
    return Backup(data_dir, runs, (data_dir / STORE_FILE).stat().st_size, logs, log_bytes)


def _copy_file(source: Path, target: Path) -> None:
    """Copy `source` to a new file `target` for this user alone."""
    with open(source, "rb") as file, open(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE), "wb") as copy:
        shutil.copyfileobj(file, copy)


def _touch_on_disk(path: Path) -> None:
    """Write the empty file `path`, on disk before what comes after it."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, PRIVATE_FILE))
    _fsync(path.parent)


def _undo(work: Path, data_dir: Path, logs_in_place: bool) -> None:
    """Remove what a restore that did not end wrote (the logs it moved into place are its own:
    the data_dir held none before)."""
    if logs_in_place:
        shutil.rmtree(data_dir / LOGS_FOLDER, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    _remove_store_copy(data_dir)


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
