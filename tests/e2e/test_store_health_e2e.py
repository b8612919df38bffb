"""Through a real `eventrun serve`: /healthz and /metrics say when the store refuses writes (and
when it takes them again), and runs that start-up recovery ends count in eventrun_runs_total."""

from __future__ import annotations

import re
import resource
import time
from datetime import datetime

import pytest

from server_process import BOTH_STORES, Api, writer_of

pytestmark = pytest.mark.e2e

REFUSED = re.compile(r"the store refused the write \((.+)\); nothing of it was recorded")


async def metrics(api: Api) -> dict[str, float]:
    """The samples of GET /metrics, by name and labels as written."""
    reply = await api.request("GET", "/metrics")
    assert reply.status == 200, reply.text
    return {
        name: float(value)
        for line in reply.text.splitlines()
        if line and not line.startswith("#")
        for name, value in [line.rsplit(" ", 1)]
    }


async def store_health(api: Api) -> dict:
    reply = await api.request("GET", "/healthz")
    assert reply.status == 200, reply.text
    assert reply.json["Status"] == "ok", reply.json  # (a restart would not help: the Store says why)
    return reply.json["Store"]


async def test_healthz_and_metrics_say_while_the_store_refuses_writes_and_when_it_takes_them_again(
    eventrun_server, http, handler
):
    # A full disk answered every POST 503 StoreUnavailable while /healthz said {"Status": "ok"}
    # with no word of the store, and /metrics had nothing of the refused writes.
    server = eventrun_server({"quick": {"handler": handler("quick")}})
    api = server.client(http)
    assert await store_health(api) == {"Writes": "ok", "RefusedSince": None, "WritesRefused": 0, "WritesUnanswered": 0}
    figures = await metrics(api)
    assert figures["eventrun_store_writable"] == 1 and figures["eventrun_store_writes_refused_total"] == 0, figures

    writer = writer_of(server.pid)
    soft, hard = resource.prlimit(writer, resource.RLIMIT_FSIZE)
    resource.prlimit(writer, resource.RLIMIT_FSIZE, (1, hard))  # every commit fails, as on a full disk
    try:
        messages = []
        for n in range(3):
            error = (await api.invoke("quick", {"n": n})).error(503)
            assert error["Code"] == "StoreUnavailable", error
            messages.append(error["Message"])
        match = REFUSED.fullmatch(messages[-1])
        assert match, messages
        refused = await store_health(api)
        assert refused["Writes"] == f"refused: {match.group(1)}", (refused, messages)
        assert refused["WritesRefused"] >= 3, refused
        since = datetime.fromisoformat(refused["RefusedSince"])
        assert refused["RefusedSince"].endswith("Z") and 0 <= time.time() - since.timestamp() < 60, refused
        figures = await metrics(api)
        assert figures["eventrun_store_writable"] == 0, figures
        assert figures["eventrun_store_writes_refused_total"] == refused["WritesRefused"], (figures, refused)
    finally:
        resource.prlimit(writer, resource.RLIMIT_FSIZE, (soft, hard))

    # The next commit that goes through makes the store writable again; the count stays.
    run = await api.wait_ended(await api.accepted("quick", {"n": 9}))
    assert run["Status"] == "FINISHED", run
    after = await store_health(api)
    assert after["Writes"] == "ok" and after["RefusedSince"] is None, after
    assert after["WritesRefused"] >= refused["WritesRefused"], (after, refused)
    figures = await metrics(api)
    assert figures["eventrun_store_writable"] == 1, figures
    assert figures["eventrun_store_writes_refused_total"] == after["WritesRefused"], (figures, after)


@BOTH_STORES
async def test_runs_ended_by_recovery_after_kill_9_count_in_runs_total(eventrun_server, http, handler, poll_until):
    # After kill -9 with 20 runs RUNNING, the restart ended them FAILED and logged so, while
    # eventrun_runs_total{status="FAILED"} said 0.
    server = eventrun_server({"sleepy": {"handler": handler("sleepy"), "concurrency": 4}})
    api = server.client(http)
    running = [await api.accepted("sleepy", {"seconds": 60, "quiet": True, "i": i}) for i in range(4)]
    for request_id in running:
        await api.wait_for(request_id, {"RUNNING"}, timeout=20)
    started_first = (await metrics(api))["process_start_time_seconds"]

    server.kill9()
    server.restart()

    for request_id in running:
        state = await api.wait_ended(request_id)
        assert state["Status"] == "FAILED" and state["ErrorType"] == "ServerStopped", state
    failed = 'eventrun_runs_total{function="sleepy",status="FAILED"}'
    figures = await poll_until(
        lambda: _with(api, failed, 4), 10, "the runs recovery ended are not counted"
    )
    # The counters count since the server's start: the start time says they began again.
    assert figures["process_start_time_seconds"] > started_first, figures
    assert abs(figures["process_start_time_seconds"] - time.time()) < 120, figures


async def _with(api: Api, name: str, value: float) -> dict[str, float] | None:
    figures = await metrics(api)
    return figures if figures.get(name) == value else None
