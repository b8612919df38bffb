"""Invoking functions over HTTP: the ack, the statuses, the envelope, sync mode, listing."""

from __future__ import annotations

import asyncio
import base64
import re
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from server_process import BOTH_STORES

pytestmark = [pytest.mark.e2e, BOTH_STORES]

RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
ENVELOPE_KEYS = {
    "specversion",
    "id",
    "source",
    "type",
    "time",
    "datacontenttype",
    "eventrunfunction",
    "eventruntrigger",
    "data",
}


def rfc3339(value: Any) -> datetime:
    """Parse an RFC 3339 timestamp, asserting its shape and an explicit offset."""
    assert isinstance(value, str) and RFC3339.match(value), f"not an RFC 3339 time: {value!r}"
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    assert parsed.tzinfo is not None, value
    return parsed


async def test_ack_arrives_while_a_long_function_runs(eventrun_server, http, handler):
    server = eventrun_server(
        {"sleepy": {"handler": handler("sleepy")}, "quick": {"handler": handler("quick")}}
    )
    api = server.client(http)

    started = time.monotonic()
    long_run = await api.accepted("sleepy", {"seconds": 30})
    # The run takes 30 s; an ack that waited for it could not come back in a third of that.
    assert time.monotonic() - started < 10.0, "the ack of a 30 s run must not wait for it"
    await api.wait_for(long_run, {"RUNNING"}, timeout=15)

    started = time.monotonic()
    reply = await api.invoke("quick", {"n": 1})
    elapsed = time.monotonic() - started
    assert reply.status == 202, reply.text
    assert elapsed < 10.0, f"ack took {elapsed:.2f}s while another function ran"
    request_id = reply.json["RequestId"]
    assert isinstance(request_id, str) and request_id.strip() == request_id != ""
    assert reply.headers["X-Request-Id"] == request_id
    assert request_id != long_run
    assert (await api.status(long_run))["Status"] == "RUNNING"
    finished = await api.wait_ended(request_id)
    assert finished["Status"] == "FINISHED", finished


async def test_status_moves_from_queued_through_running_to_finished(eventrun_server, http, handler):
    server = eventrun_server({"sleepy": {"handler": handler("sleepy")}})
    api = server.client(http)
    before = datetime.now(timezone.utc)
    request_id = await api.accepted("sleepy", {"seconds": 1.0})

    order = ["QUEUED", "RUNNING", "FINISHED"]
    seen: list[str] = []
    deadline = time.monotonic() + 20
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        state = await api.status(request_id)
        status = state["Status"]
        assert status in order, f"unexpected status on the way: {state}"
        if not seen or seen[-1] != status:
            seen.append(status)
        if status == "QUEUED":
            assert state["StartedAt"] is None and state["EndedAt"] is None, state
        if status == "RUNNING":
            rfc3339(state["StartedAt"])
            assert state["EndedAt"] is None and state["DurationMs"] is None, state
            assert state["Result"] is None, state
        if status == "FINISHED":
            break
        await asyncio.sleep(0.05)
    assert seen == sorted(seen, key=order.index), f"statuses went backwards: {seen}"
    assert "RUNNING" in seen, f"a 1 s run was never seen RUNNING: {seen}"
    assert seen[-1] == "FINISHED", f"no FINISHED within 20 s: {seen}, last {state}"

    assert state["RequestId"] == request_id
    assert state["FunctionName"] == "sleepy"
    assert state["Trigger"] == "http"
    assert state["ErrorType"] is None and state["ErrorMessage"] is None, state
    assert state["Result"]["ticks"] >= 4, state
    assert isinstance(state["Result"]["pid"], int), state
    created, started, ended = (rfc3339(state[k]) for k in ("CreatedAt", "StartedAt", "EndedAt"))
    assert before - timedelta(seconds=2) <= created <= started <= ended, state
    assert isinstance(state["DurationMs"], int) and state["DurationMs"] >= 1000, state
    span_ms = (ended - started) / timedelta(milliseconds=1)
    assert abs(state["DurationMs"] - span_ms) <= 50, f"DurationMs disagrees with EndedAt-StartedAt: {state}"


