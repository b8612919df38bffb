"""A consistent copy of a single node's store and its runs' logs, taken while the server serves."""

from __future__ import annotations

import os
import shutil
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from .errors import EventrunError
from .logs import LOGS_FOLDER
from .store import PRIVATE_FILE, PRIVATE_FOLDER, STORE_FILE, create_private


class BackupError(EventrunError):
    """The backup could not be taken; the message says why and what to do."""


@dataclass(frozen=True)
class Backup:
    """What a backup holds."""

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

