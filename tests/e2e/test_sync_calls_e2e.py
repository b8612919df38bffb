"""Sync calls: answered from the run, recorded behind it, and the durable path where it must be.

With a slot free on a node with its own store, a sync call starts at once and its record
goes to the store behind it (see Engine.call). These tests hold the record to what the caller
was told, across a graceful restart and a kill -9, and check the calls that take the durable
path instead: an Idempotency-Key, a call that waits for a slot, a shared store.
"""

from __future__ import annotations

import asyncio
import re
from datetime import datetime

import aiohttp
import pytest

from server_process import BOTH_STORES

pytestmark = [pytest.mark.e2e, BOTH_STORES]

STATE_FIELDS = ("RequestId", "FunctionName", "Trigger", "Status", "CreatedAt", "StartedAt", "EndedAt", "DurationMs", "Result")


def _sync(handler_value: str, **more: object) -> dict[str, object]:
    return {"handler": handler_value, "async_execution": False, "timeout": "30s", **more}


async def _stored(api, function: str, request_id: str) -> dict | None:
    """The run as GET /invocations lists it (from the store, never from a node's memory), once ended."""
    reply = await api.list(function=function)
    assert reply.status == 200, reply.text
    found = next((item for item in reply.json["Invocations"] if item["RequestId"] == request_id), None)
    return found if found and found["Status"] not in ("QUEUED", "RUNNING") else None


async def _running_in_store(api, function: str) -> str | None:
    reply = await api.list(function=function, status="RUNNING")
    assert reply.status == 200, reply.text
    found = reply.json["Invocations"]
    return found[0]["RequestId"] if found else None


async def test_a_sync_call_is_recorded_as_it_was_answered(eventrun_server, http, handler, poll_until):
    server = eventrun_server({"echo": _sync(handler("sync_echo"))})
    api = server.client(http)
    reply = await api.invoke("echo", {"n": 1})
    assert reply.status == 200, reply.text
    answer = reply.json
    assert answer["Status"] == "FINISHED" and answer["Result"]["data"] == {"n": 1}, answer
    request_id = answer["RequestId"]

    right_after = await api.status(request_id)  # whether the store has it yet or not
    stored = await poll_until(lambda: _stored(api, "echo", request_id), 10, "the sync call never reached the store")
    for state in (right_after, stored):
        assert state["Status"] == "FINISHED" and state["Result"] == answer["Result"], state
    assert {k: right_after[k] for k in STATE_FIELDS} == {k: stored[k] for k in STATE_FIELDS}
    assert isinstance(stored["DurationMs"], int) and stored["DurationMs"] >= 0, stored
    event = await api.request("GET", f"/invocations/{request_id}/event")
    assert event.status == 200 and event.json["data"] == {"n": 1}, event.text

    server.stop()
    server.restart()
    after_restart = await api.status(request_id)
    assert {k: after_restart[k] for k in STATE_FIELDS} == {k: stored[k] for k in STATE_FIELDS}


async def test_a_sync_call_with_an_idempotency_key_runs_once(eventrun_server, http, handler):
    server = eventrun_server({"echo": _sync(handler("sync_echo"))})
    api = server.client(http)
    key = {"Idempotency-Key": "order-77"}
    first = await api.invoke("echo", {"n": 1}, headers=key)
    second = await api.invoke("echo", {"n": 2}, headers=key)
    assert first.status == second.status == 200, (first.text, second.text)
    assert second.json["RequestId"] == first.json["RequestId"]
    assert second.json["Result"] == first.json["Result"], "the second call must get the first run's result"
    reply = await api.list(function="echo")
    assert [item["RequestId"] for item in reply.json["Invocations"]] == [first.json["RequestId"]]


