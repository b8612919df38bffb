"""A result is held to MAX_RESULT_NESTING levels, so that every answer holding it can be written.

orjson writes at most 254 levels, and GET /invocations holds a result 3 levels down: a result
nested 252 to 254 levels deep could be stored, but not listed (and, at 254, not read nor
answered to a sync call either), and took GET /invocations down with a 500 for everyone. Such
a result now fails its run with ResultNotSerializable; one stored before that is served as
null, with ErrorType ResultNotSerializable, in an answer that could not be written with it.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import asyncpg
import pytest

from eventrun.engine.worker import MAX_RESULT_NESTING
from server_process import BOTH_STORES, poll_until

pytestmark = [pytest.mark.e2e, BOTH_STORES]

TOO_DEEP = f"nests deeper than {MAX_RESULT_NESTING} levels"


def nested(levels: int) -> Any:
    """What the handler deep.py returns for `levels` lists, as JSON reads it back."""
    value: Any = 7
    for _ in range(levels):
        value = [value]
    return value


def _functions(handler: Any) -> dict[str, dict[str, Any]]:
    return {
        "deep": {"handler": handler("deep")},
        "deep-sync": {"handler": handler("deep"), "async_execution": False, "timeout": "30s"},
    }


async def _listed(api: Any, request_id: str) -> dict[str, Any]:
    """The run as GET /invocations lists it, once ended there (a sync call's record is written behind it)."""

    async def ended() -> dict[str, Any] | None:
        reply = await api.list(limit=1000)
        assert reply.status == 200, reply.text
        item = next((item for item in reply.json["Invocations"] if item["RequestId"] == request_id), None)
        return item if item is not None and item["Status"] not in ("QUEUED", "RUNNING") else None

    return await poll_until(ended, 10, f"{request_id} never listed as ended")  # type: ignore[no-any-return]


def _assert_too_deep(state: dict[str, Any]) -> None:
    assert state["Status"] == "FAILED", state
    assert state["ErrorType"] == "ResultNotSerializable", state
    assert TOO_DEEP in state["ErrorMessage"], state
    assert state["Result"] is None, state


async def test_a_result_at_the_limit_is_served_by_every_answer(eventrun_server, http, handler):
    api = eventrun_server(_functions(handler)).client(http)
    request_id = await api.accepted("deep", {"levels": MAX_RESULT_NESTING})
    ended = await api.wait_ended(request_id)
    assert ended["Status"] == "FINISHED", ended
    assert ended["Result"] == nested(MAX_RESULT_NESTING)
    assert (await _listed(api, request_id))["Result"] == nested(MAX_RESULT_NESTING)

    reply = await api.invoke("deep-sync", {"levels": MAX_RESULT_NESTING})
    assert reply.status == 200, reply.text
    assert reply.json["Status"] == "FINISHED" and reply.json["Result"] == nested(MAX_RESULT_NESTING), reply.text
    listed = await _listed(api, reply.json["RequestId"])
    assert listed["Status"] == "FINISHED" and listed["Result"] == nested(MAX_RESULT_NESTING)


@pytest.mark.parametrize("levels", [252, 253, 254])
async def test_a_result_past_the_limit_fails_its_run_and_every_answer_says_so(eventrun_server, http, handler, levels):
    api = eventrun_server(_functions(handler)).client(http)
    request_id = await api.accepted("deep", {"levels": levels})
    _assert_too_deep(await api.wait_ended(request_id))  # GET /invocations/{id}
    _assert_too_deep(await _listed(api, request_id))  # GET /invocations, for everyone

    reply = await api.invoke("deep-sync", {"levels": levels})  # the sync answer
    assert reply.status == 200, reply.text
    _assert_too_deep(reply.json)
    _assert_too_deep(await api.status(reply.json["RequestId"]))
    _assert_too_deep(await _listed(api, reply.json["RequestId"]))
    assert "[eventrun] run ended FAILED: ResultNotSerializable" in await api.logs(request_id)


@pytest.mark.parametrize(
    ("kind", "levels"),
    [
        ("list", 300),  # past what the worker's encoder writes
        ("dict", 252),
        ("tuple", 300),  # the encoder writes tuples at any depth: the server's check refuses it
        ("tuple", 1100),  # deeper than the server reads a frame
    ],
)
async def test_any_result_too_deep_fails_with_the_same_error(eventrun_server, http, handler, kind, levels):
    api = eventrun_server(_functions(handler)).client(http)
    request_id = await api.accepted("deep", {"levels": levels, "kind": kind})
    _assert_too_deep(await api.wait_ended(request_id))
    _assert_too_deep(await _listed(api, request_id))
    # The next run is served as usual (the instance kept or replaced as the case may be).
    ok = await api.accepted("deep", {"levels": 3, "kind": kind})
    assert (await api.wait_ended(ok))["Status"] == "FINISHED"


async def _store_result(server: Any, server_store: dict[str, Any], request_id: str, blob: bytes) -> None:
    """Write a result into the store as a server without the limit did."""
    if "store" in server_store:
        conn = await asyncpg.connect(server_store["store"]["url"])
        try:
            await conn.execute("UPDATE invocations SET result = $1 WHERE request_id = $2::uuid", blob, request_id)
        finally:
            await conn.close()
        return
    server.stop()
    db = sqlite3.connect(server.data_dir / "eventrun.db")
    with db:
        db.execute("UPDATE invocations SET result = ? WHERE request_id = ?", (blob, request_id))
    db.close()
    server.start()


async def test_a_result_stored_too_deep_before_the_limit_cannot_take_the_answers_down(
    eventrun_server, http, handler, server_store
):
    server = eventrun_server(_functions(handler))
    api = server.client(http)
    fine = await api.accepted("deep", {"levels": 2})
    old = {levels: await api.accepted("deep", {"levels": 1}) for levels in (252, 254)}
    sync = await api.invoke("deep-sync", {"levels": 1}, headers={"Idempotency-Key": "k-1"})
    assert sync.status == 200 and sync.json["Status"] == "FINISHED", sync.text
    for request_id in (fine, *old.values()):
        assert (await api.wait_ended(request_id))["Status"] == "FINISHED"
    for levels, request_id in old.items():
        await _store_result(server, server_store, request_id, b"[" * levels + b"]" * levels)
    await _store_result(server, server_store, sync.json["RequestId"], b"[" * 254 + b"]" * 254)
    api = server.client(http)

    reply = await api.list(limit=1000)
    assert reply.status == 200, reply.text
    listed = {item["RequestId"]: item for item in reply.json["Invocations"]}
    assert listed[fine]["Result"] == nested(2) and listed[fine]["ErrorType"] is None
    for request_id in (*old.values(), sync.json["RequestId"]):
        item = listed[request_id]
        assert item["Status"] == "FINISHED" and item["Result"] is None, item
        assert item["ErrorType"] == "ResultNotSerializable" and TOO_DEEP in item["ErrorMessage"], item

    # One answer writes what fits in it: 252 levels fit in GET /invocations/{id}, 254 do not.
    state = await api.status(old[252])
    assert state["Result"] == json.loads(b"[" * 252 + b"]" * 252) and state["ErrorType"] is None, state
    state = await api.status(old[254])
    assert state["Status"] == "FINISHED" and state["Result"] is None, state
    assert state["ErrorType"] == "ResultNotSerializable" and TOO_DEEP in state["ErrorMessage"], state

    # A sync call answered from the stored run (the same Idempotency-Key).
    again = await api.invoke("deep-sync", {"levels": 1}, headers={"Idempotency-Key": "k-1"})
    assert again.status == 200, again.text
    assert again.json["RequestId"] == sync.json["RequestId"]
    assert again.json["Status"] == "FINISHED" and again.json["Result"] is None, again.text
    assert again.json["ErrorType"] == "ResultNotSerializable" and TOO_DEEP in again.json["ErrorMessage"]
