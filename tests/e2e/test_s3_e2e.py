"""The s3 trigger end to end: moto_server (real S3 + SQS) -> eventrun -> functions in worker processes."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from eventrun.engine.api import Invocation, Status
from eventrun.engine.core import Engine
from eventrun.engine.manifest import load_manifest
from eventrun.triggers.http import HttpTrigger
from eventrun.triggers.s3 import S3Trigger
from s3_service import S3Service, bucket_notifying_queue, has_sqs, queue_depth, s3_service, unique  # noqa: F401
from server_process import to_toml

pytestmark = pytest.mark.e2e

HANDLERS = Path(__file__).parent / "handlers"
CSV_SUMMARY = Path(__file__).resolve().parents[2] / "functions" / "csv_summary.py"
TOKEN = "e2e-token"

# MinIO's documented webhook body (notes §1.3); the bucket is replaced per test.
MINIO_BODY = json.loads((Path(__file__).parents[1] / "samples" / "minio_webhook.json").read_text())


def write_manifest(path: Path, tables: Mapping[str, Mapping[str, Any]], functions: Mapping[str, Mapping[str, Any]]) -> Path:
    """A manifest file: plain tables, then each function (its triggers an inline array of tables)."""
    path.write_text(to_toml({**tables, "functions": functions}))
    return path


@dataclass
class Platform:
    """eventrun in this process (engine, gateway, s3 trigger) against one bucket and queue."""

    service: S3Service
    bucket: str
    queue_url: str
    engine: Engine
    trigger: S3Trigger
    http: HttpTrigger
    _running: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http.port}"

    async def start(self) -> Platform:
        await self.engine.start()
        self._running.append(self.engine.stop)
        await self.http.start()
        self._running.append(self.http.stop)
        await self.trigger.start()
        self._running.append(self.trigger.stop)
        self.engine.add_reporter("s3", self.trigger.state)
        return self

    async def close(self) -> None:
        while self._running:
            await self._running.pop()()

    async def put(self, key: str, body: bytes = b"a,b\n1,2\n") -> None:
        async with self.service.client("s3") as s3:
            await s3.put_object(Bucket=self.bucket, Key=key, Body=body)

    async def invocations(self, function: str) -> list[Invocation]:
        return (await self.engine.list(function=function, limit=1000))[0]

    async def ended(self, function: str, count: int, timeout: float = 20.0) -> list[Invocation]:
        """Wait for `count` invocations of `function`, all ended; assert no more arrive meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            runs = await self.invocations(function)
            if len(runs) >= count and all(run.status.ended for run in runs):
                assert len(runs) == count, [(r.function, r.request_id) for r in runs]
                return runs
            if time.monotonic() > deadline:
                raise AssertionError(f"{function}: wanted {count} ended runs, have {[(r.status, r.error_message) for r in runs]}")
            await asyncio.sleep(0.1)

    async def settled(self, records: int, timeout: float = 15.0) -> None:
        """Wait until the trigger has routed `records` records and the queue is empty."""
        deadline = time.monotonic() + timeout
        while self.trigger.state()["records"] < records or await queue_depth(self.service, self.queue_url):
            if time.monotonic() > deadline:
                raise AssertionError(f"not settled: {self.trigger.state()}")
            await asyncio.sleep(0.1)


@pytest.fixture
async def platform(tmp_path: Path, s3_service: S3Service) -> AsyncIterator[Callable[..., Awaitable[Platform]]]:
    """Factory: `await platform(functions, start=True)` with its own bucket notifying its own queue."""
    if not await has_sqs(s3_service):
        pytest.skip(f"{s3_service.url} has no SQS (S3 -> SQS tests need moto_server or AWS)")
    made: list[Platform] = []

    async def make(functions: Mapping[str, Mapping[str, Any]], *, start: bool = True) -> Platform:
        folder = tmp_path / f"platform{len(made)}"
        folder.mkdir()
        bucket, queue = unique("bkt"), unique("q")
        queue_url = await bucket_notifying_queue(s3_service, bucket, queue)
        for config in functions.values():
            for trigger in config.get("triggers", ()):
                trigger.setdefault("bucket", bucket)
        tables = {
            "server": {"data_dir": str(folder / "data"), "shutdown_grace": "2s", "kill_grace": "1s"},
            "s3": s3_service.s3_table(webhook_token=TOKEN, sqs_queue_url=queue_url),
        }
        manifest = load_manifest(write_manifest(folder / "eventrun.toml", tables, functions))
        engine = Engine(manifest)
        trigger = S3Trigger(engine, manifest, wait_time_seconds=1, backoff=(0.1, 0.5))
        http = HttpTrigger(engine, "127.0.0.1", 0, extra_routes=trigger.routes())
        made.append(Platform(s3_service, bucket, queue_url, engine, trigger, http))
        return await made[-1].start() if start else made[-1]

    yield make
    for platform in made:
        await platform.close()


