"""Starts and restarts: durable acceptance across kill -9, the async lock, manifest refusals."""

from __future__ import annotations

import os
import re
import signal

import pytest

from server_process import BOTH_STORES

pytestmark = [pytest.mark.e2e, BOTH_STORES]

START = re.compile(r"sleepy start pid=(\d+)")


async def test_async_mode_is_locked_at_creation(eventrun_server, http, handler):
    functions = {"lockme": {"handler": handler("quick"), "async_execution": True}}
    server = eventrun_server(functions)
    api = server.client(http)
    request_id = await api.accepted("lockme", {})
    await api.wait_ended(request_id)
    server.stop()

    server.write_manifest({"lockme": {"handler": handler("quick"), "async_execution": False}})
    code = server.run_to_exit()
    stderr = server.stderr_text()
    assert code != 0, f"a flipped async_execution must be refused\n{server.log_text()}"
    assert "lockme" in stderr, stderr
    assert f"cannot start: {server.manifest_path}: functions.lockme.async_execution: " in stderr, "the file is named"
    assert re.search(r"new\s+(function\s+)?name|rename|different name|another name", stderr, re.I), stderr
    assert "Traceback" not in stderr, stderr

    server.write_manifest(functions)
    server.restart()
    assert (await api.status(request_id))["Status"] == "FINISHED"


async def test_kill_9_loses_no_acknowledged_run(eventrun_server, http, handler, poll_until):
    server = eventrun_server({"one": {"handler": handler("sleepy"), "concurrency": 1}})
    api = server.client(http)
    running = await api.accepted("one", {"seconds": 30})
    await api.wait_for(running, {"RUNNING"}, timeout=15)
    await poll_until(lambda: _has_started(api, running), 15, "the long run never printed")
    queued = [await api.accepted("one", {"seconds": 0.3, "i": i}) for i in range(3)]
    for request_id in queued:
        assert (await api.status(request_id))["Status"] == "QUEUED"

    server.kill9()
    server.restart()

    for request_id in [running, *queued]:
        await api.status(request_id)  # asserts 200: every acknowledged RequestId still exists
    interrupted = await api.wait_ended(running)
    assert interrupted["Status"] == "FAILED", interrupted
    message = interrupted["ErrorMessage"] or ""
    assert "server" in message.lower() and re.search(
        r"stop|restart|crash|died|kill|interrupt|shut|lost", message, re.I
    ), f"the message must say the server stopped under the run: {interrupted}"
    for request_id in queued:
        state = await api.wait_ended(request_id, timeout=25)
        assert state["Status"] == "FINISHED", state
    # No retries: the interrupted run is not started again after the restart.
    log = await api.logs(running)
    assert len(START.findall(log)) == 1
    assert (await api.status(running))["Status"] == "FAILED"
    # Its log ends as a stopped server's runs' do: a grep for "run ended" finds it.
    assert log.rstrip("\n").splitlines()[-1].split(" ", 1)[1].startswith("[eventrun] run ended FAILED: ServerStopped: "), log


async def _has_started(api, request_id: str) -> bool:
    return START.search(await api.logs(request_id)) is not None


async def test_instances_do_not_outlive_a_killed_server(
    eventrun_server, http, handler, poll_until, pid_alive
):
    """After kill -9 of the server, its instances stop too instead of running on unseen.

    The run is quiet (it prints nothing after its first line), so the instance cannot learn
    of the server's death from a broken output pipe; after a restart the run is reported
    FAILED, and an instance still running its code would contradict that.
    """
    server = eventrun_server({"sleepy": {"handler": handler("sleepy")}})
    api = server.client(http)
    request_id = await api.accepted("sleepy", {"seconds": 30, "quiet": True})

    async def pid() -> int | None:
        match = START.search(await api.logs(request_id))
        return int(match.group(1)) if match else None

    instance = await poll_until(pid, 15, "the run never printed its pid")
    server.kill9()
    try:
        await poll_until(lambda: not pid_alive(instance), 10, f"instance {instance} survived the server")
    finally:
        if pid_alive(instance):  # instances run in their own session: teardown would miss it
            os.kill(instance, signal.SIGKILL)


def test_a_typo_in_the_manifest_is_refused_with_file_key_and_suggestion(eventrun_server, handler):
    server = eventrun_server(
        {"typo": {"handler": handler("quick"), "timout": "5s"}}, start=False
    )
    code = server.run_to_exit()
    stderr = server.stderr_text()
    assert code != 0, server.log_text()
    lines = [line for line in stderr.splitlines() if "functions.typo.timout" in line]
    assert lines, f"no line names the key functions.typo.timout:\n{stderr}"
    assert any(str(server.manifest_path) in line and "'timeout'" in line for line in lines), stderr
    assert "Traceback" not in stderr, stderr


def test_an_unknown_trigger_type_is_refused(eventrun_server, handler):
    server = eventrun_server(
        {"t": {"handler": handler("quick"), "triggers": [{"type": "sqs", "queue": "q"}]}}, start=False
    )
    code = server.run_to_exit()
    stderr = server.stderr_text()
    assert code != 0, server.log_text()
    assert str(server.manifest_path) in stderr and "functions.t.triggers" in stderr, stderr
    assert "unknown trigger type" in stderr, stderr


async def test_a_second_server_on_the_same_data_dir_is_refused(eventrun_server, http, handler):
    functions = {"one": {"handler": handler("quick")}}
    first = eventrun_server(functions)
    second = eventrun_server(functions, start=False)
    second.data_dir = first.data_dir
    second.write_manifest(functions)

    code = second.run_to_exit()
    stderr = second.stderr_text()
    assert code == 2, f"a store in use must be refused\n{second.log_text()}"
    assert f"in use by another eventrun server (process {first.pid})" in stderr, stderr
    assert "Traceback" not in stderr, stderr
    api = first.client(http)
    request_id = await api.accepted("one", {})
    assert (await api.wait_ended(request_id))["Status"] == "FINISHED"  # the first serves on

    first.kill9()  # the lock goes with the process, however it ends
    second.start()
    assert (await second.client(http).status(request_id))["Status"] == "FINISHED"
