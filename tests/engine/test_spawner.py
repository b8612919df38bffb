"""The spawner: forks workers on request, reports how they end, and ends them when closed or lost."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path
from typing import AsyncIterator

import pytest

from eventrun.engine import worker
from eventrun.engine.spawner import SpawnedProcess, Spawner, SpawnerUnavailable, forkable

HANDLER = "import os\n\ndef main_handler(event, context):\n    return {'pid': os.getpid(), 'cwd': os.getcwd(), 'x': os.environ.get('X')}\n"


@pytest.fixture
async def spawner(tmp_path: Path) -> AsyncIterator[Spawner]:
    (tmp_path / "h.py").write_text(HANDLER)
    spawner = Spawner(worker.__file__, {**os.environ, "PYTHONUNBUFFERED": "1"})
    spawner.start()
    try:
        yield spawner
    finally:
        await spawner.close()
        while _spawned:  # (as an Instance does when done with its process)
            _spawned.pop().close_pipes()


_spawned: list[SpawnedProcess] = []


async def spawn(spawner: Spawner, folder: Path, token: str = "t0", *, fresh: bool = False) -> SpawnedProcess:
    """A worker whose frame token is `token` and task key KEY (handed over as an Instance does)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "X": "forked"}
    process = await spawner.spawn(handler=f"{folder}/h.py:main_handler", function="f", cwd=str(folder), env=env, fresh=fresh)
    _spawned.append(process)
    process.stdin.write(f"{token} {KEY} {{}}\n".encode())
    return process


KEY = "k0"


