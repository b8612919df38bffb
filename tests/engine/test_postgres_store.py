"""What the PostgreSQL store adds for several nodes: claims, leases, shipped logs, notices, its schema."""

from __future__ import annotations

import asyncio
import inspect
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from postgres_service import Link, as_user

from eventrun.engine.api import Invocation, Status
from eventrun.engine.cluster import Cluster
from eventrun.engine.dispatcher import Dispatcher
from eventrun.engine.envelope import new_id, now_rfc3339, request_ids
from eventrun.engine.logs import LeftOut
from eventrun.engine.errors import StoreError
from eventrun.engine.postgres import ENDED, MIGRATIONS, QUEUED, TERMINATE, NodeIdInUse, PostgresStore, migrate
from eventrun.engine.store import NewInvocation


def rows(n: int, *, function: str = "f", prefix: str = "e") -> list[NewInvocation]:
    seq, ids = request_ids(n)
    now = now_rfc3339()
    return [
        NewInvocation(rid, function, f"/http/{function}", f"{prefix}{i}", "http", now, b'{"n":%d}' % i, seq + i)
        for i, rid in enumerate(ids)
    ]


@pytest.fixture
async def other(postgres: str, postgres_store: PostgresStore) -> AsyncIterator[PostgresStore]:
    """A second node's store on the same database."""
    store = PostgresStore(postgres, "node-b")
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def test_claims_take_the_oldest_first_and_never_pass_the_cap_across_nodes(
    postgres_store: PostgresStore, other: PostgresStore
) -> None:
    accepted = rows(20)
    await postgres_store.accept(accepted)
    # Many claims at once from two nodes: the function's RUNNING runs stay at the cap (3).
    claims = await asyncio.gather(*(store.claim("f", 2, 3) for store in [postgres_store, other] * 5))
    claimed = sorted(rid for claim in claims for rid in claim)
    assert claimed == [r.request_id for r in accepted[:3]], "the three oldest, once each"
    # A run that ends frees its slot for the next oldest.
    assert await postgres_store.finish(claimed[0], Status.FINISHED, now_rfc3339())
    assert await other.claim("f", 5, 3) == [accepted[3].request_id]


async def test_a_claimed_run_starts_only_on_its_node_and_once(postgres_store: PostgresStore, other: PostgresStore) -> None:
    (run,) = rows(1)
    await postgres_store.accept([run])
    assert await postgres_store.claim("f", 1, 10) == [run.request_id]
    assert not await other.mark_running(run.request_id, now_rfc3339()), "another node's claim"
    started_at = now_rfc3339()
    assert await postgres_store.mark_running(run.request_id, started_at)
    assert not await postgres_store.mark_running(run.request_id, "2000-01-01T00:00:00.000Z"), "it started already"
    # The same start tried again (its first answer lost) is taken as itself; never from another node.
    assert await postgres_store.mark_running(run.request_id, started_at)
    assert not await other.mark_running(run.request_id, started_at)


async def test_runs_claimed_but_not_started_go_back_to_the_queue(postgres_store: PostgresStore, other: PostgresStore) -> None:
    accepted = rows(2)
    await postgres_store.accept(accepted)
    claimed = await postgres_store.claim("f", 2, 10)
    await postgres_store.unclaim(claimed)
    assert await other.claim("f", 2, 10) == claimed
    invocation = await other.get(claimed[0])
    assert invocation is not None and invocation.status is Status.QUEUED, "claimed, not started: still QUEUED to its users"
    assert (await other.list(status=Status.QUEUED))[0][0].request_id == claimed[1]


