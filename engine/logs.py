"""Run logs: one file per RequestId, and a small publish/subscribe hub for followers."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Iterable, Iterator

from .api import Status
from .envelope import now_rfc3339
from .errors import InvocationNotFound, StoreError
from .store import PRIVATE_FILE
from .text import printable

logger = logging.getLogger(__name__)

FOLLOW_CHUNK = 16 * 1024
"""Bytes of a run's file a follower reads at a time (more only for one line longer than that): what
following a large log holds, also while its client does not read. Replaying 8 MB takes 500 reads
of a page cache, a few milliseconds."""

FOLLOWER_LAG = 64 * 1024
"""Bytes of live lines a follower may have waiting (at least one batch); past them it reads on
from the run's file, so a follower that stops reading pins no more of the run's output."""

FILE_CHECK_EVERY = 1.0
"""Seconds between two looks, while a run writes, at whether its file was removed (and at its end)."""

_FLAGS = os.O_RDWR | os.O_CREAT | os.O_APPEND  # (read too: should it be removed, what it held is copied)
_Lines = tuple[list[str], "int | None", int]  # (stamped lines, their end in the run's file or None, their size)
_END = None  # what a follower's queue receives when the run has ended
_BEHIND: _Lines = ([], None, 0)  # ... when it fell behind: the lines it missed are read from the file


class _Follower:
    """A follower's live lines, and how far behind it is."""

    __slots__ = ("queue", "lag", "behind", "closed")

    def __init__(self) -> None:
        self.queue: asyncio.Queue[_Lines | None] = asyncio.Queue()
        self.lag = 0  # bytes of the lines in the queue
        self.behind = False  # given no more lines until it has read the file
        self.closed = False  # the run's log was closed since it subscribed: _END is queued


class _OpenLog:
    """The log of a run that is going on; its file is made with the first line."""

    __slots__ = ("fd", "path", "checked", "size", "truncated", "held", "unwritable")

    def __init__(self) -> None:
        self.fd: int | None = None
        self.path = ""  # where its file is, once made
        self.checked = 0.0  # when it was last seen at its path (time.monotonic)
        self.size = 0
        self.truncated = False
        self.held: list[str] = []  # stamped lines that go in with the first line written
        self.unwritable = False  # its file could not be made or written: not tried again


LOGS_FOLDER = "logs"
"""The runs' logs' folder in the data_dir."""


