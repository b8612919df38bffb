"""The server's order of start and stop: what a probe sees while the triggers are still starting,
what the callers in flight get when it stops."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import resource
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Callable

import aiohttp
import pytest
from eventrun import app
from eventrun.engine.api import SERVER_STOPPED
from eventrun.engine.errors import ManifestError
from eventrun.engine.manifest import FunctionConfig, KafkaConfig, Manifest, ServerConfig, load_manifest
from eventrun.triggers.kafka import KafkaTrigger
from kafka_service import free_port
from server_process import ServerProcess, handler


def held(monkeypatch: pytest.MonkeyPatch, method: str) -> tuple[asyncio.Event, asyncio.Event]:
    """Make KafkaTrigger.`method` wait: (entered, release) — set once it is called; set to let it go on."""
    entered = asyncio.Event()
    release = asyncio.Event()
    real = getattr(KafkaTrigger, method)

    async def slow(self: KafkaTrigger) -> None:
        entered.set()
        await release.wait()
        await real(self)

    monkeypatch.setattr(KafkaTrigger, method, slow)
    return entered, release


@contextlib.asynccontextmanager
async def serving(
    manifest: Manifest, release: asyncio.Event | None = None
) -> AsyncIterator[tuple[asyncio.Event, asyncio.Task[None]]]:
    """app.run(manifest) in a task: (the event that stops it, the task). At the end it is stopped
    and waited for, once `release` (a held trigger's) is set."""
    stop = asyncio.Event()
    task = asyncio.create_task(app.run(manifest, stop))
    try:
        yield stop, task
    finally:
        if release is not None:
            release.set()
        stop.set()
        await asyncio.wait_for(task, 60)


async def answering(session: aiohttp.ClientSession, url: str) -> None:
    """Wait until the server at `url` answers /healthz with 200 (it listens once its engine has started)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            async with session.get(f"{url}/healthz") as reply:
                if reply.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        assert time.monotonic() < deadline, "the server never answered"
        await asyncio.sleep(0.05)


@pytest.fixture
def kafka_manifest(tmp_path: Path) -> Manifest:
    """One function fed by a Kafka topic, on a broker nobody listens for."""
    return Manifest(
        server=ServerConfig(port=free_port(), data_dir=tmp_path / "data"),
        kafka=KafkaConfig(bootstrap_servers=f"127.0.0.1:{free_port()}"),
        functions={
            "fn": FunctionConfig(handler="f.py:main", triggers=({"type": "kafka", "topic": "orders"},)),
        },
    )


async def test_healthz_reports_every_trigger_of_the_manifest_while_they_are_still_starting(
    kafka_manifest: Manifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A trigger's start may wait on the store (the Kafka consumers load their marks); the
    # listener is open by then, and its first answer must already name the trigger.
    started, release = held(monkeypatch, "start")
    async with serving(kafka_manifest, release):
        await asyncio.wait_for(started.wait(), 30)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{kafka_manifest.server.port}/healthz") as reply:
                assert reply.status == 200
                health = await reply.json()
        assert health["Triggers"]["kafka"] == {
            "fn:orders": {
                "State": "stopped",
                "Function": "fn",
                "Topic": "orders",
                "GroupId": "eventrun-fn",
                "Partitions": [],
                "Accepted": 0,
                "Duplicates": 0,
            }
        }


async def test_a_stop_takes_no_new_connection_while_the_triggers_are_still_stopping(
    kafka_manifest: Manifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Kafka trigger's stop may take seconds (a rebalance under way): the gateway went on
    # answering 202 to new invocations meanwhile, as it closed only after the triggers.
    stopping, release = held(monkeypatch, "stop")
    port = kafka_manifest.server.port
    async with serving(kafka_manifest, release) as (stop, _):
        async with aiohttp.ClientSession() as session:
            await answering(session, f"http://127.0.0.1:{port}")
        stop.set()
        await asyncio.wait_for(stopping.wait(), 30)
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)


async def test_a_stop_answers_every_sync_call_in_flight_and_ends_log_streams_at_once(tmp_path: Path) -> None:
    # The listener closes and log followers end first; the runs get shutdown_grace, then end
    # ServerStopped; then each sync caller gets its run as it ended, or as it stands: queued
    # for the next start. No caller is cut off, and the stop takes the graces and little more.
    grace, kill = 1.0, 1.0
    port = free_port()
    manifest = Manifest(
        server=ServerConfig(port=port, data_dir=tmp_path / "data", shutdown_grace=grace, kill_grace=kill),
        functions={
            "hs": FunctionConfig(handler=handler("sleepy"), async_execution=False, timeout=60.0, concurrency=1),
        },
    )
    url = f"http://127.0.0.1:{port}"
    async with serving(manifest) as (stop, server):
        async with aiohttp.ClientSession() as session:

            async def call(seconds: float) -> tuple[int, dict[str, Any]]:
                async with session.post(f"{url}/functions/hs/invocations", json={"seconds": seconds}) as reply:
                    return reply.status, await reply.json()

            async def invocations(status: str) -> list[dict[str, Any]]:
                async with session.get(f"{url}/invocations", params={"status": status}) as reply:
                    return (await reply.json())["Invocations"]  # type: ignore[no-any-return]

            async def appeared(status: str) -> str:
                for _ in range(300):
                    await asyncio.sleep(0.05)
                    if found := await invocations(status):
                        return str(found[0]["RequestId"])
                raise AssertionError(f"no {status} run")

            await answering(session, url)
            running = asyncio.create_task(call(60))
            running_id = await appeared("RUNNING")
            queued = asyncio.create_task(call(0.1))
            queued_id = await appeared("QUEUED")
            async with session.get(f"{url}/invocations/{running_id}/logs", params={"follow": "true"}) as follower:
                await follower.content.readuntil(b"\n\n")
                started = time.monotonic()
                stop.set()
                await asyncio.wait_for(follower.content.read(), grace / 2)
            async with aiohttp.ClientSession() as fresh:  # (a new connection, not one kept alive)
                with pytest.raises(aiohttp.ClientConnectionError):
                    await fresh.get(f"{url}/healthz")
            assert await asyncio.wait_for(running, grace + kill + 5) == (
                200,
                {
                    "RequestId": running_id, "Status": "FAILED", "Result": None,
                    "ErrorType": "ServerStopped", "ErrorMessage": SERVER_STOPPED,
                },
            )
            status, answer = await asyncio.wait_for(queued, 5)
            assert status == 200 and (answer["RequestId"], answer["Status"]) == (queued_id, "QUEUED"), answer
        await asyncio.wait_for(server, grace + kill + 5)
        assert time.monotonic() - started < grace + kill + 1.5


async def test_a_listener_out_of_descriptors_is_reported_once_a_while_and_every_other_report_as_before(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = asyncio.get_running_loop()
    errors = app.LoopErrors()
    emfile = OSError(errno.EMFILE, "Too many open files")
    with caplog.at_level(logging.INFO):
        for _ in range(1000):  # as asyncio reports a pending connection on each pass of its accept loop
            errors(loop, {"message": app.OUT_OF_RESOURCES, "exception": emfile})
        errors(loop, {"message": "Task exception was never retrieved", "exception": ValueError("boom")})
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        (
            "eventrun", logging.ERROR,
            "socket.accept() out of system resource ([Errno 24] Too many open files):"
            " new connections wait in the listen queue until descriptors are free",
        ),
        ("asyncio", logging.ERROR, "Task exception was never retrieved"),  # the loop's default handler
    ]


@pytest.mark.e2e
def test_a_server_out_of_descriptors_says_so_once_a_while_not_for_each_connection(
    eventrun_server: Callable[..., ServerProcess],
) -> None:
    server = eventrun_server({})
    soft, hard = resource.prlimit(server.pid, resource.RLIMIT_NOFILE)
    # Not one descriptor to spare: each connection waiting is refused by accept() (EMFILE).
    resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (len(os.listdir(f"/proc/{server.pid}/fd")), hard))
    clients = [socket.socket() for _ in range(40)]
    try:
        for client in clients:
            client.setblocking(False)
            client.connect_ex(("127.0.0.1", server.port))
        time.sleep(3)
    finally:
        resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (soft, hard))
        for client in clients:
            client.close()
    log = server.stderr_text()
    assert 1 <= log.count(app.OUT_OF_RESOURCES) <= 2, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


@pytest.mark.e2e
def test_the_server_raises_its_limit_of_open_files_to_the_hard_limit(eventrun_server: Callable[..., ServerProcess]) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard // 2, hard))  # what the server starts with, as children inherit it
    try:
        server = eventrun_server({})
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert resource.prlimit(server.pid, resource.RLIMIT_NOFILE) == (hard, hard)


def test_what_the_triggers_find_wrong_is_refused_as_the_manifest_is_read_naming_its_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "f.py").write_text("def main_handler(event, context):\n    return None\n")
    path = tmp_path / "eventrun.toml"
    path.write_text(
        '[functions.f]\nhandler = "f.py:main_handler"\n'
        '[[functions.f.triggers]]\ntype = "kafka"\ntopic = "orders"\n'
        '[[functions.f.triggers]]\ntype = "kafka"\ntopic = "orders"\n'
        '[[functions.f.triggers]]\ntype = "timer"\nname = "nightly"\ncron = "0 0 30 2 *"\n'
    )
    with pytest.raises(ManifestError) as caught:
        load_manifest(path, check=app.trigger_problems)
    assert str(caught.value).splitlines() == [
        f"{path}: functions.f.triggers[1]: topic 'orders' with group_id 'eventrun-f' is already consumed by "
        "functions.f.triggers[0]; give this trigger its own group_id",
        f"{path}: functions.f.triggers[2].cron: '0 0 30 2 *' (timer 'nightly'): no date ever matches every field (such as 30 February)",
    ]
    monkeypatch.setenv("EVENTRUN_FUNCTIONS__F__TRIGGERS", '[{"type": "timer", "name": "t", "cron": "0 0 25 * * * *"}]')
    with pytest.raises(ManifestError, match=r"^the environment: EVENTRUN_FUNCTIONS__F__TRIGGERS \(\[0\]\.cron\): '0 0 25 \* \* \* \*' \(timer 't'\): .*hour field '25'"):
        load_manifest(path, check=app.trigger_problems)
    assert load_manifest(path).functions["f"].triggers[0].type == "timer", "without the check the manifest reads"


LARGE_BLOCKS = """
import sys
from eventrun.app import return_large_blocks

def resident_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])