async def test_a_dead_node_s_running_runs_end_failed_and_it_leaves_the_registry(
    postgres_store: PostgresStore, other: PostgresStore
) -> None:
    await postgres_store.join("http://a", 0.2)
    await other.join("http://b", 5.0)
    running, claimed, queued = rows(3)
    await postgres_store.accept([running, claimed, queued])
    await postgres_store.claim("f", 2, 10)
    assert await postgres_store.mark_running(running.request_id, now_rfc3339())
    async def reap() -> list[tuple[str, str]]:
        return await other.fail_runs_of(["node-a"], now_rfc3339(), "NodeLost", lambda node: f"{node} is gone", lease=0.2)

    assert await reap() == [], "node-a is not silent past the lease yet"
    await asyncio.sleep(0.3)
    assert await other.heartbeat()
    ended = await reap()
    assert ended == [(running.request_id, "f")]
    assert await reap() == [], "once"
    failed = await other.get(running.request_id)
    assert failed is not None and failed.status is Status.FAILED
    assert (failed.error_type, failed.error_message) == ("NodeLost", "node-a is gone")
    log, _ = await other.read_log(running.request_id)
    assert log == f"{failed.ended_at} [eventrun] run ended FAILED: NodeLost: node-a is gone\n".encode(), "its closing line, with its end"
    assert failed.duration_ms is not None and failed.duration_ms >= 0
    assert (await other.get(queued.request_id)).status is Status.QUEUED  # type: ignore[union-attr]
    assert await other.claim("f", 5, 10) == [claimed.request_id, queued.request_id], "what it claimed is queued again"
    assert [n.node_id for n in await other.nodes()] == ["node-b"]
    assert not await postgres_store.heartbeat(), "a node taken off the registry learns it at its next heartbeat"


async def test_a_live_node_id_is_refused_and_a_silent_one_taken_over(postgres: str, postgres_store: PostgresStore) -> None:
    await postgres_store.join("http://a", 0.2)
    twin = PostgresStore(postgres, "node-a")
    await twin.open()
    try:
        with pytest.raises(NodeIdInUse, match="node id 'node-a' is held by a live node"):
            await twin.join("http://twin", 5.0)
        await asyncio.sleep(0.3)
        assert [n.heartbeat_age >= 0.2 for n in await twin.nodes()] == [True]
        await twin.join("http://twin", 0.2)  # silent past this lease: taken over
        assert [(n.node_id, n.url) for n in await twin.nodes()] == [("node-a", "http://twin")]
        assert await twin.heartbeat()
    finally:
        await twin.close()


async def test_a_terminated_run_not_started_ends_even_claimed_and_its_node_does_not_start_it(
    postgres_store: PostgresStore, other: PostgresStore
) -> None:
    # A claimed run reads QUEUED: ended in the store by whichever node is asked, its claim goes
    # with it. Left to the claiming node, a terminate raced the run's start there.
    running, claimed, queued = rows(3)
    await postgres_store.accept([running, claimed, queued])
    await postgres_store.claim("f", 2, 10)
    assert await postgres_store.mark_running(running.request_id, now_rfc3339())
    assert not await other.finish(running.request_id, Status.ABORTED, now_rfc3339(), queued_only=True), "it started"
    assert await postgres_store.owner(running.request_id) == "node-a"
    assert await other.finish(claimed.request_id, Status.ABORTED, now_rfc3339(), queued_only=True)
    assert not await postgres_store.mark_running(claimed.request_id, now_rfc3339()), "ended before its node started it"
    ended_at = now_rfc3339()
    assert await other.finish(queued.request_id, Status.ABORTED, ended_at, error_type="Aborted", error_message="asked", queued_only=True)
    # No node holds these runs' logs: the closing line was written with the end, in one commit.
    log, _ = await postgres_store.read_log(queued.request_id)
    assert log == f"{ended_at} [eventrun] run ended ABORTED: Aborted: asked\n".encode()
    assert (await postgres_store.read_log(running.request_id))[0] == b"", "an end not recorded writes no line"


async def test_a_terminate_is_kept_with_the_run_until_its_node_reads_it(
    postgres_store: PostgresStore, other: PostgresStore
) -> None:
    heard: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    listener = await postgres_store.listen(lambda channel, payload: heard.put_nowait((channel, payload)), lambda: None)
    try:
        running, queued = rows(2)
        await postgres_store.accept([running, queued])
        await postgres_store.claim("f", 1, 10)
        assert await postgres_store.mark_running(running.request_id, now_rfc3339())
        assert await other.request_abort(queued.request_id) is None, "no node holds it"
        assert await other.request_abort(running.request_id) == "node-a"
        assert await asyncio.wait_for(heard.get(), 5) == (TERMINATE, f"node-a {running.request_id}")
        assert await postgres_store.aborts_requested() == [running.request_id], "also without the notice"
        assert await other.aborts_requested() == [], "only the node running it is asked"
        await postgres_store.finish(running.request_id, Status.ABORTED, now_rfc3339())
        assert await postgres_store.aborts_requested() == [], "an ended run is asked nothing"
    finally:
        await listener.close()


