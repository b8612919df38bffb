"""How runs end: terminate, timeout, exceptions, dead instances, a stop; warm and recycled instances."""

from __future__ import annotations

import asyncio
import re
import time

import aiohttp
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


async def cleanup_started(api, poll_until, request_id: str) -> None:
    """Wait until a cleanup run has set its SIGTERM handler."""
    async def started() -> bool:
        return "cleanup start" in await api.logs(request_id)

    await poll_until(started, 15, f"{request_id} never started")


# A handler that catches SIGTERM may clean up in kill_grace, then exit (FAILED SystemExit, it used
# to end) or return (FINISHED with its partial result): the run ends as it was stopped all the same.
@pytest.mark.parametrize("on_term", ["exit", "return"])
async def test_a_terminated_run_ends_aborted_whatever_its_sigterm_handler_does(
    eventrun_server, http, handler, poll_until, on_term
):
    server = eventrun_server({"cleanup": {"handler": handler("cleanup")}})
    api = server.client(http)
    request_id = await api.accepted("cleanup", {"seconds": 30, "on_term": on_term})
    await cleanup_started(api, poll_until, request_id)

    reply = await api.terminate(request_id)
    assert reply.status == 200, reply.text
    assert reply.json["Status"] == "ABORTED", reply.json
    state = await api.status(request_id)
    assert (state["Status"], state["ErrorType"], state["Result"]) == ("ABORTED", "Aborted", None), state
    assert "cleaning up" in await api.logs(request_id)


@pytest.mark.parametrize("on_term", ["exit", "return"])
async def test_a_run_past_its_timeout_ends_timed_out_whatever_its_sigterm_handler_does(
    eventrun_server, http, handler, poll_until, on_term
):
    server = eventrun_server({"cleanup": {"handler": handler("cleanup"), "timeout": "2s"}})
    api = server.client(http)
    request_id = await api.accepted("cleanup", {"seconds": 30, "on_term": on_term})
    state = await api.wait_ended(request_id, timeout=15)
    assert (state["Status"], state["ErrorType"], state["Result"]) == ("TIMED_OUT", "TimedOut", None), state
    assert "cleaning up" in await api.logs(request_id)


async def test_a_terminate_while_a_timed_out_run_is_being_killed_leaves_it_timed_out(eventrun_server, http, handler, poll_until):
    server = eventrun_server({"cleanup": {"handler": handler("cleanup"), "timeout": "1s"}}, server={"kill_grace": "4s"})
    api = server.client(http)
    request_id = await api.accepted("cleanup", {"seconds": 30, "on_term": "ignore"})

    async def sigtermed() -> bool:  # past its timeout, its SIGTERM ignored: kill_grace runs
        return "cleaning up" in await api.logs(request_id)

    await poll_until(sigtermed, 15, f"{request_id} never got its SIGTERM")
    reply = await api.terminate(request_id)
    assert reply.status == 200, reply.text
    state = await api.wait_ended(request_id, timeout=15)
    assert (state["Status"], state["ErrorType"]) == ("TIMED_OUT", "TimedOut"), state


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


async def test_a_sync_call_in_flight_when_the_server_stops_is_answered_with_its_end(
    eventrun_server, http, handler, poll_until
):
    # The gateway must not cut the caller off: it stops taking connections, the engine ends the
    # run (ServerStopped once shutdown_grace is out), the caller gets that end, and the stop takes
    # shutdown_grace + kill_grace at most, plus the time to close.
    grace, kill = 3.0, 2.0
    server = eventrun_server(
        {"hs": {"handler": handler("sleepy"), "async_execution": False, "timeout": "60s"}},
        server={"shutdown_grace": f"{grace:g}s", "kill_grace": f"{kill:g}s"},
    )
    api = server.client(http)
    call = asyncio.create_task(api.invoke("hs", {"seconds": 60}))

    async def running() -> str | None:
        found = (await api.list(function="hs", status="RUNNING")).json["Invocations"]
        return found[0]["RequestId"] if found else None

    request_id = await poll_until(running, 15, "the sync call never ran")
    await instance_pid(api, poll_until, request_id)

    started = time.monotonic()
    stopping = asyncio.create_task(asyncio.to_thread(server.stop))  # SIGTERM, then the exit awaited
    await asyncio.sleep(0.5)
    try:  # the stop takes nothing new: a new connection is refused, or the event is 503
        late = await api.invoke("hs", {"seconds": 1})
    except aiohttp.ClientConnectionError:
        pass
    else:
        assert late.error(503)["Code"] == "ShuttingDown", late.text
    try:
        answer = await asyncio.wait_for(call, grace + kill + 10)
    except aiohttp.ClientError as exc:
        raise AssertionError(f"the caller got no answer ({exc!r})\n{server.log_text()}") from None
    code = await stopping
    took = time.monotonic() - started
    assert code == 0, server.log_text()
    assert took < grace + kill + 2, f"the stop took {took:.1f}s\n{server.log_text()}"
    assert answer.status == 200, answer.text
    assert answer.headers.get("X-Request-Id") == request_id, answer.headers
    assert answer.json["RequestId"] == request_id, answer.json
    assert (answer.json["Status"], answer.json["ErrorType"]) == ("FAILED", "ServerStopped"), answer.json

    server.restart()
    state = await api.status(request_id)
    assert (state["Status"], state["ErrorType"]) == ("FAILED", "ServerStopped"), state
    assert (await api.logs(request_id)).count("sleepy start") == 1, "a sync call is never run again"
