"""The Kafka and bucket scenarios of compose/, against real Kafka and MinIO containers.

testcontainers starts the brokers where a Docker engine answers; elsewhere every test here is
skipped with the reason, and the same scenarios keep running against local services in
tests/e2e (Tansu for Kafka, moto_server for S3). eventrun runs in this process (engine plus
triggers), with the example functions that compose/eventrun.toml wires.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import socket
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from eventrun.engine.api import Invocation, Status
from eventrun.engine.core import Engine
from eventrun.engine.manifest import Manifest, load_manifest

FUNCTIONS = Path(__file__).resolve().parents[2] / "functions"
KAFKA_IMAGE = "confluentinc/cp-kafka:7.6.0"  # testcontainers' KafkaContainer drives Confluent's start scripts
MINIO_IMAGE = "minio/minio:RELEASE.2025-04-22T22-12-26Z"  # as in compose/docker-compose.yml
MINIO_USER, MINIO_PASSWORD = "minioadmin", "minioadmin"
WEBHOOK_ID = "EVENTRUN"
TOKEN = "containers-token"
RUN_TIMEOUT = 60.0


def docker_problem() -> str | None:
    """Why no Docker engine can be used here, or None when one answers a ping."""
    try:
        import docker
        from testcontainers.core.docker_client import get_docker_host
    except ImportError as exc:
        return f"the {exc.name} package is not installed"
    host = get_docker_host()  # DOCKER_HOST, ~/.testcontainers.properties or the docker context
    if host is None and not Path("/var/run/docker.sock").exists():
        return "/var/run/docker.sock does not exist and DOCKER_HOST is not set"
    # A failed connection leaves an unclosed socket behind: collect it while its
    # ResourceWarning is ignored, not later inside some unrelated test.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            client = docker.DockerClient(base_url=host, timeout=10) if host else docker.from_env(timeout=10)
            try:
                client.ping()
            finally:
                client.close()
        except Exception as exc:  # noqa: BLE001 - any failure means: no engine to use
            reason = " ".join(str(exc).split()) or type(exc).__name__
            return f"{host or 'the default Docker socket'}: {reason}"
        finally:
            gc.collect()
    return None


DOCKER_PROBLEM = docker_problem()

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        DOCKER_PROBLEM is not None,
        reason=f"no Docker engine reachable: {DOCKER_PROBLEM} (tests/e2e runs these scenarios on local services)",
    ),
    pytest.mark.timeout(600),  # the first run pulls the images
]


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


def unique(prefix: str) -> str:
    """A topic or bucket name no other test uses (lowercase, S3-valid)."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def toml(value: Any) -> str:
    """A TOML value: JSON's strings, numbers, arrays and (inline) tables are valid TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    return json.dumps(value)


def write_manifest(folder: Path, tables: dict[str, dict[str, Any]], function: str, config: dict[str, Any]) -> Manifest:
    """A manifest with these tables and one function; loaded (and so validated)."""
    lines = []
    for name, table in tables.items():
        lines += [f"[{name}]", *(f"{k} = {toml(v)}" for k, v in table.items()), ""]
    lines += [f"[functions.{function}]", *(f"{k} = {toml(v)}" for k, v in config.items())]
    path = folder / "eventrun.toml"
    path.write_text("\n".join(lines) + "\n")
    return load_manifest(path)


def server_table(folder: Path) -> dict[str, Any]:
    """[server] for an in-process engine: its own data_dir, short graces."""
    return {"data_dir": str(folder / "data"), "shutdown_grace": "2s", "kill_grace": "1s"}


async def ended_run(engine: Engine, function: str, message: str, timeout: float = RUN_TIMEOUT) -> Invocation:
    """The one run of `function`, once it has ended; fail with `message` if none ends in time."""
    deadline = time.monotonic() + timeout
    while True:
        runs = (await engine.list(function=function, limit=10))[0]
        if runs and all(run.status.ended for run in runs):
            assert len(runs) == 1, [(run.request_id, run.status) for run in runs]
            return runs[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} (no ended run of {function} within {timeout}s: {runs})")
        await asyncio.sleep(0.2)


def webhook_host() -> tuple[str, dict[str, str]]:
    """The address a container uses to reach this process, and the extra_hosts it needs."""
    configured = os.environ.get("EVENTRUN_TEST_WEBHOOK_HOST", "").strip()
    if configured:
        return configured, {}
    from testcontainers.core.utils import default_gateway_ip, inside_container

    gateway = default_gateway_ip() if inside_container() else None
    if gateway:
        # In a container (Docker-out-of-Docker): testcontainers puts new containers on this
        # container's network, so this container's own address there is reachable.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((gateway, 9))  # UDP: no packet is sent, it only picks the route
            return str(probe.getsockname()[0]), {}
    # On the Docker host itself: Docker maps this name to the host's bridge address.
    return "host.docker.internal", {"host.docker.internal": "host-gateway"}


# --------------------------------------------------------------------------- Kafka


@pytest.fixture(scope="module")
def kafka_bootstrap() -> Iterator[str]:
    """One Kafka broker (KRaft) in a container for this module; its bootstrap address."""
    from testcontainers.community.kafka import KafkaContainer

    with KafkaContainer(KAFKA_IMAGE).with_kraft() as kafka:
        yield kafka.get_bootstrap_server()


async def test_kafka_record_runs_the_orders_function(kafka_bootstrap: str, tmp_path: Path) -> None:
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from eventrun.triggers.kafka import KafkaTrigger

    topic = unique("orders")
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name=topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()

    manifest = write_manifest(
        tmp_path,
        {"server": server_table(tmp_path), "kafka": {"bootstrap_servers": kafka_bootstrap}},
        "orders",
        {
            "handler": f"{FUNCTIONS / 'order.py'}:main_handler",
            "triggers": [
                {"type": "kafka", "topic": topic, "group_id": unique("eventrun"), "starting_position": "earliest"}
            ],
        },
    )
    engine = Engine(manifest)
    trigger = KafkaTrigger(engine, manifest)
    await engine.start()
    try:
        await trigger.start()
        try:
            order = {"order_id": 42, "amount": 19.5, "note": "ü & +"}
            producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
            await producer.start()
            try:
                await producer.send_and_wait(topic, json.dumps(order).encode(), key=b"order-42")
            finally:
                await producer.stop()
            run = await ended_run(engine, "orders", f"the record on {topic} started no run")
            log = (await engine.read_log(run.request_id)).decode()
        finally:
            await trigger.stop()
    finally:
        await engine.stop()

    assert run.status is Status.FINISHED, (run.error_type, run.error_message)
    assert run.trigger == "kafka"
    assert run.result == {"order": order, "key": "order-42", "partition": 0, "offset": 0}
    assert f"from kafka://{topic} partition 0 offset 0" in log, log


# --------------------------------------------------------------------------- MinIO


class MinioService:
    """A MinIO container whose webhook target EVENTRUN points at `webhook_url`."""

    def __init__(self, webhook_url: str, extra_hosts: dict[str, str]) -> None:
        # testcontainers' MinioContainer would import the `minio` client package, which
        # eventrun does not use; this is the same container, configured the same way.
        from testcontainers.core.container import DockerContainer
        from testcontainers.core.wait_strategies import HttpWaitStrategy

        prefix = "MINIO_NOTIFY_WEBHOOK_"
        self.container = (
            DockerContainer(MINIO_IMAGE, _wait_strategy=HttpWaitStrategy(9000, "/minio/health/live"))
            .with_exposed_ports(9000)
            .with_command("server /data")
            .with_envs(
                MINIO_ROOT_USER=MINIO_USER,
                MINIO_ROOT_PASSWORD=MINIO_PASSWORD,
                **{
                    f"{prefix}ENABLE_{WEBHOOK_ID}": "on",
                    f"{prefix}ENDPOINT_{WEBHOOK_ID}": webhook_url,
                    f"{prefix}AUTH_TOKEN_{WEBHOOK_ID}": TOKEN,
                    f"{prefix}QUEUE_DIR_{WEBHOOK_ID}": "/data/.minio-events",
                },
            )
        )
        if extra_hosts:
            self.container.with_kwargs(extra_hosts=extra_hosts)
        self.url = ""

    def start(self) -> MinioService:
        """Start the container and wait for its health endpoint (blocking)."""
        self.container.start()
        host = self.container.get_container_host_ip()
        self.url = f"http://{host}:{self.container.get_exposed_port(9000)}"
        return self

    def stop(self) -> None:
        """Remove the container (blocking)."""
        self.container.stop()

    def client(self) -> Any:
        """An aiobotocore S3 client context for this MinIO."""
        from aiobotocore.session import get_session

        return get_session().create_client(
            "s3",
            region_name="us-east-1",
            endpoint_url=self.url,
            aws_access_key_id=MINIO_USER,
            aws_secret_access_key=MINIO_PASSWORD,
        )


@pytest.fixture
async def minio_and_port() -> AsyncIterator[tuple[MinioService, int, str]]:
    """MinIO notifying http://<this machine>:PORT/triggers/s3; the PORT eventrun must serve on."""
    port = free_port()
    host, extra_hosts = webhook_host()
    webhook_url = f"http://{host}:{port}/triggers/s3"
    minio = MinioService(webhook_url, extra_hosts)
    await asyncio.to_thread(minio.start)
    try:
        yield minio, port, webhook_url
    finally:
        await asyncio.to_thread(minio.stop)


