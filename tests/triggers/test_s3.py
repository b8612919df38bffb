"""The s3 trigger: parsing captured payloads, the webhook route, and the SQS poller against moto."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from eventrun.engine.api import Accepted
from eventrun.engine.envelope import Envelope
from eventrun.engine.errors import InvalidParameter, ShuttingDown
from eventrun.engine.manifest import FunctionConfig, Manifest, S3Config, ServerConfig
from eventrun.triggers.http import build_app
from eventrun.triggers.s3 import (
    BadNotification,
    S3Trigger,
    check_authorization,
    decode_key,
    event_matches,
    parse_body,
    parse_record,
    records_from_body,
    to_envelopes,
)
from eventrun.engine.envelope import is_rfc3339
from eventrun.triggers.s3.sqs import ANSWER_GRACE, SqsPoller
from s3_service import MotoServer, S3Service, free_port, queue_depth, s3_service, unique  # noqa: F401

TOKEN = "change-me"

# --------------------------------------------------------------------------- captured payloads

# MinIO webhook body, notes §1.3 (the documented shape; pretty-printed, one line on the wire).
MINIO_WEBHOOK_BODY = (Path(__file__).parents[1] / "samples" / "minio_webhook.json").read_text()

# moto's S3 -> SQS bodies, notes §3 (verbatim).
MOTO_TEST_EVENT = '{"Service": "Amazon S3", "Event": "s3:TestEvent", "Time": "2026-11-22T09:01:24.692Z", "Bucket": "probe-bucket"}'
MOTO_PUT = '{"Records": [{"eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1", "eventTime": "2026-11-22T09:01:25.733Z", "eventName": "ObjectCreated:Put", "s3": {"s3SchemaVersion": "1.0", "configurationId": "created-in-csv", "bucket": {"name": "probe-bucket", "arn": "arn:aws:s3:::probe-bucket"}, "object": {"key": "in%2FMy+File+%C3%BC.csv", "size": 8, "eTag": "e5ebd4c02cefbe7955977c67ada242b7"}}}]}'
MOTO_MULTIPART = '{"Records": [{"eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1", "eventTime": "2026-11-22T09:01:26.885Z", "eventName": "ObjectCreated:CompleteMultipartUpload", "s3": {"s3SchemaVersion": "1.0", "configurationId": "created-in-csv", "bucket": {"name": "probe-bucket", "arn": "arn:aws:s3:::probe-bucket"}, "object": {"key": "in%2Fmulti+part.csv", "size": 1024, "eTag": "64a3b22c51ddc101b3e6d623279b60e9-1"}}}]}'
MOTO_DELETE = '{"Records": [{"eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1", "eventTime": "2026-11-22T09:01:27.928Z", "eventName": "ObjectRemoved:Delete", "s3": {"s3SchemaVersion": "1.0", "configurationId": "removed-in", "bucket": {"name": "probe-bucket", "arn": "arn:aws:s3:::probe-bucket"}, "object": {"key": "in%2FMy+File+%C3%BC.csv", "size": 8, "eTag": "e5ebd4c02cefbe7955977c67ada242b7"}}}]}'

# AWS's documented test message (with RequestId and HostId, unlike moto's).
AWS_TEST_EVENT = {
    "Service": "Amazon S3",
    "Event": "s3:TestEvent",
    "Time": "2024-05-01T10:00:00.000Z",
    "Bucket": "uploads",
    "RequestId": "5582815E1AEA5ADF",
    "HostId": "8cLeGAmw098X5cv4Zkwcmo8vvZa3eH3eKxsPzbB9wrR+YstdA6Knx4Ip8EXAMPLE",
}


def aws_record(
    key: str,
    *,
    event: str = "ObjectCreated:Put",
    bucket: str = "uploads",
    sequencer: str | None = "0055AED6DCD90281E5",
    version_id: str | None = None,
    size: int | None = 1024,
) -> dict[str, Any]:
    """An AWS S3 record as the docs describe it; `key` is passed as it appears on the wire."""
    obj: dict[str, Any] = {"key": key, "eTag": "d41d8cd98f00b204e9800998ecf8427e"}
    if size is not None:
        obj["size"] = size
    if version_id is not None:
        obj["versionId"] = version_id
    if sequencer is not None:
        obj["sequencer"] = sequencer
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": "us-east-1",
        "eventTime": "2024-05-01T10:00:00.000Z",
        "eventName": event,
        "userIdentity": {"principalId": "AWS:AIDAEXAMPLE"},
        "requestParameters": {"sourceIPAddress": "203.0.113.7"},
        "responseElements": {"x-amz-request-id": "C3D13FE58DE4C810", "x-amz-id-2": "FMyUVURIY8"},
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "rule-1",
            "bucket": {"name": bucket, "ownerIdentity": {"principalId": "A3NL1KOZZKExample"}, "arn": f"arn:aws:s3:::{bucket}"},
            "object": obj,
        },
    }


def function(*triggers: dict[str, Any]) -> FunctionConfig:
    """A function config with these triggers (the handler path is never loaded here)."""
    return FunctionConfig(handler="functions/x.py:main_handler", triggers=tuple(triggers))


def s3(bucket: str, **fields: Any) -> dict[str, Any]:
    """An s3 trigger table."""
    return {"type": "s3", "bucket": bucket, **fields}


# --------------------------------------------------------------------------- parsing


def test_minio_webhook_body_becomes_one_envelope() -> None:
    body = json.loads(MINIO_WEBHOOK_BODY)
    records = records_from_body(body)
    assert len(records) == 1
    envelopes = to_envelopes(records[0], {"ingest": function(s3("probe-bucket", prefix="in/", suffix=".csv"))})
    assert len(envelopes) == 1
    envelope = envelopes[0]
    assert envelope.id == "ObjectCreated:Put:probe-bucket/in/My File ü.csv:1879B5C3F3E6A2C8"
    assert envelope.source == "s3://probe-bucket"
    assert envelope.type == "eventrun.s3.ObjectCreated:Put"
    assert envelope.subject == "in/My File ü.csv"
    # MinIO's top-level Key is already decoded: the subject equals it without the bucket.
    assert f"probe-bucket/{envelope.subject}" == body["Key"]
    assert envelope.time == "2026-11-22T09:01:25.733Z"
    assert envelope.function == "ingest"
    assert envelope.trigger == "s3"
    assert envelope.datacontenttype == "application/json"
    assert envelope.data == {
        "bucket": "probe-bucket",
        "key": "in/My File ü.csv",
        "size": 8,
        "etag": "e5ebd4c02cefbe7955977c67ada242b7",
        "event_name": "ObjectCreated:Put",
        "version_id": None,
        "record": body["Records"][0],
    }
    # The raw record keeps MinIO's own fields.
    assert envelope.data["record"]["eventSource"] == "minio:s3"
    assert envelope.data["record"]["responseElements"]["x-minio-deployment-id"]


def test_go_escaped_minio_body_with_plus_ampersand_and_percent() -> None:
    # Go's encoding/json writes & as \\u0026; the record key is url.QueryEscape'd.
    raw = (
        '{"EventName":"s3:ObjectCreated:Put","Key":"b-1/in/a+b=c\\u0026d%20e.csv","Records":[{"eventVersion":"2.0",'
        '"eventSource":"minio:s3","awsRegion":"","eventTime":"2026-11-22T09:01:25.733Z","eventName":"s3:ObjectCreated:Put",'
        '"s3":{"s3SchemaVersion":"1.0","configurationId":"Config","bucket":{"name":"b-1","arn":"arn:aws:s3:::b-1"},'
        '"object":{"key":"in%2Fa%2Bb%3Dc%26d%2520e.csv","size":3,"eTag":"x","sequencer":"18"}}}]}'
    )
    (record,) = parse_body(raw)
    (envelope,) = to_envelopes(record, {"f": function(s3("b-1"))})
    assert envelope.subject == "in/a+b=c&d%20e.csv"
    assert f"b-1/{envelope.subject}" == json.loads(raw)["Key"]


def test_moto_test_event_is_skipped() -> None:
    assert parse_body(MOTO_TEST_EVENT) == []
    assert records_from_body(AWS_TEST_EVENT) == []


def test_moto_put_without_sequencer_uses_etag_version_and_time() -> None:
    (record,) = parse_body(MOTO_PUT)
    (envelope,) = to_envelopes(record, {"f": function(s3("probe-bucket"))})
    assert envelope.subject == "in/My File ü.csv"
    assert envelope.type == "eventrun.s3.ObjectCreated:Put"
    assert envelope.id == "ObjectCreated:Put:probe-bucket/in/My File ü.csv:e5ebd4c02cefbe7955977c67ada242b7::2026-11-22T09:01:25.733Z"
    assert envelope.data["version_id"] is None
    assert envelope.data["record"] == json.loads(MOTO_PUT)["Records"][0]


def test_moto_multipart_and_delete_records() -> None:
    (multipart,) = parse_body(MOTO_MULTIPART)
    (delete,) = parse_body(MOTO_DELETE)
    functions = {
        "created": function(s3("probe-bucket")),
        "removed": function(s3("probe-bucket", events=["s3:ObjectRemoved:*"])),
    }
    (created,) = to_envelopes(multipart, functions)
    assert (created.function, created.subject, created.type) == (
        "created",
        "in/multi part.csv",
        "eventrun.s3.ObjectCreated:CompleteMultipartUpload",
    )
    (removed,) = to_envelopes(delete, functions)
    assert (removed.function, removed.subject, removed.type) == (
        "removed",
        "in/My File ü.csv",
        "eventrun.s3.ObjectRemoved:Delete",
    )


@pytest.mark.parametrize(
    ("wire", "decoded"),
    [
        ("images/red+flower.jpg", "images/red flower.jpg"),  # AWS keeps '/', '+' is a space
        ("images%2Fred+flower.jpg", "images/red flower.jpg"),  # MinIO and moto encode '/'
        ("in/a%2Bb.csv", "in/a+b.csv"),  # a literal plus
        ("in/100%25+sure.csv", "in/100% sure.csv"),  # a literal percent
        ("in/a%2520b.csv", "in/a%20b.csv"),  # decoded once, not twice
        ("in/x%3Dy%26z.csv", "in/x=y&z.csv"),
        ("deep/er/and/deeper/%E6%97%A5%E6%9C%AC.csv", "deep/er/and/deeper/日本.csv"),
    ],
)
def test_keys_are_form_decoded_exactly_once(wire: str, decoded: str) -> None:
    assert decode_key(wire) == decoded
    event = parse_record(aws_record(wire))
    assert event.key == decoded


def test_aws_record_with_sequencer_and_version() -> None:
    record = aws_record("in/My+File+%C3%BC.csv", version_id="3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY")
    (envelope,) = to_envelopes(record, {"f": function(s3("uploads"))})
    assert envelope.id == "ObjectCreated:Put:uploads/in/My File ü.csv:0055AED6DCD90281E5"
    assert envelope.data["version_id"] == "3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY"
    assert envelope.data["size"] == 1024


NOT_RFC3339 = [
    "not a time", "2024-05-01", "2024-05-01T10:00:00", 1714557600, "",
    # What datetime.fromisoformat takes on Python 3.11 besides RFC 3339:
    "20250101T000000Z", "2025-W01-1T00:00:00+00:00", "2025-01-01T00Z", "2025-01-01T00:00Z",
    "2025-01-01T00:00:00+0100", "2025-01-01 00:00:00Z", "2025-001T00:00:00Z", "2025-01-01T00:00:00,5Z",
    "2025-01-01T00:00:00.Z", "2025-01-01T00:00:00+01", "\uff12025-01-01T00:00:00Z",
    # The grammar, on no real date or time:
    "2025-02-30T00:00:00Z", "2025-13-01T00:00:00Z", "0000-01-01T00:00:00Z", "2025-01-01T24:00:00Z",
    "2025-01-01T00:60:00Z", "2025-01-01T00:00:61Z", "2025-01-01T00:00:00+24:00", "2025-01-01T00:00:00Z\n",
]
RFC3339 = [
    "2024-05-01T10:00:00Z", "2024-05-01T10:00:00.123456789Z", "2024-05-01t10:00:00z",
    "2024-05-01T10:00:00-07:30", "2016-12-31T23:59:60Z", "2024-02-29T00:00:00+00:00",
]


@pytest.mark.parametrize("given", NOT_RFC3339)
def test_an_event_time_that_is_no_rfc_3339_time_is_not_the_envelopes(given: Any) -> None:
    record = aws_record("in/a.csv")
    record["eventTime"] = given
    (envelope,) = to_envelopes(record, {"f": function(s3("uploads"))})
    assert envelope.time != given and envelope.time.endswith("Z")  # the time it was accepted instead
    assert parse_record(record).time is None


@pytest.mark.parametrize("first,second", [
    ("2026-12-07 07:00:00", "2026-12-07 08:00:00"), ("20261207T070000Z", "20261207T080000Z"), (1765090800, 1765094400),
])
def test_two_uploads_without_a_sequencer_are_told_apart_by_their_time_in_any_form(first: Any, second: Any) -> None:
    # moto sends no sequencer: the id is eTag, versionId and eventTime; a time that is no RFC
    # 3339 one was left out of it, and a second upload of the same bytes was taken for the first.
    records = [aws_record("in/a.csv"), aws_record("in/a.csv")]
    for record, time in zip(records, (first, second)):
        del record["s3"]["object"]["sequencer"]
        record["eventTime"] = time
    ids = [parse_record(record).id for record in records]
    assert ids[0] != ids[1] and ids[0].endswith(f":{first}"), ids


def test_an_event_time_with_its_zone_is_the_envelopes() -> None:
    record = aws_record("in/a.csv")
    record["eventTime"] = "2024-05-01T10:00:00.000+02:00"
    (envelope,) = to_envelopes(record, {"f": function(s3("uploads"))})
    assert envelope.time == "2024-05-01T10:00:00.000+02:00"


@pytest.mark.parametrize("given", RFC3339)
def test_every_rfc_3339_time_is_one(given: str) -> None:
    assert is_rfc3339(given)


def test_minio_removal_without_size_and_etag() -> None:
    record = aws_record("in%2Fgone.csv", event="s3:ObjectRemoved:Delete", size=None)
    del record["s3"]["object"]["eTag"]
    event = parse_record(record)
    assert (event.size, event.etag, event.event_name) == (None, None, "ObjectRemoved:Delete")
    assert event.id == "ObjectRemoved:Delete:uploads/in/gone.csv:0055AED6DCD90281E5"


def test_get_and_put_sharing_a_minio_sequencer_get_distinct_ids() -> None:
    put = parse_record(aws_record("k", event="s3:ObjectCreated:Put"))
    get = parse_record(aws_record("k", event="s3:ObjectAccessed:Get"))
    assert put.id != get.id


@pytest.mark.parametrize(
    "event", ["s3:ObjectAccessed:Get", "s3:ObjectAccessed:Head", "s3:ObjectCreated:PutTagging", "s3:ObjectCreated:PutRetention"]
)
def test_events_that_leave_the_object_as_it_was_are_told_apart_by_their_time(event: str) -> None:
    # MinIO gives them the sequencer of the write before them (the object's modification time).
    first, second = aws_record("k", event=event), aws_record("k", event=event)
    second["eventTime"] = "2024-05-01T10:00:07.250Z"
    assert parse_record(first).id == f"{event.removeprefix('s3:')}:uploads/k:0055AED6DCD90281E5:2024-05-01T10:00:00.000Z"
    assert parse_record(first).id != parse_record(second).id
    assert parse_record(first).id == parse_record(aws_record("k", event=event)).id  # a redelivery is the same event


def test_a_write_is_named_by_its_sequencer_alone() -> None:
    assert parse_record(aws_record("k", event="s3:ObjectCreated:Put")).id == "ObjectCreated:Put:uploads/k:0055AED6DCD90281E5"


def test_sns_envelope_is_unwrapped() -> None:
    sns = {"Type": "Notification", "MessageId": "m-1", "TopicArn": "arn:aws:sns:us-east-1:1:t", "Message": MOTO_PUT}
    (record,) = records_from_body(sns)
    assert record["eventName"] == "ObjectCreated:Put"
    assert records_from_body({"Type": "Notification", "Message": MOTO_TEST_EVENT}) == []


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ("{}", "Records"),
        ('{"Records": {"a": 1}}', "Records"),
        ('{"Records": [1]}', "Records[0]: expected an object"),
        ('{"Records": [{"s3": {"bucket": {"name": "b"}, "object": {"key": "k"}}}]}', "Records[0].eventName"),
        ('{"Records": [{"eventName": "ObjectCreated:Put", "s3": {"object": {"key": "k"}}}]}', "s3.bucket.name"),
        ('{"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "b"}}}]}', "s3.object.key"),
        ('{"Type": "Notification", "Message": "nope"}', "SNS Message is not valid JSON"),
    ],
)
def test_malformed_bodies_are_refused_with_a_reason(body: str, message: str) -> None:
    with pytest.raises(BadNotification, match=message.replace("[", r"\[").replace("]", r"\]")) as caught:
        parse_body(body)
    assert isinstance(caught.value, InvalidParameter)  # the gateway's 400


@pytest.mark.parametrize(
    ("patterns", "name", "expected"),
    [
        (["s3:ObjectCreated:*"], "ObjectCreated:Put", True),
        (["s3:ObjectCreated:*"], "ObjectCreated:CompleteMultipartUpload", True),
        (["s3:ObjectCreated:*"], "ObjectRemoved:Delete", False),
        (["ObjectCreated:*"], "ObjectCreated:Copy", True),
        (["s3:ObjectCreated:Put"], "ObjectCreated:Put", True),
        (["s3:ObjectCreated:Put"], "ObjectCreated:Post", False),
        (["s3:ObjectRemoved:*", "s3:ObjectCreated:Copy"], "ObjectRemoved:DeleteMarkerCreated", True),
        (["s3:*"], "ObjectAccessed:Get", True),
        ([], "ObjectCreated:Put", False),
    ],
)
def test_event_patterns_match_both_spellings(patterns: list[str], name: str, expected: bool) -> None:
    assert event_matches(patterns, name) is expected


def test_filters_use_bucket_event_prefix_and_suffix_of_the_decoded_key() -> None:
    functions = {
        "csv": function(s3("uploads", prefix="in/My File", suffix=".csv")),
        "other_bucket": function(s3("elsewhere")),
        "removed": function(s3("uploads", events=["s3:ObjectRemoved:*"])),
        "kafka_only": function({"type": "kafka", "topic": "t"}),
    }
    assert [e.function for e in to_envelopes(aws_record("in%2FMy+File+1.csv"), functions)] == ["csv"]
    assert to_envelopes(aws_record("in%2FMy+File+1.txt"), functions) == []
    assert to_envelopes(aws_record("out%2FMy+File+1.csv"), functions) == []
    deleted = to_envelopes(aws_record("in%2FMy+File+1.csv", event="ObjectRemoved:Delete"), functions)
    assert [e.function for e in deleted] == ["removed"]


def test_fan_out_gives_one_envelope_per_function() -> None:
    functions = {
        "a": function(s3("uploads")),
        "b": function(s3("uploads", prefix="in/")),
        "twice": function(s3("uploads"), s3("uploads", suffix=".csv")),
    }
    envelopes = to_envelopes(aws_record("in/x.csv"), functions)
    assert [e.function for e in envelopes] == ["a", "b", "twice"]
    assert len({e.id for e in envelopes}) == 1  # same event, so the same id: one RequestId per function


@pytest.mark.parametrize(
    ("header", "refused"),
    [
        (f"Bearer {TOKEN}", False),
        (f"bearer {TOKEN}", False),
        (f"  Bearer   {TOKEN} ", False),
        (None, True),
        ("", True),
        ("Bearer", True),
        ("Bearer wrong", True),
        (f"Bearer {TOKEN}x", True),
        (f"Basic {TOKEN}", True),
        (TOKEN, True),
        ("Bearer ü", True),
    ],
)
def test_check_authorization(header: str | None, refused: bool) -> None:
    assert (check_authorization(header, TOKEN) is not None) is refused


# --------------------------------------------------------------------------- the webhook route


class FakeEngine:
    """accept_batch with the engine's idempotency on (function, source, id); what the gateway reads."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.shutting_down = False
        self.accepted: list[Envelope] = []
        self.batches = 0
        self.error: BaseException | None = None
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self._ids: dict[tuple[str, str, str], str] = {}

    async def accept(self, envelope: Envelope, *, throttle: bool = True) -> Accepted:
        raise AssertionError("the s3 trigger must use accept_batch (never throttled)")

    async def accept_batch(self, envelopes: Sequence[Envelope]) -> list[Accepted]:
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        self.batches += 1
        answers = []
        for envelope in envelopes:
            key = (envelope.function, envelope.source, envelope.id)
            if key in self._ids:
                answers.append(Accepted(self._ids[key], created=False))
                continue
            self.accepted.append(envelope)
            self._ids[key] = f"rid-{len(self.accepted)}"
            answers.append(Accepted(self._ids[key], created=True))
        return answers


