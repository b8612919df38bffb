"""The kafka trigger end to end: a real broker (Tansu) -> eventrun -> functions in worker processes."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from eventrun.engine.api import Invocation, Status
from eventrun.engine.core import Engine
from eventrun.engine.manifest import Manifest, load_manifest
from eventrun.triggers.http import HttpTrigger
from eventrun.triggers.kafka import KafkaTrigger, Settings
from kafka_service import KafkaService, Record, kafka, produce_undecodable_header, unique  # noqa: F401
from server_process import to_toml

pytestmark = pytest.mark.e2e

HANDLERS = Path(__file__).parent / "handlers"

# Quick reactions for tests; Tansu's first group join takes half the session timeout.
FAST = {
    "session_timeout_ms": 6000,
    "probe_interval": 0.5,
    "backoff_min": 0.2,
    "backoff_max": 1.0,
    "stop_timeout": 5.0,
}


def handler(name: str) -> str:
    return f"{HANDLERS / f'{name}.py'}:main_handler"


def write_manifest(path: Path, tables: Mapping[str, Mapping[str, Any]], functions: Mapping[str, Mapping[str, Any]]) -> Path:
    path.write_text(to_toml({**tables, "functions": functions}))
    return path


@dataclass
class Server:
    """One eventrun in this process: engine, Kafka trigger, and (if asked) the HTTP gateway."""

    manifest: Manifest
    settings: Settings
    with_http: bool = False
    engine: Engine = field(init=False)
    trigger: KafkaTrigger = field(init=False)
    http: HttpTrigger | None = field(init=False, default=None)
    _running: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def start(self) -> Server:
        self.engine = Engine(self.manifest)
        self.trigger = KafkaTrigger(self.engine, self.manifest, settings=self.settings)
        await self.engine.start()
        self._running.append(self.engine.stop)
        if self.with_http:
            self.http = HttpTrigger(self.engine, "127.0.0.1", 0)
            await self.http.start()
            self._running.append(self.http.stop)
        await self.trigger.start()
        self._running.append(self.trigger.stop)
        self.engine.add_reporter("kafka", self.trigger.state)  # as `eventrun serve` does
        self.engine.add_metrics(self.trigger.metrics)
        return self

    async def stop(self) -> None:
        while self._running:
            await self._running.pop()()

    def metric(self, name: str) -> int:
        """The value of one eventrun_kafka_* metric of the (one) consumer in /metrics' text."""
        text = self.engine.metrics_text()
        found = re.findall(rf'^{name}\{{function="[^"]*",topic="[^"]*",group="[^"]*"\}} (\d+)$', text, re.M)
        assert len(found) == 1, text
        return int(found[0])

    @property
    def consumer_state(self) -> dict[str, Any]:
        (state,) = self.trigger.state().values()
        return state

    async def invocations(self, function: str) -> list[Invocation]:
        runs: list[Invocation] = []
        cursor = None
        while True:
            page, cursor = await self.engine.list(function=function, limit=1000, cursor=cursor)
            runs += page
            if cursor is None:
                return runs

    async def ended(self, function: str, count: int, timeout: float = 25.0) -> list[Invocation]:
        """Wait for `count` invocations of `function`, all ended; assert no more than that exist."""
        deadline = time.monotonic() + timeout
        while True:
            runs = await self.invocations(function)
            if len(runs) >= count and all(run.status.ended for run in runs):
                assert len(runs) == count, f"{len(runs)} runs for {count} records"
                return runs
            if time.monotonic() > deadline:
                statuses = sorted({r.status.value for r in runs})
                raise AssertionError(f"{function}: wanted {count} ended runs, have {len(runs)} {statuses}; {self.trigger.state()}")
            await asyncio.sleep(0.1)

    async def state_is(self, prefix: str, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not self.consumer_state["State"].startswith(prefix):
            if time.monotonic() > deadline:
                raise AssertionError(f"state never became {prefix!r}: {self.consumer_state}")
            await asyncio.sleep(0.05)
        return self.consumer_state


@pytest.fixture
async def servers(tmp_path: Path, kafka: KafkaService) -> AsyncIterator[Callable[..., Awaitable[Server]]]:  # noqa: F811
    """Factory: `await servers(functions, name="a", kafka_table=..., settings=..., http=False)`."""
    made: list[Server] = []

    async def make(
        functions: Mapping[str, Mapping[str, Any]],
        *,
        name: str = "a",
        server_table: Mapping[str, Any] | None = None,
        kafka_table: Mapping[str, Any] | None = None,
        settings: Mapping[str, Any] | None = None,
        http: bool = False,
        start: bool = True,
    ) -> Server:
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)
        tables = {
            "server": {"data_dir": str(folder / "data"), "shutdown_grace": "2s", "kill_grace": "1s", **(server_table or {})},
            "kafka": {"bootstrap_servers": kafka.bootstrap, **(kafka_table or {})},
        }
        manifest = load_manifest(write_manifest(folder / "eventrun.toml", tables, functions))
        options = {**FAST, **(settings or {})}
        configured = Settings.from_manifest(manifest, **options)
        server = Server(manifest, configured, with_http=http)
        made.append(server)
        return await server.start() if start else server

    yield make
    for server in made:
        await server.stop()


