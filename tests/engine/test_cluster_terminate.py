"""A node's terminate and wait on a shared store: a run stopped whatever step it is at, wherever it runs,
and an end found in the store when its notice is lost."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from eventrun.engine import core
from eventrun.engine.api import Status
from eventrun.engine.core import Engine
from eventrun.engine.envelope import Envelope, new_id, now_rfc3339, request_ids
from eventrun.engine.errors import NodeNotAnswering
from eventrun.engine.postgres import PostgresStore
from eventrun.engine.store import NewInvocation
from eventrun.triggers.http.responses import ERROR_STATUS

SLEEPY = """\
import time


def main_handler(event, context):
    time.sleep(event["data"]["seconds"])
    return "slept"
"""


@pytest.fixture
async def engine(postgres: str, start_engine: Callable[..., Awaitable[Engine]]) -> Engine:
    """Node node-a on a fresh PostgreSQL database: `sleepy` (async) and `echo` (sync, 3 s timeout)."""
    return await start_engine(
        '[server]\ndata_dir = "data"\nkill_grace = "1s"\n\n'
        f'[store]\nurl = "{postgres}"\n\n[cluster]\nnode_id = "node-a"\nlease = "3s"\n\n'
        '[functions.sleepy]\nhandler = "sleepy.py:main_handler"\nconcurrency = 2\n\n'
        '[functions.echo]\nhandler = "echo.py:main_handler"\nasync_execution = false\ntimeout = "3s"\n',
        {"sleepy.py": SLEEPY, "echo.py": "def main_handler(event, context):\n    return event['data']\n"},
    )


def event(function: str, data: Any) -> Envelope:
    return Envelope(id=new_id(), source=f"/http/{function}", type="t", function=function, trigger="http", data=data)


async def status_in_store(engine: Engine, request_id: str) -> str:
    return await engine.store.pool.fetchval(  # type: ignore[union-attr,no-any-return]
        "SELECT status FROM invocations WHERE request_id = $1::uuid", request_id
    )


async def running_on(store: PostgresStore, function: str = "sleepy") -> str:
    """A run RUNNING on `store`'s node, accepted there (no notice: no other node hears of it)."""
    seq, (request_id,) = request_ids(1)
    row = NewInvocation(request_id, function, f"/http/{function}", new_id(), "http", now_rfc3339(), b'{"data":{}}', seq)
    await store.accept([row])
    assert await store.claim(function, 1, 2) == [request_id]
    assert await store.mark_running(request_id, now_rfc3339())
    return request_id