def manifest(token: str = TOKEN, **s3_fields: str) -> Manifest:
    """Two functions on probe-bucket (fan-out for in/*.csv) and one elsewhere."""
    return Manifest(
        server=ServerConfig(max_body_size=8192, shutdown_grace=5),
        s3=S3Config(webhook_token=token, **s3_fields),
        functions={
            "ingest": function(s3("probe-bucket", prefix="in/", suffix=".csv")),
            "audit": function(s3("probe-bucket", events=["s3:ObjectCreated:*", "s3:ObjectRemoved:*"])),
            "photos": function(s3("photos")),
        },
    )


async def _client(token: str) -> tuple[TestClient, FakeEngine, S3Trigger]:
    config = manifest(token)
    engine = FakeEngine(config)
    trigger = S3Trigger(engine, config)
    client = TestClient(TestServer(build_app(engine, extra_routes=trigger.routes())))  # type: ignore[arg-type]
    await client.start_server()
    return client, engine, trigger


@pytest.fixture
async def webhook() -> AsyncIterator[tuple[TestClient, FakeEngine, S3Trigger]]:
    client, engine, trigger = await _client(TOKEN)
    try:
        yield client, engine, trigger
    finally:
        await client.close()


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


async def error_of(response: Any, status: int) -> dict[str, str]:
    assert response.status == status, await response.text()
    body = await response.json()
    assert set(body) == {"Error"} and set(body["Error"]) == {"Code", "Message"}, body
    return body["Error"]  # type: ignore[no-any-return]


