"""The triggers' pure parsers fuzzed: any input gives the normal result or the documented error.

The normal result is an envelope the store can keep: it encodes and decodes back to itself.
Documented errors: InvalidParameter (HTTP), BadNotification (S3, an InvalidParameter), none at
all for Kafka records (odd bytes are carried as base64), ValueError for timer schedules.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from datetime import datetime
from typing import Any

from aiokafka.structs import ConsumerRecord
from eventrun.engine.envelope import Envelope, decode, encode, encode_many
from eventrun.engine.errors import InvalidParameter
from eventrun.engine.manifest import FunctionConfig
from eventrun.triggers.http.parser import to_envelope as http_envelope
from eventrun.triggers.kafka.parser import (
    DEFAULT_MAX_JSON,
    _structured_cloudevent,
    to_accept,
    to_envelope,
    to_envelopes,
)
from eventrun.triggers.s3 import (
    BadNotification,
    check_authorization,
    parse_body,
    parse_record,
    records_from_body,
)
from eventrun.triggers.s3 import to_envelope as s3_envelope
from eventrun.triggers.s3 import to_envelopes as s3_envelopes
from eventrun.triggers.timer import (
    next_slot,
    parse_cron,
    parse_slot,
    parse_timezone,
    slot_id,
)
from eventrun.triggers.timer.parser import UTC
from hypothesis import given, note, settings
from hypothesis import strategies as st

# When a test fails, hypothesis's pytest plugin imports its patch writer (libcst) in a report
# hook, where warnings are errors; libcst's import warns (mypy_extensions.TypedDict is
# deprecated), which turns the failure report into an INTERNALERROR. Imported here instead.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "mypy_extensions.TypedDict is deprecated", DeprecationWarning)
    with contextlib.suppress(ImportError):
        import hypothesis.extra._patching  # noqa: F401

# Each test note()s its input: schemathesis (installed for the API's fuzzing), once imported,
# blanks hypothesis's own "Falsifying example" values for the whole session.
FUZZ = settings(max_examples=400, deadline=None, derandomize=True, database=None)

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def or_junk(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """The strategy's values, or any JSON value in their place."""
    return strategy | JSON


def deep(levels: int) -> bytes:
    """JSON text of arrays nested `levels` deep."""
    return b"[" * levels + b"]" * levels


# Header text as aiohttp hands it over: bytes that are not UTF-8 become lone surrogates.
HEADER = st.binary(max_size=40).map(lambda raw: raw.decode("utf-8", "surrogateescape"))


def assert_storable(envelope: Envelope) -> None:
    """What the store does with an envelope works: encoded, it decodes back to the same one."""
    assert decode(encode(envelope)) == envelope, envelope


# --------------------------------------------------------------------------- HTTP


JSON_TEXT = JSON.map(lambda value: json.dumps(value).encode())
CONTENT_TYPES = st.sampled_from(["application/json", "application/cloudevents+json", "text/plain"])


@given(
    body=st.binary(max_size=200) | JSON_TEXT | st.sampled_from([deep(253), deep(254), deep(400)]),
    content_type=st.none() | HEADER | CONTENT_TYPES,
    idempotency_key=st.none() | HEADER | st.text(min_size=250, max_size=260),
)
@FUZZ
def test_an_http_request_is_an_envelope_or_invalid_parameter(
    body: bytes, content_type: str | None, idempotency_key: str | None
):
    note(f"body={body!r} content_type={content_type!r} idempotency_key={idempotency_key!r}")
    try:
        envelope = http_envelope("f", body, content_type, idempotency_key)
    except InvalidParameter:
        return
    stored = encode(envelope)  # (its data may hold integers beyond 64 bits as the body's text)
    assert_storable(decode(stored))
    data = json.loads(stored)["data"]
    if data is not None and not (isinstance(data, dict) and "body_base64" in data):
        assert data == json.loads(body)  # the body as sent, every digit of it


# --------------------------------------------------------------------------- S3 / MinIO


S3_FUNCTIONS = {
    "f": FunctionConfig(handler="functions/x.py:main_handler", triggers=({"type": "s3", "bucket": "fuzz"},)),
    "g": FunctionConfig(
        handler="functions/x.py:main_handler",
        triggers=({"type": "s3", "bucket": "fuzz", "events": ["*"], "prefix": "in/", "suffix": ".csv"},),
    ),
}

