"""How runs end: terminate, timeout, exceptions, dead instances; warm and recycled instances."""

from __future__ import annotations

import re

import pytest

from server_process import BOTH_STORES

pytestmark = [pytest.mark.e2e, BOTH_STORES]

START = re.compile(r"sleepy start pid=(\d+)")


async def instance_pid(api, poll_until, request_id: str) -> int:
    """The pid a sleepy run printed first."""
    async def printed() -> int | None:
        match = START.search(await api.logs(request_id))
        return int(match.group(1)) if match else None

    return await poll_until(printed, 15, f"{request_id} never printed its pid")


async def test_terminate_a_running_run_kills_its_instance(
    eventrun_server, http, handler, poll_until, pid_alive
):
    server = eventrun_server({"sleepy": {"handler": handler("sleepy")}})
    api = server.client(http)
    request_id = await api.accepted("sleepy", {"seconds": 30})
    pid = await instance_pid(api, poll_until, request_id)
    assert pid_alive(pid)
    assert (await api.status(request_id))["Status"] == "RUNNING"

    reply = await api.terminate(request_id)
    assert reply.status == 200, reply.text
    state = await api.wait_for(request_id, {"ABORTED"}, timeout=10)
    assert state["EndedAt"] is not None, state
    await poll_until(lambda: not pid_alive(pid), 10, f"instance {pid} still runs after terminate")
    assert "sleepy done" not in await api.logs(request_id)
    assert (await api.status(request_id))["Status"] == "ABORTED"


async def test_terminate_a_queued_run_means_it_never_runs(eventrun_server, http, handler, poll_until):
    server = eventrun_server({"one": {"handler": handler("sleepy"), "concurrency": 1}})
    api = server.client(http)
    blocker = await api.accepted("one", {"seconds": 30})
    await api.wait_for(blocker, {"RUNNING"}, timeout=15)
    queued = await api.accepted("one", {"seconds": 0.2})
    assert (await api.status(queued))["Status"] == "QUEUED"

    reply = await api.terminate(queued)
    assert reply.status == 200, reply.text
    state = await api.wait_for(queued, {"ABORTED"}, timeout=5)
    assert state["StartedAt"] is None, state

    # Free the only slot; a later run must go first because the aborted one is gone.
    assert (await api.terminate(blocker)).status == 200
    await api.wait_for(blocker, {"ABORTED"}, timeout=10)
    later = await api.accepted("one", {"seconds": 0.2})
    assert (await api.wait_ended(later))["Status"] == "FINISHED"

    state = await api.status(queued)
    assert state["Status"] == "ABORTED" and state["StartedAt"] is None, state
    assert "sleepy start" not in await api.logs(queued)


async def test_terminate_an_ended_run_is_a_conflict(eventrun_server, http, handler):
    server = eventrun_server({"quick": {"handler": handler("quick")}})
    api = server.client(http)
    request_id = await api.accepted("quick", {})
    assert (await api.wait_ended(request_id))["Status"] == "FINISHED"
    error = (await api.terminate(request_id)).error(409)
    assert request_id in error["Message"] or "FINISHED" in error["Message"], error
    assert (await api.status(request_id))["Status"] == "FINISHED"


async def test_a_run_past_its_timeout_ends_timed_out(
    eventrun_server, http, handler, poll_until, pid_alive
):
    server = eventrun_server({"slow": {"handler": handler("sleepy"), "timeout": "2s"}})
    api = server.client(http)
    request_id = await api.accepted("slow", {"seconds": 30})
    pid = await instance_pid(api, poll_until, request_id)
    state = await api.wait_ended(request_id, timeout=15)
    assert state["Status"] == "TIMED_OUT", state
    assert 1500 <= state["DurationMs"] <= 8000, state
    assert "sleepy done" not in await api.logs(request_id)
    await poll_until(lambda: not pid_alive(pid), 10, f"instance {pid} outlived its run's timeout")


async def test_success_keeps_the_instance_warm(eventrun_server, http, handler):
    server = eventrun_server({"pid": {"handler": handler("pid"), "concurrency": 1}})
    api = server.client(http)
    pids = []
    for _ in range(3):
        state = await api.wait_ended(await api.accepted("pid", {}))
        assert state["Status"] == "FINISHED", state
        pids.append(state["Result"]["pid"])
    assert len(set(pids)) == 1, f"successful runs must reuse the warm instance: {pids}"


async def test_an_exception_recycles_the_instance(eventrun_server, http, handler, poll_until, pid_alive):
    server = eventrun_server({"pid": {"handler": handler("pid"), "concurrency": 1}})
    api = server.client(http)
    first = await api.wait_ended(await api.accepted("pid", {}))
    assert first["Status"] == "FINISHED", first
    warm_pid = first["Result"]["pid"]

    failed = await api.wait_ended(await api.accepted("pid", {"fail": True}))
    assert failed["Status"] == "FAILED", failed
    assert failed["ErrorType"] == "ValueError", failed
    assert f"failing on demand in pid {warm_pid}" in failed["ErrorMessage"], failed
    assert failed["Result"] is None, failed

    after = await api.wait_ended(await api.accepted("pid", {}))
    assert after["Status"] == "FINISHED", after
    assert after["Result"]["pid"] != warm_pid, "the instance that raised must not serve the next event"
    await poll_until(lambda: not pid_alive(warm_pid), 10, f"instance {warm_pid} was not discarded")


async def test_an_exception_is_recorded_with_its_log(eventrun_server, http, handler):
    server = eventrun_server({"boom": {"handler": handler("boom")}})
    api = server.client(http)
    request_id = await api.accepted("boom", {})
    state = await api.wait_ended(request_id)
    assert state["Status"] == "FAILED", state
    assert state["ErrorType"] == "ValueError", state
    assert re.search(r"boom from pid \d+", state["ErrorMessage"]), state
    assert state["EndedAt"] is not None and state["DurationMs"] is not None, state
    assert "boom is about to fail" in await api.logs(request_id)
    # No retries: a failed async run is never run again.
    runs = (await api.list(function="boom")).json["Invocations"]
    assert [item["RequestId"] for item in runs] == [request_id]
    assert (await api.logs(request_id)).count("boom is about to fail") == 1


async def test_a_dead_instance_fails_the_run_and_the_server_keeps_serving(eventrun_server, http, handler):
    server = eventrun_server(
        {"crash": {"handler": handler("crash")}, "quick": {"handler": handler("quick")}}
    )
    api = server.client(http)
    request_id = await api.accepted("crash", {})
    state = await api.wait_ended(request_id)
    assert state["Status"] == "FAILED", state
    assert re.search(r"(?<![\d-])3(?!\d)", state["ErrorMessage"] or ""), (
        f"ErrorMessage must carry the exit code 3: {state}"
    )
    assert "crash is about to exit" in await api.logs(request_id)

    after = await api.wait_ended(await api.accepted("quick", {"still": "here"}))
    assert after["Status"] == "FINISHED" and after["Result"]["data"] == {"still": "here"}, after
    again = await api.wait_ended(await api.accepted("crash", {}))
    assert again["Status"] == "FAILED", "a fresh instance must serve (and fail) the next event"
    assert (await api.request("GET", "/healthz")).status == 200
