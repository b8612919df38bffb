"""Several `eventrun serve` nodes on one real PostgreSQL: any node answers, runs move, nothing is lost."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import asyncpg
import pytest

from postgres_service import as_user
from server_process import Api, ServerProcess, handler, poll_until
from test_destinations_e2e import Receiver

pytestmark = pytest.mark.e2e

LEASE = "2s"


class Cluster:
    """Nodes started on one database, each with its own node id, data_dir and port."""

    def __init__(self, make: Callable[..., ServerProcess], url: str, http: aiohttp.ClientSession) -> None:
        self._make = make
        self.url = url
        self._http = http
        self.nodes: list[ServerProcess] = []

    def start(
        self,
        functions: Mapping[str, Mapping[str, Any]],
        n: int = 2,
        *,
        server: Mapping[str, Any] | None = None,
        lease: str = LEASE,
        **extra: Any,
    ) -> list[ServerProcess]:
        """Start n more nodes with these functions (and these [server] keys)."""
        started = []
        for _ in range(n):
            node_id = f"node-{len(self.nodes) + 1}"
            node = self._make(
                functions,
                server=server,
                extra={"store": {"url": self.url}, "cluster": {"node_id": node_id, "lease": lease}, **extra},
            )
            node.node_id = node_id  # type: ignore[attr-defined]
            self.nodes.append(node)
            started.append(node)
        return started

    def api(self, node: ServerProcess) -> Api:
        """A client of one node."""
        return node.client(self._http)

    async def runs(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """Rows straight from the shared database."""
        conn = await asyncpg.connect(self.url)
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()


@pytest.fixture
def cluster(eventrun_server: Callable[..., ServerProcess], postgres: str, http: aiohttp.ClientSession) -> Cluster:
    """Start nodes with `cluster.start(functions, n)`; each is stopped at teardown."""
    return Cluster(eventrun_server, postgres, http)


async def test_any_node_answers_for_a_run_on_another(cluster: Cluster) -> None:
    nodes = cluster.start({"sleepy": {"handler": handler("sleepy"), "concurrency": 1}})
    request_id = await cluster.api(nodes[0]).accepted("sleepy", {"seconds": 30})
    await cluster.api(nodes[0]).wait_for(request_id, {"RUNNING"}, 10)
    [(owner,)] = await cluster.runs("SELECT owner FROM invocations WHERE request_id = $1::uuid", request_id)
    # Status, logs (also followed, live) and terminate from the node that does not run it.
    a = next(n for n in nodes if n.node_id == owner)  # type: ignore[attr-defined]
    b = next(n for n in nodes if n is not a)
    api_a, api_b = cluster.api(a), cluster.api(b)
    running = await api_b.status(request_id)
    assert running["Status"] == "RUNNING" and running["FunctionName"] == "sleepy"
    await poll_until(lambda: _has(api_b, request_id, "tick 1 at"), 5, "the log read on the other node")
    lines: list[str] = []
    async with cluster._http.get(f"{b.url}/invocations/{request_id}/logs", params={"follow": "true"}) as stream:
        async def follow() -> None:
            async for raw in stream.content:
                lines.append(raw.decode())
        follower = asyncio.create_task(follow())
        await poll_until(lambda: sum("tick" in line for line in lines) >= 3, 5, "live lines followed on the other node")
        # Terminated from the node it does not run on: its own node stops it.
        reply = await api_b.terminate(request_id)
        assert reply.status == 200, reply.text
        await asyncio.wait_for(follower, 10)
    ended = await api_a.wait_ended(request_id)
    assert ended["Status"] == "ABORTED", ended
    assert any("event: end" in line for line in lines), lines
    listed = (await api_b.list(function="sleepy")).json["Invocations"]
    assert [r["RequestId"] for r in listed] == [request_id]
    health = (await api_b.request("GET", "/healthz")).json
    assert health["Node"] == b.node_id  # type: ignore[attr-defined]
    assert sorted(n["NodeId"] for n in health["Cluster"]["Nodes"]) == ["node-1", "node-2"]
    metrics = (await api_a.request("GET", "/metrics")).text
    assert f'eventrun_node_info{{node="{a.node_id}"}} 1' in metrics  # type: ignore[attr-defined]

    async def both_counted() -> bool:  # (as of a's last heartbeat: a third of the lease at most, on a loaded machine more)
        return "eventrun_cluster_nodes 2" in (await api_a.request("GET", "/metrics")).text

    await poll_until(both_counted, 10, "node a's metrics never counted both nodes")


async def test_a_run_terminated_as_soon_as_it_is_accepted_ends_aborted(cluster: Cluster) -> None:
    # Terminated on the node that accepted it, right away: the node often claimed and started it
    # meanwhile, and the terminate only waited for it to finish.
    (node,) = cluster.start({"sleepy": {"handler": handler("sleepy"), "concurrency": 2}}, n=1)
    api = cluster.api(node)
    for _ in range(6):
        request_id = await api.accepted("sleepy", {"seconds": 1, "quiet": True})
        reply = await api.terminate(request_id)
        assert reply.status == 200, reply.text
        assert reply.json["Status"] == "ABORTED", reply.json


async def test_a_terminate_whose_notice_is_lost_with_the_listeners_still_stops_the_run(cluster: Cluster) -> None:
    # Every node's listening connection dropped (as a PostgreSQL restart drops them): the notice
    # asking the run's node to stop it was lost, and the run went on; the caller got it RUNNING.
    nodes = cluster.start({"sleepy": {"handler": handler("sleepy"), "concurrency": 1}}, lease="6s")
    request_id = await cluster.api(nodes[0]).accepted("sleepy", {"seconds": 30, "quiet": True})
    await cluster.api(nodes[0]).wait_for(request_id, {"RUNNING"}, 10)
    [(owner,)] = await cluster.runs("SELECT owner FROM invocations WHERE request_id = $1::uuid", request_id)
    asking = next(n for n in nodes if n.node_id != owner)  # type: ignore[attr-defined]
    killed = [
        r[0] for r in await cluster.runs(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN %'"
            " AND pg_terminate_backend(pid)"
        )
    ]
    assert len(killed) == 2, killed

    async def gone() -> bool:
        return not await cluster.runs("SELECT 1 FROM pg_stat_activity WHERE pid = any($1::int[])", killed)

    await poll_until(gone, 5, "the listening connections did not go", interval=0.01)
    reply = await cluster.api(asking).terminate(request_id)  # (each node listens again at its next heartbeat)
    assert reply.status == 200, reply.text
    assert reply.json["Status"] == "ABORTED", reply.json


async def _has(api: Api, request_id: str, text: str) -> bool:
    return text in await api.logs(request_id)


async def test_a_sync_invocation_answers_with_the_result_wherever_it_ran(cluster: Cluster) -> None:
    functions = {
        "sleepy": {"handler": handler("sleepy"), "concurrency": 1},
        "echo": {"handler": handler("sync_echo"), "async_execution": False},
    }
    # Node 1 runs one instance at most, and a long run takes it: its sync call runs on node 2.
    (a,) = cluster.start(functions, n=1, server={"max_instances": 1})
    busy = await cluster.api(a).accepted("sleepy", {"seconds": 30, "quiet": True})
    await cluster.api(a).wait_for(busy, {"RUNNING"}, 10)
    (b,) = cluster.start(functions, n=1)
    reply = await cluster.api(a).invoke("echo", {"n": 1})
    assert reply.status == 200, reply.text
    assert reply.json["Status"] == "FINISHED" and reply.json["Result"]["data"] == {"n": 1}, reply.json
    [(owner,)] = await cluster.runs("SELECT owner FROM invocations WHERE request_id = $1::uuid", reply.json["RequestId"])
    assert owner == "node-2"


async def test_queued_runs_spread_and_the_concurrency_holds_across_nodes(cluster: Cluster) -> None:
    a, b = cluster.start({"pid": {"handler": handler("sleepy"), "concurrency": 2}})
    api_a = cluster.api(a)
    ids = [await api_a.accepted("pid", {"seconds": 0.6, "quiet": True}) for _ in range(8)]
    most = 0

    async def sample() -> bool:
        nonlocal most
        rows = await cluster.runs("SELECT count(*) FROM invocations WHERE status = 'RUNNING'")
        most = max(most, rows[0][0])
        ended = await cluster.runs("SELECT count(*) FROM invocations WHERE status = 'FINISHED'")
        return ended[0][0] == len(ids)

    await poll_until(sample, 30, "every run finished", interval=0.02)
    assert most == 2, f"at most 2 runs of the function at once across the nodes, saw {most}"
    took = await cluster.runs("SELECT DISTINCT owner FROM invocations")
    assert {r[0] for r in took} == {"node-1", "node-2"}, "both nodes took runs"
    # FIFO per function: claimed in the order they were accepted. Each node starts what it
    # claimed by its own clock, so two nodes' starts may cross by a few milliseconds.
    started = [datetime.fromisoformat((await api_a.status(i))["StartedAt"]) for i in ids]
    late = [(n, a, b) for n, (a, b) in enumerate(zip(started, started[1:])) if b < a - timedelta(milliseconds=50)]
    assert not late, f"runs started before runs accepted earlier: {late}"
    owners = dict(await cluster.runs("SELECT request_id::text, owner FROM invocations"))
    for owner in ("node-1", "node-2"):
        mine = [when for request_id, when in zip(ids, started) if owners[request_id] == owner]
        assert mine == sorted(mine), f"{owner} started its runs out of order"


async def test_a_killed_node_s_runs_end_failed_and_its_queue_runs_elsewhere(cluster: Cluster) -> None:
    (a,) = cluster.start({"sleepy": {"handler": handler("sleepy"), "concurrency": 1}}, n=1)
    api_a = cluster.api(a)
    running = await api_a.accepted("sleepy", {"seconds": 60})
    await api_a.wait_for(running, {"RUNNING"}, 10)
    queued = await api_a.accepted("sleepy", {"seconds": 0.2})
    assert (await api_a.status(queued))["Status"] == "QUEUED"
    (b,) = cluster.start({"sleepy": {"handler": handler("sleepy"), "concurrency": 1}}, n=1)
    api_b = cluster.api(b)
    a.kill9()
    failed = await api_b.wait_ended(running, timeout=15)
    assert failed["Status"] == "FAILED" and failed["ErrorType"] == "NodeLost", failed
    assert "node-1" in failed["ErrorMessage"] and "not retried" in failed["ErrorMessage"]
    finished = await api_b.wait_ended(queued, timeout=15)
    assert finished["Status"] == "FINISHED", finished
    assert "[eventrun] run ended FAILED: NodeLost" in await api_b.logs(running)
    health = (await api_b.request("GET", "/healthz")).json
    assert [n["NodeId"] for n in health["Cluster"]["Nodes"]] == ["node-2"]


async def read_only(url: str, on: bool) -> None:
    """Make the database read-only for new sessions (as a failover to a replica is), or writable
    again, and cut off the sessions it has: every node reconnects into the new state."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SET default_transaction_read_only = off")  # (this session: to undo it)
        database = await conn.fetchval("SELECT current_database()")
        setting = "SET default_transaction_read_only = on" if on else "RESET default_transaction_read_only"
        await conn.execute(f'ALTER DATABASE "{database}" {setting}')
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()