async def test_webhook_accepts_the_minio_body_with_fan_out(webhook: Any) -> None:
    client, engine, trigger = webhook
    response = await client.post("/triggers/s3", data=MINIO_WEBHOOK_BODY.encode(), headers=auth())
    assert response.status == 200, await response.text()
    body = await response.json()
    assert body == {
        "Accepted": [
            {"FunctionName": "ingest", "RequestId": "rid-1"},
            {"FunctionName": "audit", "RequestId": "rid-2"},
        ]
    }
    assert [e.subject for e in engine.accepted] == ["in/My File ü.csv"] * 2
    assert engine.batches == 1  # one durable commit for the whole request


async def test_webhook_redelivery_yields_the_same_request_ids(webhook: Any) -> None:
    client, engine, trigger = webhook
    first = await (await client.post("/triggers/s3", data=MINIO_WEBHOOK_BODY, headers=auth())).json()
    again = await client.post("/triggers/s3", data=MINIO_WEBHOOK_BODY, headers=auth())
    assert again.status == 200
    assert await again.json() == first
    assert len(engine.accepted) == 2
    assert trigger.state()["duplicates"] == 2


async def test_webhook_record_matching_no_function_is_200(webhook: Any) -> None:
    client, engine, trigger = webhook
    body = {"EventName": "s3:ObjectCreated:Put", "Key": "nobody/x", "Records": [aws_record("x", bucket="nobody")]}
    response = await client.post("/triggers/s3", json=body, headers=auth())
    assert response.status == 200
    assert await response.json() == {"Accepted": []}
    assert engine.accepted == []
    assert trigger.state()["unmatched"] == 1