def kafka_function(handler_name: str, topic: str, **extra: Any) -> dict[str, Any]:
    trigger = {"type": "kafka", "topic": topic, "starting_position": "earliest"}
    trigger.update(extra.pop("trigger", {}))
    return {"handler": handler(handler_name), "triggers": [trigger], **extra}


async def delete_topic(kafka: KafkaService, topic: str) -> None:  # noqa: F811
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([topic])
    finally:
        await admin.close()


def ids(runs: list[Invocation]) -> list[str]:
    return [run.result["id"] for run in runs if run.status is Status.FINISHED]


# --------------------------------------------------------------------------- records in, runs out


async def test_each_record_runs_once_with_its_data(kafka: KafkaService, servers: Any) -> None:  # noqa: F811
    topic = await kafka.create_topic(unique("orders"), partitions=3)
    records = [
        Record(json.dumps({"order": i}).encode(), key=f"k{i}".encode(), headers=[("trace", f"t{i}".encode())], partition=i % 3)
        for i in range(30)
    ]
    sent = await kafka.produce(topic, records)
    server = await servers({"echo": kafka_function("kafka_echo", topic)})

    runs = await server.ended("echo", len(records))
    assert {run.status for run in runs} == {Status.FINISHED}, [(r.error_type, r.error_message) for r in runs]
    assert {run.trigger for run in runs} == {"kafka"}
    by_position = {(r.result["event"]["data"]["partition"], r.result["event"]["data"]["offset"]): r.result["event"] for r in runs}
    assert set(by_position) == set(sent)
    for record, position in zip(records, sent):
        event = by_position[position]
        assert event["id"] == f"{position[0]}-{position[1]}"
        assert event["source"] == f"kafka://{topic}"
        assert event["type"] == "eventrun.kafka.record"
        assert event["subject"] == record.key.decode()
        assert event["eventruntrigger"] == "kafka" and event["eventrunfunction"] == "echo"
        data = event["data"]
        assert data["value"] == json.loads(record.value)
        assert data["key"] == record.key.decode()
        assert data["headers"] == {"trace": record.headers[0][1].decode()}
        assert isinstance(data["timestamp"], int) and data["timestamp"] > 0
        assert event["time"].endswith("Z")
    assert server.consumer_state["State"] == "consuming"
    assert server.consumer_state["Partitions"] == [0, 1, 2]
    assert server.metric("eventrun_kafka_records_accepted_total") == len(records)
    assert server.metric("eventrun_kafka_partitions") == 3
    assert server.metric("eventrun_kafka_consumer_connected") == 1
    assert server.metric("eventrun_kafka_consumer_paused") == 0


async def test_starting_position_latest_is_resolved_once(kafka: KafkaService, servers: Any) -> None:  # noqa: F811
    topic = await kafka.create_topic(unique("latest"))
    # One batch per record: Tansu answers ListOffsets(latest) with the last batch's base offset + 1.
    for i in range(5):
        await kafka.produce_json(topic, [{"old": i}])
    functions = {"fn": kafka_function("kafka_id", topic, trigger={"starting_position": "latest"})}
    server = await servers(functions)
    await server.state_is("consuming")
    assert server.consumer_state["Partitions"] == [0]
    await server.stop()
    # Records sent while no server runs are not skipped: "latest" was pinned at the first start.
    await kafka.produce_json(topic, [{"new": i} for i in range(3)])
    server = await servers(functions)
    runs = await server.ended("fn", 3)
    assert sorted(ids(runs)) == ["0-5", "0-6", "0-7"]


async def test_starting_position_latest_counts_from_the_start_not_the_group_join(
    kafka: KafkaService, servers: Any  # noqa: F811
) -> None:
    # "latest" was the log's end when the group assigned the partitions, seconds after the
    # start with Tansu: records produced meanwhile never ran.
    topic = await kafka.create_topic(unique("joining"), partitions=2)
    for i in range(4):  # one batch per record (see test_starting_position_latest_is_resolved_once)
        await kafka.produce(topic, [Record(json.dumps({"old": i}).encode(), key=b"k", partition=i % 2)])
    functions = {"fn": kafka_function("kafka_id", topic, trigger={"starting_position": "latest"})}
    server = await servers(functions)
    for i in range(4):
        await kafka.produce(topic, [Record(json.dumps({"new": i}).encode(), key=b"k", partition=i % 2)])
    assert server.consumer_state["Partitions"] == [], "the records were to come while the group was joining"
    runs = await server.ended("fn", 4)
    assert sorted(ids(runs)) == ["0-2", "0-3", "1-2", "1-3"]
    # And once, for good: a restart (a new client, a new join) skips nothing either.
    await server.stop()
    await kafka.produce(topic, [Record(b'{"while": "stopped"}', key=b"k", partition=0)])
    server = await servers(functions)
    await kafka.produce(topic, [Record(b'{"after": "restart"}', key=b"k", partition=1)])
    runs = await server.ended("fn", 6)  # (the same data_dir: the first four are there too)
    assert sorted(ids(runs)) == ["0-2", "0-3", "0-4", "1-2", "1-3", "1-4"]


