"""A server that runs out of a resource it needs to start an instance (here: file descriptors)
ends the run that needed it FAILED, naming the reason, and serves on once it has them again."""

from __future__ import annotations

import os
import resource
from datetime import datetime

import pytest
from server_process import writer_of

pytestmark = pytest.mark.e2e


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_a_run_that_cannot_get_an_instance_fails_with_the_reason_and_the_server_serves_on(
    eventrun_server, http, handler
):
    server = eventrun_server({"quick": {"handler": handler("quick")}})
    api = server.client(http)
    assert (await api.request("GET", "/healthz")).status == 200  # (the connection the test goes on with)
    soft, hard = resource.prlimit(server.pid, resource.RLIMIT_NOFILE)
    # No descriptor to spare: the pipes to a new instance cannot be made. (The soft limit only:
    # raising it back needs no privilege.)
    resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (open_fds(server.pid), hard))
    try:
        request_id = await api.accepted("quick", {"n": 1})
        state = await api.wait_ended(request_id)
    finally:
        resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (soft, hard))
    assert state["Status"] == "FAILED", state
    assert state["ErrorType"] == "InstanceStartFailed", state
    assert "Too many open files" in state["ErrorMessage"], state
    assert f"cannot start an instance of quick for run {request_id}" in server.stderr_text()

    again = await api.wait_ended(await api.accepted("quick", {"n": 2}))
    assert again["Status"] == "FINISHED", again
    assert again["Result"]["data"] == {"n": 2}
    assert "[eventrun] run started on instance" in await api.logs(again["RequestId"])


async def test_while_the_store_refuses_writes_events_get_503_and_no_start_or_end_is_lost(
    eventrun_server, http, handler, poll_until
):
    server = eventrun_server(
        {
            "sleepy": {"handler": handler("sleepy"), "concurrency": 1},
            "quick": {"handler": handler("quick")},
            "echo": {"handler": handler("quick"), "async_execution": False},
        }
    )
    api = server.client(http)
    running = await api.accepted("sleepy", {"seconds": 1.5, "quiet": True})
    await api.wait_for(running, {"RUNNING"}, timeout=10)
    queued = await api.accepted("sleepy", {"seconds": 0, "quiet": True})  # waits for the one slot
    writer = writer_of(server.pid)
    soft, hard = resource.prlimit(writer, resource.RLIMIT_FSIZE)
    # The store's files cannot grow past one byte: every commit fails, as on a full disk.
    resource.prlimit(writer, resource.RLIMIT_FSIZE, (1, hard))
    try:
        reply = await api.invoke("quick", {"n": 1})
        assert reply.status == 503, reply.text
        error = reply.error(503)
        assert error["Code"] == "StoreUnavailable" and "nothing of it was recorded" in error["Message"], error
        # A sync call is answered from its run; its record, written behind, waits for the store.
        called = await api.invoke("echo", {"n": 3})
        assert called.status == 200 and called.json["Status"] == "FINISHED", called.text
        # The first run ends meanwhile and the second would start: the store takes neither.
        await poll_until(
            lambda: f"the store refused the end of run {running}" in server.stderr_text()
            and f"the store refused the start of run {queued}" in server.stderr_text(),
            10,
            "the refused end and start were not reported",
        )
        assert (await api.status(running))["Status"] == "RUNNING"
        assert (await api.status(queued))["Status"] == "QUEUED"
    finally:
        resource.prlimit(writer, resource.RLIMIT_FSIZE, (soft, hard))
    # Once the store takes writes again, the end is recorded with its result, and the start goes ahead.
    first = await api.wait_ended(running, timeout=15)
    assert first["Status"] == "FINISHED" and first["Result"]["ticks"] == 0, first
    second = await api.wait_ended(queued, timeout=15)
    assert second["Status"] == "FINISHED", second
    # The log says the store recovered, once for each kind of write it had refused.
    for kind in ("runs' ends", "runs' starts"):
        assert server.stderr_text().count(f"the store records {kind} again") == 1, server.stderr_text()[-3000:]
    # The sync call's record is in the store: listed (a list reads only the store), with its result.
    async def listed() -> dict | None:
        listing = (await api.list(function="echo")).json["Invocations"]
        return listing[0] if listing and listing[0]["Status"] == "FINISHED" else None

    record = await poll_until(listed, 15, "the sync call's record never reached the store")
    assert record["RequestId"] == called.json["RequestId"] and record["Result"]["data"] == {"n": 3}, record
    assert f"the store refused the acceptance of sync call {record['RequestId']}" in server.stderr_text()
    assert "the store records sync calls' records again" in server.stderr_text()
    assert (await api.wait_ended(await api.accepted("quick", {"n": 2})))["Status"] == "FINISHED"


async def test_a_run_that_needs_the_room_of_an_idle_instance_does_not_wait_for_it_to_go(
    eventrun_server, http, handler, pid_alive
):
    # One instance at most: b's run needs the room of a's idle instance, which ignores SIGTERM and
    # so takes kill_grace (10 s) to stop. The run does not wait for that.
    server = eventrun_server(
        {"a": {"handler": handler("stubborn")}, "b": {"handler": handler("quick")}},
        server={"max_instances": 1, "kill_grace": "10s"},
    )
    api = server.client(http)
    first = await api.wait_ended(await api.accepted("a", {}))
    assert first["Status"] == "FINISHED", first
    stubborn = first["Result"]
    second = await api.wait_ended(await api.accepted("b", {"n": 1}), timeout=30)
    assert second["Status"] == "FINISHED", second
    took = datetime.fromisoformat(second["EndedAt"]) - datetime.fromisoformat(second["StartedAt"])
    assert took.total_seconds() < 5, second  # not kill_grace
    assert pid_alive(stubborn), "the evicted instance is still going (it has kill_grace)"
