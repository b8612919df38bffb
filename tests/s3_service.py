"""A real S3 + SQS endpoint for tests: moto_server as a local process, or EVENTRUN_TEST_S3.

Test modules import the fixture they need (`from s3_service import s3_service`).
EVENTRUN_TEST_S3=http://host:port uses that endpoint instead of starting moto_server
(credentials from EVENTRUN_TEST_S3_ACCESS_KEY_ID / EVENTRUN_TEST_S3_SECRET_ACCESS_KEY); tests
that need SQS are skipped when the endpoint has none (MinIO).
"""

from __future__ import annotations

import os
import socket
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiobotocore.session import get_session
from local_process import LocalProcess

READY_TIMEOUT = 20.0
REGION = "us-east-1"
ALL_EVENTS = ("s3:ObjectCreated:*", "s3:ObjectRemoved:*")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MotoServer(LocalProcess):
    """One `python -m moto.server` process on 127.0.0.1."""

    def __init__(self, port: int, log_dir: Path) -> None:
        super().__init__(log_dir / f"moto-{port}.log")
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def start(self) -> MotoServer:
        """Start and wait until it answers HTTP."""
        self.launch([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)])
        assert self.proc is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                with urllib.request.urlopen(self.url + "/moto-api/", timeout=1.0):
                    return self
            except urllib.error.HTTPError:
                return self  # any HTTP answer means it is serving
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto_server was not ready within {READY_TIMEOUT}s:\n{self.log_text()}")



@dataclass(frozen=True)
class S3Service:
    """An S3 (and maybe SQS) endpoint and the credentials to use it."""

    url: str
    access_key_id: str = "testing"
    secret_access_key: str = "testing"
    region: str = REGION

    def client(self, service: str, *, endpoint_url: str | None = None) -> Any:
        """An aiobotocore client context for `service` ("s3" or "sqs") at this endpoint."""
        return get_session().create_client(
            service,
            region_name=self.region,
            endpoint_url=endpoint_url or self.url,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
        )

    def s3_table(self, **overrides: str) -> dict[str, str]:
        """The manifest's [s3] table for this endpoint."""
        return {
            "endpoint_url": self.url,
            "region": self.region,
            "access_key_id": self.access_key_id,
            "secret_access_key": self.secret_access_key,
            **overrides,
        }


@pytest.fixture(scope="session")
def s3_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Service]:
    """moto_server on a free port for the session (or the EVENTRUN_TEST_S3 endpoint)."""
    existing = os.environ.get("EVENTRUN_TEST_S3", "").strip()
    if existing:
        yield S3Service(
            existing.rstrip("/"),
            os.environ.get("EVENTRUN_TEST_S3_ACCESS_KEY_ID", "testing"),
            os.environ.get("EVENTRUN_TEST_S3_SECRET_ACCESS_KEY", "testing"),
        )
        return
    server = MotoServer(free_port(), tmp_path_factory.mktemp("moto")).start()
    try:
        yield S3Service(server.url)
    finally:
        server.stop()


def unique(prefix: str) -> str:
    """A bucket or queue name no other test uses (lowercase, S3-valid)."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def has_sqs(service: S3Service) -> bool:
    """Whether the endpoint answers SQS (moto does, MinIO does not)."""
    try:
        async with service.client("sqs") as sqs:
            await sqs.list_queues()
    except Exception:
        return False
    return True


async def bucket_notifying_queue(
    service: S3Service, bucket: str, queue: str, events: tuple[str, ...] = ALL_EVENTS
) -> str:
    """Create `bucket` and `queue` and point the bucket's notifications at the queue; its URL.

    Saving the configuration makes the store send an s3:TestEvent to the queue.
    """
    async with service.client("s3") as s3, service.client("sqs") as sqs:
        await s3.create_bucket(Bucket=bucket)
        queue_url = (await sqs.create_queue(QueueName=queue))["QueueUrl"]
        attributes = await sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])
        await s3.put_bucket_notification_configuration(
            Bucket=bucket,
            NotificationConfiguration={
                "QueueConfigurations": [
                    {"Id": "eventrun", "QueueArn": attributes["Attributes"]["QueueArn"], "Events": list(events)}
                ]
            },
        )
    return str(queue_url)


async def queue_depth(service: S3Service, queue_url: str) -> int:
    """Messages in the queue, visible or in flight."""
    async with service.client("sqs") as sqs:
        attributes = (
            await sqs.get_queue_attributes(
                QueueUrl=queue_url,
                AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
            )
        )["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"]) + int(attributes["ApproximateNumberOfMessagesNotVisible"])
