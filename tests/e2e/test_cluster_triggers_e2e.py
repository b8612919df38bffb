"""Triggers on a cluster: a Kafka group split over nodes, a timer on every node, one webhook sent to two nodes.

Each node runs every trigger of the manifest; the shared store's UNIQUE (function, source, id)
is what makes an event that reaches several nodes (a redelivered record, a timer slot, a
retried webhook) run once.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer
from server_process import ENDED, ServerProcess, handler, poll_until
from eventrun.triggers.timer import parse_slot
from kafka_service import KafkaService, kafka, unique  # noqa: F401
from test_cluster_e2e import Cluster, cluster  # noqa: F401

pytestmark = pytest.mark.e2e

TOKEN = "cluster-token"
MINIO_BODY = json.loads((Path(__file__).parents[1] / "samples" / "minio_webhook.json").read_text())


async def health(cluster: Cluster, node: ServerProcess) -> dict[str, Any]:  # noqa: F811
    """GET /healthz of one node."""
    reply = await cluster.api(node).request("GET", "/healthz")
    assert reply.status == 200, reply.text
    return reply.json  # type: ignore[no-any-return]


def node_id(node: ServerProcess) -> str:
    """The [cluster] node_id a node was started with."""
    return node.node_id  # type: ignore[attr-defined,no-any-return]


async def all_ended(cluster: Cluster, function: str, count: int, timeout: float) -> list[asyncpg.Record]:  # noqa: F811
    """The function's runs, once there are `count` of them (or more) and every one has ended."""

    async def ended() -> list[asyncpg.Record] | None:
        rows = await cluster.runs(
            "SELECT request_id::text, source, convert_from(event_id, 'UTF8') AS event_id, status, error_type, owner, result"
            " FROM invocations WHERE function = $1",
            function,
        )
        return rows if len(rows) >= count and all(r["status"] in ENDED for r in rows) else None

    try:
        return await poll_until(ended, timeout, f"{count} runs of {function} never all ended", interval=0.25)
    except AssertionError as exc:
        rows = await cluster.runs(
            "SELECT status, count(*) FROM invocations WHERE function = $1 GROUP BY status", function
        )
        by_status = {status: n for status, n in rows}
        raise AssertionError(f"{exc}; runs by status: {by_status}") from None


# --------------------------------------------------------------------------- Kafka


async def test_a_kafka_group_split_over_two_nodes_runs_each_record_once_when_one_is_killed(
    cluster: Cluster, kafka: KafkaService  # noqa: F811
) -> None:
    topic = await kafka.create_topic(unique("split"), partitions=4)
    trigger = {"type": "kafka", "topic": topic, "group_id": unique("group"), "starting_position": "earliest"}
    functions = {"fn": {"handler": handler("kafka_id"), "concurrency": 8, "triggers": [trigger]}}
    nodes = cluster.start(functions, n=2, kafka={"bootstrap_servers": kafka.bootstrap})
    consumer = f"fn:{topic}"

    async def partitions() -> dict[str, list[int]]:
        return {node_id(n): (await health(cluster, n))["Triggers"]["kafka"][consumer]["Partitions"] for n in nodes}

    async def split() -> dict[str, list[int]] | None:
        held = await partitions()
        every = sorted(p for ps in held.values() for p in ps)
        return held if all(held.values()) and every == [0, 1, 2, 3] else None

    await poll_until(split, 40, "the two nodes never split the four partitions between them", interval=0.2)

    sent: list[tuple[int, int]] = []
    first_wave = 400

    async def trickle() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
        await producer.start()
        try:
            for i in range(first_wave):
                value = json.dumps({"i": i, "sleep": 0.05}).encode()
                meta = await producer.send_and_wait(topic, value, key=f"k{i}".encode(), partition=i % 4)
                sent.append((meta.partition, meta.offset))
                await asyncio.sleep(0.01)
        finally:
            await producer.stop()

    async def count() -> int:
        [(n,)] = await cluster.runs("SELECT count(*) FROM invocations WHERE function = 'fn'")
        return int(n)

    producing = asyncio.create_task(trickle())
    try:
        await poll_until(lambda: _at_least(count, 100), 30, "100 records were never accepted", interval=0.02)
        # The node with the most runs going dies: the runs it owns end NodeLost, its queue and its
        # partitions go to the survivor (which may read again what it accepted but had not committed).
        running = await cluster.runs("SELECT owner, count(*) FROM invocations WHERE status = 'RUNNING' GROUP BY owner")
        busiest = max(running, key=lambda r: r[1])[0] if running else node_id(nodes[0])
        victim = next(n for n in nodes if node_id(n) == busiest)
        survivor = next(n for n in nodes if n is not victim)
        victim_partitions = (await partitions())[node_id(victim)]
        accepted_at_kill = await count()
        victim.kill9()
        await producing
    finally:
        producing.cancel()
    assert victim_partitions, "the killed node held no partition"
    assert accepted_at_kill < first_wave, "the kill came after the whole first wave was accepted; nothing was tested"
    # More records after the kill, also on the partitions the dead node held.
    sent += await kafka.produce_json(topic, [{"i": first_wave + i} for i in range(100)], partitions=4)

    rows = await all_ended(cluster, "fn", len(sent), 60)
    ids = Counter(r["event_id"] for r in rows)
    expected = {f"{p}-{o}" for p, o in sent}
    assert len(expected) == len(sent)
    twice = sorted(i for i, n in ids.items() if n > 1)
    assert not twice, f"records with more than one run: {twice[:20]}"
    missing = sorted(expected - set(ids))
    assert not missing, f"{len(missing)} records never ran: {missing[:20]}"
    extra = sorted(set(ids) - expected)
    assert not extra, f"runs of no produced record: {extra[:20]}"
    assert {r["source"] for r in rows} == {f"kafka://{topic}"}
    for row in rows:
        if row["status"] == "FINISHED":
            assert json.loads(row["result"]) == {"id": row["event_id"], "source": f"kafka://{topic}"}, row
        else:
            assert row["status"] == "FAILED" and row["error_type"] == "NodeLost", dict(row)
            assert row["owner"] == node_id(victim), dict(row)
    owners = Counter(r["owner"] for r in rows)
    assert owners[node_id(victim)] > 0 and owners[node_id(survivor)] > 0, owners
    # The survivor took the dead node's partitions over.
    assert (await health(cluster, survivor))["Triggers"]["kafka"][consumer]["Partitions"] == [0, 1, 2, 3]