class LogHub:
    """Appends stamped lines to per-run files and hands them to live followers."""

    def __init__(self, directory: Path, limit: int) -> None:
        self.directory = directory
        self.limit = limit
        self._open: dict[str, _OpenLog] = {}
        self._folders: set[str] = set()  # fan-out folders known to exist
        try:  # logs in the old layout (see _legacy_path) are read and continued where they are
            self._legacy = any(len(name) == 2 for name in os.listdir(directory))
        except OSError:
            self._legacy = False
        self._followers: dict[str, set[_Follower]] = {}
        self.sink: Callable[[str, bytes], None] | None = None  # given every byte written (a shared store)

    def path(self, request_id: str) -> Path:
        """Where a run's log lives: in folders by the time at the head of its RequestId.

        A RequestId starts with its creation time in milliseconds (hex), so the first six digits
        name a folder per 4.7 hours and the next two one of its 256 folders of 65 s each: no
        folder grows with the server's age, and the logs of one period sit together.
        """
        return Path(self._folder(request_id), f"{request_id}.log")

    def _folder(self, request_id: str) -> str:
        return os.path.join(self.directory, request_id[:6], request_id[6:8])

    def _legacy_path(self, request_id: str) -> Path:
        # Before the time folders: one folder per first two characters, which for time-ordered
        # ids is the same folder for decades. Logs written there are still read.
        return self.directory / request_id[:2] / f"{request_id}.log"

    def open(self, request_id: str) -> None:
        """Start (or continue) a run's log. Its file is made with the first line: a run that
        writes nothing leaves no file (and costs no file creation), and reads as empty."""
        self._log(request_id)

    def _log(self, request_id: str) -> _OpenLog:
        log = self._open.get(request_id)
        if log is None:
            log = self._open[request_id] = _OpenLog()
        return log

    def _create(self, request_id: str, log: _OpenLog) -> int:
        # Once a run: strings rather than Paths, and each fan-out folder made once.
        folder = self._folder(request_id)
        file = os.path.join(folder, f"{request_id}.log")
        if self._legacy and not os.path.exists(file):
            legacy = str(self._legacy_path(request_id))
            if os.path.exists(legacy):
                folder, file = os.path.dirname(legacy), legacy
        if folder not in self._folders:
            os.makedirs(folder, exist_ok=True)
            self._folders.add(folder)
        try:
            fd = os.open(file, _FLAGS, PRIVATE_FILE)
        except FileNotFoundError:  # the folder was removed behind our back: make it again
            os.makedirs(folder, exist_ok=True)
            fd = os.open(file, _FLAGS, PRIVATE_FILE)
        log.fd, log.path, log.checked = fd, file, time.monotonic()
        log.size = os.fstat(fd).st_size  # a log continued (e.g. noted after a restart) keeps its limit
        return fd

    def hold(self, request_id: str, line: str) -> None:
        """A line stamped now and written just before the run's first line; dropped if none comes.

        For eventrun's own line at the start of a run: a run that writes nothing and ends well
        then leaves no file at all. (Making a file is the costliest part of a short run's
        bookkeeping: 0.1 to 0.5 ms of the server's time on a journalled filesystem.)
        """
        log = self._log(request_id)
        if log.fd is None:
            log.held.append(f"{now_rfc3339()} {line}")
        else:
            self.note(request_id, line)

    def is_open(self, request_id: str) -> bool:
        """True while the run's log is being written."""
        return request_id in self._open

    def write(self, request_id: str, lines: Iterable[str]) -> None:
        """Stamp and append a run's output; past the size limit, say so once and drop the rest."""
        self._append(request_id, lines, limited=True)

    def note(self, request_id: str, line: str) -> None:
        """Stamp and append a line of eventrun's own (the run's start, its end): past the size
        limit too, so that a log cut short still ends with how the run ended. Such lines are few
        and short; the notice at the limit says the run's output is what is discarded."""
        self._append(request_id, (line,), limited=False)

    def _append(self, request_id: str, lines: Iterable[str], *, limited: bool) -> None:
        log = self._log(request_id)
        if log.truncated and limited:
            return
        stamp = now_rfc3339()
        stamped = [f"{stamp} {line}" for line in lines]
        if not stamped:
            return
        held = log.held
        if held:  # (only before the first line is written: the file is made with it)
            stamped[:0] = held
            log.held = []
        fd = log.fd
        if fd is None and not log.unwritable:
            try:
                fd = self._create(request_id, log)
            except OSError as exc:
                self._cannot_write(request_id, log, exc)
        data = ("\n".join(stamped) + "\n").encode("utf-8", "replace")
        if limited and log.size + len(data) > self.limit:
            notice = f"{stamp} [eventrun] log limit of {self.limit} bytes reached; further output of this run is discarded"
            stamped = [*held, *_fitting(stamped[len(held) :], self.limit - log.size - _size(held)), notice]
            data = ("\n".join(stamped) + "\n").encode("utf-8", "replace")
            log.truncated = True
        if fd is not None and time.monotonic() - log.checked >= FILE_CHECK_EVERY:
            fd = self._keep_file(request_id, log)
        if fd is not None:
            try:
                os.write(fd, data)
            except OSError as exc:
                self._cannot_write(request_id, log, exc)
        log.size += len(data)
        if self.sink is not None:
            self.sink(request_id, data)
        if request_id in self._followers:
            self._publish(request_id, stamped, None if log.fd is None else log.size, len(data))

    def _keep_file(self, request_id: str, log: _OpenLog) -> int | None:
        """The run's file; made again, with what it held, should it have been removed while the
        run goes on (its folder cleaned up, or the data_dir's logs): its lines would go on into
        a file no one can read. None if it cannot be made again (see _cannot_write)."""
        removed = log.fd
        assert removed is not None
        log.checked = time.monotonic()
        try:
            if os.fstat(removed).st_nlink:
                return removed
            os.makedirs(os.path.dirname(log.path), exist_ok=True)
            fd = os.open(log.path, _FLAGS, PRIVATE_FILE)
        except OSError as exc:
            self._cannot_write(request_id, log, exc)
            return None
        note = f"{now_rfc3339()} [eventrun] this log's file was removed while the run went on; made again with what it held\n"
        try:
            offset = 0
            while chunk := os.pread(removed, FOLLOW_CHUNK, offset):
                os.write(fd, chunk)
                offset += len(chunk)
            os.write(fd, note.encode())
        except OSError as exc:
            os.close(fd)
            self._cannot_write(request_id, log, exc)
            return None
        os.close(removed)
        log.fd = fd
        log.size += len(note)
        logger.warning(
            "the log file of run %s was removed while the run went on; made it again (%s) with what it held", request_id, log.path
        )
        return fd

    def _cannot_write(self, request_id: str, log: _OpenLog, exc: OSError) -> None:
        """The run's file cannot be made or written (a full disk, no file descriptor left): the
        file is given up for the rest of the run, not the run. Live followers (and a shared
        store) still get its lines; the server's log says why the file lacks them."""
        logger.error("cannot write the log of run %s (%s); its further lines are not kept in its file", request_id, exc)
        log.unwritable = True
        if log.fd is not None:
            try:
                os.close(log.fd)
            except OSError:
                pass
            log.fd = None

    def remove(self, request_id: str) -> None:
        """Delete an ended run's log (retention, or a shared store's spool)."""
        for path in (self.path(request_id), self._legacy_path(request_id)):
            try:
                os.remove(path)
            except (FileNotFoundError, NotADirectoryError):
                pass

    def prune(self, request_id: str) -> None:
        """Delete the log of a run retention deletes, and its time folders once they hold nothing
        more (they went on piling up empty: a folder a minute that saw a log)."""
        self.remove(request_id)
        folder = self._folder(request_id)
        for empty in (folder, os.path.dirname(folder)):  # (a log made in one meanwhile makes it again: _create)
            try:
                os.rmdir(empty)
            except OSError:  # not empty, as a rule: a run of that minute is still kept
                break
            self._folders.discard(empty)

    def close(self, request_id: str) -> None:
        """End a run's log and release its followers. With a sink (a shared store, which keeps
        the logs and is where they are read), the local file was only a spool and goes too."""
        log = self._open.pop(request_id, None)
        if log is not None and log.fd is not None:
            self._keep_file(request_id, log)  # (what was written since the last look goes in too)
        if log is not None and (log.fd is not None or log.unwritable):
            if log.fd is not None:
                os.close(log.fd)
            if self.sink is not None:
                self.remove(request_id)
        for follower in self._followers.pop(request_id, ()):
            follower.closed = True
            follower.queue.put_nowait(_END)

    def close_all(self) -> None:
        """Close every open log (shutdown)."""
        for request_id in list(self._open):
            self.close(request_id)

    def file(self, request_id: str) -> Path | None:
        """The run's file, if it has one (a run that wrote nothing has none)."""
        for path in (self.path(request_id), self._legacy_path(request_id)):
            if path.is_file():
                return path
        return None

    def read(self, request_id: str, *, last: int | None = None) -> bytes:
        """The whole log so far ("" before the run started); with `last`, only its last `last` bytes."""
        for path in (self.path(request_id), self._legacy_path(request_id)):
            try:
                with open(path, "rb") as file:
                    if last is not None:
                        file.seek(max(0, os.fstat(file.fileno()).st_size - last))
                    return file.read(last if last is not None else -1)
            except (FileNotFoundError, NotADirectoryError):  # (no file made: nothing written, or it could not be)
                pass
        return b""

    async def follow(
        self, request_id: str, ended: Callable[[], Awaitable[bool]], *, tail: int | None = None
    ) -> AsyncIterator[str | LeftOut]:
        """Every line so far, then live lines until the run ends. With `tail`, only the lines so far
        that begin within the file's last `tail` bytes, after a LeftOut saying how many bytes
        come before them (if any do).

        The lines so far are read from the run's file a chunk at a time, and so are the live
        lines a slow follower falls behind on. Each batch of live lines carries where it ends in
        the file, so none is given twice: those the follower read from the file already are passed
        over. The file, once open, is held open: a log deleted meanwhile (retention) is read to its end.
        """
        follower = _Follower()
        self._followers.setdefault(request_id, set()).add(follower)
        fd: int | None = None
        offset = 0
        try:
            while True:
                # The file from `offset` to its end; no await between the last read and the queue.
                if fd is None:
                    fd = self._open_to_read(request_id)
                    if fd is not None and tail is not None:
                        offset, tail = _tail_start(fd, tail), None
                        if offset:
                            yield LeftOut(offset)
                while fd is not None and (chunk := _read_lines(fd, offset)):
                    offset += len(chunk)
                    text = chunk.decode("utf-8", "replace")
                    del chunk  # (a follower that stops mid-chunk holds its text alone)
                    for line in _each_line(text):
                        yield line
                if not follower.closed and request_id not in self._open and await _has_ended(ended) and not follower.closed:
                    return  # (ended before this follower subscribed: nothing more will come)
                while (item := await follower.queue.get()) is not _BEHIND:
                    if item is None:  # _END: the run has ended
                        return
                    lines, end, size = item
                    follower.lag -= size
                    if end is None or end > offset:
                        for line in lines:
                            yield line
                        offset = end if end is not None else offset
                follower.behind, follower.lag = False, 0  # (lines published from here are read or passed over)
        finally:
            if fd is not None:
                os.close(fd)
            followers = self._followers.get(request_id)
            if followers is not None:
                followers.discard(follower)
                if not followers:
                    del self._followers[request_id]

    def _open_to_read(self, request_id: str) -> int | None:
        """The run's file, open to read; None while it has none (nothing written yet, or it could not
        be made). StoreError if it cannot be opened now (no descriptor left: EMFILE)."""
        for path in (self.path(request_id), self._legacy_path(request_id)):
            try:
                return os.open(path, os.O_RDONLY)
            except (FileNotFoundError, NotADirectoryError):
                pass
            except OSError as exc:
                raise unreadable_log(path, exc) from None
        return None

    def _publish(self, request_id: str, lines: list[str], end: int | None, size: int) -> None:
        """Hand lines to the run's followers; `end`: where they end in its file (None: not in it)."""
        followers = self._followers[request_id]
        for follower in list(followers):
            if follower.behind:
                continue
            if follower.lag == 0 or follower.lag + size <= FOLLOWER_LAG:  # (a batch is in memory anyway)
                follower.lag += size
                follower.queue.put_nowait((lines, end, size))
            elif end is not None:
                follower.behind = True  # it reads these from the file, once it has taken what it has
                follower.queue.put_nowait(_BEHIND)
            else:
                # Lines the file does not hold (it could not be written): a follower that cannot
                # keep up is cut off rather than held in memory.
                followers.discard(follower)
                notice = f"{now_rfc3339()} [eventrun] follower fell too far behind; read the log again to continue"
                follower.queue.put_nowait(([notice], None, 0))
                follower.queue.put_nowait(_END)


