"""A node's lease among others on a shared store: through an outage of the store, when the node is
taken for dead, and what followers of a lost node's run read."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import asyncpg
import pytest

from eventrun.engine.api import Status
from eventrun.engine.cluster import NODE_LOST, node_lost
from eventrun.engine.core import Engine
from eventrun.engine.envelope import Envelope, new_id, now_rfc3339
from eventrun.engine.errors import StoreError
from eventrun.engine.postgres import PostgresStore
from test_cluster_terminate import SLEEPY, running_on, status_in_store

LEASE = 3.0  # node-a's: a heartbeat every second


@pytest.fixture
async def engine(postgres: str, start_engine: Callable[..., Awaitable[Engine]]) -> Engine:
    """Node node-a on a fresh PostgreSQL database, lease 3 s: `sleepy` (async)."""
    return await start_engine(
        '[server]\ndata_dir = "data"\nkill_grace = "1s"\n\n'
        f'[store]\nurl = "{postgres}"\n\n[cluster]\nnode_id = "node-a"\nlease = "{LEASE:g}s"\n\n'
        '[functions.sleepy]\nhandler = "sleepy.py:main_handler"\nconcurrency = 2\n',
        {"sleepy.py": SLEEPY},
    )


class Outage:
    """node-a's heartbeats fail while `down` (as every query does while PostgreSQL is stopped)."""

    def __init__(self, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
        self.down = False
        self.failed = asyncio.Event()
        self.renewed = asyncio.Event()
        self.renewed_at = 0.0  # (monotonic) the last renewal that went through
        real = engine.store.heartbeat

        async def heartbeat() -> bool:
            if self.down:
                self.failed.set()
                raise StoreError("the PostgreSQL store cannot serve this now (ConnectionRefusedError: [Errno 111])")
            renewed = await real()
            self.renewed_at = time.monotonic()
            self.renewed.set()
            return renewed

        monkeypatch.setattr(engine.store, "heartbeat", heartbeat)

    async def start(self) -> None:
        """Cut node-a off until a renewal of its lease has failed."""
        self.down = True
        self.failed.clear()
        await asyncio.wait_for(self.failed.wait(), LEASE)

    async def end(self) -> float:
        """Let node-a through again; the time (monotonic) its first renewal since went through."""
        self.down = False
        self.renewed.clear()
        await asyncio.wait_for(self.renewed.wait(), LEASE)
        return self.renewed_at


async def test_an_outage_of_the_store_takes_no_node_for_dead(
    engine: Engine, node_x: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # PostgreSQL stopped for longer than 2/3 of the lease: the first node back found the others
    # silent past their lease (their heartbeats had failed as its own had) and took them for
    # dead; their runs, stored FAILED (NodeLost), went on running.
    await node_x.join("http://x", 4.5)
    request_id = await running_on(node_x)
    outage = Outage(engine, monkeypatch)
    await outage.start()
    # node-x could not renew either: silent past its lease (4.5 s) when the store answers again.
    await node_x.pool.execute("UPDATE nodes SET heartbeat_at = now() - interval '6 seconds' WHERE node_id = 'node-x'")
    back = await outage.end()
    await asyncio.sleep(3.6)  # a heartbeat past node-a's own lease: node-x is judged by its own, 4.5 s
    assert await status_in_store(engine, request_id) == "RUNNING"
    assert "node-x" in [n.node_id for n in engine.cluster.nodes], "counted alive meanwhile"  # type: ignore[union-attr]
    # node-x stays silent: taken for dead once it has had its whole lease since the store answered.
    while await status_in_store(engine, request_id) == "RUNNING":
        assert time.monotonic() - back < 4.5 + 2 * LEASE / 3 + 1, "node-x was never taken for dead"
        await asyncio.sleep(0.1)
    assert time.monotonic() - back >= 4.5
    ended = await engine.get(request_id)
    assert (ended.status, ended.error_type) == (Status.FAILED, NODE_LOST), ended


async def test_a_node_that_starts_as_the_store_comes_back_gives_the_others_their_lease(
    postgres: str, start_engine: Callable[..., Awaitable[Engine]]
) -> None:
    # A node started as the store came back (one that could not start during the outage) found
    # the others silent past their lease, as they could not renew either, and took them for dead.
    node_x = PostgresStore(postgres, "node-x")
    await node_x.open()
    try:
        await node_x.join("http://x", LEASE)
        request_id = await running_on(node_x)
        await node_x.pool.execute("UPDATE nodes SET heartbeat_at = now() - interval '10 seconds' WHERE node_id = 'node-x'")
        engine = await start_engine(
            '[server]\ndata_dir = "data"\nkill_grace = "1s"\n\n'
            f'[store]\nurl = "{postgres}"\n\n[cluster]\nnode_id = "node-a"\nlease = "{LEASE:g}s"\n\n'
            '[functions.sleepy]\nhandler = "sleepy.py:main_handler"\nconcurrency = 2\n',
            {"sleepy.py": SLEEPY},
        )
        started = time.monotonic()
        await asyncio.sleep(LEASE * 2 / 3 + 0.3)  # node-a has looked at the nodes twice since
        assert await status_in_store(engine, request_id) == "RUNNING"
        # node-x stays silent: taken for dead once it has had its whole lease since node-a started.
        while await status_in_store(engine, request_id) == "RUNNING":
            assert time.monotonic() - started < LEASE + 2 * LEASE / 3 + 1, "node-x was never taken for dead"
            await asyncio.sleep(0.1)
        assert time.monotonic() - started >= LEASE
    finally:
        await node_x.close()


async def test_a_node_that_renews_again_after_an_outage_stays_alive(
    engine: Engine, node_x: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await node_x.join("http://x", LEASE)
    request_id = await running_on(node_x)
    outage = Outage(engine, monkeypatch)
    await outage.start()
    await node_x.pool.execute("UPDATE nodes SET heartbeat_at = now() - interval '5 seconds' WHERE node_id = 'node-x'")
    await outage.end()
    await asyncio.sleep(LEASE / 3 + 0.2)  # node-a's next heartbeat, past its first since the outage
    assert await node_x.heartbeat(), "node-x was taken for dead as node-a came back"  # its first renewal since
    assert await status_in_store(engine, request_id) == "RUNNING"


async def test_heartbeats_that_fail_are_logged_once_and_their_recovery_once(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A line every third of the lease for as long as the store was down.
    outage = Outage(engine, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="eventrun.engine.cluster"):
        await outage.start()
        await asyncio.sleep(2.5)  # two or three more failed heartbeats
        await outage.end()
        await asyncio.sleep(LEASE / 3 + 0.2)  # and another that goes through
    messages = [r.getMessage() for r in caplog.records]
    failed = [m for m in messages if m.startswith("heartbeat failed")]
    assert len(failed) == 1 and "ConnectionRefusedError" in failed[0], messages
    again = [m for m in messages if m.startswith("heartbeats reach the store again")]
    assert len(again) == 1 and "more failed since the last such line" in again[0], messages


async def test_healthz_says_while_the_node_s_heartbeats_do_not_reach_the_store(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every node answered {"Status": "ok"} with nothing else changed through a 30 s outage.
    outage = Outage(engine, monkeypatch)
    assert engine.health()["Cluster"]["Store"] == "reachable"
    await outage.start()
    await asyncio.sleep(LEASE / 3 + 0.3)  # and one more that fails
    cluster = engine.health()["Cluster"]
    assert cluster["Store"] == "unreachable: the PostgreSQL store cannot serve this now (ConnectionRefusedError: [Errno 111])", cluster
    assert cluster["LastHeartbeatSecondsAgo"] >= LEASE / 3, cluster
    await outage.end()
    async with asyncio.timeout(LEASE):  # (once the rest of that heartbeat's work is done)
        while (cluster := engine.health()["Cluster"])["Store"] != "reachable":
            await asyncio.sleep(0.02)
    assert cluster["LastHeartbeatSecondsAgo"] < 1, cluster


async def test_a_node_taken_for_dead_stops_the_runs_that_were_ended_for_it(
    engine: Engine, node_x: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # node-a cut off past its lease while node-x reached the store: node-x ended node-a's run
    # FAILED (NodeLost) and its slot went to others, but the run went on to its end on node-a
    # (its result lost, the function's concurrency exceeded meanwhile).
    accepted = await engine.accept(Envelope(id=new_id(), source="/t", type="t", function="sleepy", trigger="http", data={"seconds": 60}))
    request_id = accepted.request_id
    deadline = time.monotonic() + 10
    while (run := engine._runs.get(request_id)) is None or run.instance is None:
        assert time.monotonic() < deadline, "the run never started"
        await asyncio.sleep(0.05)
    outage = Outage(engine, monkeypatch)
    await outage.start()
    await node_x.pool.execute("UPDATE nodes SET heartbeat_at = now() - interval '5 seconds' WHERE node_id = 'node-a'")
    assert await node_x.fail_runs_of(["node-a"], now_rfc3339(), NODE_LOST, node_lost, lease=LEASE) == [(request_id, "sleepy")]
    await outage.end()
    while request_id in engine._runs or engine.dispatcher.running("sleepy"):
        assert time.monotonic() < deadline + 5, "the run went on"
        await asyncio.sleep(0.05)
    ended = await engine.get(request_id)
    assert (ended.status, ended.error_type) == (Status.FAILED, NODE_LOST), ended
    assert "ABORTED" not in (await engine.read_log(request_id)).decode(), "its NodeLost end is its only end"
    assert "node-a" in [n.node_id for n in await node_x.nodes()], "node-a joined again"


async def test_a_follower_reads_the_closing_line_of_a_run_whose_node_was_lost(engine: Engine, node_x: PostgresStore) -> None:
    # The end was once committed (and announced) before its closing line was written: the
    # follower ended with the run, without that line. Now both go in one commit.
    await node_x.join("http://x", LEASE)
    request_id = await running_on(node_x)
    await node_x.append_logs([(request_id, b"2026-01-01T00:00:00.000Z tick 1\n")])
    lines: list[str] = []

    async def follow() -> None:
        async for line in await engine.follow_log(request_id):
            lines.append(line)

    follower = asyncio.create_task(follow())
    deadline = time.monotonic() + 5
    while not lines:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    await node_x.pool.execute("UPDATE nodes SET heartbeat_at = now() - interval '5 seconds' WHERE node_id = 'node-x'")
    await asyncio.wait_for(follower, 10)
    assert lines[0].endswith(" tick 1") and len(lines) == 2, lines
    assert " [eventrun] run ended FAILED: NodeLost: node node-x running this run stopped answering" in lines[1], lines
    assert "\n".join(lines) + "\n" == (await engine.read_log(request_id)).decode(), "every line once, in order"


async def _in_store(postgres: str, query: str, *args: object) -> object:
    """One value read on a connection of its own (the engine's pool is closed once it stopped)."""
    connection = await asyncpg.connect(postgres)
    try:
        return await connection.fetchval(query, *args)
    finally:
        await connection.close()


async def test_a_node_that_stops_ends_the_runs_whose_ends_the_store_refused_before_it_leaves(
    postgres: str, engine: Engine
) -> None:
    # A run RUNNING under node-a in the store that node-a no longer runs: its end was refused
    # through an outage as the node stopped. Left so, with node-a gone from the registry, no
    # other node would ever take it for dead.
    request_id = await running_on(engine.store)
    await engine.stop()
    row = await _in_store(postgres, "SELECT status || ' ' || error_type FROM invocations WHERE request_id = $1::uuid", request_id)
    assert row == "FAILED ServerStopped"
    assert await _in_store(postgres, "SELECT count(*) FROM nodes WHERE node_id = 'node-a'") == 0


async def test_a_node_that_cannot_end_them_as_it_stops_stays_registered_for_the_others_to_judge(
    postgres: str, engine: Engine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    request_id = await running_on(engine.store)

    async def refused(*args: object, **kwargs: object) -> None:
        raise StoreError("the PostgreSQL store cannot serve this now (ConnectionRefusedError: [Errno 111])")

    monkeypatch.setattr(engine.store, "fail_runs_of", refused)
    await engine.stop()
    assert await _in_store(postgres, "SELECT status FROM invocations WHERE request_id = $1::uuid", request_id) == "RUNNING"
    assert await _in_store(postgres, "SELECT count(*) FROM nodes WHERE node_id = 'node-a'") == 1, "its lease will run out"
    assert "it stays in the cluster's registry" in caplog.text