async def test_while_the_database_refuses_writes_events_get_503_and_a_run_s_end_waits_for_it(cluster: Cluster) -> None:
    (node,) = cluster.start(
        {"sleepy": {"handler": handler("sleepy"), "concurrency": 1}, "quick": {"handler": handler("quick")}}, n=1
    )
    api = cluster.api(node)
    running = await api.accepted("sleepy", {"seconds": 1.5, "quiet": True})
    await api.wait_for(running, {"RUNNING"}, 10)
    queued = await api.accepted("sleepy", {"seconds": 0, "quiet": True})
    await read_only(cluster.url, True)
    try:
        reply = await api.invoke("quick", {"n": 1})
        error = reply.error(503)
        assert error["Code"] == "StoreUnavailable" and "the PostgreSQL store cannot serve this now" in error["Message"], error
        await poll_until(
            lambda: f"the store refused the end of run {running}" in node.stderr_text(), 15, "the refused end was not reported"
        )
    finally:
        await read_only(cluster.url, False)
    first = await ended_once_served(api, running)
    assert first["Status"] == "FINISHED" and first["Result"]["ticks"] == 0, first
    assert f"logger line for {running}" in await api.logs(running)  # its lines were shipped before its end
    assert (await ended_once_served(api, queued))["Status"] == "FINISHED"
    assert (await api.wait_ended(await api.accepted("quick", {"n": 2}), timeout=20))["Status"] == "FINISHED"