async def test_each_node_is_judged_by_its_own_lease(postgres_store: PostgresStore, other: PostgresStore) -> None:
    # A node with a short lease took healthy nodes with a longer one for dead, ending their runs.
    await postgres_store.join("http://a", 30.0)
    await other.join("http://b", 0.2)
    (run,) = rows(1)
    await postgres_store.accept([run])
    await postgres_store.claim("f", 1, 10)
    assert await postgres_store.mark_running(run.request_id, now_rfc3339())
    await asyncio.sleep(0.4)
    assert await other.heartbeat()
    assert await other.fail_runs_of(["node-a"], now_rfc3339(), "NodeLost", lambda node: "gone", lease=0.2) == []
    assert (await other.get(run.request_id)).status is Status.RUNNING  # type: ignore[union-attr]
    assert {(n.node_id, n.lease) for n in await other.nodes()} == {("node-a", 30.0), ("node-b", 0.2)}
    await asyncio.sleep(0.3)
    assert await postgres_store.fail_runs_of(["node-b"], now_rfc3339(), "NodeLost", lambda node: "gone", lease=30.0) == []
    assert [n.node_id for n in await postgres_store.nodes()] == ["node-a"], "node-b, silent past its own 0.2 s"


async def test_a_database_of_the_schema_before_is_migrated_and_its_nodes_judged_by_the_observer(postgres: str) -> None:
    conn = await asyncpg.connect(postgres)
    try:
        await conn.execute("CREATE TABLE eventrun_schema (version int NOT NULL)")
        for number, sql in enumerate(MIGRATIONS[:3], start=1):
            await conn.execute(sql)
            await conn.execute("INSERT INTO eventrun_schema (version) VALUES ($1)", number)
        # A node of the eventrun before, heard from 2 s ago; and a run it runs.
        await conn.execute(
            "INSERT INTO nodes (node_id, incarnation, url, heartbeat_at) VALUES ('old', 'i', 'http://old', now() - interval '2 seconds')"
        )
        (run,) = rows(1)
        await conn.execute(
            "INSERT INTO invocations (request_id, function, source, event_id, trigger, status, created_at, envelope, owner)"
            " VALUES ($1::uuid, 'f', 's', 'e', 'http', 'RUNNING', $2, '{}', 'old')",
            run.request_id, run.created_at,
        )
    finally:
        await conn.close()
    store = PostgresStore(postgres, "node-n")
    await store.open()
    try:
        assert [(n.node_id, n.lease) for n in await store.nodes()] == [("old", None)]
        assert await store.fail_runs_of(["old"], now_rfc3339(), "NodeLost", lambda node: "gone", lease=10.0) == []
        assert await store.request_abort(run.request_id) == "old", "within the observer's lease"
        assert await store.fail_runs_of(["old"], now_rfc3339(), "NodeLost", lambda node: "gone", lease=1.0) == [(run.request_id, "f")]
    finally:
        await store.close()


async def test_shipped_log_lines_read_back_in_order_and_from_where_a_reader_left(postgres_store: PostgresStore) -> None:
    (run,) = rows(1)
    await postgres_store.accept([run])
    await postgres_store.append_logs([(run.request_id, b"one\n"), (run.request_id, b"two\n")])
    whole, last = await postgres_store.read_log(run.request_id)
    assert whole == b"one\ntwo\n"
    await postgres_store.append_logs([(run.request_id, b"three\n")])
    assert (await postgres_store.read_log(run.request_id, last))[0] == b"three\n"
    assert await postgres_store.read_log("not-a-request-id") == (b"", 0)


@pytest.fixture
async def shipped(postgres_store: PostgresStore) -> tuple[NewInvocation, list[bytes]]:
    """A run whose log was shipped in 30 chunks of 10 lines each (of one size): the run, the chunks."""
    (run,) = rows(1)
    await postgres_store.accept([run])
    shipments = [b"".join(b"2026-12-06T00:00:00.000Z line %02d.%d\n" % (s, n) for n in range(10)) for s in range(30)]
    await postgres_store.append_logs([(run.request_id, shipment) for shipment in shipments])
    return run, shipments