async def test_starting_position_latest_skips_a_batch_produced_before_the_start(kafka: KafkaService, servers: Any) -> None:  # noqa: F811
    # Tansu answers ListOffsets(latest) with the last batch's base offset + 1: of 30 records sent
    # as one batch before the first start, "latest" ran 29 (the end was taken as 1).
    topic = await kafka.create_topic(unique("batch"))
    await kafka.produce(topic, [Record(json.dumps({"old": i}).encode(), key=b"k", partition=0) for i in range(30)], linger_ms=200)
    server = await servers({"fn": kafka_function("kafka_id", topic, trigger={"starting_position": "latest"})})
    await server.state_is("consuming")
    await kafka.produce_json(topic, [{"new": 1}])
    assert ids(await server.ended("fn", 1)) == ["0-30"]
    await asyncio.sleep(0.5)
    assert len(await server.invocations("fn")) == 1


async def test_a_topic_created_again_before_latest_read_a_record_is_read_from_its_start(
    kafka: KafkaService, servers: Any, caplog: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    # "latest" pinned the position with no record to check the log by: the new log's records
    # before that position were skipped, unseen, and nothing was logged.
    topic = await kafka.create_topic(unique("pinned"))
    await kafka.produce_json(topic, [{"old": i} for i in range(3)])
    functions = {"fn": kafka_function("kafka_id", topic, trigger={"starting_position": "latest"})}
    server = await servers(functions)
    await server.state_is("consuming")
    await server.stop()
    await delete_topic(kafka, topic)
    await kafka.create_topic(topic)
    await kafka.produce_json(topic, [{"new": i} for i in range(5)])
    server = await servers(functions)
    runs = await server.ended("fn", 5, timeout=40)
    assert sorted(ids(runs)) == [f"0-{n}-1" for n in range(5)]
    assert "started over (the record at offset 2 is not the one read there before)" in caplog.text


async def test_starting_position_latest_on_a_topic_created_after_the_start_reads_all_of_it(
    kafka: KafkaService, servers: Any  # noqa: F811
) -> None:
    # No topic at the trigger's first start: every record it will hold comes after the start,
    # even those produced before the group has assigned its partitions.
    topic = unique("later")
    server = await servers({"fn": kafka_function("kafka_id", topic, trigger={"starting_position": "latest"})})
    await kafka.create_topic(topic)
    await kafka.produce_json(topic, [{"i": i} for i in range(3)])
    runs = await server.ended("fn", 3, timeout=30)
    assert sorted(ids(runs)) == ["0-0", "0-1", "0-2"]


async def test_graceful_restart_mid_stream_loses_and_repeats_nothing(kafka: KafkaService, servers: Any) -> None:  # noqa: F811
    topic = await kafka.create_topic(unique("restart"), partitions=2)
    total = 300
    await kafka.produce_json(topic, [{"i": i, "sleep": 0.005} for i in range(total)], partitions=2)
    functions = {"fn": kafka_function("kafka_id", topic, concurrency=2)}
    # A small high-water mark keeps most records in Kafka, so the stop lands mid-stream.
    options = {"kafka_table": {"high_water_mark": 10}, "settings": {"batch_size": 20}}
    server = await servers(functions, **options)
    deadline = time.monotonic() + 20
    while len(await server.invocations("fn")) < 40:
        assert time.monotonic() < deadline, server.trigger.state()
        await asyncio.sleep(0.02)
    assert len(await server.invocations("fn")) < total, "the stop came after the whole stream; nothing was tested"
    await server.stop()

    server = await servers(functions, **options)
    runs = await server.ended("fn", total, timeout=30)
    finished = ids(runs)
    assert len(finished) == len(set(finished)), "a record ran twice"
    assert {r.status for r in runs} <= {Status.FINISHED, Status.FAILED}
    for run in runs:
        if run.status is Status.FAILED:  # was running when the server stopped; never re-run
            assert run.error_type == "ServerStopped", run


async def test_two_servers_split_the_partitions_and_run_each_record_once(kafka: KafkaService, servers: Any) -> None:  # noqa: F811
    topic = await kafka.create_topic(unique("shared"), partitions=4)
    total = 400
    await kafka.produce_json(topic, [{"i": i, "sleep": 0.02} for i in range(total)], partitions=4)
    functions = {"fn": kafka_function("kafka_id", topic, concurrency=4, trigger={"group_id": "shared-group"})}
    options = {"kafka_table": {"high_water_mark": 8}, "settings": {"batch_size": 10}}
    first = await servers(functions, name="a", **options)
    deadline = time.monotonic() + 20
    while not (await first.invocations("fn")):
        assert time.monotonic() < deadline, first.trigger.state()
        await asyncio.sleep(0.05)
    # The second server joins mid-stream: a rebalance moves partitions while records flow.
    second = await servers(functions, name="b", **options)

    async def both_ended() -> tuple[list[Invocation], list[Invocation]]:
        deadline = time.monotonic() + 40
        while True:
            a, b = (await first.invocations("fn")), (await second.invocations("fn"))
            if len(a) + len(b) >= total and all(r.status.ended for r in a + b):
                return a, b
            assert time.monotonic() < deadline, (len(a), len(b), first.trigger.state(), second.trigger.state())
            await asyncio.sleep(0.1)

    a, b = await both_ended()
    assert a and b, "both servers must have run records"
    assert first.consumer_state["Partitions"] and second.consumer_state["Partitions"]
    assert set(first.consumer_state["Partitions"]).isdisjoint(second.consumer_state["Partitions"])
    assert {r.status for r in a + b} == {Status.FINISHED}
    ids_a, ids_b = ids(a), ids(b)
    assert set(ids_a).isdisjoint(ids_b), sorted(set(ids_a) & set(ids_b))[:10]
    assert len(ids_a) + len(ids_b) == total


# --------------------------------------------------------------------------- odd records


async def test_poison_records_become_envelopes(kafka: KafkaService, servers: Any) -> None:  # noqa: F811
    topic = await kafka.create_topic(unique("poison"))
    huge = json.dumps({"blob": "x" * 200_000}).encode()
    records = [
        Record(b"not json at all", key=b"text"),
        Record(b"\xff\xfe\x00\x01binary", key=b"\xff\xfe"),
        Record(b"", key=b"empty"),
        Record(None, key=b"tombstone"),
        Record(huge, key=b"huge"),
        Record(b'{"ok": 1}', key=b"headers", headers=[("bin", b"\xff\x00"), ("dup", b"a"), ("dup", b"b"), ("text", b"plain")]),
        Record(b'{\n  "pretty": [1,\r\n 2],\n  "text": "a\\nb"\n}\n', key=b"pretty"),
    ]
    sent = await kafka.produce(topic, records)
    produce_undecodable_header(kafka.bootstrap, topic, 0)
    await kafka.produce(topic, [Record(b'{"after": true}', key=b"after")])
    # max_body_size is also the largest value parsed as JSON.
    server = await servers({"echo": kafka_function("kafka_echo", topic)}, server_table={"max_body_size": "64KB"})

    runs = await server.ended("echo", len(records) + 2)
    assert {run.status for run in runs} == {Status.FINISHED}, [(r.error_type, r.error_message) for r in runs]
    events = {r.result["event"]["data"]["offset"]: r.result["event"] for r in runs}
    assert sorted(events) == list(range(len(records) + 2))
    offset = {record.key: position[1] for record, position in zip(records, sent)}

    text = events[offset[b"text"]]["data"]
    assert "value" not in text and base64.b64decode(text["value_base64"]) == b"not json at all"
    binary = events[offset[b"\xff\xfe"]]
    assert base64.b64decode(binary["data"]["value_base64"]) == b"\xff\xfe\x00\x01binary"
    assert "key" not in binary["data"] and base64.b64decode(binary["data"]["key_base64"]) == b"\xff\xfe"
    assert "subject" not in binary
    assert events[offset[b"empty"]]["data"]["value_base64"] == ""
    assert events[offset[b"tombstone"]]["data"]["value"] is None
    summary = events[offset[b"huge"]]["data"]["value_base64"]  # kafka_echo summarises long values
    assert summary == {"length": len(huge), "sha256": hashlib.sha256(huge).hexdigest()}
    headers = events[offset[b"headers"]]["data"]["headers"]
    assert headers == {"bin": {"base64": base64.b64encode(b"\xff\x00").decode()}, "dup": ["a", "b"], "text": "plain"}

    # JSON with line breaks between its tokens (pretty-printed) reaches the function whole.
    assert events[offset[b"pretty"]]["data"]["value"] == {"pretty": [1, 2], "text": "a\nb"}

    undecodable = events[len(records)]
    assert undecodable["type"] == "eventrun.kafka.undecodable"
    assert undecodable["id"] == f"0-{len(records)}"
    assert "decode" in undecodable["data"]["error"].lower()
    assert events[len(records) + 1]["data"]["value"] == {"after": True}
    assert server.consumer_state["State"] == "consuming"


async def test_cloudevents_attributes_are_kept(kafka: KafkaService, servers: Any) -> None:  # noqa: F811
    topic = await kafka.create_topic(unique("ce"))
    binary = [
        ("ce_specversion", b"1.0"), ("ce_id", b"order-42"), ("ce_source", b"/shop/orders"),
        ("ce_type", b"com.example.order.created"), ("ce_subject", b"orders/42"), ("ce_time", b"2024-05-01T10:00:00Z"),
        ("content-type", b"application/json"),
    ]
    structured = {
        "specversion": "1.0", "id": "evt-7", "source": "/billing", "type": "com.example.invoice.paid",
        "subject": "invoices/7", "time": "2024-05-02T11:00:00Z", "datacontenttype": "application/json",
        "data": {"invoice": 7},
    }
    await kafka.produce(topic, [
        Record(b'{"order": 42}', key=b"k42", headers=binary),
        Record(json.dumps(structured).encode(), headers=[("content-type", b"application/cloudevents+json; charset=UTF-8")]),
        Record(b'{"order": 42, "again": true}', key=b"k42", headers=binary),  # the producer's retry
        Record(b'{"plain": true}', key=b"plain"),
    ])
    server = await servers({"echo": kafka_function("kafka_echo", topic)})

    runs = await server.ended("echo", 3)  # the retry maps to the first one's RequestId
    events = {r.result["event"]["id"]: r.result["event"] for r in runs}
    assert set(events) == {"order-42", "evt-7", "0-3"}
    event = events["order-42"]
    assert (event["source"], event["type"], event["subject"], event["time"]) == (
        "/shop/orders", "com.example.order.created", "orders/42", "2024-05-01T10:00:00Z",
    )
    assert event["data"]["value"] == {"order": 42} and event["data"]["offset"] == 0
    event = events["evt-7"]
    assert (event["source"], event["type"], event["subject"], event["time"]) == (
        "/billing", "com.example.invoice.paid", "invoices/7", "2024-05-02T11:00:00Z",
    )
    assert event["data"] == {"invoice": 7}
    assert events["0-3"]["source"] == f"kafka://{topic}"


async def test_integers_keep_every_digit_whatever_the_record(
    tmp_path: Path, kafka: KafkaService, servers: Any  # noqa: F811
) -> None:
    # Only a record with a UTF-8 key and no headers used to keep them: the others were written
    # from what orjson parsed, and the function got 1.2345678901234568e+29.
    big = 123456789012345678901234567890
    value = b'{"order_id": %d}' % big
    topic = await kafka.create_topic(unique("digits"))
    await kafka.produce(topic, [
        Record(value, key=b"usual"),
        Record(value),
        Record(value, key=b"k", headers=[("trace", b"t")]),
        Record(value, key=b"\xff\xfe"),
        Record(b'{\n  "order_id": %d\n}\n' % big, headers=[("trace", b"t")]),
    ])
    digits = tmp_path / "digits.py"
    digits.write_text('def main_handler(event, context):\n    return str(event["data"]["value"]["order_id"])\n')
    trigger = {"type": "kafka", "topic": topic, "starting_position": "earliest"}
    server = await servers({"digits": {"handler": f"{digits}:main_handler", "triggers": [trigger]}}, http=True)

    runs = await server.ended("digits", 5)
    assert [(r.status, r.result) for r in runs] == [(Status.FINISHED, str(big))] * 5, [(r.error_type, r.error_message) for r in runs]
    assert server.http is not None
    async with aiohttp.ClientSession() as session:
        for run in runs:
            async with session.get(f"http://127.0.0.1:{server.http.port}/invocations/{run.request_id}/event") as answer:
                assert answer.status == 200, await answer.text()
                assert json.loads(await answer.read())["data"]["value"] == {"order_id": big}


# --------------------------------------------------------------------------- backpressure


async def test_backpressure_pauses_and_resumes_without_loss(kafka: KafkaService, servers: Any) -> None:  # noqa: F811
    topic = await kafka.create_topic(unique("slow"))
    total = 40
    await kafka.produce_json(topic, [{"seconds": 0.05} for _ in range(total)])
    mark, batch = 5, 4
    server = await servers(
        {"slow": kafka_function("kafka_slow", topic, concurrency=1, qps_limit=1)},
        kafka_table={"high_water_mark": mark},
        settings={"batch_size": batch},
    )
    states: set[str] = set()
    most = paused_metric = 0
    deadline = time.monotonic() + 30
    while len(await server.invocations("slow")) < total or not all(r.status.ended for r in (await server.invocations("slow"))):
        assert time.monotonic() < deadline, server.consumer_state
        states.add(server.consumer_state["State"].split(" (")[0])
        paused_metric = max(paused_metric, server.metric("eventrun_kafka_consumer_paused"))
        most = max(most, server.engine.backlog("slow"))
        await asyncio.sleep(0.01)
    runs = await server.ended("slow", total)
    assert {r.status for r in runs} == {Status.FINISHED}, "qps_limit never refuses Kafka records"
    assert len(set(ids(runs))) == total
    assert "paused" in states, states
    assert paused_metric == 1, "/metrics never showed the consumer paused"
    # Checked before each fetch; one batch may be in the engine and the next being read.
    assert most <= mark + 2 * batch, f"backlog reached {most}, high-water mark {mark}, batch {batch}"
    await server.state_is("consuming", timeout=5)


# --------------------------------------------------------------------------- broker trouble


async def test_broker_stopped_and_restarted_while_eventrun_runs(kafka: KafkaService, servers: Any) -> None:  # noqa: F811
    if not kafka.can_restart:
        pytest.skip("needs a broker this test may stop (Tansu), not EVENTRUN_TEST_KAFKA")
    topic = await kafka.create_topic(unique("outage"))
    await kafka.produce_json(topic, [{"before": i} for i in range(3)])
    server = await servers({"fn": kafka_function("kafka_id", topic)}, http=True)
    assert sorted(ids(await server.ended("fn", 3))) == ["0-0", "0-1", "0-2"]

    assert server.metric("eventrun_kafka_consumer_connected") == 1
    kafka.stop_broker()
    state = await server.state_is("broker unreachable", timeout=15)
    # Why, from a connection eventrun made itself: the broker's port refuses connections.
    assert f"{kafka.bootstrap}: " in state["State"] and "Connect call failed" in state["State"], state
    assert server.metric("eventrun_kafka_consumer_connected") == 0
    assert server.http is not None
    async with aiohttp.ClientSession() as session:
        base = f"http://127.0.0.1:{server.http.port}"
        async with session.post(f"{base}/functions/fn/invocations", json={"via": "http"}) as answer:
            assert answer.status == 202, await answer.text()
            request_id = (await answer.json())["RequestId"]
        async with session.get(f"{base}/healthz") as answer:
            health = await answer.json()
        assert health["Triggers"]["kafka"][f"fn:{topic}"]["State"].startswith("broker unreachable"), health
    assert (await server.engine.wait(request_id, timeout=15)).status is Status.FINISHED

    # Tansu keeps its log in memory: it comes back empty, so offsets start again at 0.
    await kafka.start_broker()
    await kafka.create_topic(topic)
    await server.state_is("consuming", timeout=20)
    assert server.metric("eventrun_kafka_consumer_connected") == 1
    await kafka.produce_json(topic, [{"after": i} for i in range(3)])
    runs = await server.ended("fn", 7, timeout=30)
    kafka_ids = sorted(ids([r for r in runs if r.trigger == "kafka"]))
    # The new log's records get epoch 1 in their ids, so none is taken for an old one.
    assert kafka_ids == ["0-0", "0-0-1", "0-1", "0-1-1", "0-2", "0-2-1"], kafka_ids


async def test_a_topic_deleted_and_created_again_is_read_from_its_start(
    kafka: KafkaService, servers: Any, caplog: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    # The consumer stood at offset 10, with the group's offset there, and no rebalance came:
    # Tansu answered its reads of the new log with no records until the log grew past 10, and
    # offsets 0-9 of the new log never ran (its later records ran as "0-10", "0-11").
    topic = await kafka.create_topic(unique("again"))
    await kafka.produce_json(topic, [{"old": i} for i in range(10)])
    server = await servers({"fn": kafka_function("kafka_id", topic)})
    assert len(await server.ended("fn", 10)) == 10
    await delete_topic(kafka, topic)
    await kafka.create_topic(topic)
    await kafka.produce_json(topic, [{"new": i} for i in range(3)])
    await asyncio.sleep(1)  # the consumer reads the new log while it is shorter than 10
    await kafka.produce_json(topic, [{"new": i} for i in range(3, 12)])
    runs = await server.ended("fn", 22, timeout=40)
    assert sorted(i for i in ids(runs) if i.count("-") == 2) == sorted(f"0-{n}-1" for n in range(12)), sorted(ids(runs))
    assert re.search(r"started over \(its log ends at offset [0-3], before offset 10 ", caplog.text), caplog.text


@pytest.mark.parametrize("undecodable_again", [False, True], ids=["now-decodable", "another-undecodable"])
async def test_a_topic_created_again_while_down_is_noticed_when_the_last_record_read_was_undecodable(
    kafka: KafkaService, servers: Any, caplog: pytest.LogCaptureFixture, undecodable_again: bool  # noqa: F811
) -> None:
    # The undecodable record was handed over with no fingerprint, so the restart had nothing to
    # check the log by: the new log's records 0-3 were skipped, unseen, and nothing was logged.
    topic = await kafka.create_topic(unique("poisoned"))
    await kafka.produce_json(topic, [{"old": i} for i in range(3)])
    produce_undecodable_header(kafka.bootstrap, topic, 0)
    functions = {"fn": kafka_function("kafka_id", topic)}
    server = await servers(functions)
    await server.ended("fn", 4)
    await server.stop()
    await delete_topic(kafka, topic)
    await kafka.create_topic(topic)
    await kafka.produce_json(topic, [{"new": i} for i in range(3)])
    if undecodable_again:  # at the same offset: another record all the same (its batch tells)
        produce_undecodable_header(kafka.bootstrap, topic, 0)
    await kafka.produce_json(topic, [{"new": i} for i in range(3 + undecodable_again, 6)])
    server = await servers(functions)
    runs = await server.ended("fn", 10, timeout=40)
    assert sorted(i for i in ids(runs) if i.count("-") == 2) == [f"0-{n}-1" for n in range(6)]
    assert "started over (the record at offset 3 is not the one read there before)" in caplog.text


async def test_an_undecodable_last_record_read_again_on_the_same_log_runs_once(
    kafka: KafkaService, servers: Any, caplog: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    # Its fingerprint comes from its batch as the broker keeps it: read again where the trigger
    # left off, it is the same record, so the log goes on (no new epoch, no second run).
    topic = await kafka.create_topic(unique("poisoned"))
    await kafka.produce_json(topic, [{"old": 0}])
    produce_undecodable_header(kafka.bootstrap, topic, 0)
    functions = {"fn": kafka_function("kafka_id", topic)}
    server = await servers(functions)
    await server.ended("fn", 2)
    await server.stop()
    with caplog.at_level(logging.DEBUG, logger="eventrun.triggers.kafka"):
        server = await servers(functions)
        await kafka.produce_json(topic, [{"new": 0}])
        runs = await server.ended("fn", 3)
    assert sorted(ids(runs)) == ["0-0", "0-1", "0-2"]
    assert "partition 0 starts at offset 1 (committed offset, checking the last record read)" in caplog.text
    assert "started over" not in caplog.text


async def test_broker_down_at_start(tmp_path: Path, kafka: KafkaService, servers: Any) -> None:  # noqa: F811
    if not kafka.can_restart:
        pytest.skip("needs a broker this test may stop (Tansu), not EVENTRUN_TEST_KAFKA")
    topic = unique("late")
    kafka.stop_broker()
    server = await servers({"fn": kafka_function("kafka_id", topic)})
    state = await server.state_is("broker unreachable", timeout=10)
    assert "Partitions" in state and state["Partitions"] == []
    await kafka.start_broker()
    await kafka.create_topic(topic)
    await kafka.produce_json(topic, [{"i": i} for i in range(3)])
    runs = await server.ended("fn", 3, timeout=30)
    assert sorted(ids(runs)) == ["0-0", "0-1", "0-2"]


async def test_clean_stop_commits_what_was_accepted(kafka: KafkaService, servers: Any) -> None:  # noqa: F811
    topic = await kafka.create_topic(unique("commit"), partitions=2)
    await kafka.produce_json(topic, [{"i": i} for i in range(50)], partitions=2)
    functions = {"fn": kafka_function("kafka_id", topic, trigger={"group_id": "committer"})}
    server = await servers(functions)
    await server.ended("fn", 50)
    await server.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap, group_id="committer", enable_auto_commit=False)
    await consumer.start()
    try:
        committed = {p: await consumer.committed(TopicPartition(topic, p)) for p in (0, 1)}
    finally:
        await consumer.stop()
    assert committed == {0: 25, 1: 25}


# --------------------------------------------------------------------------- through `eventrun serve`


async def test_kill_9_mid_stream_loses_and_repeats_nothing(
    kafka: KafkaService, eventrun_server: Any, http: aiohttp.ClientSession  # noqa: F811
) -> None:
    """A real server process killed with SIGKILL while records stream in, then started again."""
    topic = await kafka.create_topic(unique("crash"), partitions=2)
    functions = {
        "fn": {
            "handler": handler("kafka_id"),
            "concurrency": 2,
            "triggers": [{"type": "kafka", "topic": topic, "starting_position": "earliest"}],
        }
    }
    server = eventrun_server(functions, extra={"kafka": {"bootstrap_servers": kafka.bootstrap, "high_water_mark": 20}})
    api = server.client(http)
    total = 400

    async def accepted() -> int:
        health = (await api.request("GET", "/healthz")).json
        return int(health["Triggers"]["kafka"][f"fn:{topic}"]["Accepted"])

    async def trickle() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
        await producer.start()
        try:
            for i in range(total):
                await producer.send_and_wait(topic, json.dumps({"i": i}).encode(), partition=i % 2)
                await asyncio.sleep(0.01)
        finally:
            await producer.stop()

    async def consuming() -> bool:
        health = (await api.request("GET", "/healthz")).json
        return health["Triggers"]["kafka"][f"fn:{topic}"]["State"] == "consuming"

    deadline = time.monotonic() + 20
    while not await consuming():
        assert time.monotonic() < deadline, server.log_text()
        await asyncio.sleep(0.05)
    producing = asyncio.create_task(trickle())
    try:
        deadline = time.monotonic() + 20
        while await accepted() < 50:
            assert time.monotonic() < deadline, server.log_text()
            await asyncio.sleep(0.05)
        assert not producing.done(), "the kill must come while records still stream in"
        server.kill9()
        await asyncio.sleep(0.5)
        server.restart()
        await producing
    finally:
        producing.cancel()

    async def all_ended() -> list[dict[str, Any]] | None:
        runs: list[dict[str, Any]] = []
        cursor = None
        while True:
            query = {"function": "fn", "limit": 1000, "cursor": cursor}
            page = (await api.list(**query)).json
            runs += page["Invocations"]
            cursor = page["NextCursor"]
            if not cursor:
                break
        done = len(runs) >= total and all(r["Status"] in ("FINISHED", "FAILED") for r in runs)
        return runs if done else None

    deadline = time.monotonic() + 30
    while (runs := await all_ended()) is None:
        assert time.monotonic() < deadline, server.log_text()[-3000:]
        await asyncio.sleep(0.2)
    assert len(runs) == total, f"{len(runs)} runs for {total} records"
    metrics = (await api.request("GET", "/metrics")).text
    where = f'{{function="fn",topic="{topic}",group="eventrun-fn"}}'
    accepted_since_restart = re.search(rf"^eventrun_kafka_records_accepted_total{re.escape(where)} (\d+)$", metrics, re.M)
    assert accepted_since_restart is not None and int(accepted_since_restart.group(1)) > 0, metrics
    assert f"eventrun_kafka_consumer_connected{where} 1" in metrics.splitlines(), metrics
    finished = [r["Result"]["id"] for r in runs if r["Status"] == "FINISHED"]
    assert len(finished) == len(set(finished)), "a record ran twice"
    for run in runs:
        if run["Status"] == "FAILED":  # running when the server died; ends FAILED, never re-run
            assert run["ErrorType"] == "ServerStopped", run


async def test_batches_compressed_with_each_codec_run_once(
    kafka: KafkaService, eventrun_server: Any, http: aiohttp.ClientSession, poll_until: Any  # noqa: F811
) -> None:
    # A batch compressed with lz4, zstd or snappy stopped the consumer for good: the codecs'
    # library was not installed, the client raised UnsupportedCodecError at every fetch, and
    # /healthz said "broker unreachable". No record of any partition ran.
    topic = await kafka.create_topic(unique("codecs"), partitions=2)
    codecs = ["gzip", "lz4", "zstd", "snappy"]
    sent: set[str] = set()
    for codec in codecs:
        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", compression_type=codec, linger_ms=50)
        await producer.start()
        try:  # sent together, so each partition gets one batch of this codec
            futures = [await producer.send(topic, json.dumps({"codec": codec, "i": i}).encode(), partition=i % 2) for i in range(20)]
            sent |= {f"{m.partition}-{m.offset}" for m in [await future for future in futures]}
        finally:
            await producer.stop()
    assert len(sent) == 80
    functions = {"fn": {"handler": handler("kafka_id"), "triggers": [{"type": "kafka", "topic": topic, "starting_position": "earliest"}]}}
    server = eventrun_server(functions, extra={"kafka": {"bootstrap_servers": kafka.bootstrap}})
    api = server.client(http)

    async def ended() -> list[dict[str, Any]] | None:
        runs = (await api.list(function="fn", limit=1000)).json["Invocations"]
        return runs if len(runs) >= len(sent) and all(r["Status"] in ("FINISHED", "FAILED") for r in runs) else None

    runs = await poll_until(ended, 40, f"runs of every record\n{server.log_text()[-3000:]}")
    assert [r["Status"] for r in runs] == ["FINISHED"] * len(sent), runs
    ran = [r["Result"]["id"] for r in runs]
    assert sorted(ran) == sorted(sent), "each record runs exactly once"
    health = (await api.request("GET", "/healthz")).json["Triggers"]["kafka"][f"fn:{topic}"]
    assert health["State"] == "consuming" and health["Accepted"] == len(sent), health
    metrics = (await api.request("GET", "/metrics")).text
    assert f'eventrun_kafka_consumer_connected{{function="fn",topic="{topic}",group="eventrun-fn"}} 1' in metrics.splitlines()
