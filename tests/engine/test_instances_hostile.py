"""What one function's code can do to another function's instance: nothing it could use.

Functions run as one Unix user. Their instances and the spawner are not dumpable (no
/proc/PID/fd, mem or environ, no ptrace for the others; root, as here, is not held back, so these
tests write to an instance's pipes as only another process of the user could before); an
instance's secrets are on no command line; a task without the instance's key is refused; an
end frame for another run fails the run and stops the instance.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import secrets
import time
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import orjson
import pytest

from eventrun.engine.api import Status
from eventrun.engine.instances import Instance, InstancePool, Outcome, Spec
from eventrun.engine.worker import FRAME_MARK

HANDLER = """\
import ctypes, os, time

def main_handler(event, context):
    data = event.get("data") or {}
    if "sleep" in data:
        time.sleep(data["sleep"])
    if "touch" in data:
        open(data["touch"], "w").close()
    return {"pid": os.getpid(), "dumpable": ctypes.CDLL(None).prctl(3, 0, 0, 0, 0)}  # PR_GET_DUMPABLE
"""

Acquire = Callable[[], Awaitable[Instance]]


@pytest.fixture(params=[True, False], ids=["forked", "fresh"])
async def acquire(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Acquire]:
    """Factory: acquire() -> an instance of function f (HANDLER), from a pool whose instances are
    forked from the spawner, or fresh interpreters; the pool is stopped at teardown."""
    (tmp_path / "f.py").write_text(HANDLER)
    pool = InstancePool(max_instances=4, idle_timeout=300, kill_grace=1, base_env=dict(os.environ), fork=request.param)
    await pool.start()
    spec = Spec(function="f", handler=f"{tmp_path}/f.py:main_handler", cwd=tmp_path, environment={})
    try:
        yield lambda: pool.acquire(spec)
    finally:
        await pool.stop()


async def run(instance: Instance, data: dict, request_id: str = "r1") -> Outcome:
    envelope = orjson.dumps({"specversion": "1.0", "id": "e", "source": "/t", "type": "t", "data": data})
    return await instance.run(request_id, envelope, 10, lambda lines: None, 1)


def token_of(instance: Instance) -> str:
    return instance._mark.decode()[len(FRAME_MARK) :]


def forged_end(instance: Instance, request_id: str) -> bytes:
    """An end frame marked as the instance's, for a run it was never given."""
    frame = {"request_id": request_id, "run": "0" * 16, "ok": True, "result": "forged"}
    return (FRAME_MARK + token_of(instance) + " ").encode() + orjson.dumps(frame) + b"\n"


async def gone(pid: int, within: float = 5) -> bool:
    deadline = time.monotonic() + within
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat", "rb") as file:
            if file.read().rpartition(b")")[2].split()[0] == b"Z":
                return True
        await asyncio.sleep(0.02)
    return not Path(f"/proc/{pid}").exists()


def test_the_server_runs_dumpable() -> None:
    # (So that the 0 a handler reads below is its instance's doing, not inherited from the tests.)
    assert ctypes.CDLL(None).prctl(3, 0, 0, 0, 0) == 1


async def test_an_instance_is_not_dumpable(acquire: Acquire) -> None:
    # A forked instance does not set it itself: it keeps the spawner's, which this checks too.
    instance = await acquire()
    outcome = await run(instance, {})
    assert outcome.status == Status.FINISHED, outcome
    assert outcome.result == {"pid": instance.pid, "dumpable": 0}


async def test_an_instances_secrets_are_not_on_its_command_line_nor_in_its_environment(acquire: Acquire) -> None:
    instance = await acquire()
    assert (await run(instance, {})).status == Status.FINISHED  # (so it has read its secrets)
    secrets = [token_of(instance), *([instance._key.decode()] if hasattr(instance, "_key") else [])]
    seen = Path(f"/proc/{instance.pid}/cmdline").read_bytes() + Path(f"/proc/{instance.pid}/environ").read_bytes()
    assert not [secret for secret in secrets if secret.encode() in seen], seen