async def test_terminating_a_run_whose_node_was_killed_answers_that_the_node_does_not_answer(cluster: Cluster) -> None:
    # It answered 200 with the run RUNNING, as if it had been stopped.
    functions = {"sleepy": {"handler": handler("sleepy"), "concurrency": 1}}
    (a,) = cluster.start(functions, n=1, lease="30s")
    running = await cluster.api(a).accepted("sleepy", {"seconds": 60, "quiet": True})
    await cluster.api(a).wait_for(running, {"RUNNING"}, 10)
    (b,) = cluster.start(functions, n=1, lease="30s")
    a.kill9()
    reply = await cluster.api(b).terminate(running)
    error = reply.error(409)
    assert error["Code"] == "NodeNotAnswering", error
    assert "node node-1, which has not renewed its lease for" in error["Message"], error
    assert "ends FAILED (NodeLost) once that lease (30s) runs out" in error["Message"], error
    assert (await cluster.api(b).status(running))["Status"] == "RUNNING"


async def ended_once_served(api: Api, request_id: str) -> dict[str, Any]:
    """The run's state once ended, asking until then; a 503 (a connection the database cut off
    being found out, once each) is an answer to ask again after, as a client would."""

    async def ended() -> dict[str, Any] | None:
        reply = await api.request("GET", f"/invocations/{request_id}")
        if reply.status == 503:
            assert reply.error(503)["Code"] == "StoreUnavailable"
            return None
        assert reply.status == 200, reply.text
        return reply.json if reply.json["Status"] not in ("QUEUED", "RUNNING") else None

    return await poll_until(ended, 20, f"{request_id} did not end once the database took writes again")