# A bucket notification record, whole and right (so it reaches the envelope) ...
WHOLE_RECORD = st.builds(
    lambda name, time, bucket, obj: {
        "eventName": name, "eventTime": time, "s3": {"bucket": {"name": bucket}, "object": obj}
    },
    name=st.sampled_from(["s3:ObjectCreated:Put", "ObjectCreated:Copy", "s3:ObjectRemoved:Delete"]),
    time=or_junk(st.sampled_from(["2026-12-05T08:00:00.000Z", "not a time", ""])),
    bucket=st.sampled_from(["fuzz", "other"]),
    obj=st.fixed_dictionaries(
        {"key": st.sampled_from(["in/a.csv", "in%2Fsales+2024.csv", "%E0%A4%A", "%ED%A0%80"]) | st.text(max_size=10)},
        optional={
            "size": or_junk(st.integers()),
            "eTag": JSON,
            "versionId": JSON,
            "sequencer": or_junk(st.text(max_size=20)),
            "extra": st.sampled_from([json.loads(deep(level)) for level in (250, 251, 252, 260)]) | JSON,
        },
    ),
)
# ... or with one part missing or wrong.
PARTS = [("eventName",), ("s3",), ("s3", "bucket"), ("s3", "bucket", "name"), ("s3", "object"), ("s3", "object", "key")]


@st.composite
def broken_records(draw: st.DrawFn) -> dict[str, Any]:
    """A whole record with one part removed or replaced by any JSON value."""
    record = draw(WHOLE_RECORD)
    *path, last = draw(st.sampled_from(PARTS))
    parent = record
    for name in path:
        parent = parent[name]
    if draw(st.booleans()):
        del parent[last]
    else:
        parent[last] = draw(JSON)
    return record


RECORD = WHOLE_RECORD | broken_records() | JSON
EVENT = st.sampled_from(["s3:TestEvent", "other"])
NOTIFICATION = st.fixed_dictionaries(
    {"Records": st.lists(RECORD, max_size=3)}, optional={"EventName": JSON, "Key": JSON, "Event": EVENT}
) | st.fixed_dictionaries({}, optional={"Records": JSON, "Event": EVENT})
# The same, or wrapped in an SNS notification as SQS delivers it from an SNS topic.
BODY = NOTIFICATION | NOTIFICATION.map(lambda inner: {"Type": "Notification", "Message": json.dumps(inner)}) | JSON


def _s3_envelopes(records: list[dict[str, Any]]) -> None:
    for record in records:
        assert_storable(s3_envelope(parse_record(record), "any"))  # matched or not
        for envelope in s3_envelopes(record, S3_FUNCTIONS):
            assert_storable(envelope)


@given(raw=st.binary(max_size=300) | BODY.map(lambda body: json.dumps(body).encode()) | BODY.map(json.dumps))
@FUZZ
def test_an_s3_body_is_records_or_bad_notification(raw: bytes | str):
    note(f"raw={raw!r}")
    try:
        records = parse_body(raw)
    except BadNotification:
        return
    # "A body that passes can be turned into envelopes without further errors."
    _s3_envelopes(records)


@given(body=BODY)
@FUZZ
def test_a_parsed_s3_body_is_records_or_bad_notification(body: Any):
    note(f"body={body!r}")
    try:
        records = records_from_body(body)
    except BadNotification:
        return
    _s3_envelopes(records)


@given(header=st.none() | HEADER | HEADER.map("Bearer ".__add__))
@FUZZ
def test_any_authorization_header_is_checked_without_raising(header: str | None):
    note(f"header={header!r}")
    reason = check_authorization(header, "the-token")
    if header is None or "the-token" not in header:
        assert isinstance(reason, str) and reason, reason
    else:
        assert reason is None or isinstance(reason, str), reason
    assert check_authorization("Bearer the-token", "the-token") is None


# --------------------------------------------------------------------------- Kafka


VALUE = st.none() | st.binary(max_size=60) | JSON_TEXT
VALUE |= st.sampled_from([b"1e400", b'"\\ud800"', deep(250), deep(251), deep(300), deep(2000)])
VALUE |= st.sampled_from([b'{"n": 123456789012345678901234567890}', b'[\r\n -18446744073709551617,\n 1.50\n]\n'])
VALUE |= st.builds(
    lambda event, data: json.dumps({**event, "data": data}).encode(),
    st.fixed_dictionaries(
        {}, optional={"id": or_junk(st.just("e-1")), "source": or_junk(st.just("/s")), "type": or_junk(st.just("t"))}
    ),
    JSON | st.just(json.loads(deep(252))),
)
HEADER_NAMES = st.sampled_from(["content-type", "ce_id", "ce_source", "ce_type", "ce_time", "ce_subject", "x"])
HEADER_NAMES |= st.text(max_size=8)
HEADER_VALUES = st.sampled_from([b"application/cloudevents+json", b"e-1", b"/s", b"t"])
HEADER_VALUES |= st.none() | st.binary(max_size=20)


