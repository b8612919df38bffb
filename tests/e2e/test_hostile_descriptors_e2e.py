"""A run that returns holding every file descriptor its instance may open still reports its end."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("fork_instances", [True, False], ids=["forked", "fresh"])
async def test_a_run_that_returns_holding_every_descriptor_finishes_and_its_instance_is_not_reused(
    eventrun_server, http, handler, poll_until, pid_alive, fork_instances
):
    # Its instance once had to open orjson's files to write the result, and died of EMFILE.
    server = eventrun_server(
        {"fds": {"handler": handler("hostile_descriptors"), "concurrency": 1}}, server={"fork_instances": fork_instances}
    )
    api = server.client(http)
    request_id = await api.accepted("fds", {"hold": True})
    state = await api.wait_ended(request_id, timeout=15)
    assert state["Status"] == "FINISHED", state
    pid = state["Result"]["pid"]
    assert state["Result"]["opened"] > 100, state
    log = await api.logs(request_id)
    assert "[eventrun] the run left no file descriptor free; this instance is not reused" in log, log
    await poll_until(lambda: not pid_alive(pid), 5, f"instance {pid} without a free descriptor was kept")
    again = await api.wait_ended(await api.accepted("fds", {}))
    assert again["Status"] == "FINISHED" and again["Result"]["pid"] != pid, again