async def test_a_log_is_read_a_piece_at_a_time_and_a_follower_gets_all_of_it(
    postgres_store: PostgresStore, shipped: tuple[NewInvocation, list[bytes]], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from eventrun.engine import cluster as cluster_module

    run, shipments = shipped
    piece, last = await postgres_store.read_log(run.request_id, 0, most=len(shipments[0]) * 2 + 1)
    assert piece == b"".join(shipments[:3])  # the chunks that begin within the bytes asked for
    assert (await postgres_store.read_log(run.request_id, last, most=1))[0] == shipments[3]  # at least one
    monkeypatch.setattr(cluster_module, "FOLLOW_CHUNK", len(shipments[0]) * 3)
    sizes: list[int] = []
    real = postgres_store.read_log

    async def read_log(request_id: str, after: int, most: int | None = None) -> tuple[bytes, int]:
        data, upto = await real(request_id, after, most)
        sizes.append(len(data))
        return data, upto

    monkeypatch.setattr(postgres_store, "read_log", read_log)
    cluster, _ = node(postgres_store, tmp_path)

    async def ended() -> Invocation:
        return state_of(run, Status.FINISHED)

    lines = [line async for line in cluster.follow_log(run.request_id, ended)]
    assert lines == b"".join(shipments).decode().splitlines()
    assert max(sizes) == len(shipments[0]) * 3 and len(sizes) == 11  # ten pieces, then nothing more


async def test_the_end_of_a_log_is_read_without_the_rest_and_a_whole_log_in_pieces(
    postgres_store: PostgresStore, shipped: tuple[NewInvocation, list[bytes]], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from eventrun.engine import cluster as cluster_module

    run, shipments = shipped
    size = len(shipments[0])
    # The chunks that hold the last bytes asked for, whole: two and a byte take three chunks.
    assert await postgres_store.read_log_end(run.request_id, size * 2 + 1) == b"".join(shipments[-3:])
    assert await postgres_store.read_log_end(run.request_id, 1) == shipments[-1]
    assert await postgres_store.read_log_end(run.request_id, size * 100) == b"".join(shipments)
    assert await postgres_store.read_log_end("not-a-request-id", 10) == b""
    monkeypatch.setattr(cluster_module, "FOLLOW_CHUNK", size * 4)
    cluster, _ = node(postgres_store, tmp_path)
    pieces = [piece async for piece in cluster.log_pieces(run.request_id)]
    assert [len(piece) for piece in pieces] == [size * 4] * 7 + [size * 2]
    assert b"".join(pieces) == b"".join(shipments)
    assert await cluster.read_log(run.request_id, last=size + 1) == b"".join(shipments[-2:])


async def test_a_follow_of_the_tail_of_a_shipped_log_reads_only_its_last_pieces(
    postgres_store: PostgresStore, shipped: tuple[NewInvocation, list[bytes]], tmp_path: Path
) -> None:
    run, shipments = shipped
    size = len(shipments[0])
    whole = b"".join(shipments)
    line = whole.index(b"\n") + 1  # (the lines are of one size)
    assert await postgres_store.read_log_tail(run.request_id, size * 2 + 1) == (b"".join(shipments[-2:]), 30, size * 28)
    assert await postgres_store.read_log_tail(run.request_id, line * 3 - 1) == (whole[-line * 2 :], 30, len(whole) - line * 2)
    assert await postgres_store.read_log_tail(run.request_id, size * 100) == (b"".join(shipments), 30, 0)
    assert await postgres_store.read_log_tail(new_id(), 10) == (b"", 0, 0)
    assert await postgres_store.read_log_tail("not-a-request-id", 10) == (b"", 0, 0)
    cluster, _ = node(postgres_store, tmp_path)

    async def ended() -> Invocation:
        return state_of(run, Status.FINISHED)

    seen = [line async for line in cluster.follow_log(run.request_id, ended, tail=1)]
    assert seen == [LeftOut(len(whole))], "the last line alone is longer"
    seen = [text async for text in cluster.follow_log(run.request_id, ended, tail=line * 3 + 1)]
    assert seen == [LeftOut(len(whole) - line * 3), *whole[-line * 3 :].decode().splitlines()], seen[:3]
    seen = [line async for line in cluster.follow_log(run.request_id, ended, tail=size * 100)]
    assert seen == b"".join(shipments).decode().splitlines(), "nothing left out: no LeftOut"


async def test_every_node_hears_of_new_runs_and_of_ends(postgres_store: PostgresStore, other: PostgresStore) -> None:
    heard: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    listener = await other.listen(lambda channel, payload: heard.put_nowait((channel, payload)), lambda: None)
    try:
        (run,) = rows(1, function="thumbs")
        await postgres_store.accept([run])
        await postgres_store.announce(["thumbs", "crops"])
        assert {await asyncio.wait_for(heard.get(), 5) for _ in range(2)} == {(QUEUED, "thumbs"), (QUEUED, "crops")}
        await postgres_store.finish(run.request_id, Status.ABORTED, now_rfc3339())
        assert await asyncio.wait_for(heard.get(), 5) == (ENDED, f"thumbs {run.request_id}")
        assert heard.empty()
    finally:
        await listener.close()


async def test_the_schema_is_versioned_and_a_newer_one_refused(postgres: str, postgres_store: PostgresStore) -> None:
    conn = await asyncpg.connect(postgres)
    try:
        assert await migrate(conn) == len(MIGRATIONS)  # again: nothing to do
        assert await conn.fetchval("SELECT max(version) FROM eventrun_schema") == len(MIGRATIONS)
        await conn.execute("INSERT INTO eventrun_schema (version) VALUES ($1)", len(MIGRATIONS) + 1)
    finally:
        await conn.close()
    newer = PostgresStore(postgres, "node-c")
    with pytest.raises(StoreError, match="newer than this eventrun knows"):
        await newer.open()
    await newer.close()


async def test_an_unreachable_server_is_a_clear_error_without_the_password() -> None:
    store = PostgresStore("postgresql://eventrun:s3cret@127.0.0.1:1/eventrun", "node-a")
    with pytest.raises(StoreError, match=r"cannot reach the PostgreSQL store at postgresql://eventrun:\*\*\*@127.0.0.1:1/eventrun") as caught:
        await store.open()
    assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://127.0.0.1:1/eventrun?password=QPW&sslmode=disable", "postgresql://127.0.0.1:1/eventrun?password=***&sslmode=disable"),
        ("postgresql://u@127.0.0.1:1/eventrun?sslmode=prefer&PASSWORD=QPW", "postgresql://u@127.0.0.1:1/eventrun?sslmode=prefer&PASSWORD=***"),
        ("postgresql://u:QPW@127.0.0.1:1/eventrun?sslpassword=QPW", "postgresql://u:***@127.0.0.1:1/eventrun?sslpassword=***"),
    ],
    ids=["password", "upper-case", "sslpassword"],
)
async def test_a_password_given_as_a_parameter_is_not_shown_either(url: str, shown: str) -> None:
    store = PostgresStore(url, "node-a")
    with pytest.raises(StoreError) as caught:
        await store.open()
    assert "QPW" not in str(caught.value) and f" at {shown}: " in str(caught.value), caught.value