async def test_a_sync_call_waits_for_a_busy_slot(eventrun_server, http, handler, poll_until):
    server = eventrun_server({"one": _sync(handler("sleepy"), concurrency=1)})
    api = server.client(http)
    first = asyncio.create_task(api.invoke("one", {"seconds": 1.0}))
    await poll_until(lambda: _running_in_store(api, "one"), 10, "the first call never ran")
    second = await api.invoke("one", {"seconds": 0.1})
    done = await first
    assert done.status == second.status == 200, (done.text, second.text)
    assert done.json["Status"] == second.json["Status"] == "FINISHED", (done.json, second.json)
    one, two = await api.status(done.json["RequestId"]), await api.status(second.json["RequestId"])
    waited = _time(two["StartedAt"]) - _time(one["StartedAt"])
    assert waited.total_seconds() >= 1.0, f"with concurrency = 1 the second call waits for the first: {one}, {two}"


async def test_terminating_a_sync_call_answers_its_caller(eventrun_server, http, handler, poll_until):
    server = eventrun_server({"long": _sync(handler("sleepy"))})
    api = server.client(http)
    call = asyncio.create_task(api.invoke("long", {"seconds": 25}))
    request_id = await poll_until(lambda: _running_in_store(api, "long"), 10, "the call never ran")
    terminated = await api.terminate(request_id)
    assert terminated.status == 200, terminated.text
    answer = await asyncio.wait_for(call, 15)
    assert answer.status == 200, answer.text
    assert answer.json["RequestId"] == request_id and answer.json["Status"] == "ABORTED", answer.json
    stored = await poll_until(lambda: _stored(api, "long", request_id), 10, "the end never reached the store")
    assert stored["Status"] == "ABORTED", stored


async def test_kill_9_during_a_sync_call_leaves_it_failed(eventrun_server, http, handler, poll_until):
    server = eventrun_server({"long": _sync(handler("sleepy"))})
    api = server.client(http)
    call = asyncio.create_task(api.invoke("long", {"seconds": 25}))
    request_id = await poll_until(lambda: _running_in_store(api, "long"), 10, "the call never ran")
    await poll_until(lambda: _printed(api, request_id), 10, "the run never printed")

    server.kill9()
    with pytest.raises(aiohttp.ClientError):
        await asyncio.wait_for(call, 10)  # the caller sees its connection end, not an answer
    server.restart()
    state = await api.wait_ended(request_id)
    assert state["Status"] == "FAILED" and "server" in (state["ErrorMessage"] or "").lower(), state
    assert len(re.findall(r"sleepy start", await api.logs(request_id))) == 1, "a sync call is never run again"


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


async def _printed(api, request_id: str) -> bool:
    return "sleepy start" in await api.logs(request_id)


async def test_a_stop_right_after_the_answer_still_records_the_call(eventrun_server, http, handler):
    server = eventrun_server({"echo": _sync(handler("sync_echo"))})
    api = server.client(http)
    answers = [(await api.invoke("echo", {"n": n})).json for n in range(3)]
    server.stop()  # within the batch's 50 ms: what was not yet sent goes before the store closes
    server.restart()
    for answer in answers:
        state = await api.status(answer["RequestId"])
        assert state["Status"] == "FINISHED" and state["Result"] == answer["Result"], state


async def test_a_sync_call_replayed_at_once_is_linked_to_its_replay(eventrun_server, http, handler):
    server = eventrun_server({"echo": _sync(handler("sync_echo"))})
    api = server.client(http)
    answer = (await api.invoke("echo", {"n": 5})).json
    replayed = await api.request("POST", f"/invocations/{answer['RequestId']}/replay")  # within the 50 ms
    assert replayed.status == 202, replayed.text
    replay_id = replayed.json["RequestId"]
    state = await api.wait_ended(replay_id)
    assert state["Status"] == "FINISHED" and state["Result"]["data"] == {"n": 5}, state
    assert state["ReplayOf"] == answer["RequestId"], state
    server.stop()
    server.restart()
    original = await api.status(answer["RequestId"])
    assert original["Status"] == "FINISHED" and original["Replays"] == [replay_id], original
