"""Worker instances: one Python process per instance, kept warm between good runs.

Nothing a function does in its instance may hurt the server or other runs. Its output is read
in bounded pieces and, once past what the run's log keeps, only searched for the run's outcome,
never held or decoded. A run ends when its outcome arrives, or when the process ends without
one (even while processes it started still hold its output pipe open), or at its timeout,
which also bounds handing it the event. A killed instance takes with it every process it
started, including ones that left its process group (see kill()).

Only this server talks to an instance, and it knows it by two secrets it makes for each, handed
over as the first line on the instance's task pipe (see worker.py): the token that marks its
frames, and a key every task carries; the function's environment comes on that line too. Each
task names its run with a fresh nonce, which the end frame must name again; an answer for
another run means someone else made the instance run something, and the instance is stopped
(ForeignAnswer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .api import Status
from .envelope import dumps, loads, too_deep_to_serve
from . import worker
from .spawner import OutputPipe, SpawnedProcess, Spawner, SpawnerUnavailable, descendants, forkable, read_at_start
from .users import instance_user
from .worker import FRAME_MARK, FRAME_MORE, MAX_FRAME, MAX_RESULT_NESTING, NO_NEW_PRIVILEGES, RESULT_TOO_DEEP

logger = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024
MAX_LINE = 64 * 1024  # longer lines are split, so one line never holds unbounded memory
AFTER_EXIT = 1.0  # seconds to read what a process wrote before it ended, for its outcome
OUTSIDE_RUNS = 64 * 1024  # bytes of output between runs shown in the server's log (each time)
PARTIAL_LINE_WAIT = 0.5  # seconds output waits for its line feed; then it is logged as it is (a progress bar's)

LineSink = Callable[[list[str]], None]
CodeFile = tuple[str, int, int, int]  # a file of a function's code: path, st_mtime_ns, st_size, st_ino

_WORKER_FILE = worker.__file__


@dataclass(frozen=True, slots=True)
class Spec:
    """How to start an instance of one function."""

    function: str
    handler: str  # absolute "path/to/file.py:callable"
    cwd: Path
    environment: dict[str, str]
    memory_limit: int = 0  # bytes of data memory (RLIMIT_DATA) an instance may use; 0: no limit
    run_as: str = ""  # the name of the user it runs as, looked up at each start; "": the server's


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """How one run on an instance ended."""

    status: Status
    result: Any = None
    error_type: str | None = None
    error_message: str | None = None
    keep_instance: bool = False


class InstanceDied(Exception):
    """The instance process ended without reporting an outcome."""


class ForeignAnswer(InstanceDied):
    """The instance sent an end frame for another run than the one it was given: it is stopped."""


class PartialLine:
    """When the start of a line that waits for its line feed is logged as it is: once it has
    waited PARTIAL_LINE_WAIT. Its line feed then ends the line logged, making no empty one."""

    __slots__ = ("_log", "_since", "_timer", "logged")

    def __init__(self, log: Callable[[], None]) -> None:
        self._log = log  # logs what waits as it is, and sets `logged` if it logs any
        self._since = 0.0  # when what waits began to wait (time.monotonic())
        self._timer: asyncio.TimerHandle | None = None  # calls _log once it has waited PARTIAL_LINE_WAIT
        self.logged = False  # the line waiting began with output logged before its line feed

    def waits(self, *, new: bool) -> None:
        """Output waits for its line feed. `new`: it began in the output just read (a line ended before it)."""
        if self._timer is None:
            self._since = time.monotonic()
            self._timer = asyncio.get_running_loop().call_later(PARTIAL_LINE_WAIT, self._due)
        elif new:
            self._since = time.monotonic()

    def drop_line_feed(self, lines: list[bytes]) -> None:
        """Lines ended, the first of them one `logged` began: its line feed makes no empty line of its own."""
        self.logged = False
        if not lines[0]:
            del lines[0]

    def cancel(self) -> None:
        """No more output comes: nothing waits."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _due(self) -> None:
        self._timer = None
        left = self._since + PARTIAL_LINE_WAIT - time.monotonic()
        if left > 0:  # (what waits began after the timer was set, as a line ended meanwhile)
            self._timer = asyncio.get_running_loop().call_later(left, self._due)
        else:
            self._log()