async def test_one_event_handed_to_two_nodes_at_once_is_one_run(postgres_store: PostgresStore, other: PostgresStore) -> None:
    # As a Kafka batch is after a crash between acceptance and the offset commit, once the
    # partition moves: the same records reach another node, each with a fresh RequestId.
    mine, theirs = rows(50, prefix="3-"), rows(50, prefix="3-")
    answers = await asyncio.gather(postgres_store.accept(mine), other.accept(theirs))
    kept = [a.request_id for a in answers[0]]
    assert kept == [a.request_id for a in answers[1]], "both nodes answer with the same RequestIds"
    assert sum(a.created for pair in answers for a in pair) == 50
    assert await postgres_store.claim("f", 100, 100) == sorted(kept)


async def test_claims_a_failed_claim_left_behind_go_back_to_the_queue(
    postgres_store: PostgresStore, other: PostgresStore, tmp_path: Path
) -> None:
    # A claim committed whose answer was lost (a dropped connection): the node never heard of its
    # runs, which would stay CLAIMED, each holding a slot, until the node died. After a failed
    # claim the next heartbeat hands back the claims the node does not know of, and only those.
    cluster, dispatcher = node(postgres_store, tmp_path)
    accepted = rows(3)
    await postgres_store.accept(accepted)
    known = await postgres_store.claim("f", 1, 10)
    dispatcher.submit("f", *known)  # claimed and heard of: queued here
    lost = await postgres_store.claim("f", 2, 10)  # claimed, its answer lost
    assert sorted(await postgres_store.claimed_here()) == sorted(known + lost)

    await cluster._hand_back_unknown_claims()
    assert await postgres_store.claimed_here() == known
    assert await other.claim("f", 5, 10) == lost


