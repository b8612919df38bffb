"""Hostile functions (issue #20): each ends with a clear status, the server's memory stays
bounded, nothing they started outlives them, and a well-behaved function runs on meanwhile."""

from __future__ import annotations

import asyncio
import io
import json
import os
import platform
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

GIB = 1024**3
STARTED = re.compile(r"\[eventrun\] run started on instance (\d+)")


def rss_kb(pid: int) -> int:
    """The resident memory of a process, from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def state_of(pid: int) -> str:
    """The one-letter state of a process (R, S, T, Z, ...), "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return ""


async def instance_of(api, request_id: str) -> int:
    """The pid of the instance a run ran on, from eventrun's line in its log."""
    match = STARTED.search(await api.logs(request_id))
    assert match, await api.logs(request_id)
    return int(match.group(1))


async def quick_runs_while(
    api, request_id: str, seconds: float, each: Callable[[], None] = lambda: None
) -> tuple[int, dict]:
    """Run the `quick` function over and over while `request_id` is going (at most `seconds`),
    calling `each()` every time round; how many quick runs began and ended while it was
    RUNNING, and its final state."""
    deadline = time.monotonic() + seconds
    during = 0
    while time.monotonic() < deadline:
        each()
        state = await api.status(request_id)
        if state["Status"] not in ("QUEUED", "RUNNING"):
            return during, state
        quick = await api.wait_ended(await api.accepted("quick", {"n": during}), timeout=10)
        assert quick["Status"] == "FINISHED", quick
        if state["Status"] == "RUNNING" and (await api.status(request_id))["Status"] == "RUNNING":
            during += 1
        await asyncio.sleep(0.05)
    raise AssertionError(f"{request_id} still going after {seconds}s: {await api.status(request_id)}")


async def accepted_large(api, function: str, data: dict) -> str:
    """Invoke with a body of megabytes (streamed: aiohttp warns of large bodies given as bytes)."""
    body = io.BytesIO(json.dumps(data).encode())
    reply = await api.request(
        "POST", f"/functions/{function}/invocations", data=body, headers={"Content-Type": "application/json"}
    )
    assert reply.status == 202, reply.text
    return reply.json["RequestId"]