@st.composite
def kafka_records(draw: st.DrawFn) -> ConsumerRecord[bytes, bytes]:
    """A record as aiokafka hands it over, with odd bytes anywhere."""
    key = draw(st.none() | st.binary(max_size=20) | st.sampled_from([b"k", b"\xff"]))
    value = draw(VALUE)
    return ConsumerRecord(
        topic=draw(st.sampled_from(["orders", "events"]) | st.text(max_size=10)),
        partition=draw(st.integers(0, 2**31 - 1)),
        offset=draw(st.integers(0, 2**63 - 1)),
        timestamp=draw(st.none() | st.integers(-(2**63), 2**63 - 1) | st.integers(0, 2**41)),
        timestamp_type=0,
        key=key,
        value=value,
        checksum=None,
        serialized_key_size=len(key) if key is not None else -1,
        serialized_value_size=len(value) if value is not None else -1,
        headers=tuple(draw(st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=4))),
    )


def _comparable(envelope: Envelope, record: ConsumerRecord[bytes, bytes]) -> dict[str, Any]:
    event = envelope.to_dict()
    if not (record.timestamp is not None and 0 <= record.timestamp < 2**41):
        event.pop("time")  # stamped "now" when the record has no usable timestamp
    return event


@given(
    records=st.lists(kafka_records(), max_size=5),
    epoch=st.sampled_from([0, 3]),
    max_json=st.sampled_from([DEFAULT_MAX_JSON, 16]),
)
@FUZZ
def test_kafka_records_are_always_envelopes(records: list[ConsumerRecord[bytes, bytes]], epoch: int, max_json: int):
    note(f"records={records!r} epoch={epoch} max_json={max_json}")
    # "Never raises for odd bytes": every record is an envelope, in order, in a batch or alone.
    envelopes = to_envelopes(records, "f", epoch=epoch, max_json=max_json)
    assert len(envelopes) == len(records) == len(to_accept(records, "f", epoch=epoch, max_json=max_json))
    for envelope, record in zip(envelopes, records):
        assert_storable(envelope)
        alone = to_envelope(record, "f", epoch=epoch, max_json=max_json)
        assert _comparable(alone, record) == _comparable(envelope, record)
    # What is stored is one line, and a JSON value is the producer's, every digit of it.
    for written, record in zip(encode_many(to_accept(records, "f", epoch=epoch, max_json=max_json)), records):
        assert b"\n" not in written and b"\r" not in written
        data = json.loads(written)["data"]
        if _structured_cloudevent(record.value, record.headers, max_json) is None and "value" in data:
            assert data["value"] == (None if record.value is None else json.loads(record.value))


# --------------------------------------------------------------------------- timer


FIELD = st.sampled_from(
    [
        "*", "?", "0", "7", "8", "59", "60", "1-5", "5-1", "*/0", "*/15", "1/2", "MON-FRI", "fri-sun", "SUN",
        "sun-sat/2", "L", "last", "1st mon", "1,2,3", "1,,2", "99999999999999999999", "-1", "1-", "2099", "1969",
        "29", "30", "31", "2", "#", "mon#2",
    ]
) | st.text(max_size=6)
CRON = st.lists(FIELD, min_size=5, max_size=7).map(" ".join) | st.text(max_size=30)
ZONE = st.sampled_from(["UTC", "Asia/Shanghai", "America/New_York", "Europe/London", "Australia/Lord_Howe"])


# Any clock reading a server may have, up to the last a datetime holds.
CLOCK = st.datetimes(datetime(1970, 1, 1), datetime.max, timezones=st.just(UTC)) | st.sampled_from(
    [datetime.max.replace(tzinfo=UTC), datetime(9999, 12, 31, 23, 59, tzinfo=UTC)]
)


@given(expr=CRON, zone=ZONE, after=CLOCK)
@FUZZ
def test_a_cron_expression_is_a_schedule_or_value_error(expr: str, zone: str, after: datetime):
    note(f"expr={expr!r} zone={zone!r} after={after!r}")
    try:
        schedule = parse_cron(expr, zone)
    except ValueError:
        return
    fire = next_slot(schedule, after)
    assert fire is None or (fire > after and fire.tzinfo is not None), fire


@given(name=st.text(max_size=40) | st.sampled_from(["utc", "Asia/Shangai", "../etc/passwd", "America", "\0", "\ud800"]))
@FUZZ
def test_a_time_zone_is_a_zone_or_value_error(name: str):
    note(f"name={name!r}")
    try:
        zone = parse_timezone(name)
    except ValueError:
        return
    assert datetime(2026, 1, 1, tzinfo=zone).utcoffset() is not None


@given(text=st.text(max_size=30) | st.datetimes(timezones=st.just(UTC)).map(slot_id))
@FUZZ
def test_a_slot_text_is_a_time_or_value_error(text: str):
    note(f"text={text!r}")
    try:
        slot = parse_slot(text)
    except ValueError:
        return
    assert slot.tzinfo is UTC
    assert parse_slot(slot_id(slot)) == slot