async def test_handler_receives_the_cloudevents_envelope(eventrun_server, http, handler):
    server = eventrun_server({"env": {"handler": handler("envelope")}})
    api = server.client(http)
    data = {"hello": "world", "n": [1, 2.5, None], "nested": {"ok": True}}
    before = datetime.now(timezone.utc)

    keyed = await api.accepted("env", data, headers={"Idempotency-Key": "order-42-abc"})
    fresh = await api.accepted("env", data)
    for request_id, expected_id in ((keyed, "order-42-abc"), (fresh, None)):
        state = await api.wait_ended(request_id)
        assert state["Status"] == "FINISHED", state
        assert state["Result"]["request_id"] == request_id
        event = state["Result"]["event"]
        assert set(event) == ENVELOPE_KEYS, f"http envelopes carry exactly these attributes: {event}"
        assert event["specversion"] == "1.0"
        if expected_id is None:
            assert str(uuid.UUID(event["id"])) == event["id"].lower(), event["id"]
        else:
            assert event["id"] == expected_id
        assert event["source"] == "/http/env"
        assert event["type"] == "eventrun.http.request"
        sent = rfc3339(event["time"])
        assert before - timedelta(seconds=2) <= sent <= datetime.now(timezone.utc) + timedelta(seconds=2)
        assert event["datacontenttype"] == "application/json"
        assert event["eventrunfunction"] == "env"
        assert event["eventruntrigger"] == "http"
        assert event["data"] == data
    first = (await api.status(fresh))["Result"]["event"]["id"]
    again = await api.accepted("env", data)
    second = (await api.wait_ended(again))["Result"]["event"]["id"]
    assert first != second, "each invocation without Idempotency-Key gets a fresh id"


@pytest.mark.parametrize(
    ("body", "content_type"),
    [(b"hello \xff\x00 bytes", "application/octet-stream"), (b"plain words", "text/plain")],
)
async def test_non_json_body_arrives_as_base64(eventrun_server, http, handler, body, content_type):
    server = eventrun_server({"env": {"handler": handler("envelope")}})
    api = server.client(http)
    request_id = await api.accepted("env", body=body, headers={"Content-Type": content_type})
    state = await api.wait_ended(request_id)
    assert state["Status"] == "FINISHED", state
    data = state["Result"]["event"]["data"]
    assert set(data) == {"body_base64", "content_type"}, data
    assert base64.b64decode(data["body_base64"]) == body
    assert data["content_type"].startswith(content_type), data


async def test_async_def_handler_runs(eventrun_server, http, handler):
    server = eventrun_server({"aio": {"handler": handler("async_handler")}})
    api = server.client(http)
    request_id = await api.accepted("aio", {"x": 1})
    state = await api.wait_ended(request_id)
    assert state["Status"] == "FINISHED", state
    assert state["Result"] == {
        "async": True,
        "data": {"x": 1},
        "request_id": request_id,
        "function_name": "aio",
    }


async def test_an_instance_loads_only_what_its_handler_uses(eventrun_server, http, handler):
    # Every instance start pays for what the worker imports: asyncio (and ssl with it) comes
    # only for an async handler; the eventrun package and what it imports never. orjson comes
    # at start (the spawner's, once: forked instances share it), and inspect and dataclasses with
    # it, so that a handler that used up every descriptor can still have its result written. The
    # spawner also loads what the worker imports when first needed (logging for context.logger,
    # among others), once, for a function whose run_as user cannot read the Python's files.
    server = eventrun_server({"mods": {"handler": handler("modules")}})
    api = server.client(http)
    state = await api.wait_ended(await api.accepted("mods", {}))
    assert state["Status"] == "FINISHED", state
    assert state["Result"] == {
        "asyncio": False,
        "orjson": True,
        "logging": True,
        "inspect": True,
        "dataclasses": True,
        "eventrun": False,
    }


async def test_sync_function_answers_with_the_result(eventrun_server, http, handler):
    server = eventrun_server(
        {"echo": {"handler": handler("sync_echo"), "async_execution": False, "timeout": "30s"}}
    )
    api = server.client(http)
    reply = await api.invoke("echo", {"question": 42})
    assert reply.status == 200, reply.text
    body = reply.json
    assert {"RequestId", "Status", "Result"} <= set(body), body
    assert body["Status"] == "FINISHED", body
    assert reply.headers["X-Request-Id"] == body["RequestId"]
    assert body["Result"]["data"] == {"question": 42}
    assert body["Result"]["eventrunfunction"] == "echo"
    state = await api.status(body["RequestId"])
    assert state["Status"] == "FINISHED" and state["Result"] == body["Result"], state


async def test_sync_function_queues_with_invocation_type_event(eventrun_server, http, handler):
    server = eventrun_server(
        {"echo": {"handler": handler("sync_echo"), "async_execution": False, "timeout": "30s"}}
    )
    api = server.client(http)
    request_id = await api.accepted("echo", {"queued": True}, headers={"X-Invocation-Type": "Event"})
    state = await api.wait_ended(request_id)
    assert state["Status"] == "FINISHED", state
    assert state["Result"]["data"] == {"queued": True}


