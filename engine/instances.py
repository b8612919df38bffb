"""Worker instances: one Python process per instance, kept warm between good runs."""

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
from .envelope import dumps, loads
from . import worker
from .spawner import ForkedProcess, Spawner, SpawnerUnavailable, forkable
from .worker import FRAME_MARK

logger = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024
MAX_LINE = 64 * 1024  # longer lines are split, so one line never holds unbounded memory
FRAME_BYTE = FRAME_MARK[0].encode()

LineSink = Callable[[list[str]], None]

_WORKER_FILE = worker.__file__


@dataclass(frozen=True, slots=True)
class Spec:
    """How to start an instance of one function."""

    function: str
    handler: str  # absolute "path/to/file.py:callable"
    cwd: Path
    environment: dict[str, str]


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


class Instance:
    """One worker process, running one event at a time."""

    def __init__(self, spec: Spec, process: asyncio.subprocess.Process | ForkedProcess, token: str) -> None:
        self.spec = spec
        self.process = process
        self.pid = process.pid
        self._mark = FRAME_MARK + token + " "
        self._sink: LineSink | None = None
        self._outcome: asyncio.Future[dict[str, Any]] | None = None
        self._reader = asyncio.create_task(self._read(), name=f"instance-{self.pid}-reader")
        self.last_used = time.monotonic()
        self.stopping: Status | None = None  # why we are killing it, if we are

    @property
    def alive(self) -> bool:
        """True while the process runs."""
        return self.process.returncode is None and not self._reader.done()

    async def run(self, request_id: str, envelope: bytes, timeout: float, sink: LineSink, kill_grace: float) -> Outcome:
        """Hand one event to the instance and wait for its outcome, within the timeout."""
        assert self.process.stdin is not None
        self._sink = sink
        self._outcome = asyncio.get_running_loop().create_future()
        deadline = time.time() + timeout
        task = b'{"request_id":' + dumps(request_id) + b',"deadline":' + dumps(deadline) + b',"event":' + envelope + b"}\n"
        try:
            self.process.stdin.write(task)
            await self.process.stdin.drain()
            frame = await asyncio.wait_for(asyncio.shield(self._outcome), timeout)
        except asyncio.TimeoutError:
            self.stopping = self.stopping or Status.TIMED_OUT
            await self.kill(kill_grace)
            return self._stopped_outcome(timeout)
        except (InstanceDied, ConnectionError):
            await self.process.wait()
            if self.stopping is not None:
                return self._stopped_outcome(timeout)
            return Outcome(status=Status.FAILED, error_type="InstanceDied", error_message=self._exit_text())
        finally:
            self._sink = None
            self.last_used = time.monotonic()
        if frame.get("ok"):
            return Outcome(status=Status.FINISHED, result=frame.get("result"), keep_instance=True)
        return Outcome(
            status=Status.FAILED,
            error_type=frame.get("error_type") or "Error",
            error_message=frame.get("error_message") or "",
            keep_instance=not frame.get("recycle", True),
        )

    def _stopped_outcome(self, timeout: float) -> Outcome:
        if self.stopping is Status.TIMED_OUT:
            return Outcome(
                status=Status.TIMED_OUT,
                error_type="TimedOut",
                error_message=f"the run exceeded its timeout of {timeout:g}s and was killed",
            )
        return Outcome(status=Status.ABORTED, error_type="Aborted", error_message="the run was terminated on request")

    def _exit_text(self) -> str:
        code = self.process.returncode
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"the instance process was killed by {name} ({-code}) before the run ended"
        return f"the instance process exited with code {code} before the run ended"

    async def abort(self, status: Status, kill_grace: float) -> None:
        """Stop the current run: SIGTERM the instance's process group, SIGKILL after the grace."""
        self.stopping = status
        await self.kill(kill_grace)

    async def kill(self, grace: float) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds; waits until the process is gone."""
        if self.process.returncode is None:
            _signal_group(self.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), grace)
            except asyncio.TimeoutError:
                _signal_group(self.pid, signal.SIGKILL)
                await self.process.wait()
        # Children the function left behind in its group go too.
        _signal_group(self.pid, signal.SIGKILL)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._reader), 5)
        if self.process.stdin is not None:
            self.process.stdin.close()
        if isinstance(self.process, ForkedProcess):  # (asyncio closes a Process's pipes itself)
            self.process.close_pipes()

    async def _read(self) -> None:
        stream = self.process.stdout
        assert stream is not None
        pending = b""
        try:
            while True:
                chunk = await stream.read(READ_CHUNK)
                if not chunk:
                    break
                pending += chunk
                *lines, pending = pending.split(b"\n")
                # Output lines are split to bound memory; a frame (results can be large) is not,
                # and the worker itself refuses results over MAX_RESULT.
                while len(pending) > MAX_LINE and FRAME_BYTE not in pending:
                    lines.append(pending[:MAX_LINE])
                    pending = pending[MAX_LINE:]
                self._route([line.decode("utf-8", "replace") for line in lines])
        finally:
            if isinstance(self.process, ForkedProcess):  # at its end of file, or cancelled with the loop
                self.process.close_pipes()
            if pending:
                self._route([pending.decode("utf-8", "replace")])
            if self._outcome is not None and not self._outcome.done():
                self._outcome.set_exception(InstanceDied())
                self._outcome.exception()  # retrieved here; run() reads it again

    def _route(self, lines: list[str]) -> None:
        text: list[str] = []
        for line in lines:
            at = line.find(self._mark)
            if at < 0:
                text.append(line)
                continue
            if at:
                text.append(line[:at])
            self._emit(text)
            text = []
            try:
                frame = loads(line[at + len(self._mark) :])
            except ValueError as exc:
                frame = {"ok": False, "error_type": "InternalError", "error_message": f"unreadable outcome: {exc}"}
            if self._outcome is not None and not self._outcome.done():
                self._outcome.set_result(frame)
        self._emit(text)

    def _emit(self, lines: list[str]) -> None:
        if lines and self._sink is not None:
            self._sink(lines)
        elif lines:
            logger.info("instance %s of %s said outside a run: %s", self.pid, self.spec.function, lines[:3])


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


class InstancePool:
    """Starts instances, keeps warm ones per function, and reaps idle ones."""

    def __init__(
        self, *, max_instances: int, idle_timeout: float, kill_grace: float, base_env: dict[str, str], fork: bool = True
    ) -> None:
        self.max_instances = max_instances
        self.idle_timeout = idle_timeout
        self.kill_grace = kill_grace
        self._base_env = base_env
        self._spawner = Spawner(_WORKER_FILE, {**base_env, "PYTHONUNBUFFERED": "1"}) if fork else None
        self._idle: dict[str, list[Instance]] = {}
        self._busy: set[Instance] = set()
        self._reaper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the spawner, and begin reaping idle instances."""
        if self._spawner is not None:
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
        await asyncio.gather(*(i.kill(self.kill_grace) for i in everyone), return_exceptions=True)
        if self._spawner is not None:
            await self._spawner.close()

    @property
    def size(self) -> int:
        """Instances alive now."""
        return len(self._busy) + sum(len(g) for g in self._idle.values())

    async def acquire(self, spec: Spec) -> Instance:
        """A warm instance of the function, or a new one."""
        idle = self._idle.get(spec.function, [])
        while idle:
            instance = idle.pop()
            if instance.alive:
                self._busy.add(instance)
                return instance
        if self.size >= self.max_instances:
            await self._evict_one()
        instance = await self._spawn(spec)
        self._busy.add(instance)
        return instance

    async def release(self, instance: Instance, *, keep: bool) -> None:
        """Return an instance after a run: warm if the run ended well, discarded otherwise."""
        self._busy.discard(instance)
        if keep and instance.alive:
            instance.last_used = time.monotonic()
            self._idle.setdefault(instance.spec.function, []).append(instance)
        else:
            await instance.kill(self.kill_grace)

    async def _evict_one(self) -> None:
        candidates = [i for group in self._idle.values() for i in group]
        if not candidates:
            return
        oldest = min(candidates, key=lambda i: i.last_used)
        self._idle[oldest.spec.function].remove(oldest)
        await oldest.kill(self.kill_grace)

    async def _spawn(self, spec: Spec) -> Instance:
        token = secrets.token_hex(8)
        env = {**self._base_env, **spec.environment, "PYTHONUNBUFFERED": "1"}
        spawner = self._spawner
        if spawner is not None and forkable(spec.environment, self._base_env) and spawner.ready():
            try:
                forked = await spawner.spawn(
                    handler=spec.handler, function=spec.function, token=token, cwd=str(spec.cwd), env=env
                )
            except SpawnerUnavailable as exc:
                logger.warning("cannot fork an instance of %s (%s); starting a fresh interpreter", spec.function, exc)
            else:
                logger.info("started instance %s of %s", forked.pid, spec.function)
                return Instance(spec, forked, token)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            # -P: neither the cwd (the user's folder) nor the worker's own folder goes on sys.path.
            # Run as a file, not with -m: the eventrun package is not loaded into the instance.
            "-P",
            _WORKER_FILE,
            spec.handler,
            spec.function,
            token,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=spec.cwd,
            env=env,
            start_new_session=True,  # its own process group, so a kill reaches the function's children
        )
        logger.info("started instance %s of %s", process.pid, spec.function)
        return Instance(spec, process, token)

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(min(self.idle_timeout / 2, 30))
            now = time.monotonic()
            for function, group in list(self._idle.items()):
                stale = [i for i in group if now - i.last_used >= self.idle_timeout or not i.alive]
                for instance in stale:
                    group.remove(instance)
                    logger.info("reaping idle instance %s of %s", instance.pid, function)
                    await instance.kill(self.kill_grace)