async def test_a_run_this_node_starts_while_its_terminate_is_on_the_way_is_stopped(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Terminated right after it was accepted, on the node that accepted it: the node claimed and
    # started it while the terminate's first write (an end for a run not started) was on its way.
    # That terminate found the run no longer queued here and only waited: it ran to its end, FINISHED.
    store = engine.store
    claims_go = asyncio.Event()
    real_claim, real_finish = store.claim, store.finish  # type: ignore[union-attr]

    async def claim(*args: Any) -> list[str]:
        await claims_go.wait()
        return await real_claim(*args)

    async def finish(request_id: str, *args: Any, queued_only: bool = False, **kwargs: Any) -> bool:
        if queued_only:  # the run starts here meanwhile
            claims_go.set()
            deadline = time.monotonic() + 10
            while request_id not in engine._runs or await status_in_store(engine, request_id) != "RUNNING":
                assert time.monotonic() < deadline, "the run never started"
                await asyncio.sleep(0.01)
        return await real_finish(request_id, *args, queued_only=queued_only, **kwargs)

    monkeypatch.setattr(store, "claim", claim)
    monkeypatch.setattr(store, "finish", finish)
    accepted = await engine.accept(event("sleepy", {"seconds": 2}))
    started = time.monotonic()
    ended = await engine.terminate(accepted.request_id)
    assert ended.status is Status.ABORTED, ended
    assert time.monotonic() - started < 2, "stopped, not waited for"


async def test_a_run_another_node_claimed_but_has_not_started_ends_at_once(engine: Engine, node_x: PostgresStore) -> None:
    seq, (request_id,) = request_ids(1)
    row = NewInvocation(request_id, "sleepy", "/http/sleepy", new_id(), "http", now_rfc3339(), b'{"data":{}}', seq)
    await node_x.accept([row])
    assert await node_x.claim("sleepy", 1, 2) == [request_id]
    ended = await engine.terminate(request_id)
    assert (ended.status, ended.error_message) == (Status.ABORTED, "the run was terminated before it started")
    assert not await node_x.mark_running(request_id, now_rfc3339()), "its node finds it ended and does not start it"


async def test_a_terminate_whose_notice_was_lost_reaches_the_run_at_its_node_s_next_heartbeat(
    engine: Engine, node_x: PostgresStore, postgres: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The notice asking node-a to stop a run went while node-a's listening connection was down
    # (or PostgreSQL restarted): the run went on to its end, and the caller got it RUNNING.
    assert engine.cluster is not None
    asked = asyncio.Event()
    listen = engine.cluster._listen

    async def listen_once_asked() -> None:  # (node-a listens again only once the notice is gone)
        await asked.wait()
        await listen()

    monkeypatch.setattr(engine.cluster, "_listen", listen_once_asked)
    accepted = await engine.accept(event("sleepy", {"seconds": 30}))
    request_id = accepted.request_id
    deadline = time.monotonic() + 10
    while await status_in_store(engine, request_id) != "RUNNING":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert engine.cluster._listener is not None
    admin = await asyncpg.connect(postgres)
    try:
        await admin.execute("SELECT pg_terminate_backend($1)", engine.cluster._listener.get_server_pid())
    finally:
        await admin.close()
    while engine.cluster._listener is not None:
        assert time.monotonic() < deadline, "the node never saw its listener go"
        await asyncio.sleep(0.01)
    assert await node_x.request_abort(request_id) == "node-a"  # node-x's terminate: its notice is lost
    asked.set()
    ended = await engine.wait(request_id, timeout=10)
    assert ended.status is Status.ABORTED, ended


async def test_a_sync_call_run_by_another_node_answers_once_the_store_has_its_end_without_a_notice(
    engine: Engine, node_x: PostgresStore
) -> None:
    engine.dispatcher.pause()  # node-a claims nothing: node-x runs the call
    call = asyncio.create_task(engine.call(event("echo", {"n": 1})))
    deadline = time.monotonic() + 10
    while not (claimed := await node_x.claim("echo", 1, 8)):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    (request_id,) = claimed
    assert await node_x.mark_running(request_id, now_rfc3339())
    # Its end is recorded with no notice (as when the notice is lost with a dropped connection).
    await node_x.pool.execute(
        "UPDATE invocations SET status = 'FINISHED', ended_at = $2, result = $3 WHERE request_id = $1::uuid",
        request_id, now_rfc3339(), b'{"n":1}',
    )
    ended_at = time.monotonic()
    answer = await asyncio.wait_for(call, 10)
    assert (answer.status, answer.result) == (Status.FINISHED, {"n": 1})
    assert time.monotonic() - ended_at < core.WAIT_RECHECK + 1, "found in the store, not at the call's timeout"


async def test_terminating_a_run_whose_node_stopped_answering_is_a_conflict_that_says_so(
    engine: Engine, node_x: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It used to answer 200 with the run RUNNING, as if the terminate had been delivered.
    monkeypatch.setattr(core, "TERMINATE_WAIT", 0.2)
    await node_x.join("http://x", 60.0)
    request_id = await running_on(node_x)
    await node_x.pool.execute("UPDATE nodes SET heartbeat_at = now() - interval '45 seconds' WHERE node_id = 'node-x'")
    with pytest.raises(NodeNotAnswering) as caught:
        await engine.terminate(request_id)
    assert ERROR_STATUS[NodeNotAnswering] == 409
    message = str(caught.value)
    assert re.search(r"node node-x, which has not renewed its lease for 4\d\.\ds", message), message
    assert "ends FAILED (NodeLost) once that lease (60s) runs out" in message, message
    assert (await engine.get(request_id)).status is Status.RUNNING


async def test_terminating_a_run_whose_node_s_lease_ran_out_answers_with_its_nodelost_end(
    engine: Engine, node_x: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(core, "TERMINATE_WAIT", 0.2)
    await node_x.join("http://x", 20.0)
    request_id = await running_on(node_x)
    await node_x.pool.execute("UPDATE nodes SET heartbeat_at = now() - interval '25 seconds' WHERE node_id = 'node-x'")
    # node-a has reached the store for longer than node-x's lease (a node just started judges no other before that).
    monkeypatch.setattr(engine.cluster, "_answered_since", time.monotonic() - 30)
    ended = await engine.terminate(request_id)
    assert (ended.status, ended.error_type) == (Status.FAILED, "NodeLost"), ended


async def test_terminating_a_run_whose_node_renewed_its_lease_lately_and_does_not_act_is_a_conflict(
    engine: Engine, node_x: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A node with a long lease killed right after a heartbeat: the wait was over before the node
    # could be seen to miss a renewal, and terminate answered 200 with the run RUNNING.
    monkeypatch.setattr(core, "TERMINATE_WAIT", 0.2)
    await node_x.join("http://x", 60.0)
    request_id = await running_on(node_x)
    with pytest.raises(NodeNotAnswering) as caught:
        await engine.terminate(request_id)
    message = str(caught.value)
    assert re.search(r"node node-x, which has not stopped it within 1\.2s of the request \(it last renewed its lease \d\.\ds ago\)", message), message
    assert "it ends ABORTED once that node acts on it, or FAILED (NodeLost) should that node's lease (60s) run out first" in message
    assert (await engine.get(request_id)).status is Status.RUNNING


async def test_terminating_a_queued_run_of_a_function_this_node_does_not_serve_answers_its_end(
    engine: Engine, node_x: PostgresStore
) -> None:
    # Accepted by a node whose manifest has `only1`, terminated through one whose manifest has
    # not: the run was ABORTED, and the terminate answered 500 (a KeyError in the dispatcher).
    seq, (request_id,) = request_ids(1)
    row = NewInvocation(request_id, "only1", "/http/only1", new_id(), "http", now_rfc3339(), b'{"data":{}}', seq)
    await node_x.accept([row])
    ended = await engine.terminate(request_id)
    assert (ended.status, ended.error_type, ended.function) == (Status.ABORTED, "Aborted", "only1"), ended