async def test_webhook_test_event_is_200(webhook: Any) -> None:
    client, engine, _ = webhook
    response = await client.post("/triggers/s3", data=MOTO_TEST_EVENT, headers=auth())
    assert response.status == 200
    assert await response.json() == {"Accepted": []}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": TOKEN},
        {"Authorization": f"Basic {TOKEN}"},
    ],
)
async def test_webhook_missing_or_wrong_token_is_401(webhook: Any, headers: dict[str, str]) -> None:
    client, engine, _ = webhook
    response = await client.post("/triggers/s3", data=MINIO_WEBHOOK_BODY, headers=headers)
    error = await error_of(response, 401)
    assert error["Code"] == "Unauthorized"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert engine.accepted == []


async def test_webhook_checks_the_token_before_the_body(webhook: Any) -> None:
    client, _, _ = webhook
    response = await client.post("/triggers/s3", data=b"not json", headers={"Authorization": "Bearer nope"})
    await error_of(response, 401)


async def test_webhook_without_configured_token_refuses_everything() -> None:
    client, engine, trigger = await _client("")
    try:
        for headers in ({}, {"Authorization": "Bearer "}, auth("anything")):
            response = await client.post("/triggers/s3", data=MINIO_WEBHOOK_BODY, headers=headers)
            error = await error_of(response, 403)
            assert error["Code"] == "WebhookTokenNotSet"
            assert "webhook_token" in error["Message"]
        assert engine.accepted == []
        assert trigger.state()["webhook"].startswith("off")
    finally:
        await client.close()