async def test_a_run_lost_with_its_node_has_its_failure_delivered_by_a_survivor(cluster: Cluster) -> None:
    receiver = Receiver()
    await receiver.start()
    try:
        functions = {"sleepy": {"handler": handler("sleepy"), "on_failure": {"url": receiver.url}}}
        (a,) = cluster.start(functions, n=1)
        running = await cluster.api(a).accepted("sleepy", {"seconds": 60})
        await cluster.api(a).wait_for(running, {"RUNNING"}, 10)
        (b,) = cluster.start(functions, n=1)
        a.kill9()
        (record,) = await poll_until(lambda: receiver.of("on_failure", running), 20, "the NodeLost run's record never came")
        assert (record.json["Status"], record.json["ErrorType"]) == ("FAILED", "NodeLost")
        assert record.json["Event"]["data"] == {"seconds": 60}
        async def owed() -> list[Any]:
            return await cluster.runs("SELECT * FROM outbox")

        await poll_until(lambda: _nothing(owed()), 10, "the delivery stayed owed")
        assert len(receiver.of("on_failure", running)) == 1
        assert b.proc is not None and b.proc.poll() is None
    finally:
        await receiver.stop()


async def test_the_async_flag_is_locked_across_nodes(cluster: Cluster, eventrun_server: Callable[..., ServerProcess]) -> None:
    cluster.start({"f": {"handler": handler("quick"), "async_execution": True}}, n=1)
    flipped = eventrun_server(
        {"f": {"handler": handler("quick"), "async_execution": False}},
        extra={"store": {"url": cluster.url}, "cluster": {"node_id": "node-9"}},
        start=False,
    )
    assert flipped.run_to_exit() == 2
    assert "was created with async_execution = true" in flipped.stderr_text()


async def test_a_node_id_held_by_a_live_node_is_refused(cluster: Cluster, eventrun_server: Callable[..., ServerProcess]) -> None:
    cluster.start({"f": {"handler": handler("quick")}}, n=1)
    twin = eventrun_server(
        {"f": {"handler": handler("quick")}},
        extra={"store": {"url": cluster.url}, "cluster": {"node_id": "node-1"}},
        start=False,
    )
    assert twin.run_to_exit() == 2
    assert "eventrun: cannot start: node id 'node-1' is held by a live node" in twin.stderr_text()


async def test_a_database_user_without_rights_is_refused_in_one_line(
    postgres: str, eventrun_server: Callable[..., ServerProcess]
) -> None:
    # It was a 36-line traceback of InsufficientPrivilegeError and exit status 1, where a wrong
    # password, a missing database or a newer schema get one line and exit status 2.
    role = f"eventrun_user_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(postgres)
    await admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'")
    try:
        url = as_user(postgres, role, "pw")
        node = eventrun_server(
            {"f": {"handler": handler("quick")}}, extra={"store": {"url": url}, "cluster": {"node_id": "node-1"}}, start=False
        )
        assert node.run_to_exit() == 2, node.log_text()
        stderr = node.stderr_text()
        assert stderr.startswith(
            f"eventrun: cannot start: cannot use the PostgreSQL store at {url.replace(':pw@', ':***@')}:"
            " permission denied for schema public (InsufficientPrivilegeError); "
        ), stderr
        assert stderr.count("\n") == 1 and "Traceback" not in node.log_text(), node.log_text()
    finally:
        await admin.execute(f"DROP ROLE {role}")
        await admin.close()


async def _nothing(rows: Any) -> bool:
    return not await rows