if sys.argv[1] == "held":
    return_large_blocks()
block = bytes(5_000_000)  # glibc raises its threshold to the largest block freed: 5 MB
del block
before = resident_kb()
pinned = []
for _ in range(20):
    block = bytearray(4_000_000)  # (a large answer's copy)
    block[::4096] = b"x" * len(block[::4096])
    pinned.append(bytearray(100))  # what comes after it on the heap keeps the heap from shrinking
    del block
print(resident_kb() - before)
"""


SMALL_BLOCKS = """
import asyncio
import sys
from eventrun.app import return_free_memory

def resident_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])

lines = [bytes(1000) + bytes([i % 256]) for i in range(150_000)]  # (a stalled follower's waiting lines)
pinned = bytes(1000) + b"pinned"  # what comes after them on the heap keeps the heap from shrinking
del lines
before = resident_kb()

async def a_while() -> None:
    if sys.argv[1] == "returned":
        task = asyncio.create_task(return_free_memory(every=0.05))
        await asyncio.sleep(0.3)
        task.cancel()

asyncio.run(a_while())
print(before - resident_kb())
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists() or os.confstr("CS_GNU_LIBC_VERSION") is None, reason="glibc's malloc on Linux only")
def test_free_heap_memory_goes_back_to_the_system_from_time_to_time() -> None:
    # 300 followers let go left the server at 123 MB of the 145 they had taken (54 idle).
    import subprocess
    import sys

    returned = {
        how: int(subprocess.run([sys.executable, "-c", SMALL_BLOCKS, how], capture_output=True, text=True, check=True).stdout)
        for how in ("kept", "returned")
    }
    assert returned["kept"] < 20_000, returned  # (what the test shows: 150 MB freed in the heap's middle stay)
    assert returned["returned"] >= 100_000, returned