async def test_a_log_follower_rides_out_a_store_that_cannot_serve(
    postgres_store: PostgresStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A PostgreSQL outage of a few seconds ended every follower with an InternalError while the
    # run went on; the follower now reads on once the store serves again.
    from eventrun.engine import cluster as cluster_module

    monkeypatch.setattr(cluster_module, "FOLLOW_RECHECK", 0.05)
    cluster, _ = node(postgres_store, tmp_path)
    (run,) = rows(1)
    await postgres_store.accept([run])
    await postgres_store.append_logs([(run.request_id, b"2026-12-06T00:00:00.000Z first\n")])
    real = postgres_store.read_log
    outage = {"reads": 3}

    async def read_log(request_id: str, after: int, most: int | None = None) -> tuple[bytes, int]:
        if outage["reads"]:
            outage["reads"] -= 1
            raise StoreError("the PostgreSQL store cannot serve this now (connection was closed in the middle of operation)")
        return await real(request_id, after, most)

    monkeypatch.setattr(postgres_store, "read_log", read_log)
    checks = iter([Status.RUNNING] * 4 + [Status.FINISHED])

    async def ended() -> Invocation:
        return state_of(run, next(checks))

    lines = [line async for line in cluster.follow_log(run.request_id, ended)]
    assert lines == ["2026-12-06T00:00:00.000Z first"] and outage["reads"] == 0


# What each public coroutine method of the store is called with when the database is gone.
_RUN = request_ids(1)[1][0]
_NOW = now_rfc3339()
CALLS: dict[str, tuple[Any, ...]] = {
    "keep_templates": ([b'{"specversion":"1.0"}'],),
    "accept": (rows(1),),
    "mark_running": (_RUN, _NOW),
    "begin": (_RUN, _NOW),
    "unclaim": ([_RUN],),
    "claimed_here": (),
    "claim": ("f", 1, 1),
    "finish": (_RUN, Status.FINISHED, _NOW),
    "replay": (rows(1)[0], _RUN),
    "prune": (0,),
    "set_destinations": ({"f": [("callback", "http://127.0.0.1:1/done")]},),
    "claim_deliveries": (1, 60.0, ["f"]),
    "settle_delivery": (1,),
    "release_deliveries": (),
    "outbox": (),
    "next_delivery": (),
    "links": (_RUN,),
    "replays_under": ("key", [_RUN]),
    "register_functions": ({"f": True}, _NOW),
    "put_state": ("k", "v"),
    "join": ("http://127.0.0.1:1", 10.0),
    "heartbeat": (),
    "leave": (),
    "nodes": (),
    "fail_runs_of": (["node-x"], _NOW, "NodeLost", str),
    "request_abort": (_RUN,),
    "aborts_requested": (),
    "notify": (QUEUED, "f"),
    "announce": (["f"],),
    "backlog": (),
    "append_logs": ([(_RUN, b"a line\n")],),
    "read_log": (_RUN,),
    "read_log_end": (_RUN, 100),
    "read_log_tail": (_RUN, 100),
    "get_state": ("k",),
    "get": (_RUN,),
    "owner": (_RUN,),
    "envelope": (_RUN,),
    "list": (),
    "counts": (),
    "count_active": ("f", "/http/f"),
    "find_event": ("f", "/http/f", "e0"),
}
# Not called while the database is gone: the lifecycle, and `listen`, whose OSError or asyncpg
# error Cluster takes as a reason to look for work at each heartbeat until it listens again.
NOT_CALLED = {"open", "start", "close", "stop", "listen"}


def test_the_writes_counted_as_refused_are_methods_of_the_store() -> None:
    # (a method renamed would drop out of eventrun_store_writes_refused_total without a word)
    from eventrun.engine.postgres import store as postgres_store

    methods = {name for name, member in inspect.getmembers(PostgresStore) if inspect.iscoroutinefunction(member)}
    assert postgres_store._WRITES <= methods, postgres_store._WRITES - methods


def test_every_public_method_of_the_store_is_called_in_the_outage_test() -> None:
    public = {
        name for name, member in inspect.getmembers(PostgresStore)
        if not name.startswith("_") and inspect.iscoroutinefunction(member)
    }
    assert public - NOT_CALLED == set(CALLS), "give CALLS the arguments of a new method (or say in NOT_CALLED why not)"


async def test_every_method_meets_a_database_that_is_gone_with_a_store_error(postgres: str, postgres_link: Link) -> None:
    # A timer with overlap = false stopped for good after a PostgreSQL outage: count_active let
    # a ConnectionRefusedError through where the timer tries a StoreError again (a 503 for the
    # API). Every method the serving node calls turns a lost database into a StoreError.
    store = PostgresStore(postgres_link.url(postgres), "node-a")
    await store.open()
    try:
        postgres_link.cut()
        leaks: dict[str, str] = {}
        for name, args in CALLS.items():
            try:
                await getattr(store, name)(*args)
            except StoreError:
                continue
            except Exception as exc:
                leaks[name] = f"{type(exc).__name__}: {exc}"
            else:
                leaks[name] = "no error (does it reach the database with these arguments?)"
        assert not leaks, leaks
    finally:
        await store.close()


async def test_an_outage_logs_no_traceback_of_the_driver_and_the_store_serves_after_it(
    postgres: str, postgres_link: Link, caplog: pytest.LogCaptureFixture
) -> None:
    # asyncpg logged "Failed to restore the pool connection floor" with a traceback of some 40
    # lines, again and again while the database was down; the store's callers say it once.
    caplog.set_level(logging.DEBUG, logger="asyncpg")
    store = PostgresStore(postgres_link.url(postgres), "node-a")
    await store.open()
    try:
        await store.accept(rows(2))
        postgres_link.cut()
        for _ in range(6):
            with pytest.raises(StoreError):
                await store.counts()
            await asyncio.sleep(0.25)
        postgres_link.mend()
        assert (await store.counts())["f"]["QUEUED"] == 2
    finally:
        await store.close()
    driver = [r for r in caplog.records if r.name.startswith("asyncpg")]
    assert not driver, [(r.name, r.getMessage()) for r in driver]


async def test_a_node_sets_the_destinations_of_its_manifest_s_functions_and_no_others(
    postgres_store: PostgresStore, other: PostgresStore
) -> None:
    # A node whose manifest lacked a function deleted that function's destinations for the
    # whole cluster: its runs' ends owed nothing any more, whichever node ran them.
    await postgres_store.set_destinations({"f": [("callback", "http://a/f")], "g": [("on_failure", "kafka:g-failed")]})
    await other.set_destinations({"f": [("callback", "http://b/f")], "h": []})  # (no g here)

    async def destinations() -> list[tuple[str, str, str]]:
        found = await postgres_store.pool.fetch("SELECT function, kind, target FROM destinations ORDER BY function")
        return [tuple(r) for r in found]

    assert await destinations() == [("f", "callback", "http://b/f"), ("g", "on_failure", "kafka:g-failed")]
    (run,) = rows(1, function="g")
    await postgres_store.accept([run])
    assert await other.finish(run.request_id, Status.FAILED, now_rfc3339(), error_type="E", error_message="m")
    owed = await other.pool.fetch("SELECT request_id::text, kind, target FROM outbox")
    assert [tuple(r) for r in owed] == [(run.request_id, "on_failure", "kafka:g-failed")]
    await other.set_destinations({"f": []})  # (a function its manifest has with none: it has none)
    assert await destinations() == [("g", "on_failure", "kafka:g-failed")]


async def test_a_user_without_rights_is_refused_at_open_naming_what_was_denied(postgres: str) -> None:
    # It crashed the start with a 36-line traceback (exit 1) where a wrong password gets one line.
    role = f"eventrun_user_{uuid.uuid4().hex[:8]}"
    url = as_user(postgres, role, "pw")
    admin = await asyncpg.connect(postgres)
    await admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'")
    try:
        refused = PostgresStore(url, "node-a")
        with pytest.raises(StoreError) as caught:
            await refused.open()
        assert str(caught.value) == (
            f"cannot use the PostgreSQL store at {url.replace(':pw@', ':***@')}: permission denied for schema public"
            " (InsufficientPrivilegeError); its user must be allowed to read and write the schema's tables,"
            " and the first start to create them"
        )
        with pytest.raises(RuntimeError, match="not open"):  # (its connections closed)
            refused.pool
        # Once a user that may create tables has made the schema, one that may only read and
        # write them runs a node.
        owner = PostgresStore(postgres, "node-a")
        await owner.open()
        await owner.close()
        await admin.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}")
        await admin.execute(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}")
        store = PostgresStore(url, "node-b")
        await store.open()
        try:
            await store.register_functions({"f": True}, now_rfc3339())
            await store.set_destinations({"f": [("callback", "http://127.0.0.1:1/done")]})
            await store.join("http://127.0.0.1:1", 10.0)
            (run,) = rows(1)
            await store.accept([run])
            assert await store.claim("f", 1, 1) == [run.request_id]
            assert await store.begin(run.request_id, now_rfc3339()) is not None
            await store.append_logs([(run.request_id, b"a line\n")])
            assert await store.finish(run.request_id, Status.FINISHED, now_rfc3339())
            assert (await store.outbox()).pending == 1
        finally:
            await store.close()
    finally:
        await admin.execute(f"DROP OWNED BY {role}")
        await admin.execute(f"DROP ROLE {role}")
        await admin.close()