async def _has_ended(ended: Callable[[], Awaitable[bool]]) -> bool:
    """Whether the run has ended; so has one whose record is gone (retention deletes only ended
    runs), as a follower of an ended run finds when retention deletes it while it reads the log."""
    try:
        return await ended()
    except InvocationNotFound:
        return True


def unreadable_log(path: Path | str, exc: OSError) -> StoreError:
    """The error for a run's log file that cannot be opened now."""
    return StoreError(f"the run's log {path} cannot be read now ({exc.strerror or exc}); try again later")


@dataclasses.dataclass(frozen=True)
class LeftOut:
    """What a follow of a log's tail leaves out before its first line: `size` bytes of it."""

    size: int


def _tail_start(fd: int, most: int) -> int:
    """Where in a log file the first line that begins within its last `most` bytes begins (its
    end, if none does: the last line alone is longer)."""
    size = os.fstat(fd).st_size
    if size <= most:
        return 0
    at = size - most - 1  # (a line begins after a line feed: from the byte before)
    while piece := os.pread(fd, FOLLOW_CHUNK, at):
        if (found := piece.find(b"\n")) >= 0:
            return at + found + 1
        at += len(piece)
    return size


def _size(lines: list[str]) -> int:
    """The bytes of these lines in a log."""
    return sum(len(line.encode("utf-8", "replace")) + 1 for line in lines)