class Instance:
    """One worker process, running one event at a time."""

    def __init__(self, spec: Spec, process: asyncio.subprocess.Process | SpawnedProcess, token: str) -> None:
        self.spec = spec
        self.process = process
        self.pid = process.pid
        self._mark = (FRAME_MARK + token).encode()  # what each piece of a frame begins with (see worker.FRAME_MORE)
        self._key = secrets.token_hex(8).encode()  # what each task carries, for the instance to know it ours
        self._run: tuple[str, str] = ("", "")  # the request_id and nonce of the last task: what its end frame names
        self.foreign: str | None = None  # why the instance is not to be trusted, once it sent an answer for another run
        self._stopping_foreign: asyncio.Task[None] | None = None
        assert process.stdin is not None
        # The first line it reads: its secrets, and its function's environment, which goes no other
        # way (through the spawner, it would stay in the memory of instances forked after it).
        process.stdin.write(token.encode() + b" " + self._key + b" " + dumps(spec.environment) + b"\n")
        self._parts: list[bytes] = []  # the pieces of a frame that came before its last
        self._parts_size = 0  # their bytes, counted on past MAX_FRAME (no more are kept then)
        self._sink: LineSink | None = None
        self._outcome: asyncio.Future[dict[str, Any]] | None = None
        self._budget = OUTSIDE_RUNS  # bytes of output still passed on; past it, only frames are looked for
        self._pending = b""  # output after its last full line
        self._partial = PartialLine(self._log_waiting)  # logs _pending as it is, once it has waited
        self._pump: asyncio.Task[None] | None = None  # (held, so that the task is not collected)
        if isinstance(process, SpawnedProcess):
            self._output = process.stdout
        else:  # a Process of asyncio's: its stream is read by a task that hands the pieces on
            self._output = OutputPipe(asyncio.get_running_loop())
            self._pump = asyncio.create_task(self._read_stream(), name=f"instance-{self.pid}-reader")
        self._output.attach(self._feed, self._ended)
        self._exit = asyncio.ensure_future(self._wait_exit())
        self._exit.add_done_callback(self._exited)
        self._pipe = None if isinstance(process, SpawnedProcess) else _output_link(process)
        self.last_used = time.monotonic()
        self.stopping: Status | None = None  # why we are killing it, if we are
        self.code: tuple[CodeFile, ...] = ()  # the function's code as it imported it (see worker._CodeFiles)

    @property
    def alive(self) -> bool:
        """True while the process runs."""
        return self.process.returncode is None and not self._output.closed.done() and self.foreign is None

    async def run(
        self,
        request_id: str,
        envelope: bytes,
        timeout: float,
        sink: LineSink,
        kill_grace: float,
        *,
        log_limit: int | None = None,
    ) -> Outcome:
        """Hand one event to the instance and wait for its outcome, within the timeout.

        `log_limit`: output past this many bytes is not passed to `sink` (the log would drop it).
        """
        assert self.process.stdin is not None
        self._sink = sink
        self._budget = log_limit if log_limit is not None else 1 << 62
        self._outcome = asyncio.get_running_loop().create_future()
        deadline = time.time() + timeout
        nonce = secrets.token_hex(8)
        self._run = (request_id, nonce)
        task = (
            b'{"key":"' + self._key + b'","run":"' + nonce.encode() + b'","request_id":' + dumps(request_id)
            + b',"deadline":' + dumps(deadline) + b',"event":' + envelope + b"}\n"
        )
        try:
            # Handing it the event counts against the timeout: an instance that stopped reading
            # (stopped, or stuck in native code) never takes a large one.
            async with asyncio.timeout(timeout):  # (no task of its own, unlike wait_for)
                frame = await self._exchange(task)
            if self.stopping is not None:
                # Stopped on request while it ran: it ends so, whatever its handler reported since
                # (one that catches SIGTERM may exit or return), once its instance is gone or
                # kill_grace has passed. What it printed meanwhile goes to its log.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._exit), kill_grace + AFTER_EXIT)
                return self._stopped_outcome(timeout)
        except asyncio.TimeoutError:
            self.stopping = self.stopping or Status.TIMED_OUT
            await self.kill(kill_grace)
            return self._stopped_outcome(timeout)
        except ForeignAnswer as exc:
            await self.kill(kill_grace)
            return Outcome(status=Status.FAILED, error_type="InstanceDied", error_message=str(exc))
        except (InstanceDied, ConnectionError):
            with contextlib.suppress(asyncio.TimeoutError):
                # Its pipe closes as it exits, a moment before its exit status comes.
                await asyncio.wait_for(asyncio.shield(self._exit), AFTER_EXIT)
            if self.stopping is not None:
                await asyncio.shield(self._exit)
                return self._stopped_outcome(timeout)
            spawner_lost = isinstance(self.process, SpawnedProcess) and self.process.spawner_lost is not None
            if spawner_lost:  # (its exit comes once what it started is ended too)
                await asyncio.shield(self._exit)
            elif self.process.returncode is None:
                return Outcome(
                    status=Status.FAILED,
                    error_type="InstanceDied",
                    error_message="the instance closed its output pipe (every copy of stdout and stderr), so it could"
                    " not report the run's end; it was stopped",
                )
            return Outcome(status=Status.FAILED, error_type="InstanceDied", error_message=self._exit_text())
        finally:
            self._sink = None
            self._budget = OUTSIDE_RUNS
            self.last_used = time.monotonic()
        if "code" in frame:  # (its code changed since it last said: after its first run, as a rule)
            self.code = code_files(frame["code"])
        if frame.get("ok"):
            return Outcome(status=Status.FINISHED, result=frame.get("result"), keep_instance=not frame.get("recycle"))
        return Outcome(
            status=Status.FAILED,
            error_type=frame.get("error_type") or "Error",
            error_message=frame.get("error_message") or "",
            keep_instance=not frame.get("recycle", True),
        )

    async def _exchange(self, task: bytes) -> dict[str, Any]:
        """Send the task; its outcome frame (InstanceDied if the process ended without one)."""
        assert self.process.stdin is not None and self._outcome is not None
        self.process.stdin.write(task)
        await self.process.stdin.drain()
        # Awaited as it is: cut off (the timeout, a stop), it is cancelled, and whatever would
        # settle it later looks whether it is done first.
        return await self._outcome

    async def _wait_exit(self) -> int:
        """The exit code, once the process has exited, whether or not its pipes are closed.

        (asyncio's Process.wait() also waits for its pipes to close, which processes the
        function started can hold open for ever; a pidfd says when the process itself ended.)
        """
        process = self.process
        if isinstance(process, SpawnedProcess):
            return await process.wait()
        loop = asyncio.get_running_loop()
        try:
            pidfd = os.pidfd_open(process.pid)
        except ProcessLookupError:
            pass  # ended already: its exit code is on its way
        except (OSError, AttributeError):  # no pidfds here: the closing of its pipes must do
            return await process.wait()
        else:
            ended: asyncio.Future[None] = loop.create_future()

            def readable() -> None:
                if not ended.done():
                    ended.set_result(None)

            loop.add_reader(pidfd, readable)
            try:
                await ended
            finally:
                loop.remove_reader(pidfd)
                os.close(pidfd)
        while process.returncode is None:  # asyncio's child watcher reaps it in a moment
            await asyncio.sleep(0.005)
        return process.returncode

    def _exited(self, exit: asyncio.Future[int]) -> None:
        # Its end of file does not come while processes it started hold the pipe open: the exit
        # is what says it ended. What it wrote before still comes through first.
        if exit.cancelled() or exit.exception() is not None:
            return
        if self._outcome is not None and not self._outcome.done():
            asyncio.get_running_loop().call_later(AFTER_EXIT, self._died)

    def _died(self) -> None:
        if self._outcome is not None and not self._outcome.done():
            self._outcome.set_exception(InstanceDied())
            self._outcome.exception()  # retrieved here; run() reads it again

    def _stopped_outcome(self, timeout: float) -> Outcome:
        if self.stopping is Status.TIMED_OUT:
            return Outcome(
                status=Status.TIMED_OUT,
                error_type="TimedOut",
                error_message=f"the run exceeded its timeout of {timeout:g}s and was killed",
            )
        return Outcome(status=Status.ABORTED, error_type="Aborted", error_message="the run was terminated on request")

    def _exit_text(self) -> str:
        if isinstance(self.process, SpawnedProcess) and self.process.spawner_lost is not None:
            return (
                f"the instance spawner died ({self.process.spawner_lost}), and this run's instance, one of its"
                " children, was ended with it"
            )
        code = self.process.returncode
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"the instance process was killed by {name} ({-code}) before the run ended"
        return f"the instance process exited with code {code} before the run ended"

    async def abort(self, status: Status, kill_grace: float) -> None:
        """Stop the current run: SIGTERM the instance's process group, SIGKILL after the grace.
        A run already being stopped keeps the reason it had (one past its timeout ends TIMED_OUT)."""
        self.stopping = self.stopping or status
        await self.kill(kill_grace)

    async def kill(self, grace: float) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds; waits until the process is gone.

        The signals go to the instance's process group, which holds what the function started,
        unless a process moved to a group or session of its own (a daemon's double fork). Those
        are still below the instance, a child subreaper (see worker.py), so they are found by
        walking its tree and killed first. Should the instance die by itself, its parent takes
        the tree over: a spawner kills what it inherits. The server, parent of the instances it
        starts itself while the spawner is down, is no subreaper (it would inherit every orphan
        of its own children); for those, what still holds the instance's output pipe is killed.
        A process that also closed its copies of the pipe (a proper daemon) is out of reach then,
        as is, for a server that is not root, one forked from the instance and not exec'd since: it
        is not dumpable (see worker.py), so its fds are not to be seen.
        """
        if self.process.returncode is None:
            _kill_escaped(self.pid)
            _signal_instance(self.pid, signal.SIGTERM)
            _signal_instance(self.pid, signal.SIGCONT)  # a stopped process would not act on its SIGTERM
            try:
                await asyncio.wait_for(asyncio.shield(self._exit), grace)
            except asyncio.TimeoutError:
                _kill_escaped(self.pid)
                _signal_instance(self.pid, signal.SIGKILL)
                await asyncio.shield(self._exit)
        # Children the function left behind in its group go too.
        _signal_group(self.pid, signal.SIGKILL)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._output.closed), 1)
        if not self._output.closed.done() and self._pipe is not None:
            # Its output pipe is still held, by processes it started that left its group and,
            # as it died, its tree: whoever holds that pipe goes.
            for pid in await asyncio.to_thread(_holders, self._pipe):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._output.closed), 4)
        if self.process.stdin is not None:
            self.process.stdin.close()
        if isinstance(self.process, SpawnedProcess):  # (asyncio closes a Process's pipes itself)
            self.process.close_pipes()

    async def _read_stream(self) -> None:
        stream = self.process.stdout
        assert stream is not None
        try:
            while not self._output.closed.done() and (chunk := await stream.read(READ_CHUNK)):
                self._output.data_received(chunk)
        finally:  # at its end of file, or cancelled with the loop
            self._output.connection_lost(None)

    def _feed(self, data: bytes) -> None:
        """Output as it arrives: whole lines to the run's log, the outcome frame to the run, and
        the start of a line that waits for its line feed once it has waited PARTIAL_LINE_WAIT."""
        mark = self._mark
        if self._pending:
            data = self._pending + data
        if self._budget <= 0:
            # Past what the log keeps (a flood): the output is dropped unread, and only the
            # frame is looked for; no line is split or decoded.
            at = data.find(mark)
            if at < 0:
                self._pending = data[-(len(mark) - 1) :]  # the most of a mark it can end with
                return
            data = data[at:]
        *lines, pending = data.split(b"\n")
        if len(pending) > MAX_LINE + len(mark) - 1:
            pending = _cut(pending, lines, mark)
        self._pending = pending
        partial = self._partial
        if pending:
            partial.waits(new=bool(lines))
        if lines:
            if partial.logged:
                partial.drop_line_feed(lines)
            self._route(lines)

    def _log_waiting(self) -> None:
        """Log the output that has waited PARTIAL_LINE_WAIT for its line feed as a line, as it is
        (the rest of its line comes as another): a progress bar is seen while it runs."""
        pending = self._pending
        ready = _ready_output(pending, self._mark) if self._budget > 0 else 0
        if ready:
            self._pending = pending[ready:]
            self._partial.logged = True
            self._route([pending[:ready]])

    def _ended(self) -> None:
        """The output pipe's end: what is left of it is passed on, and a run still waiting has died."""
        if isinstance(self.process, SpawnedProcess):
            self.process.close_pipes()
        self._partial.cancel()
        pending, self._pending = self._pending, b""
        if pending and self._budget > 0:
            self._route([pending])
        if self._outcome is not None and not self._outcome.done():
            self._outcome.set_exception(InstanceDied())
            self._outcome.exception()  # retrieved here; run() reads it again

    def _route(self, lines: list[bytes]) -> None:
        """Whole lines: output to the run's log (within its budget), the pieces of a frame to the frame.

        A piece's mark is looked for anywhere in a line, not only at its start: a thread of the
        run that writes more than PIPE_BUF bytes at once may have them split around the piece,
        which then follows some of them on their line.
        """
        mark, more = self._mark, FRAME_MORE.encode()
        text: list[str] = []
        for line in lines:
            at = line.find(mark)
            if at != 0 and self._budget > 0:  # (an empty line is output too; nothing before a mark is none)
                output = line if at < 0 else line[:at]
                self._budget -= len(output) + 1
                text.append(output.decode("utf-8", "replace"))
            if at < 0:
                continue
            at += len(mark)
            if line[at : at + 1] == more:
                self._parts_size += len(line) - at - 1
                if self._parts_size <= MAX_FRAME:
                    self._parts.append(line[at + 1 :])
                continue
            self._emit(text)
            text = []
            try:
                frame = self._assemble(line[at + 1 :])
            except ForeignAnswer as exc:
                self._distrust(exc)
                continue
            if self._outcome is not None and not self._outcome.done():
                self._outcome.set_result(frame)
        self._emit(text)

    def _assemble(self, last: bytes) -> dict[str, Any]:
        """The frame whose last piece this is, read: the run's outcome (ForeignAnswer: another run's)."""
        parts, size = self._parts, self._parts_size + len(last)
        self._parts, self._parts_size = [], 0
        if size > MAX_FRAME:  # the worker sends no longer one
            return _unreadable(f"it is longer than {MAX_FRAME} bytes")
        return _read_frame(b"".join([*parts, last]) if parts else last, self._run)

    def _distrust(self, exc: ForeignAnswer) -> None:
        """An answer for another run came: some other process got a task to the instance (or wrote
        as it). The run waiting fails, and the instance is stopped (at once, between runs)."""
        if self.foreign is None:
            logger.warning("instance %s of %s is stopped: %s", self.pid, self.spec.function, exc)
        self.foreign = str(exc)
        if self._outcome is not None and not self._outcome.done():
            self._outcome.set_exception(exc)
            self._outcome.exception()  # retrieved here; run() reads it again
        elif self._stopping_foreign is None:
            self._stopping_foreign = asyncio.get_running_loop().create_task(self.kill(0), name=f"distrusted {self.pid}")

    def _emit(self, lines: list[str]) -> None:
        if lines and self._sink is not None:
            self._sink(lines)
        elif lines:
            shown = [line[:200] for line in lines[:3]]
            logger.info("instance %s of %s said outside a run: %s", self.pid, self.spec.function, shown)


def code_files(reported: Any) -> tuple[CodeFile, ...]:
    """The files of its code an instance reported (a list of [path, mtime_ns, size, ino]); those
    not so written are left out (the worker writes none such: the function's code might)."""
    files = []
    for item in reported if isinstance(reported, list) else ():
        if isinstance(item, list) and len(item) == 4 and isinstance(item[0], str) and all(type(n) is int for n in item[1:]):
            files.append((item[0], item[1], item[2], item[3]))
    return tuple(files)


def code_changes(code: tuple[CodeFile, ...]) -> dict[str, CodeFile | None]:
    """The files of an instance's code that differ from it now, each as it is now (None: gone).

    One stat per file: a warm instance is checked so each time it is handed a run.
    """
    changed: dict[str, CodeFile | None] = {}
    for file in code:
        path = file[0]
        try:
            st = os.stat(path)
        except OSError:
            changed[path] = None
            continue
        if (st.st_mtime_ns, st.st_size, st.st_ino) != file[1:]:
            changed[path] = (path, st.st_mtime_ns, st.st_size, st.st_ino)
    return changed


def _read_frame(raw: bytes, run: tuple[str, str]) -> dict[str, Any]:
    """A frame's JSON, read and checked: the outcome it reports, or why it cannot be had;
    ForeignAnswer if it names another run than `run` (the request_id and nonce of the last task)."""
    try:
        frame = loads(raw)
    except ValueError as exc:
        if str(exc).startswith("depth limit exceeded"):  # orjson reads 1024 levels: a result deeper still
            return _too_deep({"recycle": True})
        return _unreadable(str(exc))
    if not isinstance(frame, dict):
        return _unreadable("it is no JSON object")
    if (frame.get("request_id"), frame.get("run")) != run:
        named = repr(frame.get("request_id"))
        raise ForeignAnswer(
            f"the instance sent an answer for another run (request_id {named[:80]}) than the one it was given"
            f" ({run[0]}): it was stopped, and its answer not taken"
        )
    if frame.get("ok") and _nests_too_deep(raw, frame.get("result")):
        return _too_deep(frame)
    return frame


def _unreadable(why: str) -> dict[str, Any]:
    """The outcome of a run whose frame cannot be read, in place of its frame."""
    return {"ok": False, "error_type": "InternalError", "error_message": f"unreadable outcome: {why}"}


def _nests_too_deep(text: bytes, result: Any) -> bool:
    """Whether a result nests deeper than MAX_RESULT_NESTING levels, so that some document
    holding it could not be written (the worker's encoder lets some through: tuples, for one).

    Each level takes a bracket, so counting them in the frame's text (fast) spares most
    results the exact check: writing the result as deep as the deepest document holds it.
    """
    if text.count(b"[") + text.count(b"{") <= MAX_RESULT_NESTING + 1:  # (+ the frame's own brace)
        return False
    return too_deep_to_serve(result)


def _too_deep(frame: dict[str, Any]) -> dict[str, Any]:
    """The outcome of a run whose result nests too deep to be served, in place of its frame
    (with the code it reported: the instance is kept)."""
    outcome: dict[str, Any] = {
        "ok": False, "error_type": "ResultNotSerializable", "error_message": RESULT_TOO_DEEP,
        "recycle": bool(frame.get("recycle")),
    }
    if "code" in frame:
        outcome["code"] = frame["code"]
    return outcome


def _cut(pending: bytes, lines: list[bytes], mark: bytes) -> bytes:
    """A line too long to hold: split it into `lines` of at most MAX_LINE bytes, none ending
    inside a UTF-8 character; what is left to read on with.

    Output lines are split to bound memory, but for its last bytes, which may begin a frame's
    mark. What follows a mark (a piece of a frame, PIPE_BUF bytes at most; a whole frame should
    it come as one line) is not split, up to MAX_FRAME: no frame is longer, so one longer is
    not a frame, and is taken as output.
    """
    at = pending.find(mark)
    if at >= 0:
        if at:
            lines.append(pending[:at])
        pending = pending[at:]
        if len(pending) <= MAX_FRAME:
            return pending
    while len(pending) > MAX_LINE + len(mark):
        at = _character_start(pending, MAX_LINE)
        lines.append(pending[:at])
        pending = pending[at:]
    return pending


def _ready_output(pending: bytes, mark: bytes) -> int:
    """How many bytes of a line's start may be logged before its line feed: those before a
    frame's mark (or bytes that may begin one), and not into a character not all come yet."""
    end = pending.find(mark)
    if end < 0:
        end = len(pending)
        at = pending.find(mark[:1], max(0, end - len(mark) + 1))
        while at >= 0 and not mark.startswith(pending[at:]):
            at = pending.find(mark[:1], at + 1)
        if at >= 0:
            end = at
    return _whole_characters(pending, end)


def _whole_characters(data: bytes, end: int) -> int:
    """`end`, or where the UTF-8 character it would cut begins, if some of its bytes are yet to come."""
    for back in range(1, min(3, end) + 1):
        byte = data[end - back]
        if byte & 0xC0 == 0x80:  # a continuation byte: its character starts further back
            continue
        size = 1 if byte < 0xC0 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
        return end - back if back < size else end
    return end


def _character_start(data: bytes, at: int) -> int:
    """Where to cut `data` near `at`: there, or up to 3 bytes before, where a UTF-8 character starts.

    Each piece of a line is decoded on its own: cut inside a character, both halves would
    read as U+FFFD. Bytes that are not UTF-8 are cut at `at`, as they read as U+FFFD anyway.
    """
    for back in range(4):
        if data[at - back] & 0xC0 != 0x80:  # not a continuation byte: a character starts here
            return at - back
    return at


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _signal_instance(pid: int, sig: signal.Signals) -> None:
    """Signal a live instance's process group; or the instance alone, before it has made its
    group: the spawner tells its pid as it forks it, a moment before it calls setsid()."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
    except PermissionError:
        pass


def _output_link(process: asyncio.subprocess.Process) -> str | None:
    """What /proc shows an instance's output pipe as ("pipe:[INODE]"), from the server's own end of it.

    (Not from the instance's /proc/PID/fd: an instance is not dumpable, which closes that to a
    server that is not root.)
    """
    try:
        pipe = process._transport.get_pipe_transport(1).get_extra_info("pipe")  # type: ignore[attr-defined]
        return f"pipe:[{os.fstat(pipe.fileno()).st_ino}]"
    except (AttributeError, OSError, ValueError):
        return _stdout_link(process.pid)


def _stdout_link(pid: int) -> str | None:
    """What /proc shows a process's fd 1 as ("pipe:[INODE]"), to know its pipe by."""
    try:
        return os.readlink(f"/proc/{pid}/fd/1")
    except OSError:
        return None


def _holders(link: str) -> list[int]:
    """Processes other than this one with an fd on `link` (one instance's output pipe)."""
    me = str(os.getpid())
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or name == me:
            continue
        try:
            fds = os.listdir(f"/proc/{name}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{name}/fd/{fd}") == link:
                    found.append(int(name))
                    break
            except OSError:
                pass
    return found


def _kill_escaped(pid: int) -> None:
    """SIGKILL the processes below `pid` that are not in its process group (which gets its own signals)."""
    for child in descendants(pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(child) != pid:
                os.kill(child, signal.SIGKILL)


class InstancePool:
    """Starts instances, keeps warm ones per function, and reaps idle ones. A warm instance whose
    function's code changed since it imported it is stopped, not handed a run (see _outdated)."""

    def __init__(
        self, *, max_instances: int, idle_timeout: float, kill_grace: float, base_env: dict[str, str], fork: bool = True
    ) -> None:
        self.max_instances = max_instances
        self.idle_timeout = idle_timeout
        self.kill_grace = kill_grace
        self._base_env = base_env
        self._fork = fork
        self._spawner = Spawner(_WORKER_FILE, {**base_env, "PYTHONUNBUFFERED": "1"})
        self._idle: dict[str, list[Instance]] = {}
        self._busy: set[Instance] = set()
        self._starting = 0  # instances being started
        self._reaper: asyncio.Task[None] | None = None
        self._evicted: set[asyncio.Task[None]] = set()  # instances being stopped: to make room, reaped, outdated
        self._announced: dict[str, dict[str, CodeFile | None]] = {}  # per function: the changes of its code logged

    async def start(self) -> None:
        """Start the spawner, and begin reaping idle instances."""
        self._spawner.start()
        self._reaper = asyncio.create_task(self._reap(), name="instance-reaper")

    async def stop(self) -> None:
        """Kill every instance."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        everyone = [i for group in self._idle.values() for i in group] + list(self._busy)
        self._idle.clear()
        await asyncio.gather(*(i.kill(self.kill_grace) for i in everyone), *self._evicted, return_exceptions=True)
        await self._spawner.close()

    @property
    def size(self) -> int:
        """Instances alive now (those being stopped among them), and those being started."""
        return self._starting + len(self._busy) + sum(len(g) for g in self._idle.values()) + len(self._evicted)

    async def acquire(self, spec: Spec) -> Instance:
        """A warm instance of the function, or a new one."""
        idle = self._idle.get(spec.function, [])
        while idle:
            instance = idle.pop()
            if instance.alive and not self._outdated(instance):
                self._busy.add(instance)
                return instance
        await self._make_room()
        self._starting += 1  # (counted in size meanwhile: runs starting together each make room)
        try:
            try:
                instance = await self._spawn(spec)
            except OSError as exc:
                # No process, pipe or descriptor to be had (EAGAIN, EMFILE, ENFILE, ENOMEM): the
                # idle instances hold some, kept warm for runs that may not come. They go, and
                # one more try; without them, the run fails (InstanceStartFailed).
                if not await self._stop_idle():
                    raise
                logger.warning("cannot start an instance of %s (%s); stopped the idle instances and trying again", spec.function, exc)
                instance = await self._spawn(spec)
        finally:
            self._starting -= 1
        self._busy.add(instance)
        return instance

    async def _stop_idle(self) -> int:
        """Stop every idle instance, waiting until they have exited; how many there were."""
        idle = [i for group in self._idle.values() for i in group]
        self._idle.clear()
        await asyncio.gather(*(i.kill(self.kill_grace) for i in idle), return_exceptions=True)
        return len(idle)

    def keep_warm(self, instance: Instance, *, keep: bool) -> bool:
        """Take an instance back after a run and keep it warm if `keep` and it lives; False: kill it."""
        self._busy.discard(instance)
        if keep and instance.alive:
            instance.last_used = time.monotonic()
            self._idle.setdefault(instance.spec.function, []).append(instance)
            return True
        return False

    def _outdated(self, instance: Instance) -> bool:
        """Whether the function's code changed since the idle instance imported it; if so, it is
        stopped (the run goes to a fresh one), and the change logged once per function."""
        changed = code_changes(instance.code)
        if not changed:
            return False
        function = instance.spec.function
        announced = self._announced.setdefault(function, {})
        if any(announced.get(path, ()) != now for path, now in changed.items()):
            announced.update(changed)
            logger.info(
                "the code of function %s changed (%s): its instances are started afresh",
                function, ", ".join(sorted(os.path.basename(path) for path in changed)),
            )
        self._stop_in_background(instance, "outdated")
        return True

    async def _make_room(self) -> None:
        """Wait for room for one more instance: max_instances alive, and one more at most while
        instances are being stopped. At the limit the idle instance used longest ago is stopped
        to make room, and the run that needs it starts at once; should others still be going
        (an idle worker goes at SIGTERM, in milliseconds; one whose function ignores SIGTERM,
        after kill_grace), it waits for one of them to be gone."""
        while True:
            if self.size - len(self._evicted) >= self.max_instances and not self._evict_one():
                return  # (none idle: every slot is a run's, which the dispatcher bounds)
            if self.size <= self.max_instances or not self._evicted:
                return
            await asyncio.wait(set(self._evicted), return_when=asyncio.FIRST_COMPLETED)

    def _evict_one(self) -> bool:
        """Stop the idle instance used longest ago, in the background; False if none is idle."""
        candidates = [i for group in self._idle.values() for i in group]
        if not candidates:
            return False
        oldest = min(candidates, key=lambda i: i.last_used)
        self._idle[oldest.spec.function].remove(oldest)
        self._stop_in_background(oldest, "evict")
        return True

    def _stop_in_background(self, instance: Instance, why: str) -> None:
        """Stop an instance taken out of the pool, in the background (stop() waits for it).

        The run that needs the room, or a fresh instance, does not wait out kill_grace for an
        instance that takes its time to go (one ignoring SIGTERM); it is SIGKILLed after it.
        """
        stopping = asyncio.create_task(instance.kill(self.kill_grace), name=f"{why} {instance.pid}")
        self._evicted.add(stopping)
        stopping.add_done_callback(self._evicted.discard)

    async def _spawn(self, spec: Spec) -> Instance:
        token = secrets.token_hex(8)  # (handed over by the Instance, on the task pipe: see worker.py)
        user = instance_user(spec.run_as)
        login = user.environment() if user else {}
        # The function's own variables come on its task pipe (see Instance), but for those an
        # interpreter reads as it starts, which a fresh one must be given.
        at_start = {name: value for name, value in spec.environment.items() if read_at_start(name)}
        env = {**self._base_env, **login, **at_start, "PYTHONUNBUFFERED": "1"}
        as_user = f" as {user.name}" if user else ""
        # A fresh interpreter is still started by the spawner while it runs: so the spawner, a
        # subreaper, inherits what the instance leaves behind should it die (see worker.py).
        fresh = not (self._fork and forkable(spec.environment, self._base_env))
        if self._spawner.ready():
            try:
                forked = await self._spawner.spawn(
                    handler=spec.handler,
                    function=spec.function,
                    cwd=str(spec.cwd),
                    env=env,
                    memory_limit=spec.memory_limit,
                    user=user,
                    fresh=fresh,
                )
            except SpawnerUnavailable as exc:
                logger.warning("cannot start an instance of %s from the spawner (%s); starting one here", spec.function, exc)
            else:
                logger.info("started instance %s of %s%s", forked.pid, spec.function, as_user)
                return Instance(spec, forked, token)
        switch_user = {"user": user.uid, "group": user.gid, "extra_groups": list(user.groups)} if user else {}
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            # -P: neither the cwd (the user's folder) nor the worker's own folder goes on sys.path.
            # Run as a file, not with -m: the eventrun package is not loaded into the instance.
            "-P",
            _WORKER_FILE,
            spec.handler,
            spec.function,
            str(spec.memory_limit),
            *([NO_NEW_PRIVILEGES] if user else []),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=spec.cwd,
            env=env,
            start_new_session=True,  # its own process group, so a kill reaches the function's children
            **switch_user,
        )
        logger.info("started instance %s of %s%s", process.pid, spec.function, as_user)
        return Instance(spec, process, token)

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(min(self.idle_timeout / 2, 30))
            await self._reap_once(time.monotonic())

    async def _reap_once(self, now: float) -> None:
        """Stop the idle instances unused for idle_timeout or dead, and those whose function's
        code changed (else they would wait for a run, or for idle_timeout, to go): all at once, in
        the background (one after the other, instances that take kill_grace to go held up the
        rest, and new ones were started meanwhile)."""
        for group in self._idle.values():
            for instance in list(group):
                if now - instance.last_used >= self.idle_timeout or not instance.alive:
                    group.remove(instance)
                    logger.info("reaping idle instance %s of %s", instance.pid, instance.spec.function)
                    self._stop_in_background(instance, "reap")
                elif self._outdated(instance):  # (stopped in the background, the change logged)
                    group.remove(instance)