def event_handler() -> str:
    return f"{HANDLERS / 's3_event.py'}:main_handler"


# --------------------------------------------------------------------------- keys


KEYS = [
    "in/My File ü.csv",
    "in/a+b=c&d%20e.csv",
    "in/100% sure & co = yes.csv",
    "in/plus+plus++ and space.csv",
    "in/deep/er/path/with space/x.csv",
    "in/日本語/ファイル 1.csv",
    "in/%2B%25 literally.csv",
]


async def test_keys_arrive_as_the_original_keys(platform: Any) -> None:
    p = await platform({"echo": {"handler": event_handler(), "triggers": [{"type": "s3", "prefix": "in/"}]}})
    for key in KEYS:
        await p.put(key)
    runs = await p.ended("echo", len(KEYS))
    assert {run.status for run in runs} == {Status.FINISHED}, [(r.error_type, r.error_message) for r in runs]
    results = [run.result for run in runs]
    assert sorted(r["event"]["subject"] for r in results) == sorted(KEYS)
    for result in results:
        event = result["event"]
        key = event["subject"]
        assert event["data"]["key"] == key
        assert result["stored_size"] == 8, f"the function could not find {key!r} by its subject"
        assert event["type"] == "eventrun.s3.ObjectCreated:Put"
        assert event["source"] == f"s3://{p.bucket}"
        assert event["eventruntrigger"] == "s3"
        assert event["id"].startswith(f"ObjectCreated:Put:{p.bucket}/{key}:")
        assert event["data"]["event_name"] == "ObjectCreated:Put"
        assert event["data"]["record"]["eventSource"] == "aws:s3"


# --------------------------------------------------------------------------- filters and fan-out


async def test_prefix_suffix_and_event_filters_with_fan_out(platform: Any) -> None:
    csv = {"type": "s3", "prefix": "in/", "suffix": ".csv"}
    p = await platform(
        {
            "csv_a": {"handler": event_handler(), "triggers": [dict(csv)]},
            "csv_b": {"handler": event_handler(), "triggers": [dict(csv)]},
            "puts_only": {"handler": event_handler(), "triggers": [{"type": "s3", "events": ["s3:ObjectCreated:Put"], "suffix": ".txt"}]},
            "removed": {"handler": event_handler(), "triggers": [{"type": "s3", "events": ["s3:ObjectRemoved:*"], "prefix": "in/"}]},
        }
    )
    await p.put("in/a.csv")  # csv_a and csv_b
    await p.put("in/a.txt")  # puts_only
    await p.put("other/a.csv")  # nobody
    async with p.service.client("s3") as s3:
        # ObjectCreated:Copy: not a Put, so nobody
        await s3.copy_object(Bucket=p.bucket, Key="in/b.txt", CopySource={"Bucket": p.bucket, "Key": "in/a.txt"})
        await s3.delete_object(Bucket=p.bucket, Key="in/a.csv")  # removed
    await p.settled(records=5)

    (a,) = await p.ended("csv_a", 1)
    (b,) = await p.ended("csv_b", 1)
    assert a.request_id != b.request_id
    assert a.result["event"]["id"] == b.result["event"]["id"]
    assert a.result["event"]["subject"] == b.result["event"]["subject"] == "in/a.csv"
    (put,) = await p.ended("puts_only", 1)
    assert (put.result["event"]["subject"], put.result["event"]["type"]) == ("in/a.txt", "eventrun.s3.ObjectCreated:Put")
    (gone,) = await p.ended("removed", 1)
    assert (gone.result["event"]["subject"], gone.result["event"]["type"]) == ("in/a.csv", "eventrun.s3.ObjectRemoved:Delete")
    state = p.trigger.state()
    assert (state["unmatched"], state["accepted"]) == (2, 4), state


# --------------------------------------------------------------------------- test event and duplicates


