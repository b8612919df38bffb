"""The API's refusals: status codes, the one error shape, and nothing accepted by mistake."""

from __future__ import annotations

import asyncio
import json

import pytest

from server_process import BOTH_STORES

pytestmark = [pytest.mark.e2e, BOTH_STORES]


async def invocations_of(api, function: str) -> list[str]:
    reply = await api.list(function=function)
    assert reply.status == 200, reply.text
    return [item["RequestId"] for item in reply.json["Invocations"]]


async def test_unknown_function_is_404(eventrun_server, http, handler):
    server = eventrun_server({"quick": {"handler": handler("quick")}})
    api = server.client(http)
    error = (await api.invoke("nope", {})).error(404)
    assert "nope" in error["Message"], error
    (await api.request("GET", "/functions/nope")).error(404)


async def test_unknown_request_id_is_404(eventrun_server, http, handler):
    server = eventrun_server({"quick": {"handler": handler("quick")}})
    api = server.client(http)
    missing = "00000000-0000-0000-0000-000000000000"
    error = (await api.request("GET", f"/invocations/{missing}")).error(404)
    assert missing in error["Message"], error
    (await api.request("GET", f"/invocations/{missing}/logs")).error(404)
    (await api.request("GET", f"/invocations/{missing}/logs", params={"follow": "true"})).error(404)
    (await api.terminate(missing)).error(404)


async def test_a_request_id_is_read_in_any_case(eventrun_server, http, handler):
    # RequestIds are UUIDs, written in lower case; a UUID in upper case is the same id.
    server = eventrun_server({"quick": {"handler": handler("quick")}})
    api = server.client(http)
    request_id = await api.accepted("quick", {"n": 1})
    await api.wait_ended(request_id)
    shouted = request_id.upper()
    shown = await api.request("GET", f"/invocations/{shouted}")
    assert shown.status == 200 and shown.json["RequestId"] == request_id, shown.text
    for route in ("logs", "event"):
        reply = await api.request("GET", f"/invocations/{shouted}/{route}")
        assert reply.status == 200, (route, reply.text)
    assert (await api.terminate(shouted)).error(409)["Code"] == "InvocationEnded"
    replay = await api.request("POST", f"/invocations/{shouted}/replay")
    assert replay.status == 202 and replay.json["ReplayOf"] == request_id, replay.text


async def test_malformed_json_is_400_and_accepts_nothing(eventrun_server, http, handler):
    server = eventrun_server({"quick": {"handler": handler("quick")}})
    api = server.client(http)
    reply = await api.invoke("quick", body=b'{"a": ', headers={"Content-Type": "application/json"})
    reply.error(400)
    assert await invocations_of(api, "quick") == []


async def test_body_over_the_limit_is_413(eventrun_server, http, handler):
    server = eventrun_server({"quick": {"handler": handler("quick")}}, server={"max_body_size": "1KB"})
    api = server.client(http)
    big = json.dumps({"blob": "x" * 4096}).encode()
    (await api.invoke("quick", body=big, headers={"Content-Type": "application/json"})).error(413)
    assert await invocations_of(api, "quick") == []
    small = await api.accepted("quick", {"blob": "x" * 500})
    assert await invocations_of(api, "quick") == [small]


async def test_qps_limit_is_429_with_retry_after(eventrun_server, http, handler):
    server = eventrun_server({"capped": {"handler": handler("quick"), "qps_limit": 1}})
    api = server.client(http)
    replies = await asyncio.gather(*(api.invoke("capped", {"i": i}) for i in range(6)))
    accepted = [r.json["RequestId"] for r in replies if r.status == 202]
    throttled = [r for r in replies if r.status == 429]
    assert accepted, [r.status for r in replies]
    assert throttled, f"6 events at once with qps_limit=1: {[r.status for r in replies]}"
    assert len(accepted) + len(throttled) == len(replies), [(r.status, r.text) for r in replies]
    for reply in throttled:
        reply.error(429)
        retry_after = reply.headers.get("Retry-After", "")
        assert retry_after.isdigit() and int(retry_after) >= 1, reply.headers
    # Refused means refused: nothing throttled was queued behind the caller's back.
    assert sorted(await invocations_of(api, "capped")) == sorted(accepted)


async def test_a_retry_with_the_same_idempotency_key_is_not_throttled(eventrun_server, http, handler):
    # qps_limit counts new events: a retry of one already accepted gets its RequestId (and a sync
    # call its answer) however many come in the second, while a new event is still refused.
    server = eventrun_server(
        {
            "capped": {"handler": handler("quick"), "qps_limit": 1},
            "capped_sync": {"handler": handler("quick"), "qps_limit": 1, "async_execution": False},
        }
    )
    api = server.client(http)
    first = await api.invoke("capped", {"n": 1}, headers={"Idempotency-Key": "order-1"})
    assert first.status == 202, first.text
    retries = await asyncio.gather(
        *(api.invoke("capped", {"n": 1}, headers={"Idempotency-Key": "order-1"}) for _ in range(3)),
        api.invoke("capped", {"n": 2}, headers={"Idempotency-Key": "order-2"}),
    )
    *again, new = retries
    assert [(r.status, r.json["RequestId"]) for r in again] == [(202, first.json["RequestId"])] * 3, [r.text for r in again]
    new.error(429)
    assert await invocations_of(api, "capped") == [first.json["RequestId"]]

    answered = await api.invoke("capped_sync", {"n": 3}, headers={"Idempotency-Key": "call-1"})
    assert answered.status == 200 and answered.json["Status"] == "FINISHED", answered.text
    again = await api.invoke("capped_sync", {"n": 3}, headers={"Idempotency-Key": "call-1"})
    assert again.status == 200, again.text
    assert again.json == answered.json
    (await api.invoke("capped_sync", {"n": 4}, headers={"Idempotency-Key": "call-2"})).error(429)


async def test_bad_list_parameters_are_400(eventrun_server, http, handler):
    server = eventrun_server({"quick": {"handler": handler("quick")}})
    api = server.client(http)
    (await api.list(status="SLEEPING")).error(400)
    (await api.list(limit="many")).error(400)
    (await api.list(cursor="not-a-cursor")).error(400)