async def test_upload_reaches_csv_summary_through_the_minio_webhook(
    minio_and_port: tuple[MinioService, int, str], tmp_path: Path
) -> None:
    from eventrun.triggers.http import HttpTrigger
    from eventrun.triggers.s3 import S3Trigger

    minio, port, webhook_url = minio_and_port
    bucket = unique("uploads")
    key = "in/Q3 sales ü+plus&co=1 100%.csv"  # every character MinIO's form encoding touches
    csv = "region,amount\nnorth,10\nsouth,20.5\n"
    async with minio.client() as s3:
        await s3.create_bucket(Bucket=bucket)
        # What `mc event add ... --event put --prefix in/ --suffix .csv` stores.
        await s3.put_bucket_notification_configuration(
            Bucket=bucket,
            NotificationConfiguration={
                "QueueConfigurations": [
                    {
                        "QueueArn": f"arn:minio:sqs::{WEBHOOK_ID}:webhook",
                        "Events": ["s3:ObjectCreated:*"],
                        "Filter": {
                            "Key": {"FilterRules": [{"Name": "prefix", "Value": "in/"}, {"Name": "suffix", "Value": ".csv"}]}
                        },
                    }
                ]
            },
        )

    manifest = write_manifest(
        tmp_path,
        {
            "server": server_table(tmp_path),
            "s3": {
                "endpoint_url": minio.url,
                "access_key_id": MINIO_USER,
                "secret_access_key": MINIO_PASSWORD,
                "webhook_token": TOKEN,
            },
        },
        "csv_summary",
        {
            "handler": f"{FUNCTIONS / 'csv_summary.py'}:main_handler",
            "triggers": [{"type": "s3", "bucket": bucket, "prefix": "in/", "suffix": ".csv"}],
        },
    )
    engine = Engine(manifest)
    trigger = S3Trigger(engine, manifest)
    # Every interface: the request comes from MinIO's container, not from 127.0.0.1.
    http = HttpTrigger(engine, "0.0.0.0", port, extra_routes=trigger.routes())
    await engine.start()
    try:
        async with http, trigger:
            async with minio.client() as s3:
                await s3.put_object(Bucket=bucket, Key=key, Body=csv.encode())
            run = await ended_run(
                engine,
                "csv_summary",
                f"MinIO did not deliver the upload to {webhook_url}; set EVENTRUN_TEST_WEBHOOK_HOST to an "
                "address of this machine that containers can reach",
            )
            state = trigger.state()
    finally:
        await engine.stop()

    assert run.status is Status.FINISHED, (run.error_type, run.error_message)
    assert run.trigger == "s3"
    target = "summaries/" + key.removesuffix(".csv") + ".json"
    assert run.result == {"summary": f"s3://{bucket}/{target}", "rows": 2, "columns": 2}
    async with minio.client() as s3:
        response = await s3.get_object(Bucket=bucket, Key=target)
        async with response["Body"] as stream:
            summary = json.loads(await stream.read())
    # The function found the object by the key eventrun decoded from MinIO's form encoding.
    assert summary["source"] == f"s3://{bucket}/{key}"
    assert summary["columns"]["amount"] == {"count": 2, "numeric": 2, "sum": 30.5, "min": 10, "max": 20.5}
    assert (state["accepted"], state["bad"]) == (1, 0), state