def _fitting(lines: list[str], room: int) -> list[str]:
    """The first of these lines that fit in `room` bytes of a log."""
    fitting = []
    for line in lines:
        room -= len(line.encode("utf-8", "replace")) + 1
        if room < 0:
            break
        fitting.append(line)
    return fitting


def tail_start(data: bytes, most: int) -> int:
    """Where in `data` (whole lines) the first line that begins within its last `most` bytes
    begins (its end, if none does)."""
    if len(data) <= most:
        return 0
    return data.find(b"\n", len(data) - most - 1) + 1 or len(data)


def _read_lines(fd: int, offset: int) -> bytes:
    """Whole lines of a log file from `offset`, about FOLLOW_CHUNK bytes; b"" at its end. A line
    longer than a chunk (lines of up to 64 KiB are logged whole) is read whole, not split."""
    data = os.pread(fd, FOLLOW_CHUNK, offset)
    if len(data) < FOLLOW_CHUNK or data.endswith(b"\n"):
        return data
    if cut := data.rfind(b"\n") + 1:
        return data[:cut]
    parts, at = [data], offset + len(data)
    while more := os.pread(fd, FOLLOW_CHUNK, at):
        if end := more.find(b"\n") + 1:
            parts.append(more[:end])
            break
        parts.append(more)
        at += len(more)
    return b"".join(parts)