async def test_an_answer_for_another_run_fails_the_run_and_stops_the_instance(acquire: Acquire) -> None:
    instance = await acquire()
    running = asyncio.ensure_future(run(instance, {"sleep": 1}))
    await asyncio.sleep(0.3)
    with open(f"/proc/{instance.pid}/fd/1", "wb", 0) as output:  # as the other function's code did
        output.write(forged_end(instance, "someone-elses"))
    outcome = await asyncio.wait_for(running, 10)
    assert (outcome.status, outcome.error_type, outcome.result) == (Status.FAILED, "InstanceDied", None), outcome
    assert "an answer for another run (request_id 'someone-elses')" in (outcome.error_message or ""), outcome
    assert not outcome.keep_instance and not instance.alive
    assert await gone(instance.pid)


async def test_an_answer_between_runs_stops_the_instance(acquire: Acquire) -> None:
    instance = await acquire()
    assert (await run(instance, {})).status == Status.FINISHED
    with open(f"/proc/{instance.pid}/fd/1", "wb", 0) as output:
        output.write(forged_end(instance, "r1"))  # (the right request_id, but not the run's nonce)
    assert await gone(instance.pid), "an instance that answered for a run it was not given is still there"
    assert not instance.alive


async def test_a_task_without_the_instances_key_is_refused_and_the_instance_ends(acquire: Acquire, tmp_path: Path) -> None:
    instance = await acquire()
    assert (await run(instance, {})).status == Status.FINISHED
    touched = tmp_path / "touched"
    task = {"request_id": "r9", "run": "n9", "deadline": time.time() + 60, "event": {"data": {"touch": str(touched)}}}
    assert instance.process.stdin is not None
    instance.process.stdin.write(orjson.dumps(task) + b"\n")  # as if written to the instance's task pipe
    await instance.process.stdin.drain()
    assert await gone(instance.pid), "an instance given a task not of the server's still runs"
    assert not touched.exists(), "the instance ran a task not of the server's"


SCANNER = """\
import os

def main_handler(event, context):
    # Everything of its own memory an instance can read: was another function's secret ever there?
    # (Looked for as its head followed by its tail, so that the secret itself is never made here.)
    head, tail = event["data"]["head"].encode(), event["data"]["tail"].encode()
    found = 0
    with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            if not fields[1].startswith("r") or (len(fields) > 5 and fields[5].startswith("[v")):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            try:
                mem.seek(start)
                chunk = mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue
            at = chunk.find(head)
            while at >= 0:
                found += chunk.startswith(tail, at + len(head))
                at = chunk.find(head, at + 1)
    return {"found": found, "own": os.environ.get("SECRET")}
"""


@pytest.mark.parametrize("fork", [True, False], ids=["forked", "fresh"])
async def test_a_functions_environment_is_not_left_in_the_memory_of_instances_forked_after_it(
    tmp_path: Path, fork: bool
) -> None:
    # The spawner used to be handed each function's environment, and instances forked after it
    # (another function's, run as another user among them) began with its memory.
    (tmp_path / "f.py").write_text(HANDLER)
    (tmp_path / "scan.py").write_text(SCANNER)
    marker = secrets.token_hex(8)
    # Large, and the scanner's environment small: what the spawner freed of it is not all written over.
    secret = "x" * 60_000 + f"secret-of-f-{marker}"
    pool = InstancePool(max_instances=4, idle_timeout=300, kill_grace=1, base_env=dict(os.environ), fork=fork)
    await pool.start()
    try:
        holder = Spec(function="f", handler=f"{tmp_path}/f.py:main_handler", cwd=tmp_path, environment={"SECRET": secret})
        first = await pool.acquire(holder)
        assert (await run(first, {})).status == Status.FINISHED
        scanner = Spec(function="s", handler=f"{tmp_path}/scan.py:main_handler", cwd=tmp_path, environment={"SECRET": "own"})
        second = await pool.acquire(scanner)
        outcome = await run(second, {"head": "secret-of-f-", "tail": marker})
        assert outcome.status == Status.FINISHED, outcome
        assert outcome.result == {"found": 0, "own": "own"}, outcome.result
    finally:
        await pool.stop()