async def _at_least(count: Callable[[], Awaitable[int]], n: int) -> bool:
    return bool(await count() >= n)


@pytest.mark.timeout(300)
async def test_a_kafka_log_that_started_over_keeps_its_epoch_when_a_partition_moves_or_a_node_restarts(
    cluster: Cluster, kafka: KafkaService  # noqa: F811
) -> None:
    # Each node wrote the topic's marks as one row holding its own partitions only, and read it
    # only at its start: a partition that moved (a node stopped, or came back) went on in the new
    # log under no epoch, with the ids of the old log's runs, and its records never ran.
    if not kafka.can_restart:
        pytest.skip("needs a broker this test may stop (Tansu), not EVENTRUN_TEST_KAFKA")
    topic = await kafka.create_topic(unique("again"), partitions=2)
    trigger = {"type": "kafka", "topic": topic, "group_id": unique("group"), "starting_position": "earliest"}
    functions = {"fn": {"handler": handler("kafka_id"), "concurrency": 4, "triggers": [trigger]}}
    nodes = cluster.start(functions, n=2, kafka={"bootstrap_servers": kafka.bootstrap})
    consumer = f"fn:{topic}"
    expected: set[str] = set()

    async def partitions(among: list[ServerProcess]) -> dict[str, list[int]]:
        return {node_id(n): (await health(cluster, n))["Triggers"]["kafka"][consumer]["Partitions"] for n in among}

    async def split(among: list[ServerProcess]) -> dict[str, list[int]]:
        async def each_one() -> dict[str, list[int]] | None:
            held = await partitions(among)
            every = sorted(p for ps in held.values() for p in ps)
            return held if every == [0, 1] and all(len(ps) == 2 // len(among) for ps in held.values()) else None

        try:
            return await poll_until(each_one, 60, "", interval=0.2)  # type: ignore[no-any-return]
        except AssertionError:
            raise AssertionError(f"the partitions never went one node each: {await partitions(among)}") from None

    async def produce(wave: str, count: int, epoch: str = "-1") -> None:
        sent = await kafka.produce_json(topic, [{wave: i} for i in range(count)], partitions=2)
        expected.update(f"{p}-{o}{epoch}" for p, o in sent)

    async def every_record_ran_once() -> None:
        async def all_there() -> bool:
            rows = await cluster.runs("SELECT convert_from(event_id, 'UTF8'), status FROM invocations WHERE function = 'fn'")
            return {r[0] for r in rows} >= expected and all(r[1] in ENDED for r in rows)

        try:
            await poll_until(all_there, 40, "", interval=0.25)
        except AssertionError:
            pass  # told below: which records
        rows = await all_ended(cluster, "fn", 0, 20)
        ids = Counter(r["event_id"] for r in rows)
        missing = sorted(expected - set(ids))
        assert not missing, f"{len(missing)} records never ran: {missing}; ran: {sorted(ids)}"
        assert set(ids) == expected and max(ids.values()) == 1, ids
        assert all(r["status"] == "FINISHED" for r in rows), [dict(r) for r in rows if r["status"] != "FINISHED"]

    await split(nodes)
    await produce("old", 10, epoch="")  # offsets 0-4 of each partition
    await every_record_ran_once()

    # The broker loses its logs; the topic is made again. Each node finds its partition's log
    # started over, and reads it under epoch 1.
    kafka.stop_broker()
    await kafka.start_broker()
    await kafka.create_topic(topic, partitions=2)
    await split(nodes)
    await produce("new", 2)  # offset 0 of each partition
    await every_record_ran_once()
    await split(nodes)  # (each node read its own partition's new log)

    # One node stops; the other takes its partition over, where the new log stands.
    victim, survivor = nodes
    assert victim.stop() == 0, victim.log_text()
    await split([survivor])
    await produce("moved", 4)  # offsets 1-2 of each partition: without the epoch, ids of old runs
    await every_record_ran_once()

    # It comes back and is given a partition again.
    victim.restart()
    await split(nodes)
    await produce("back", 4)  # offsets 3-4 of each partition
    await every_record_ran_once()
    assert len(expected) == 10 + 2 + 4 + 4


def _mark_next(raw: str | None) -> int | None:
    """The next offset of a partition's mark as its state row holds it (with or without a fence)."""
    if raw is None:
        return None
    document = json.loads(raw)
    return int((document["mark"] if isinstance(document, dict) else document)[0])


@pytest.mark.timeout(240)
async def test_a_node_paused_past_its_kafka_session_never_writes_its_marks_over_the_new_holder_s(
    cluster: Cluster, kafka: KafkaService  # noqa: F811
) -> None:
    # A node paused (SIGSTOP) while it held marks it had not written down lost its partition to
    # another node when its session expired; back, it wrote those marks over the row the new
    # holder had written since (the store's write was unconditional).
    topic = await kafka.create_topic(unique("paused"), partitions=1)
    group = unique("group")
    trigger = {"type": "kafka", "topic": topic, "group_id": group, "starting_position": "earliest"}
    functions = {"fn": {"handler": handler("kafka_id"), "concurrency": 8, "triggers": [trigger]}}
    nodes = cluster.start(functions, n=2, kafka={"bootstrap_servers": kafka.bootstrap})
    consumer, key = f"fn:{topic}", f"kafka:{group}:{topic}:0"

    async def holder(among: list[ServerProcess]) -> ServerProcess | None:
        for node in among:
            if (await health(cluster, node))["Triggers"]["kafka"][consumer]["Partitions"] == [0]:
                return node
        return None

    async def row() -> int | None:
        found = await cluster.runs("SELECT value FROM state WHERE key = $1", key)
        return _mark_next(found[0]["value"]) if found else None

    async def accepted() -> int:
        [(n,)] = await cluster.runs("SELECT count(*) FROM invocations WHERE function = 'fn'")
        return int(n)

    paused = await poll_until(lambda: holder(nodes), 40, "no node was given the partition", interval=0.2)
    other = next(n for n in nodes if n is not paused)
    # A steady trickle: the holder writes its marks down about once a second, so it holds some
    # it has not written when it is paused.
    stop_trickle = asyncio.Event()

    async def trickle() -> int:
        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", linger_ms=0)
        await producer.start()
        try:
            sent = 0
            while not stop_trickle.is_set():
                await producer.send_and_wait(topic, json.dumps({"i": sent}).encode(), partition=0)
                sent += 1
                await asyncio.sleep(0.02)
            return sent
        finally:
            await producer.stop()

    producing = asyncio.create_task(trickle())
    try:
        await poll_until(lambda: _at_least(accepted, 60), 30, "the trickle was never accepted", interval=0.05)
        os.kill(paused.pid, signal.SIGSTOP)
        try:
            before, taken = await row(), await accepted()  # (offsets 0 .. taken - 1)
            stop_trickle.set()
            sent = await producing
            assert before is not None and before < taken, (
                f"the paused node had written down all its marks ({before} of {taken}): nothing to test"
            )
            # Its session expires: the other node is given the partition, and moves the marks on.
            await poll_until(lambda: holder([other]), 60, "the other node never took the partition over", interval=0.5)
            await kafka.produce_json(topic, [{"after": i} for i in range(20)])
            moved_on = sent + 20
            await poll_until(lambda: _at_least(accepted, moved_on), 30, "the new holder accepted nothing", interval=0.1)

            async def written() -> bool:
                return await row() == moved_on

            await poll_until(written, 20, "the new holder never wrote its marks down", interval=0.1)
        finally:
            os.kill(paused.pid, signal.SIGCONT)
        # Back, it finds its session gone and lets the partition go, writing its marks down: the
        # store refuses them (or, before fences, they went over the new holder's).
        refused = f"state {key} not written"

        async def tried() -> bool:
            return await _logged(paused, refused) or await row() != moved_on

        await poll_until(tried, 60, "the paused node never wrote its marks", interval=0.2)
        assert await row() == moved_on, "the paused node's marks went over the new holder's"
        await poll_until(lambda: holder(nodes), 60, "no node holds the partition again", interval=0.2)
        await asyncio.sleep(2)  # the marks after the holder's next saves
        assert await row() == moved_on, "the paused node's marks went over the new holder's"
        assert await accepted() == moved_on  # each record once
    finally:
        stop_trickle.set()
        producing.cancel()


async def _logged(node: ServerProcess, text: str) -> bool:
    return text in node.log_text()


# --------------------------------------------------------------------------- timer


async def test_a_timer_on_three_nodes_fires_each_slot_once(cluster: Cluster) -> None:  # noqa: F811
    every_second = {"type": "timer", "name": "every", "cron": "* * * * * * *", "payload": {"n": 1}}
    nodes = cluster.start({"tick": {"handler": handler("timer_echo"), "triggers": [every_second]}}, n=3)

    async def slots() -> int:
        [(n,)] = await cluster.runs("SELECT count(DISTINCT event_id) FROM invocations WHERE function = 'tick'")
        return int(n)

    async def runs() -> int:
        [(n,)] = await cluster.runs("SELECT count(*) FROM invocations WHERE function = 'tick'")
        return int(n)

    async def schedules() -> list[dict[str, Any]]:
        return [(await health(cluster, n))["Triggers"]["timer"]["Schedules"][0] for n in nodes]

    # Five more slots with all three nodes up; then the runs in the store are those the nodes say they started.
    before = await slots()
    await poll_until(lambda: _at_least(slots, before + 5), 20, "five more slots never fired", interval=0.2)

    async def consistent() -> tuple[int, list[dict[str, Any]]] | None:
        seen = await schedules()
        stored = await runs()
        return (stored, seen) if sum(s["Fired"] for s in seen) == stored else None

    stored, seen = await poll_until(consistent, 10, "the slots the nodes started are not the runs in the store")
    assert all(s["Fired"] + s["Duplicates"] >= 3 for s in seen), seen
    assert sum(s["Duplicates"] for s in seen) > 0, f"no slot was seen by more than one node: {seen}"
    assert all(s["Errors"] == 0 and s["Failure"] is None for s in seen), seen

    rows = await all_ended(cluster, "tick", stored, 20)
    ids = Counter(r["event_id"] for r in rows)
    assert max(ids.values()) == 1, ids
    stamps = sorted(parse_slot(i) for i in ids)
    assert len(stamps) >= 5
    # One run per second, none missing: ids that differed between nodes would give more runs than seconds.
    assert stamps[-1] - stamps[0] == timedelta(seconds=len(stamps) - 1), [str(s) for s in stamps]
    assert {r["source"] for r in rows} == {"timer://tick/every"}
    for row in rows:
        assert row["status"] == "FINISHED", dict(row)
        event = json.loads(row["result"])["event"]
        assert event["id"] == row["event_id"] and event["data"] == {"n": 1}, event


# --------------------------------------------------------------------------- S3 webhook


async def test_one_minio_webhook_sent_to_two_nodes_runs_once(cluster: Cluster) -> None:  # noqa: F811
    s3_trigger = {"type": "s3", "bucket": "probe-bucket", "suffix": ".csv"}
    functions = {"s3fn": {"handler": handler("kafka_id"), "triggers": [s3_trigger]}}
    a, b = cluster.start(functions, n=2, s3={"webhook_token": TOKEN})
    headers = {"Authorization": f"Bearer {TOKEN}"}

    async def post(node: ServerProcess) -> Any:
        reply = await cluster.api(node).request("POST", "/triggers/s3", json=MINIO_BODY, headers=headers)
        assert reply.status == 200, reply.text
        return reply.json

    # At once (both inserts race on the constraint), then again on each (MinIO retrying).
    first_a, first_b = await asyncio.gather(post(a), post(b))
    again_a, again_b = await post(a), await post(b)
    replies = (first_a, first_b, again_a, again_b)
    answers = {tuple((x["FunctionName"], x["RequestId"]) for x in r["Accepted"]) for r in replies}
    assert len(answers) == 1, f"the nodes answered with different RequestIds: {answers}"
    ((function, request_id),) = answers.pop()
    assert function == "s3fn"
    [row] = await all_ended(cluster, "s3fn", 1, 20)
    assert row["request_id"] == request_id
    assert row["event_id"] == "ObjectCreated:Put:probe-bucket/in/My File ü.csv:1879B5C3F3E6A2C8"
    assert row["status"] == "FINISHED" and json.loads(row["result"])["source"] == "s3://probe-bucket", dict(row)
    [(n,)] = await cluster.runs("SELECT count(*) FROM invocations")
    assert n == 1