@pytest.mark.parametrize(
    "body",
    [b"not json", b"", b"[]", b'{"EventName": "s3:ObjectCreated:Put"}', b'{"Records": [{"eventName": "x"}]}'],
)
async def test_webhook_malformed_body_is_400(webhook: Any, body: bytes) -> None:
    client, engine, _ = webhook
    response = await client.post("/triggers/s3", data=body, headers=auth())
    error = await error_of(response, 400)
    assert error["Code"] == "InvalidParameter"
    assert "Traceback" not in error["Message"]
    assert engine.accepted == []


async def test_webhook_body_over_the_limit_is_413(webhook: Any) -> None:
    client, _, _ = webhook
    response = await client.post("/triggers/s3", data=b"x" * 10_000, headers=auth())
    await error_of(response, 413)


async def test_webhook_answers_503_while_shutting_down(webhook: Any) -> None:
    client, engine, _ = webhook
    engine.error = ShuttingDown()
    response = await client.post("/triggers/s3", data=MINIO_WEBHOOK_BODY, headers=auth())
    assert (await error_of(response, 503))["Code"] == "ShuttingDown"


async def test_webhook_head_probe_and_other_methods(webhook: Any) -> None:
    client, _, _ = webhook
    assert (await client.head("/triggers/s3")).status == 200
    assert (await client.head("/triggers/s3", headers={"Authorization": "Bearer x"})).status == 200
    await error_of(await client.get("/triggers/s3"), 405)