def arguments_of(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


@pytest.mark.parametrize("fresh", [False, True], ids=["forked", "fresh"])
async def test_a_spawned_worker_runs_a_task_and_its_end_is_reported(spawner: Spawner, tmp_path: Path, fresh: bool) -> None:
    process = await spawn(spawner, tmp_path, fresh=fresh)
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(b'{"key": "k0", "run": "n1", "request_id": "r1", "deadline": 9e9, "event": {"id": "e"}}\n')
    await process.stdin.drain()
    arrived: list[bytes] = []
    first_line: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def feed(data: bytes) -> None:
        arrived.append(data)
        if b"\n" in data and not first_line.done():
            first_line.set_result(b"".join(arrived).split(b"\n")[0])

    process.stdout.attach(feed, lambda: None)
    line = await asyncio.wait_for(first_line, 10)
    assert line.startswith((worker.FRAME_MARK + 't0 {"request_id":"r1","run":"n1",').encode())
    assert f'"pid":{process.pid}'.encode() in line and b'"x":"forked"' in line and str(tmp_path).encode() in line
    assert os.getpgid(process.pid) == process.pid  # a process group of its own
    # A fresh one is a new interpreter, started with the worker's arguments; a forked one
    # still shows the spawner's.
    assert ("--spawner" in arguments_of(process.pid)) is not fresh
    assert (f"{tmp_path}/h.py:main_handler" in arguments_of(process.pid)) is fresh
    os.killpg(process.pid, signal.SIGKILL)
    assert await asyncio.wait_for(process.wait(), 10) == -signal.SIGKILL
    assert process.returncode == -signal.SIGKILL
    process.stdin.close()


async def test_a_worker_that_ends_by_itself_reports_its_code(spawner: Spawner, tmp_path: Path) -> None:
    process = await spawn(spawner, tmp_path)
    process.stdin.close()  # no more tasks: the worker returns, the interpreter exits
    assert await asyncio.wait_for(process.wait(), 10) == 0


async def test_once_the_spawner_is_gone_its_workers_end_and_spawn_says_so(spawner: Spawner, tmp_path: Path) -> None:
    process = await spawn(spawner, tmp_path)
    assert spawner.pid is not None
    os.kill(spawner.pid, signal.SIGKILL)
    assert await asyncio.wait_for(process.wait(), 10) == -signal.SIGKILL
    process.stdin.close()
    assert not spawner.available
    with pytest.raises(SpawnerUnavailable):
        await spawn(spawner, tmp_path, "t1")


async def test_closing_the_spawner_ends_it_and_its_workers(spawner: Spawner, tmp_path: Path) -> None:
    process = await spawn(spawner, tmp_path)
    pid = spawner.pid
    await spawner.close()
    assert await asyncio.wait_for(process.wait(), 10) == -signal.SIGKILL
    process.stdin.close()
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped, not a zombie


def test_an_environment_that_changes_the_interpreter_is_not_forkable() -> None:
    base = {"LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"}
    assert forkable({"GREETING": "hi", "TZ": "UTC"}, base)
    assert forkable({"LANG": "C.UTF-8"}, base)  # the same as the server's
    assert not forkable({"LANG": "de_DE.UTF-8"}, base)
    assert not forkable({"LC_ALL": "C"}, base)
    assert not forkable({"PYTHONPATH": "/opt/lib"}, base)
    assert not forkable({"PYTHONHASHSEED": "0"}, base)


async def test_a_spawner_that_stopped_is_started_again_once_its_pause_is_over(spawner: Spawner, tmp_path: Path) -> None:
    first = spawner.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    for _ in range(100):
        if not spawner.available:
            break
        await asyncio.sleep(0.05)
    assert not spawner.available
    spawner.revive(after=3600)  # too soon: stays down
    assert not spawner.available
    spawner.revive(after=0)
    assert spawner.available and spawner.pid != first
    process = await spawn(spawner, tmp_path)
    process.stdin.close()
    assert await asyncio.wait_for(process.wait(), 10) == 0


async def test_a_closed_spawner_is_not_started_again(spawner: Spawner) -> None:
    await spawner.close()
    spawner.revive(after=0)
    assert not spawner.available


DAEMON = '''import os, time

def main_handler(event, context):
    """Double-fork a daemon into a session of its own, name it in a file, then sleep."""
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            with open(event["pidfile"] + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.rename(event["pidfile"] + ".tmp", event["pidfile"])
            while True:
                time.sleep(60)
        os._exit(0)
    time.sleep(3600)
'''


async def worker_with_a_daemon(spawner: Spawner, tmp_path: Path, fresh: bool) -> tuple[SpawnedProcess, int]:
    """A worker whose run has started a daemon of its own (a session apart, deaf to SIGTERM); its pid."""
    (tmp_path / "daemon.py").write_text(DAEMON)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = await spawner.spawn(
        handler=f"{tmp_path}/daemon.py:main_handler", function="f", cwd=str(tmp_path), env=env, fresh=fresh
    )
    _spawned.append(process)
    pidfile = tmp_path / "daemon.pid"
    process.stdin.write(b"t0 k0 {}\n")
    process.stdin.write(
        b'{"key": "k0", "run": "n1", "request_id": "r1", "deadline": 9e9, "event": {"pidfile": "%s"}}\n' % str(pidfile).encode()
    )
    await process.stdin.drain()
    for _ in range(200):
        if pidfile.exists():
            break
        await asyncio.sleep(0.05)
    return process, int(pidfile.read_text())


async def gone(pid: int) -> None:
    """Wait up to 5 s for a process to be gone."""
    for _ in range(100):
        if not Path(f"/proc/{pid}").exists():
            return
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("fresh", [False, True], ids=["forked", "fresh"])
async def test_a_process_a_killed_worker_left_outside_its_group_is_killed_by_the_spawner(
    spawner: Spawner, tmp_path: Path, fresh: bool
) -> None:
    process, daemon = await worker_with_a_daemon(spawner, tmp_path, fresh)
    try:
        assert os.getpgid(daemon) != process.pid  # out of the worker's group: a group kill misses it
        os.killpg(process.pid, signal.SIGKILL)
        assert await asyncio.wait_for(process.wait(), 10) == -signal.SIGKILL
        await gone(daemon)
        assert not Path(f"/proc/{daemon}").exists(), "the daemon outlived its worker"
    finally:
        process.stdin.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(daemon, signal.SIGKILL)


@pytest.mark.parametrize("fresh", [False, True], ids=["forked", "fresh"])
async def test_once_the_spawner_is_gone_what_its_workers_left_outside_their_groups_ends_too(
    spawner: Spawner, tmp_path: Path, fresh: bool
) -> None:
    # The worker is killed from here (its parent is gone, so it cannot end its tree itself,
    # and nobody would take over what it started): its daemon goes with it.
    process, daemon = await worker_with_a_daemon(spawner, tmp_path, fresh)
    try:
        assert os.getpgid(daemon) != process.pid
        assert spawner.pid is not None
        os.kill(spawner.pid, signal.SIGKILL)
        assert await asyncio.wait_for(process.wait(), 10) == -signal.SIGKILL
        assert process.spawner_lost == "it was killed by SIGKILL", process.spawner_lost
        await gone(daemon)
        assert not Path(f"/proc/{daemon}").exists(), "the daemon outlived its worker's spawner"
    finally:
        process.stdin.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(daemon, signal.SIGKILL)


async def test_an_output_pipe_hands_on_what_came_before_its_reader_and_its_end_once() -> None:
    from eventrun.engine.spawner import OutputPipe

    pipe = OutputPipe(asyncio.get_running_loop())
    pipe.data_received(b"early ")
    got: list[bytes] = []
    ends: list[str] = []
    pipe.attach(got.append, lambda: ends.append("end"))
    pipe.data_received(b"late\n")
    assert got == [b"early ", b"late\n"] and ends == [] and not pipe.closed.done()
    pipe.connection_lost(None)
    pipe.connection_lost(None)  # (a close after the end of file)
    assert ends == ["end"] and pipe.closed.done()

    over = OutputPipe(asyncio.get_running_loop())
    over.data_received(b"last words")
    over.connection_lost(None)  # over before its reader came
    got.clear()
    ends.clear()
    over.attach(got.append, lambda: ends.append("end"))
    assert got == [b"last words"] and ends == ["end"]


async def test_an_output_pipe_whose_reader_fails_is_closed_and_ended() -> None:
    from eventrun.engine.spawner import OutputPipe

    class Transport(asyncio.BaseTransport):
        closed = False

        def close(self) -> None:
            self.closed = True

    pipe = OutputPipe(asyncio.get_running_loop())
    transport = Transport()
    pipe.connection_made(transport)
    ends: list[str] = []

    def feed(data: bytes) -> None:
        raise ValueError("a reader's bug")

    pipe.attach(feed, lambda: ends.append("end"))
    pipe.data_received(b"output\n")
    pipe.data_received(b"more\n")  # nothing is read past the failure
    pipe.connection_lost(None)  # (the transport's own close, later)
    assert transport.closed and pipe.closed.done() and ends == ["end"]
