"""A server that runs out of a resource it needs to start an instance (here: file descriptors)
ends the run that needed it FAILED, naming the reason, and serves on once it has them again."""

from __future__ import annotations

import os
import resource

import pytest

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
