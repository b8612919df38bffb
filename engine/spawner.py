"""Instances forked from a spawner process: each starts in about a millisecond of the server's time.

A fresh interpreter costs every instance 30 ms or more of CPU (the interpreter, site-packages)
before it loads its handler; a burst that starts eight instances pays that eight times. The
spawner (worker.spawner) is one interpreter started with the server that has paid it once and
forks each instance on request. The child runs the same worker with the function's own process
group, pipes, folder, environment and memory limit.

The spawner is a child subreaper: a process an instance started that outlives the instance
(a crash, a kill) is handed to the spawner, which kills it (see worker.spawner).

What a fork cannot give is what the interpreter decides at start from the environment: a
function whose `environment` sets a PYTHON* variable (PYTHONPATH, PYTHONHASHSEED, ...) or the
locale (LANG, LC_*) differently from the server's gets a fresh interpreter, as does every
instance with `fork_instances = false`. The spawner starts those too (its child execs a new
interpreter), so that they are also its children. Only while the spawner is not available
does the server start instances itself. Forked instances share the spawner's hash seed.

The spawner is not dumpable, as instances are (see worker.py), and its forked instances keep that.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping

from .worker import children_of

if TYPE_CHECKING:
    from .users import RunAs

logger = logging.getLogger(__name__)

_MESSAGE = 64 * 1024  # the spawner's messages are small: a pid, an exit code, an error
_REPLY_TIMEOUT = 10.0  # a spawner that does not answer by then is given up
_ORPHANS_WAIT = 2.0  # seconds to go on killing what is below an instance whose spawner is gone
RESTART_AFTER = 30.0  # a spawner that stopped is started again this long after, when next needed


class SpawnerUnavailable(Exception):
    """The spawner could not fork this instance; start a fresh interpreter instead."""


def read_at_start(name: str) -> bool:
    """Whether an interpreter reads the environment variable `name` as it starts (PYTHON*, the locale's)."""
    return name.startswith(("PYTHON", "LC_")) or name in ("LANG", "LANGUAGE")


def forkable(environment: Mapping[str, str], base: Mapping[str, str]) -> bool:
    """False if a function's environment changes what an interpreter decides at start."""
    return not any(read_at_start(name) and base.get(name) != value for name, value in environment.items())


class OutputPipe(asyncio.Protocol):
    """The read end of an instance's output pipe: what arrives goes to its reader at once, in
    the loop's callback that read it (no task, no buffer of its own, no wake-up of a waiter).

    What arrives before a reader is attached is kept for it; `closed` is done once the pipe is
    (at its end of file, or closed here). Should the reader fail on a piece, the pipe is closed
    and the reader told it ended, as at an end of file: nothing more is read from it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.closed: asyncio.Future[None] = loop.create_future()
        self._transport: asyncio.BaseTransport | None = None
        self._feed: Callable[[bytes], None] | None = None
        self._end: Callable[[], None] | None = None
        self._early: list[bytes] = []

    def attach(self, feed: Callable[[bytes], None], end: Callable[[], None]) -> None:
        """Hand what arrives to `feed`, and call `end` once at the pipe's end (now if it is over)."""
        self._feed, self._end = feed, end
        early, self._early = self._early, []
        over = self.closed.done()  # (then connection_lost told nobody)
        for data in early:
            self._hand_on(data)
        if over:
            end()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        if self._feed is None:
            self._early.append(data)
            return
        if not self.closed.done():  # (after a failure, nothing more is read)
            self._hand_on(data)

    def _hand_on(self, data: bytes) -> None:
        assert self._feed is not None
        try:
            self._feed(data)
        except Exception:
            logger.exception("reading an instance's output failed; its output pipe is closed")
            if self._transport is not None:
                self._transport.close()
            self.connection_lost(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
            if self._end is not None:
                self._end()


class SpawnedProcess:
    """An instance the spawner started (forked, or forked to exec), with what Instance uses of asyncio's Process."""

    def __init__(self, pid: int, stdin: asyncio.StreamWriter, stdout: OutputPipe, reading: asyncio.BaseTransport) -> None:
        self.pid = pid
        self.stdin = stdin
        self.stdout = stdout
        self._reading = reading  # stdout's pipe: closed by its end of file, or by close_pipes()
        self.returncode: int | None = None
        self.spawner_lost: str | None = None  # why the spawner went, if the process was ended for that
        self._exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def wait(self) -> int:
        """Wait until the spawner reports the process's end; its exit code (-N: killed by signal N)."""
        return await asyncio.shield(self._exited)

    def close_pipes(self) -> None:
        """Let go of stdout's pipe should it still be open (the instance is done with)."""
        if not self._reading.is_closing():
            self._reading.close()

    def exited(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
            if not self._exited.done():
                self._exited.set_result(code)


class Spawner:
    """The server's end of the spawner process."""

    def __init__(self, worker_file: str, env: Mapping[str, str]) -> None:
        self._worker_file = worker_file
        self._env = dict(env)
        self._sock: socket.socket | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._children: dict[int, SpawnedProcess] = {}
        self._starting: set[int] = set()  # forked for a spawn() still setting up the pipes
        self._exits: dict[int, int] = {}  # ends of those, reported before their SpawnedProcess existed
        self._next_id = 0
        self._down_since: float | None = None  # when it stopped (or failed to start), unless closed
        self._ending: set[asyncio.Task[None]] = set()  # ending the instances of a spawner that was lost
        self.pid: int | None = None

    @property
    def available(self) -> bool:
        """True while the spawner runs and answers."""
        return self._sock is not None

    def ready(self) -> bool:
        """True if the spawner runs, started again first if it stopped RESTART_AFTER seconds ago."""
        self.revive()
        return self.available

    def revive(self, after: float = RESTART_AFTER) -> None:
        """Start the spawner again if it stopped at least `after` seconds ago (not if it was closed)."""
        if self._sock is None and self._down_since is not None and time.monotonic() - self._down_since >= after:
            self.start()

    def start(self) -> None:
        """Start the spawner process (it needs no answer to be ready: requests wait in the socket)."""
        old = self._process
        if old is not None and old.poll() is None:
            old.kill()  # stopped answering without exiting: make sure it is gone
            old.wait()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._process = subprocess.Popen(
                # -P: as for instances, neither the cwd nor the worker's folder goes on sys.path.
                [sys.executable, "-P", self._worker_file, "--spawner", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                env=self._env,
                start_new_session=True,  # a Ctrl-C at the server's terminal is the server's to handle
            )
        except OSError as exc:
            ours.close()
            self._down_since = time.monotonic()
            logger.warning("cannot start the instance spawner (%s); instances start as fresh interpreters", exc)
            return
        finally:
            theirs.close()
        ours.setblocking(False)
        self._sock = ours
        self._down_since = None
        self.pid = self._process.pid
        logger.info("instance spawner started as process %s", self.pid)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(ours.fileno(), self._readable)

    async def spawn(
        self,
        *,
        handler: str,
        function: str,
        cwd: str,
        env: Mapping[str, str],
        memory_limit: int = 0,
        user: RunAs | None = None,
        fresh: bool = False,
    ) -> SpawnedProcess:
        """Fork one instance, its data memory capped at `memory_limit` bytes (0: not), running as
        `user` (None: the spawner's own); SpawnerUnavailable if not.

        `fresh`: the forked child starts a new interpreter (exec) to run the worker in. The
        instance's secrets are not the spawner's to know: they come on its task pipe (see Instance).
        """
        sock, loop = self._sock, self._loop
        if sock is None or loop is None:
            raise SpawnerUnavailable("the spawner is not running")
        tasks_r, tasks_w = os.pipe2(os.O_CLOEXEC)
        output_r, output_w = os.pipe2(os.O_CLOEXEC)
        request_id = self._next_id = self._next_id + 1
        reply: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._replies[request_id] = reply
        request = {
            "id": request_id,
            "handler": handler,
            "function": function,
            "cwd": cwd,
            "env": dict(env),
            "memory_limit": memory_limit,
            "user": [user.uid, user.gid, list(user.groups)] if user else None,
            "fresh": fresh,
        }
        try:
            try:
                socket.send_fds(sock, [json.dumps(request).encode()], [tasks_r, output_w])
            except OSError as exc:  # BlockingIOError included: a spawner that far behind is as good as gone
                raise SpawnerUnavailable(f"cannot reach the spawner: {exc}") from None
            finally:
                os.close(tasks_r)
                os.close(output_w)
            try:
                answer = await asyncio.wait_for(asyncio.shield(reply), _REPLY_TIMEOUT)
            except asyncio.TimeoutError:
                self._lost(f"it did not answer within {_REPLY_TIMEOUT:g}s")
                raise SpawnerUnavailable("the spawner did not answer") from None
        except BaseException:
            self._replies.pop(request_id, None)
            os.close(tasks_w)
            os.close(output_r)
            raise
        if "error" in answer:
            os.close(tasks_w)
            os.close(output_r)
            raise SpawnerUnavailable(str(answer["error"]))
        pid = int(answer["pid"])  # in _starting since its reply was read
        try:
            stdout = OutputPipe(loop)
            reading, _ = await loop.connect_read_pipe(lambda: stdout, open(output_r, "rb", 0))
            transport, protocol = await loop.connect_write_pipe(
                lambda: asyncio.streams.FlowControlMixin(loop=loop), open(tasks_w, "wb", 0)
            )
        except BaseException:
            self._starting.discard(pid)
            self._exits.pop(pid, None)
            _kill_group(pid)
            raise
        if pid not in self._starting:  # the spawner was lost meanwhile, and the process with it
            reading.close()
            transport.close()
            raise SpawnerUnavailable("the spawner stopped")
        process = SpawnedProcess(pid, asyncio.StreamWriter(transport, protocol, None, loop), stdout, reading)
        self._starting.discard(pid)
        self._children[pid] = process
        if pid in self._exits:
            process.exited(self._exits.pop(pid))
            del self._children[pid]
        return process

    async def close(self) -> None:
        """Stop the spawner (it ends any instance it still has) and wait for it."""
        if self._sock is not None:
            self._lost(None)
        if self._ending:
            await asyncio.gather(*self._ending, return_exceptions=True)
        if self._process is not None:
            process, self._process = self._process, None
            try:
                await asyncio.to_thread(process.wait, 5)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait)

    def _readable(self) -> None:
        sock = self._sock
        while sock is not None:
            try:
                data = sock.recv(_MESSAGE)
            except BlockingIOError:
                return
            except OSError as exc:
                self._lost(f"{type(exc).__name__}: {exc}")
                return
            if not data:
                self._lost(self._exit_text())
                return
            message = json.loads(data)
            if "exit" in message:
                self._ended(int(message["exit"]), int(message["code"]))
                continue
            reply = self._replies.pop(message.get("id"), None)
            if reply is not None and not reply.done():
                if "pid" in message:
                    self._starting.add(int(message["pid"]))  # before its exit can be read
                reply.set_result(message)
            elif "pid" in message:  # asked for by a spawn that gave up waiting: not ours to run
                _kill_group(int(message["pid"]))

    def _ended(self, pid: int, code: int) -> None:
        process = self._children.pop(pid, None)
        if process is not None:
            process.exited(code)
        elif pid in self._starting:
            self._exits[pid] = code  # spawn() is still connecting its pipes
        # else: a process forked for a spawn() that gave up; nobody waits for it

    def _lost(self, why: str | None) -> None:
        """The spawner is gone (why) or being closed (None): nothing more comes from it."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(sock.fileno())
        sock.close()
        if why is not None:
            self._down_since = time.monotonic()
            logger.error(
                "the instance spawner stopped (%s); instances start as fresh interpreters, and it is started"
                " again in %g s", why, RESTART_AFTER,
            )
        for reply in self._replies.values():
            if not reply.done():
                reply.set_result({"error": "the spawner stopped"})
        self._replies.clear()
        children, self._children = self._children, {}
        starting, self._starting = list(self._starting), set()
        self._exits.clear()
        if why is None:
            # Closed: the spawner, a subreaper, ends what its instances leave behind as they die.
            for pid in [*children, *starting]:
                _kill_group(pid)
            for process in children.values():
                process.exited(-signal.SIGKILL)
            return
        # Lost: no exit status will come, and nobody takes over what the instances started
        # (the processes that left their groups) should they die first. So they are ended from
        # here, each from the bottom of its tree (see end_tree), away from the loop.
        for process in children.values():
            process.spawner_lost = why
        if children or starting:
            task = asyncio.get_running_loop().create_task(self._end_orphans(children, starting, self._process, why))
            self._ending.add(task)
            task.add_done_callback(self._ending.discard)

    async def _end_orphans(
        self, children: dict[int, SpawnedProcess], starting: list[int], spawner: subprocess.Popen[bytes] | None, why: str
    ) -> None:
        """End the instances of a lost spawner and what they started; then they have exited."""
        try:
            await asyncio.to_thread(_end_trees, [*children, *starting])
        finally:
            if spawner is not None and spawner.poll() is not None:  # its exit is known by now
                why = _exit_text(spawner.returncode)
            for process in children.values():
                process.spawner_lost = why
                process.exited(-signal.SIGKILL)

    def _exit_text(self) -> str:
        process = self._process
        code = process.poll() if process is not None else None
        return "it closed its socket" if code is None else _exit_text(code)


def _exit_text(code: int) -> str:
    """How a process ended, from its exit code (-N: signal N)."""
    if code >= 0:
        return f"it exited with code {code}"
    try:
        return f"it was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"it was killed by signal {-code}"


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (its children, theirs, ...), from /proc; zombies included."""
    found: list[int] = []
    seen: set[int] = set()
    below = children_of(pid)
    while below:
        child = below.pop()
        if child not in seen:
            seen.add(child)
            found.append(child)
            below += children_of(child)
    return found


def end_tree(pid: int, wait: float) -> None:
    """SIGKILL every process below `pid`, a living instance, until none is left (for `wait` s at
    most); then the instance's process group, the instance with it.

    The instance is a child subreaper (see worker.py): so long as it lives, a process whose
    parent is killed is handed to it, and the next walk of its tree finds it, wherever its
    session or group. This is worker._end_leftovers done from outside, for an instance that
    cannot do it itself because its spawner, which would have, is gone.
    """
    deadline = time.monotonic() + wait
    while True:
        living = [child for child in descendants(pid) if _state(child) not in ("", "Z", "X")]
        if not living or time.monotonic() > deadline:
            break
        for child in living:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(child, signal.SIGKILL)
        time.sleep(0.002)
    _kill_group(pid)


def _end_trees(pids: list[int]) -> None:
    for pid in pids:
        end_tree(pid, _ORPHANS_WAIT)


def _state(pid: int) -> str:
    """A process's one-letter state (R, S, Z, ...); "" once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            return file.read().rpartition(b")")[2].split()[0].decode()
    except (OSError, IndexError):
        return ""