@pytest.mark.skipif(not Path("/proc/self/status").exists() or os.confstr("CS_GNU_LIBC_VERSION") is None, reason="glibc's malloc on Linux only")
def test_large_blocks_go_back_to_the_system_once_freed() -> None:
    # A large answer freed went to the heap once a larger one had been freed, and stayed there.
    import subprocess
    import sys

    grown = {how: int(subprocess.run([sys.executable, "-c", LARGE_BLOCKS, how], capture_output=True, text=True, check=True).stdout) for how in ("default", "held")}
    assert grown["default"] >= 3000, grown  # (what the test shows: a 4 MB block kept)
    assert grown["held"] < 500, grown


def test_the_servers_log_lines_are_stamped_in_utc() -> None:
    # They were in the machine's local time, without a zone, beside runs' logs and an API in UTC.
    import subprocess
    import sys
    from datetime import datetime, timedelta, timezone

    code = "import logging; from eventrun.engine.text import log_to_stderr; log_to_stderr(logging.INFO); logging.getLogger('eventrun').info('hello')"
    before = datetime.now(timezone.utc)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ, "TZ": "Asia/Shanghai"})
    stamp, rest = run.stderr.rstrip("\n").split(" ", 1)
    assert rest == "INFO eventrun: hello", run.stderr
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp), stamp
    at = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    assert before - timedelta(seconds=1) <= at <= datetime.now(timezone.utc) + timedelta(seconds=1), (before, stamp)