def _each_line(text: str) -> Iterator[str]:
    """log_lines of a decoded chunk, one at a time, without a list of them all."""
    start = 0
    while (end := text.find("\n", start)) >= 0:
        yield text[start:end]
        start = end + 1
    if start < len(text):
        yield text[start:]


_END_NOTE = "[eventrun] run ended "


def end_note(status: str, error_type: str | None, error_message: str | None) -> str:
    """eventrun's closing line in the log of a run that did not finish well. What the function
    gave (an exception's message often holds the event's data) stays on this one line, its
    control characters escaped: it can neither add lines that pass for eventrun's own nor move
    a terminal's cursor."""
    return f"{_END_NOTE}{status}: {printable(str(error_type))}: {printable(str(error_message))}"




def closing_status(line: str) -> str | None:
    """The status a stamped closing line (see end_note) names; None for any other line."""
    _stamp, _, text = line.partition(" ")
    if not text.startswith(_END_NOTE):
        return None
    status = text[len(_END_NOTE) :].partition(":")[0]
    return status if status in _ENDED else None


_ENDED = frozenset(status.value for status in Status if status.ended)


def closing_line(stamp: str, status: str, error_type: str | None, error_message: str | None) -> bytes:
    """The end_note as the bytes of a log, stamped as LogHub.write stamps it: for an end the
    shared store records with its closing line, in one commit."""
    return f"{stamp} {end_note(status, error_type, error_message)}\n".encode("utf-8", "replace")


def log_lines(chunk: bytes) -> list[str]:
    """The lines of whole lines read from a run's log (split at line feeds only, as written)."""
    text = chunk.decode("utf-8", "replace")
    if not text:
        return []
    return text[:-1].split("\n") if text.endswith("\n") else text.split("\n")