async def test_test_event_is_skipped_and_a_duplicate_delivery_runs_once(platform: Any) -> None:
    p = await platform({"echo": {"handler": event_handler(), "triggers": [{"type": "s3"}]}}, start=False)
    await p.put("dup/x.csv")
    # Read the real notification without consuming it, then deliver it a second time, as an
    # at-least-once queue may.
    async with p.service.client("sqs") as sqs:
        received = await sqs.receive_message(QueueUrl=p.queue_url, MaxNumberOfMessages=10, VisibilityTimeout=0)
        bodies = [m["Body"] for m in received["Messages"]]
        (notification,) = [b for b in bodies if "Records" in json.loads(b)]
        assert any(json.loads(b).get("Event") == "s3:TestEvent" for b in bodies)
        await sqs.send_message(QueueUrl=p.queue_url, MessageBody=notification)
    await p.start()
    await p.settled(records=2)

    (run,) = await p.ended("echo", 1)
    assert run.status is Status.FINISHED
    assert run.result["event"]["subject"] == "dup/x.csv"
    state = p.trigger.state()
    assert (state["skipped"], state["accepted"], state["duplicates"], state["bad"]) == (1, 1, 1, 0), state
    metrics = p.trigger.metrics()
    for line in ("eventrun_s3_skipped_total 1", "eventrun_s3_accepted_total 1", "eventrun_s3_duplicates_total 1",
                 "eventrun_s3_bad_total 0", "eventrun_s3_records_total 2", "eventrun_s3_sqs_polling 1"):  # fmt: skip
        assert line in metrics.splitlines(), metrics
    async with aiohttp.ClientSession() as http:
        async with http.get(p.url + "/healthz") as response:
            health = await response.json()
    assert health["Triggers"]["s3"]["sqs"] == "polling"


# --------------------------------------------------------------------------- the webhook path


async def test_minio_webhook_end_to_end(platform: Any) -> None:
    p = await platform({"echo": {"handler": event_handler(), "triggers": [{"type": "s3", "suffix": ".csv"}]}})
    await p.put("in/My File ü.csv", b"12345678")
    body = json.loads(json.dumps(MINIO_BODY).replace("probe-bucket", p.bucket))
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(p.url + "/triggers/s3", json=body, headers={"Authorization": "Bearer nope"}) as response:
            assert response.status == 401
        async with http.post(p.url + "/triggers/s3", json=body, headers=headers) as response:
            assert response.status == 200, await response.text()
            first = await response.json()
        async with http.post(p.url + "/triggers/s3", json=body, headers=headers) as response:
            assert response.status == 200
            again = await response.json()
        async with http.head(p.url + "/triggers/s3") as response:
            assert response.status == 200
    (accepted,) = first["Accepted"]
    assert again == first
    assert accepted["FunctionName"] == "echo"
    # The upload itself also arrives through SQS, with another id: two runs, one per delivery path.
    await p.settled(records=3)
    run = await p.engine.wait(accepted["RequestId"], timeout=20)
    assert run.status is Status.FINISHED, run
    event = run.result["event"]
    assert event["subject"] == "in/My File ü.csv"
    assert event["id"] == f"ObjectCreated:Put:{p.bucket}/in/My File ü.csv:1879B5C3F3E6A2C8"
    assert event["data"]["record"]["eventSource"] == "minio:s3"
    assert run.result["stored_size"] == 8
    runs = await p.ended("echo", 2)
    assert sum(1 for r in runs if r.request_id == accepted["RequestId"]) == 1


# --------------------------------------------------------------------------- the CSV example


async def test_csv_summary_example(platform: Any) -> None:
    p = await platform(
        {
            "csv_summary": {
                "handler": f"{CSV_SUMMARY}:main_handler",
                "triggers": [{"type": "s3", "prefix": "in/", "suffix": ".csv"}],
            }
        }
    )
    csv = "region,amount,units,note\nnorth,10,1,first\nsouth,20.5,2,\neast,30,,x ü\n"
    await p.put("in/sales 2024 ü.csv", csv.encode())
    (run,) = await p.ended("csv_summary", 1, timeout=25)
    assert run.status is Status.FINISHED, (run.error_type, run.error_message)
    target = "summaries/in/sales 2024 ü.json"
    assert run.result == {"summary": f"s3://{p.bucket}/{target}", "rows": 3, "columns": 4}
    async with p.service.client("s3") as s3:
        response = await s3.get_object(Bucket=p.bucket, Key=target)
        async with response["Body"] as stream:
            summary = json.loads(await stream.read())
    assert summary["source"] == f"s3://{p.bucket}/in/sales 2024 ü.csv"
    assert summary["rows"] == 3
    assert summary["columns"] == {
        "region": {"count": 3, "numeric": 0, "sum": 0, "min": None, "max": None},
        "amount": {"count": 3, "numeric": 3, "sum": 60.5, "min": 10, "max": 30},
        "units": {"count": 2, "numeric": 2, "sum": 3, "min": 1, "max": 2},
        "note": {"count": 2, "numeric": 0, "sum": 0, "min": None, "max": None},
    }
    log = (await p.engine.read_log(run.request_id)).decode()
    assert "reading s3://" in log and f"wrote s3://{p.bucket}/{target}" in log, log
    # Writing the summary notified too, but .json matches no trigger: no second run.
    await p.settled(records=2)
    assert len(await p.invocations("csv_summary")) == 1