async def test_idempotency_key_yields_one_request_id_and_one_run(eventrun_server, http, handler):
    server = eventrun_server({"quick": {"handler": handler("quick")}})
    api = server.client(http)
    key = {"Idempotency-Key": "webhook-delivery-7"}
    first = await api.accepted("quick", {"n": 1}, headers=key)
    second = await api.accepted("quick", {"n": 1}, headers=key)
    assert second == first
    state = await api.wait_ended(first)
    assert state["Status"] == "FINISHED", state
    after_run = await api.accepted("quick", {"n": 1}, headers=key)
    assert after_run == first, "a redelivery after the run ended must not run again"
    other = await api.accepted("quick", {"n": 1}, headers={"Idempotency-Key": "webhook-delivery-8"})
    assert other != first
    await api.wait_ended(other)

    reply = await api.list(function="quick")
    assert reply.status == 200, reply.text
    ids = [item["RequestId"] for item in reply.json["Invocations"]]
    assert sorted(ids) == sorted([first, other]), f"expected one run per key, got {ids}"


async def test_listing_pages_newest_first_with_a_cursor(eventrun_server, http, handler):
    server = eventrun_server(
        {"lst": {"handler": handler("pid")}, "other": {"handler": handler("quick")}}
    )
    api = server.client(http)
    created = [await api.accepted("lst", {"fail": i in (1, 3), "i": i}) for i in range(5)]
    stranger = await api.accepted("other", {})
    for request_id in [*created, stranger]:
        await api.wait_ended(request_id)
    newest_first = created[::-1]

    pages: list[list[str]] = []
    cursor = None
    for _ in range(5):
        reply = await api.list(function="lst", limit=2, cursor=cursor)
        assert reply.status == 200, reply.text
        body = reply.json
        assert set(body) == {"Invocations", "NextCursor"}, body
        pages.append([item["RequestId"] for item in body["Invocations"]])
        cursor = body["NextCursor"]
        if cursor is None:
            break
        assert isinstance(cursor, str) and cursor, body
    assert pages == [newest_first[0:2], newest_first[2:4], newest_first[4:5]], pages

    reply = await api.list(function="lst", status="FAILED")
    assert [item["RequestId"] for item in reply.json["Invocations"]] == [created[3], created[1]]
    assert all(item["Status"] == "FAILED" for item in reply.json["Invocations"])
    assert reply.json["NextCursor"] is None
    reply = await api.list(function="lst", status="FINISHED")
    assert [item["RequestId"] for item in reply.json["Invocations"]] == [created[4], created[2], created[0]]

    everything = await api.list()
    ids = [item["RequestId"] for item in everything.json["Invocations"]]
    assert ids == [stranger, *newest_first], ids
    item = everything.json["Invocations"][0]
    assert item["FunctionName"] == "other" and item["Status"] == "FINISHED", item
    assert "Result" in item and any(i["Result"] is not None for i in everything.json["Invocations"]), everything.json

    bare = await api.list(function="lst", results="false")
    assert [item["RequestId"] for item in bare.json["Invocations"]] == newest_first, bare.text
    assert all("Result" not in item for item in bare.json["Invocations"]), bare.text
    assert [item["ErrorType"] is not None for item in bare.json["Invocations"]] == [False, True, False, True, False]


async def test_function_registry(eventrun_server, http, handler):
    server = eventrun_server(
        {"quick": {"handler": handler("quick"), "concurrency": 3}, "sleepy": {"handler": handler("sleepy")}}
    )
    api = server.client(http)
    reply = await api.request("GET", "/functions")
    assert reply.status == 200, reply.text
    assert '"quick"' in reply.text and '"sleepy"' in reply.text, reply.text
    one = await api.request("GET", "/functions/quick")
    assert one.status == 200, one.text
    assert '"quick"' in one.text
    health = await api.request("GET", "/healthz")
    assert health.status == 200
    metrics = await api.request("GET", "/metrics")
    assert metrics.status == 200 and metrics.headers["Content-Type"].startswith("text/plain")


async def test_terminate_answers_the_run_as_get_does_with_its_replay_links(eventrun_server, http, handler):
    server = eventrun_server({"sleepy": {"handler": handler("sleepy")}})
    api = server.client(http)
    original = await api.accepted("sleepy", {"seconds": 60, "quiet": True})
    assert (await api.terminate(original)).status == 200
    replay = await api.request("POST", f"/invocations/{original}/replay")
    assert replay.status == 202, replay.text
    again = replay.json["RequestId"]
    await api.wait_for(again, {"RUNNING"}, timeout=20)
    terminated = await api.terminate(again)
    assert terminated.status == 200, terminated.text
    assert terminated.json["Status"] == "ABORTED"
    assert (terminated.json["ReplayOf"], terminated.json["Replays"]) == (original, []), terminated.json
    assert terminated.json == await api.status(again)
    assert (await api.status(original))["Replays"] == [again]