@pytest.fixture
def leftovers() -> Iterator[list[int]]:
    """Pids a test expects to be dead; whatever is not is killed at teardown, so a failing test
    leaves nothing behind either."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# -- 1. a flood of output --------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["lines", "endless", "marked"])
async def test_two_gigabytes_of_output_are_capped_in_the_log_and_read_in_bounded_memory(
    eventrun_server, http, handler, shape
):
    # "endless": 2 GB without a newline; "marked": the same after the first byte of eventrun's
    # frame mark, which used to make the reader hold everything in the hope of a frame.
    server = eventrun_server(
        {"flood": {"handler": handler("hostile_flood"), "timeout": "60s"}, "quick": {"handler": handler("quick")}},
        server={"log_limit": "1MB"},
    )
    api = server.client(http)
    assert (await api.wait_ended(await api.accepted("quick", {})))["Status"] == "FINISHED"
    before = rss_kb(server.pid)
    request_id = await api.accepted("flood", {"bytes": 2 * GIB, "shape": shape})
    samples = [before]
    during, state = await quick_runs_while(api, request_id, 25, lambda: samples.append(rss_kb(server.pid)))
    peak = max(*samples, rss_kb(server.pid))
    assert state["Status"] == "FINISHED", state
    assert state["Result"]["written"] == 2 * GIB, state
    assert during >= 1, "no quick run ran while the flood was going"
    assert peak - before < 300 * 1024, f"the server grew from {before} kB to {peak} kB reading the flood"
    log = (await api.logs(request_id)).encode()
    assert b"[eventrun] log limit of 1048576 bytes reached" in log, log[-500:]
    assert len(log) < 1024 * 1024 + 4096, len(log)


# -- 2. a crash ---------------------------------------------------------------------------------


@pytest.mark.parametrize("how, signame", [("abort", "SIGABRT"), ("segv", "SIGSEGV")])
async def test_an_instance_that_crashes_fails_its_run_naming_the_signal(
    eventrun_server, http, handler, poll_until, pid_alive, how, signame
):
    server = eventrun_server({"crash": {"handler": handler("hostile_crash")}, "quick": {"handler": handler("quick")}})
    api = server.client(http)
    request_id = await api.accepted("crash", {"how": how})
    state = await api.wait_ended(request_id, timeout=10)
    assert state["Status"] == "FAILED", state
    assert state["ErrorType"] == "InstanceDied", state
    assert signame in state["ErrorMessage"], state
    assert state["DurationMs"] < 5000, state
    log = await api.logs(request_id)
    assert f"hostile_crash {how} in pid" in log, log
    pid = await instance_of(api, request_id)
    await poll_until(lambda: not pid_alive(pid), 5, f"crashed instance {pid} still there")
    assert (await api.wait_ended(await api.accepted("quick", {})))["Status"] == "FINISHED"


# -- 3. processes left behind -----------------------------------------------------------------


@pytest.mark.parametrize("fork_instances", [True, False], ids=["forked", "fresh"])
@pytest.mark.parametrize(
    "then, status, error_type",
    [
        ("return", "FINISHED", None),
        ("raise", "FAILED", "RuntimeError"),
        ("sleep", "TIMED_OUT", "TimedOut"),
        ("abort", "FAILED", "InstanceDied"),
    ],
)
async def test_processes_a_run_left_behind_die_when_it_ends(
    eventrun_server, http, handler, poll_until, pid_alive, leftovers, tmp_path, fork_instances, then, status, error_type
):
    # A plain child, and a daemon double-forked into a session of its own (out of the
    # instance's process group); both ignore SIGTERM.
    server = eventrun_server(
        {"fork": {"handler": handler("hostile_fork"), "timeout": "2s"}, "quick": {"handler": handler("quick")}},
        server={"fork_instances": fork_instances},
    )
    api = server.client(http)
    pidfile = tmp_path / "pids"
    request_id = await api.accepted("fork", {"pidfile": str(pidfile), "then": then})
    state = await api.wait_ended(request_id, timeout=15)
    ended = time.monotonic()
    pids = [int(pid) for pid in pidfile.read_text().split()]
    instance = await instance_of(api, request_id)
    leftovers.extend([*pids, instance])
    assert len(pids) == 2 and instance not in pids, pids
    assert state["Status"] == status, state
    assert state["ErrorType"] == error_type, state
    if then == "abort":
        assert "SIGABRT" in state["ErrorMessage"], state
    await poll_until(
        lambda: not any(map(pid_alive, pids)), 5, f"processes {pids} outlived the run ({then}) that started them"
    )
    assert time.monotonic() - ended < 5
    if then == "return":
        assert state["Result"]["pids"] == pids, state
        assert "[eventrun] the run left 2 processes running" in await api.logs(request_id)
        # Not kept warm: its next run gets a fresh instance.
        again = await api.wait_ended(await api.accepted("fork", {"pidfile": str(tmp_path / "again")}), timeout=15)
        leftovers.extend(int(pid) for pid in (tmp_path / "again").read_text().split())
        assert again["Status"] == "FINISHED", again
        assert again["Result"]["pid"] != instance, again
    await poll_until(lambda: not pid_alive(instance), 5, f"instance {instance} still there")
    assert (await api.wait_ended(await api.accepted("quick", {})))["Status"] == "FINISHED"


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the handler calls clone by its x86_64 system call number")
@pytest.mark.parametrize("fork_instances", [True, False], ids=["forked", "fresh"])
async def test_a_process_a_run_makes_its_instances_sibling_is_killed_by_the_spawner_within_a_second(
    eventrun_server, http, handler, poll_until, pid_alive, leftovers, fork_instances
):
    # Its parent is the spawner, not the instance, which finds nothing left at the run's end: it
    # used to live until the spawner next reaped an instance (instance_idle_timeout, or longer).
    server = eventrun_server({"sibling": {"handler": handler("hostile_sibling")}}, server={"fork_instances": fork_instances})
    api = server.client(http)
    state = await api.wait_ended(await api.accepted("sibling", {}), timeout=15)
    assert state["Status"] == "FINISHED", state
    sibling = state["Result"]["sibling"]
    leftovers.append(sibling)
    assert sibling > 0 and parent_of(sibling) == state["Result"]["ppid"], state  # the spawner's child
    await poll_until(lambda: not pid_alive(sibling), 3, f"the run's sibling {sibling} outlived it")
    assert pid_alive(state["Result"]["pid"]), "the instance itself stays warm"


@pytest.mark.parametrize("fork_instances", [True, False], ids=["forked", "fresh"])
async def test_a_run_that_turns_off_the_instances_subreaper_still_takes_its_processes_with_it(
    eventrun_server, http, handler, poll_until, pid_alive, leftovers, tmp_path, fork_instances
):
    # Its daemon then passed to the spawner, not to the instance, which found nothing to kill:
    # the run ended FINISHED, its instance was kept, and the daemon lived on.
    server = eventrun_server({"fork": {"handler": handler("hostile_fork")}}, server={"fork_instances": fork_instances})
    api = server.client(http)
    pidfile = tmp_path / "pids"
    request_id = await api.accepted("fork", {"pidfile": str(pidfile), "subreaper_off": True, "daemon_only": True})
    state = await api.wait_ended(request_id, timeout=15)
    pids = [int(pid) for pid in pidfile.read_text().split()]
    instance = await instance_of(api, request_id)
    leftovers.extend([*pids, instance])
    assert state["Status"] == "FINISHED", state
    log = await api.logs(request_id)
    assert "[eventrun] the run let go of the processes it starts (PR_SET_CHILD_SUBREAPER 0); this instance is not reused" in log
    await poll_until(lambda: not any(map(pid_alive, pids)), 5, f"processes {pids} outlived the run that started them")
    await poll_until(lambda: not pid_alive(instance), 5, f"instance {instance} still there")
    again = await api.wait_ended(await api.accepted("fork", {"pidfile": str(tmp_path / "again")}), timeout=15)
    leftovers.extend(int(pid) for pid in (tmp_path / "again").read_text().split())
    assert again["Status"] == "FINISHED" and again["Result"]["pid"] != instance, again


# -- 4. memory --------------------------------------------------------------------------------


@pytest.mark.parametrize("fork_instances", [True, False], ids=["forked", "fresh"])
async def test_a_function_past_its_memory_limit_fails_with_memory_limit_exceeded(
    eventrun_server, http, handler, poll_until, pid_alive, fork_instances
):
    server = eventrun_server(
        {
            "hog": {"handler": handler("hostile_memory"), "memory_limit": "192MB", "concurrency": 1},
            "quick": {"handler": handler("quick")},
        },
        server={"fork_instances": fork_instances},
    )
    api = server.client(http)
    before = rss_kb(server.pid)
    modest = await api.wait_ended(await api.accepted("hog", {"upto": 64}))
    assert modest["Status"] == "FINISHED", modest
    assert modest["Result"]["memory_limit_in_mb"] == 192, modest
    warm = modest["Result"]["pid"]

    request_id = await api.accepted("hog", {})
    quick = await api.wait_ended(await api.accepted("quick", {}))
    assert quick["Status"] == "FINISHED", quick
    state = await api.wait_ended(request_id, timeout=15)
    assert state["Status"] == "FAILED", state
    assert state["ErrorType"] == "MemoryLimitExceeded", state
    assert "192 MB" in state["ErrorMessage"], state
    log = await api.logs(request_id)
    assert f"hostile_memory pid={warm} memory_limit_in_mb=192" in log, log
    assert "MemoryError" in log, log  # the traceback of where it ran out
    assert f"instance {warm} was discarded" in log, log
    await poll_until(lambda: not pid_alive(warm), 5, f"instance {warm} was kept after running out of memory")

    after = await api.wait_ended(await api.accepted("hog", {"upto": 64}))
    assert after["Status"] == "FINISHED", after
    assert after["Result"]["pid"] != warm, after
    assert rss_kb(server.pid) - before < 50 * 1024


async def test_server_memory_limit_is_the_default_and_zero_lifts_it(eventrun_server, http, handler):
    server = eventrun_server(
        {
            "capped": {"handler": handler("hostile_memory")},
            "free": {"handler": handler("hostile_memory"), "memory_limit": 0},
        },
        server={"memory_limit": "128MB"},
    )
    api = server.client(http)
    capped = await api.wait_ended(await api.accepted("capped", {"upto": 256}))
    assert capped["ErrorType"] == "MemoryLimitExceeded" and "128 MB" in capped["ErrorMessage"], capped
    free = await api.wait_ended(await api.accepted("free", {"upto": 256}))
    assert free["Status"] == "FINISHED", free
    assert free["Result"] == {"held_mb": 256, "memory_limit_in_mb": None, "pid": free["Result"]["pid"]}, free


async def test_a_memory_limit_too_small_to_start_python_is_refused(eventrun_server, handler):
    server = eventrun_server({"hog": {"handler": handler("hostile_memory"), "memory_limit": "8MB"}}, start=False)
    assert server.run_to_exit() == 2
    assert "memory_limit" in server.stderr_text() and "64MB" in server.stderr_text(), server.stderr_text()


# -- 5. a closed stdout -----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["os", "sys", "steal"])
async def test_a_run_that_closes_or_steals_its_stdout_still_reports_its_end(
    eventrun_server, http, handler, poll_until, pid_alive, tmp_path, how
):
    server = eventrun_server({"stdout": {"handler": handler("hostile_stdout"), "timeout": "10s", "concurrency": 1}})
    api = server.client(http)
    stolen = tmp_path / "stolen"
    request_id = await api.accepted("stdout", {"how": how, "file": str(stolen)})
    state = await api.wait_ended(request_id, timeout=15)
    assert state["Status"] == "FINISHED", state
    assert state["DurationMs"] < 5000, state
    pid = state["Result"]["pid"]
    assert state["Result"] == {"pid": pid, "how": how}, state
    log = await api.logs(request_id)
    assert f"hostile_stdout {how} pid={pid}" in log, log
    assert "closed or replaced its stdout or stderr" in log, log
    if how == "steal":
        assert "eventrun-frame" not in stolen.read_text(errors="replace")
    # Its broken streams are not handed to the next run.
    await poll_until(lambda: not pid_alive(pid), 5, f"instance {pid} with a closed stdout was kept")
    again = await api.wait_ended(await api.accepted("stdout", {"how": "none"}))
    assert again["Status"] == "FINISHED" and again["Result"]["pid"] != pid, again


async def test_a_run_that_closes_every_output_fd_fails_at_once(eventrun_server, http, handler, poll_until, pid_alive):
    server = eventrun_server({"stdout": {"handler": handler("hostile_stdout"), "timeout": "60s"}})
    api = server.client(http)
    request_id = await api.accepted("stdout", {"how": "all"})
    state = await api.wait_ended(request_id, timeout=15)
    assert state["Status"] == "FAILED", state
    assert state["ErrorType"] == "InstanceDied", state
    assert "closed its output pipe" in state["ErrorMessage"], state
    assert state["DurationMs"] < 10000, state
    pid = await instance_of(api, request_id)
    await poll_until(lambda: not pid_alive(pid), 5, f"instance {pid} that closed its output still runs")


# -- 6. an instance that reads no event -------------------------------------------------------


@pytest.mark.parametrize("how", ["stop", "block"])
async def test_a_large_event_for_an_instance_that_does_not_read_it_times_out(
    eventrun_server, http, handler, poll_until, pid_alive, how
):
    server = eventrun_server(
        {
            "deaf": {"handler": handler("hostile_deaf"), "timeout": "2s", "concurrency": 1},
            "quick": {"handler": handler("quick")},
        }
    )
    api = server.client(http)
    padding = "p" * 4_000_000  # far more than a pipe holds
    if how == "stop":
        # Its first run ends well and leaves a thread that stops the whole process (SIGSTOP):
        # the warm instance then never reads the next event, and writing it blocks.
        first = await api.wait_ended(await api.accepted("deaf", {"stop": True}))
        assert first["Status"] == "FINISHED", first
        pid = first["Result"]["pid"]
        await poll_until(lambda: state_of(pid) == "T", 5, f"instance {pid} did not stop")
        request_id = await accepted_large(api, "deaf", {"padding": padding})
    else:
        request_id = await accepted_large(api, "deaf", {"block": True, "padding": padding})
    during, state = await quick_runs_while(api, request_id, 20)
    assert state["Status"] == "TIMED_OUT", state
    assert state["ErrorType"] == "TimedOut", state
    assert 1500 <= state["DurationMs"] <= 8000, state
    assert during >= 1, "no quick run ran while the deaf instance held its event"
    pid = await instance_of(api, request_id)
    await poll_until(lambda: not pid_alive(pid), 5, f"deaf instance {pid} outlived its timeout")
    health = await api.request("GET", "/healthz")
    assert health.status == 200 and health.json["Running"] == 0, health.text


# -- 7. the worker's own file descriptors, and stdin ------------------------------------------


@pytest.mark.parametrize(
    "how, fork_instances",
    [("close", True), ("null", True), ("reuse", True), ("close", False)],
    ids=["close-forked", "null-forked", "reuse-forked", "close-fresh"],
)
async def test_a_run_that_closes_or_replaces_the_workers_own_fds_still_finishes(
    eventrun_server, http, handler, poll_until, pid_alive, tmp_path, how, fork_instances
):
    # fds 0, 1 and 2 are left as they were: its outcome goes out on stdout's pipe, and as the
    # worker's private copies of its pipes are gone, the instance is not kept.
    server = eventrun_server(
        {"fds": {"handler": handler("hostile_fds"), "timeout": "10s", "concurrency": 1}},
        server={"fork_instances": fork_instances},
    )
    api = server.client(http)
    reused = tmp_path / "reused"
    request_id = await api.accepted("fds", {"how": how, "file": str(reused)})
    state = await api.wait_ended(request_id, timeout=15)
    assert state["Status"] == "FINISHED", state
    pid = state["Result"]["pid"]
    assert state["Result"] == {"pid": pid, "how": how, "read": None}, state
    log = await api.logs(request_id)
    assert f"hostile_fds {how} pid={pid}" in log and " x\n" in log, log
    assert "closed or replaced the file descriptors" in log and "Traceback" not in log, log
    if how == "reuse":  # the fds it got in the worker's place are a file of its own, left alone
        assert reused.exists() and "eventrun-frame" not in reused.read_text(errors="replace")
    await poll_until(lambda: not pid_alive(pid), 5, f"instance {pid} without its own fds was kept")
    again = await api.wait_ended(await api.accepted("fds", {"how": "read"}))
    assert again["Status"] == "FINISHED" and again["Result"]["pid"] != pid, again
    assert "said outside a run" not in server.stderr_text(), server.stderr_text()[-2000:]


async def test_a_run_that_leaves_no_way_to_report_its_end_fails_saying_so(
    eventrun_server, http, handler, poll_until, pid_alive
):
    # Every fd but stdin closed, and the handler returns: no copy of the output pipe is left.
    server = eventrun_server({"fds": {"handler": handler("hostile_fds"), "timeout": "30s"}})
    api = server.client(http)
    request_id = await api.accepted("fds", {"how": "everything"})
    state = await api.wait_ended(request_id, timeout=15)
    assert state["Status"] == "FAILED", state
    assert state["ErrorType"] == "InstanceDied", state
    assert "closed its output pipe" in state["ErrorMessage"], state
    assert state["DurationMs"] < 10000, state
    assert "Traceback" not in await api.logs(request_id)
    pid = await instance_of(api, request_id)
    await poll_until(lambda: not pid_alive(pid), 5, f"instance {pid} that closed its output still runs")


@pytest.mark.parametrize("how", ["stdin-sys", "stdin-os"])
async def test_a_run_that_closes_its_stdin_does_not_leave_it_closed_for_the_next(
    eventrun_server, http, handler, poll_until, pid_alive, how
):
    server = eventrun_server({"fds": {"handler": handler("hostile_fds"), "concurrency": 1}})
    api = server.client(http)
    request_id = await api.accepted("fds", {"how": how})
    state = await api.wait_ended(request_id)
    assert state["Status"] == "FINISHED", state
    pid = state["Result"]["pid"]
    assert "closed or replaced its stdin" in await api.logs(request_id)
    await poll_until(lambda: not pid_alive(pid), 5, f"instance {pid} with a closed stdin was kept")
    again = await api.wait_ended(await api.accepted("fds", {"how": "read"}))
    assert again["Status"] == "FINISHED", again
    assert again["Result"]["read"] == "" and again["Result"]["pid"] != pid, again