async def test_trigger_without_queue_reports_sqs_off() -> None:
    trigger = S3Trigger(FakeEngine(manifest()), manifest())
    async with trigger:
        assert trigger.state()["sqs"] == "off"
        assert trigger.state()["webhook"] == "on"
    assert {route.method for route in trigger.routes()} == {"POST", "HEAD"}  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- the SQS poller (moto)


async def wait_for(predicate: Any, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} (not within {timeout}s)")
        await asyncio.sleep(0.05)


async def new_queue(service: S3Service, **attributes: str) -> str:
    async with service.client("sqs") as sqs:
        return str((await sqs.create_queue(QueueName=unique("q"), Attributes=attributes))["QueueUrl"])


async def send(service: S3Service, queue_url: str, *bodies: str) -> None:
    async with service.client("sqs") as sqs:
        for body in bodies:
            await sqs.send_message(QueueUrl=queue_url, MessageBody=body)


def poller_trigger(service: S3Service, queue_url: str) -> tuple[S3Trigger, FakeEngine]:
    config = manifest(
        sqs_queue_url=queue_url,
        region=service.region,
        access_key_id=service.access_key_id,
        secret_access_key=service.secret_access_key,
    )
    engine = FakeEngine(config)
    return S3Trigger(engine, config, wait_time_seconds=1, backoff=(0.1, 0.4)), engine