def state_of(run: NewInvocation, status: Status) -> Invocation:
    """The run as a follower reads its state: `status`, nothing more."""
    return Invocation(request_id=run.request_id, function=run.function, trigger=run.trigger, status=status, created_at=run.created_at)


def node(store: PostgresStore, data_dir: Path) -> tuple[Cluster, Dispatcher]:
    """A Cluster on the store whose dispatcher starts nothing (its runs wait in its queue)."""
    async def never(function: str, request_id: str) -> None:
        raise AssertionError("nothing starts here")

    async def nothing(*args: object) -> None:
        return None

    dispatcher = Dispatcher(concurrency={"f": 0}, qps_limits={"f": 1000}, max_running=8, execute=never)
    cluster = Cluster(
        store, data_dir=data_dir, url="http://127.0.0.1:1", lease=10.0, concurrency={"f": 10},
        qps_limits={"f": 1000}, dispatcher=dispatcher, ended_elsewhere=lambda rid: None,
        failed_here=nothing, terminate_here=nothing, lost_here=nothing,
    )
    return cluster, dispatcher


async def test_a_state_value_under_an_older_fence_never_overwrites_a_newer_one(
    postgres_store: PostgresStore, other: PostgresStore, caplog: pytest.LogCaptureFixture
) -> None:
    # A node whose Kafka session expired (paused, cut off) wrote its partition marks, when it
    # came back, over those of the node that took the partition over: the write was unconditional.
    key = "kafka:g:orders:0"
    await postgres_store.put_state(key, "[8,\"a7\",0]")  # an earlier eventrun's row: no fence
    newer = '{"fence":4294967298,"mark":[3,"b2",1]}'  # era 1, generation 2: the new holder
    await other.put_state(key, newer)  # a row without a fence is written over
    assert await postgres_store.get_state(key) == newer
    with caplog.at_level(logging.INFO, logger="eventrun.engine.postgres.store"):
        await postgres_store.put_state(key, '{"fence":4294967297,"mark":[12,"a11",0]}')  # the stale holder
        await postgres_store.put_state(key, '{"fence":1,"mark":[12,"a11",0]}')  # an earlier era
    assert await other.get_state(key) == newer
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, f"state {key} not written: it was written under fence 4294967298 since, and this write's"
                          " fence 4294967297 is older (its writer no longer holds it)"),
        (logging.WARNING, f"state {key} not written: it was written under fence 4294967298 since, and this write's"
                          " fence 1 is older (its writer no longer holds it)"),
    ]
    again = '{"fence":4294967298,"mark":[5,"b4",1]}'  # the holder itself, again
    await other.put_state(key, again)
    assert await postgres_store.get_state(key) == again
    later = '{"fence":4294967299,"mark":[5,"b4",1]}'
    await postgres_store.put_state(key, later)
    assert await other.get_state(key) == later
    # Values without a fence (the timer's slots, a trigger's start) are written as before.
    await other.put_state("timer:f:nightly", "2026-01-01T02:00:00Z")
    await postgres_store.put_state("timer:f:nightly", "2026-01-02T02:00:00Z")
    assert await other.get_state("timer:f:nightly") == "2026-01-02T02:00:00Z"
    await postgres_store.put_state("kafka:g:orders:start", '{"started":true}')
    assert await other.get_state("kafka:g:orders:start") == '{"started":true}'


async def test_a_stale_writer_racing_the_new_holder_never_wins(postgres_store: PostgresStore, other: PostgresStore) -> None:
    # The condition is checked in the write itself, not read first: whatever the interleaving.
    key = "kafka:g:orders:1"
    for n in range(20):
        stale = '{"fence":%d,"mark":[%d,"old",0]}' % (2 * n + 1, n)
        fresh = '{"fence":%d,"mark":[%d,"new",0]}' % (2 * n + 2, n)
        await asyncio.gather(postgres_store.put_state(key, stale), other.put_state(key, fresh))
        assert await postgres_store.get_state(key) == fresh
