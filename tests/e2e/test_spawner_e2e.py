"""Instances are forked from a spawner process, and are the same as instances started fresh
(which the spawner also starts while it runs)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


async def test_an_instance_is_forked_with_its_functions_group_folder_and_environment(eventrun_server, http, handler):
    server = eventrun_server({"family": {"handler": handler("family"), "environment": {"GREETING": "hallo", "TZ": "UTC"}}})
    api = server.client(http)
    state = await api.wait_ended(await api.accepted("family", {}))
    assert state["Status"] == "FINISHED", state
    me = state["Result"]
    assert me["pgid"] == me["sid"] == me["pid"]  # a session and process group of its own
    assert me["ppid"] != server.pid and parent_of(me["ppid"]) == server.pid
    assert "--spawner" in cmdline(me["ppid"])
    assert me["cwd"] == str(server.manifest_path.parent)
    assert (me["greeting"], me["tz"]) == ("hallo", "UTC")
    assert f"family pid={me['pid']}" in await api.logs(state["RequestId"])


async def test_an_environment_that_changes_the_interpreter_gets_a_fresh_one(eventrun_server, http, handler, tmp_path):
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "extra_module.py").write_text("VALUE = 42\n")
    server = eventrun_server({"family": {"handler": handler("family"), "environment": {"PYTHONPATH": str(extra)}}})
    api = server.client(http)
    state = await api.wait_ended(await api.accepted("family", {"module": "extra_module"}))
    assert state["Status"] == "FINISHED", state
    assert state["Result"]["module"] == 42  # PYTHONPATH is read when an interpreter starts
    assert_fresh_from_the_spawner(state["Result"], server)


async def test_without_the_spawner_instances_start_fresh_and_runs_go_on(
    eventrun_server, http, handler, poll_until, pid_alive
):
    server = eventrun_server({"family": {"handler": handler("family")}})
    api = server.client(http)
    first = await api.wait_ended(await api.accepted("family", {}))
    spawner = first["Result"]["ppid"]
    assert "--spawner" in cmdline(spawner)
    os.kill(spawner, signal.SIGKILL)
    # Its instance (warm, idle) ends itself once its parent is gone.
    await poll_until(lambda: not pid_alive(first["Result"]["pid"]), 10, "the spawner's instance outlived it")
    second = await api.wait_ended(await api.accepted("family", {}))
    assert second["Status"] == "FINISHED", second
    assert second["Result"]["ppid"] == server.pid
    assert "instances start as fresh interpreters" in server.stderr_text()


async def test_the_spawner_ends_with_the_server(eventrun_server, http, handler, poll_until, pid_alive):
    server = eventrun_server({"family": {"handler": handler("family")}})
    api = server.client(http)
    state = await api.wait_ended(await api.accepted("family", {}))
    spawner = state["Result"]["ppid"]
    server.proc.send_signal(signal.SIGKILL)
    await poll_until(lambda: not pid_alive(spawner), 10, "the spawner outlived a killed server")
    await poll_until(lambda: not pid_alive(state["Result"]["pid"]), 10, "an instance outlived a killed server")


async def test_fork_instances_false_starts_every_instance_fresh(eventrun_server, http, handler):
    server = eventrun_server({"family": {"handler": handler("family")}}, server={"fork_instances": False})
    api = server.client(http)
    state = await api.wait_ended(await api.accepted("family", {}))
    assert state["Status"] == "FINISHED", state
    assert_fresh_from_the_spawner(state["Result"], server)


def assert_fresh_from_the_spawner(me: dict, server) -> None:
    """A new interpreter started with the worker's own arguments, whose parent is the spawner
    (the subreaper that ends what it leaves behind), not the server."""
    assert "--spawner" not in cmdline(me["pid"]) and "family" in cmdline(me["pid"]), cmdline(me["pid"])
    assert "--spawner" in cmdline(me["ppid"]) and parent_of(me["ppid"]) == server.pid


async def test_a_spawner_killed_by_a_function_ends_its_runs_saying_so_and_all_they_started(
    eventrun_server, http, handler, poll_until, pid_alive, tmp_path
):
    # The spawner is every forked instance's parent, so its death ends them all: the run of
    # another function that had left a daemon (double-forked into a session of its own,
    # ignoring SIGTERM) ends too, and its daemon with it.
    server = eventrun_server(
        {
            "fork": {"handler": handler("hostile_fork"), "timeout": "60s"},
            "parent": {"handler": handler("hostile_parent"), "timeout": "60s"},
            "family": {"handler": handler("family")},
        }
    )
    api = server.client(http)
    pidfile = tmp_path / "pids"
    forker = await api.accepted("fork", {"pidfile": str(pidfile), "then": "sleep"})
    await poll_until(lambda: pidfile.exists() and len(pidfile.read_text().split()) == 2, 10, "no pids written")
    pids = [int(pid) for pid in pidfile.read_text().split()]
    try:
        killer = await api.accepted("parent", {})
        for request_id in (forker, killer):
            state = await api.wait_ended(request_id, timeout=15)
            assert state["Status"] == "FAILED", state
            assert state["ErrorType"] == "InstanceDied", state
            assert "the instance spawner died (it was killed by SIGKILL)" in state["ErrorMessage"], state
        await poll_until(lambda: not any(map(pid_alive, pids)), 5, f"processes {pids} outlived their run's spawner")
        after = await api.wait_ended(await api.accepted("family", {}))
        assert after["Status"] == "FINISHED", after
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