async def test_poller_accepts_then_deletes_and_skips_test_and_bad_messages(s3_service: S3Service) -> None:
    queue_url = await new_queue(s3_service)
    sns = json.dumps({"Type": "Notification", "Message": MOTO_MULTIPART})
    await send(s3_service, queue_url, MOTO_TEST_EVENT, MOTO_PUT, "garbage", sns, '{"Records": "no"}')
    trigger, engine = poller_trigger(s3_service, queue_url)
    async with trigger:
        await wait_for(lambda: trigger.state()["bad"] == 2 and len(engine.accepted) == 4, 10, "messages handled")
        await wait_for(lambda: trigger.state()["sqs"] == "polling", 5, "polling")
        assert await queue_depth(s3_service, queue_url) == 0
    assert sorted((e.function, e.subject) for e in engine.accepted) == [
        ("audit", "in/My File ü.csv"),
        ("audit", "in/multi part.csv"),
        ("ingest", "in/My File ü.csv"),
        ("ingest", "in/multi part.csv"),
    ]
    state = trigger.state()
    assert (state["skipped"], state["bad"], state["records"], state["sqs"]) == (1, 2, 2, "off")


async def test_a_message_with_a_bad_record_has_its_good_ones_taken(s3_service: S3Service, caplog: pytest.LogCaptureFixture) -> None:
    # The whole message was deleted: its good records never ran.
    queue_url = await new_queue(s3_service)
    good = json.loads(MOTO_PUT)["Records"][0]
    bad = {**good, "s3": {**good["s3"], "object": {**good["s3"]["object"], "key": 5}}}
    await send(s3_service, queue_url, json.dumps({"Records": [good, bad]}))
    trigger, engine = poller_trigger(s3_service, queue_url)
    async with trigger:
        await wait_for(lambda: trigger.state()["bad"] == 1 and len(engine.accepted) == 2, 10, "the message handled")
        await wait_for(lambda: trigger.state()["records"] == 1, 5, "one record counted")
        assert await queue_depth(s3_service, queue_url) == 0
    assert sorted(e.function for e in engine.accepted) == ["audit", "ingest"]
    assert "1 of its records are not S3 notification records (Records[1].s3.object.key: expected a string); the others are taken" in caplog.text


async def test_poller_leaves_messages_when_acceptance_fails(s3_service: S3Service) -> None:
    queue_url = await new_queue(s3_service, VisibilityTimeout="1")
    await send(s3_service, queue_url, MOTO_PUT)
    trigger, engine = poller_trigger(s3_service, queue_url)
    engine.error = RuntimeError("disk full")
    async with trigger:
        await wait_for(lambda: trigger.state()["sqs"].startswith("failing"), 10, "failing state")
        assert engine.accepted == []
        # Not deleted: it comes back after the visibility timeout and is accepted then.
        await wait_for(lambda: len(engine.accepted) == 2, 10, "redelivered message accepted")
        await wait_for(lambda: trigger.state()["sqs"] == "polling", 5, "polling again")
        await wait_for(lambda: trigger.state()["accepted"] == 2, 5, "counted")
        assert await queue_depth(s3_service, queue_url) == 0


async def test_a_queue_that_refuses_the_poller_shows_as_refused_with_its_reason(s3_service: S3Service) -> None:
    # The endpoint answers (400: there is no such queue); it was shown as unreachable.
    trigger, _ = poller_trigger(s3_service, f"{s3_service.url}/123456789012/{unique('missing')}")
    await trigger.start()
    try:
        await wait_for(lambda: trigger.state()["sqs"] != "starting", 10, "a state past starting")
        await wait_for(lambda: trigger.state()["sqs"].startswith("refused"), 10, "refused state")
        state = trigger.state()["sqs"]
        assert "NonExistentQueue" in state and state.endswith("(HTTP 400)"), state
    finally:
        await trigger.stop()


async def test_poller_survives_an_unreachable_queue_and_recovers(tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    service = S3Service(f"http://127.0.0.1:{port}")
    queue = unique("late")
    # moto's queue URL form, known before moto runs.
    queue_url = f"{service.url}/123456789012/{queue}"
    trigger, engine = poller_trigger(service, queue_url)
    await trigger.start()
    moto: MotoServer | None = None
    try:
        await wait_for(lambda: trigger.state()["sqs"].startswith("unreachable"), 10, "unreachable state")
        await asyncio.sleep(0.5)  # a few backoff rounds; the task must still be alive
        assert trigger.state()["sqs"].startswith("unreachable")
        warnings = [r for r in caplog.records if r.name == "eventrun.triggers.s3.sqs" and r.levelno >= 30]
        assert len(warnings) == 1, "one log line per state change, not one per retry"
        moto = await asyncio.to_thread(MotoServer(port, tmp_path).start)
        async with service.client("sqs") as sqs:
            created = (await sqs.create_queue(QueueName=queue))["QueueUrl"]
        assert created == queue_url
        await send(service, queue_url, MOTO_PUT)
        await wait_for(lambda: len(engine.accepted) == 2, 15, "message accepted after recovery")
        assert trigger.state()["sqs"] == "polling"
    finally:
        await trigger.stop()
        if moto is not None:
            moto.stop()
    assert trigger.state()["sqs"] == "off"


async def test_a_queue_that_stops_answering_shows_as_unreachable_while_its_receive_waits(tmp_path: Path) -> None:
    # A hung endpoint (here moto, stopped by SIGSTOP) holds the receive until the client's read
    # timeout, twice: half a minute and more of "polling" while nothing was received.
    moto = await asyncio.to_thread(MotoServer(free_port(), tmp_path).start)
    assert moto.proc is not None
    try:
        service = S3Service(moto.url)
        trigger, engine = poller_trigger(service, await new_queue(service))
        async with trigger:
            await wait_for(lambda: trigger.state()["sqs"] == "polling", 10, "polling")
            moto.proc.send_signal(signal.SIGSTOP)
            late = 1 + ANSWER_GRACE  # the test's long poll is 1 s
            await wait_for(lambda: trigger.state()["sqs"].startswith("unreachable"), late + 3, "unreachable state")
            assert trigger.state()["sqs"] == "unreachable: no answer to a receive in 6s (its long poll is 1s)"
            assert "eventrun_s3_sqs_polling 0" in trigger.metrics()
            moto.proc.send_signal(signal.SIGCONT)
            await wait_for(lambda: trigger.state()["sqs"] == "polling", 10, "polling again")
            assert "eventrun_s3_sqs_polling 1" in trigger.metrics()
    finally:
        moto.proc.send_signal(signal.SIGCONT)
        moto.stop()


async def test_stop_finishes_the_batch_in_hand(s3_service: S3Service) -> None:
    queue_url = await new_queue(s3_service)
    trigger, engine = poller_trigger(s3_service, queue_url)
    engine.gate = asyncio.Event()
    await trigger.start()
    await send(s3_service, queue_url, MOTO_PUT)
    await asyncio.wait_for(engine.entered.wait(), 10)
    stopping = asyncio.create_task(trigger.stop())
    await asyncio.sleep(0.3)
    assert not stopping.done(), "stop() must wait for the batch being accepted"
    engine.gate.set()
    await asyncio.wait_for(stopping, 10)
    assert len(engine.accepted) == 2
    assert await queue_depth(s3_service, queue_url) == 0


async def test_stop_interrupts_a_long_poll(s3_service: S3Service) -> None:
    queue_url = await new_queue(s3_service)
    config = manifest(
        sqs_queue_url=queue_url,
        access_key_id=s3_service.access_key_id,
        secret_access_key=s3_service.secret_access_key,
    )
    trigger = S3Trigger(FakeEngine(config), config)  # the default 20 s long poll
    await trigger.start()
    await wait_for(lambda: trigger.state()["sqs"] == "starting", 1, "started")
    await asyncio.sleep(0.5)
    started = time.monotonic()
    await trigger.stop()
    assert time.monotonic() - started < 2.0


def test_poller_talks_to_the_queue_url_host() -> None:
    # [s3] endpoint_url may be a MinIO without SQS; the queue URL says where SQS is.
    poller = SqsPoller(
        "https://sqs.eu-west-1.amazonaws.com/123456789012/uploads",
        ingest=None,  # type: ignore[arg-type]
        counters=None,  # type: ignore[arg-type]
        region="eu-west-1",
    )
    assert poller._endpoint == "https://sqs.eu-west-1.amazonaws.com"
    assert poller.state == "off"


def test_routes_are_plain_aiohttp_route_defs() -> None:
    trigger = S3Trigger(FakeEngine(manifest()), manifest())
    assert all(isinstance(route, web.RouteDef) for route in trigger.routes())
    assert "/triggers/s3" in trigger.openapi_paths()
