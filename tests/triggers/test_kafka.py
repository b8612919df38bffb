"""The Kafka trigger without a broker: to_envelope on captured records, start positions, lifecycle."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import struct
import time
from collections.abc import Sequence
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import UnsupportedCodecError
from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.structs import ConsumerRecord

from eventrun.engine.api import Accepted
from eventrun.engine.envelope import (
    Envelope,
    Templated,
    TemplatedBatch,
    concatenated,
    decode,
    encode,
    encode_many,
    expand,
    template_prefix,
)
from eventrun.engine.errors import ManifestError, StoreError
from eventrun.engine.manifest import FunctionConfig, KafkaConfig, Manifest
from eventrun.engine.postgres import PostgresStore
from eventrun.triggers.kafka import KafkaTrigger, Settings, TopicConsumer, record_id, to_envelope
from eventrun.triggers.kafka.client import group_generation, new_client
from eventrun.triggers.kafka.handoff import UNCOMMITTED, HandOff
from eventrun.triggers.kafka.health import Health
from eventrun.triggers.kafka.parser import (
    DEFAULT_MAX_JSON,
    RECORD_TYPE,
    fingerprint,
    record_data,
    record_template,
    record_time,
    _general,
    source_of,
    to_accept,
    to_envelopes,
    undecodable_envelope,
    undecodable_fingerprint,
)
from eventrun.triggers.kafka.partitions import Partitions
from eventrun.triggers.kafka.peek import Peek
from eventrun.triggers.kafka.positions import FENCE_ERA, Mark, Marks, Verdict, decide, fence_for, judge, latest_offset, read_row
from eventrun.triggers.kafka.trigger import _quiet_client_logs

TS = 1714557600123  # 2024-05-01T10:00:00.123Z
BINARY_HEADERS = [("ce_id", b"evt-1"), ("ce_source", b"/shop"), ("ce_type", b"t")]  # CloudEvents binary mode


def record(
    value: bytes | None = b'{"order": 42}',
    *,
    key: bytes | None = b"order-42",
    headers: Sequence[tuple[str, bytes | None]] = (),
    topic: str = "orders",
    partition: int = 2,
    offset: int = 17,
    timestamp: int = TS,
) -> ConsumerRecord[bytes, bytes]:
    """A record as aiokafka hands it over (no deserializers)."""
    return ConsumerRecord(
        topic=topic, partition=partition, offset=offset, timestamp=timestamp, timestamp_type=0,
        key=key, value=value, checksum=None,
        serialized_key_size=len(key) if key is not None else -1,
        serialized_value_size=len(value) if value is not None else -1,
        headers=tuple(headers),
    )


def roundtrip(envelope: Envelope) -> dict[str, Any]:
    """The event as a handler gets it, through eventrun's one JSON encoder."""
    event = json.loads(encode(envelope))
    assert decode(encode(envelope)) == envelope
    return event  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- to_envelope


def test_a_json_record() -> None:
    event = roundtrip(to_envelope(record(headers=[("trace", b"abc")]), "orders-fn"))
    assert event == {
        "specversion": "1.0",
        "id": "2-17",
        "source": "kafka://orders",
        "type": "eventrun.kafka.record",
        "subject": "order-42",
        "time": "2024-05-01T10:00:00.123Z",
        "datacontenttype": "application/json",
        "eventrunfunction": "orders-fn",
        "eventruntrigger": "kafka",
        "data": {
            "key": "order-42",
            "value": {"order": 42},
            "headers": {"trace": "abc"},
            "partition": 2,
            "offset": 17,
            "timestamp": TS,
        },
    }


def test_record_ids() -> None:
    assert record_id(0, 5) == "0-5"
    assert record_id(3, 12, 2) == "3-12-2"
    assert to_envelope(record(), "f", epoch=1).id == "2-17-1"


@pytest.mark.parametrize(
    "value",
    [
        b"plain text",
        b"\xff\xfe\x00\x01",
        b"",
        b"{",
        b'{"n": NaN}',
        b"[" * 5000 + b"]" * 5000,  # nested too deep to parse
        "caf\u00e9".encode("latin-1"),
    ],
    ids=["text", "binary", "empty", "truncated", "nan", "deep", "latin1"],
)
def test_values_that_are_not_json_arrive_as_base64(value: bytes) -> None:
    data = roundtrip(to_envelope(record(value), "f"))["data"]
    assert "value" not in data
    assert base64.b64decode(data["value_base64"]) == value


def test_a_tombstone_has_a_null_value() -> None:
    data = roundtrip(to_envelope(record(None), "f"))["data"]
    assert data["value"] is None and "value_base64" not in data


def test_a_value_over_the_json_limit_is_not_parsed() -> None:
    value = json.dumps({"blob": "x" * 1000}).encode()
    assert to_envelope(record(value), "f", max_json=len(value)).data["value"] == {"blob": "x" * 1000}
    data = to_envelope(record(value), "f", max_json=len(value) - 1).data
    assert base64.b64decode(data["value_base64"]) == value


def test_json_scalars_are_values() -> None:
    assert to_envelope(record(b"42"), "f").data["value"] == 42
    assert to_envelope(record(b'"text"'), "f").data["value"] == "text"
    assert to_envelope(record(b"null"), "f").data["value"] is None


def test_keys() -> None:
    event = roundtrip(to_envelope(record(key=b"\xff\x00"), "f"))
    assert "subject" not in event
    # Instead of `key`: a handler's `data["key"] is None` means "no key", never "a binary one".
    assert "key" not in event["data"] and base64.b64decode(event["data"]["key_base64"]) == b"\xff\x00"
    event = roundtrip(to_envelope(record(key=None), "f"))
    assert "subject" not in event and event["data"]["key"] is None and "key_base64" not in event["data"]
    assert to_envelope(record(key="ключ".encode()), "f").subject == "ключ"


@pytest.mark.parametrize("headers", [(), [("trace", b"t")], BINARY_HEADERS], ids=["usual", "header", "cloudevents-binary"])
@pytest.mark.parametrize("alone", [True, False])
def test_an_empty_key_gives_no_subject(headers: list[tuple[str, bytes]], alone: bool) -> None:
    # CloudEvents: a subject, if present, is a non-empty string. The data keeps the key as it was.
    rec = record(key=b"", headers=headers)
    batch = [rec] if alone else [record(offset=1), rec, record(offset=3)]
    event = json.loads(encode_many(to_accept(batch, "f"))[0 if alone else 1])
    assert "subject" not in event and event["data"]["key"] == ""
    assert to_envelopes(batch, "f")[0 if alone else 1].subject is None


@pytest.mark.parametrize("alone", [True, False])
def test_a_key_that_is_not_utf8_arrives_as_key_base64_only(alone: bool) -> None:
    rec = record(key=b"\xff\xfe", headers=[("trace", b"t")] if alone else ())
    batch = [rec] if alone else [record(offset=1), rec, record(offset=3)]
    data = json.loads(encode_many(to_accept(batch, "f"))[0 if alone else 1])["data"]
    assert "key" not in data and data["key_base64"] == base64.b64encode(b"\xff\xfe").decode()


def test_headers() -> None:
    headers = [("a", b"1"), ("bin", b"\xff\xfe"), ("none", None), ("dup", b"x"), ("dup", b"\x80"), ("empty", b"")]
    assert roundtrip(to_envelope(record(headers=headers), "f"))["data"]["headers"] == {
        "a": "1",
        "bin": {"base64": base64.b64encode(b"\xff\xfe").decode()},
        "none": None,
        "dup": ["x", {"base64": base64.b64encode(b"\x80").decode()}],
        "empty": "",
    }


def test_a_record_without_a_timestamp() -> None:
    envelope = to_envelope(record(timestamp=-1), "f")
    assert envelope.data["timestamp"] is None
    assert envelope.time.endswith("Z") and envelope.time[:4].isdigit()


def test_record_times_are_rfc3339_utc() -> None:
    assert to_envelope(record(timestamp=0), "f").time == "1970-01-01T00:00:00.000Z"
    assert to_envelope(record(timestamp=TS + 1000), "f").time == "2024-05-01T10:00:01.123Z"
    assert to_envelope(record(timestamp=TS - 123), "f").time == "2024-05-01T10:00:00.000Z"


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"value": b'{"order": 7, "item": "widget", "note": "' + b"x" * 64 + b'"}'},
        {"key": "ключ".encode()},
        {"key": b""},
        {"key": None},
        {"key": b"\xff\x00"},
        {"value": None},
        {"value": b""},
        {"value": b"not json"},
        {"value": b"[1, 2.5]"},
        {"value": b'"\\ud800"'},
        {"timestamp": 0},
        {"timestamp": -1},
        {"timestamp": None},
        {"timestamp": 10**17},
        {"partition": 0, "offset": 0, "topic": "a.b-c_d"},
    ],
    ids=lambda changes: ",".join(f"{k}={v!r}"[:24] for k, v in changes.items()) or "plain",
)
@pytest.mark.parametrize("epoch", [0, 2])
def test_a_record_without_headers_is_built_like_any_other(changes: dict[str, Any], epoch: int) -> None:
    # The usual record takes a shorter path; it must give what the general pieces give.
    rec = record(**changes)
    envelope = to_envelope(rec, "f", epoch=epoch)
    data = record_data(rec, (), DEFAULT_MAX_JSON)
    now_stamped = rec.timestamp is None or rec.timestamp < 0  # stamped when built, maybe a millisecond apart
    assert now_stamped or envelope.time == record_time(rec.timestamp)
    built = Envelope(
        id=record_id(rec.partition, rec.offset, epoch),
        source=source_of(rec.topic),
        type=RECORD_TYPE,
        subject=data.get("key") or None,
        time=envelope.time if now_stamped else record_time(rec.timestamp),
        function="f",
        trigger="kafka",
        data=data,
    )
    assert envelope == decode(encode(built))  # (a value is held as its text until written)
    assert list(envelope.data) == list(data)


@pytest.mark.parametrize(
    "key", [b"order-42", b'quote " and back\\slash', "\u00fcn\u00ef \u20ac \U0001f680".encode(), b"ctl\x01\x1f\x7f"]
)
@pytest.mark.parametrize(
    "value",
    [
        b'{"order": 42}',
        b' {  "a" : [1, 2.50, -0.0, 1e3, {"b": null}] }\t ',
        b'"quoted \\"text\\" \\u00e9 \\/ \\u0000"',
        b"true",
        b"-7",
        b'{"dup": 1, "dup": 2}',
        "{\"\u00e9t\u00e9\": \"\U0001f680\"}".encode(),
    ],
)
def test_the_usual_record_is_written_straight_into_its_json(key: bytes, value: bytes) -> None:
    rec = record(value, key=key, topic="odd.topic_name-1")
    (written,) = to_accept([rec], "f-1", epoch=2)
    built = _general(rec, "f-1", 2, DEFAULT_MAX_JSON)  # what the general path builds for it
    assert written.__class__ is Templated
    assert (written.id, written.source, written.function, written.trigger) == (built.id, built.source, "f-1", "kafka")
    # What the handler gets, read by the standard library as the worker reads it: the same
    # event, keys in the same order. (The value keeps the producer's spacing; it means the same.)
    event = json.loads(expand(written.stored, written.template))
    assert event == json.loads(encode(built))
    assert list(event) == list(built.to_dict()) and list(event["data"]) == list(built.data)
    assert decode(expand(written.stored, written.template)) == decode(encode(built))
    assert b"\n" not in expand(written.stored, written.template)  # an instance reads an envelope a line


@pytest.mark.parametrize(
    "value",
    [b'{\n  "order": 7,\n  "big": 123456789012345678901234567890\n}', b'{"a":\r\n1}', b'{"order": 7}\n', b"[1,\r2]",
     b'{"text": "two\\nlines"}\r\n'],
)
def test_a_value_with_line_breaks_is_written_on_one_line(value: bytes) -> None:
    # JSON may hold line breaks between tokens; written into the envelope as they are, they cut
    # it in two where the instance reads it (the run died with InstanceDied).
    (written,) = to_accept([record(value, key=b"k")], "f")
    assert written.__class__ is Templated
    envelope = expand(written.stored, written.template)
    assert b"\n" not in envelope and b"\r" not in envelope
    assert json.loads(envelope)["data"]["value"] == json.loads(value)  # every digit, every escaped line break


def test_a_written_value_keeps_integers_beyond_64_bits() -> None:
    big = 123456789012345678901234567890
    (written,) = to_accept([record(str(big).encode())], "f")
    assert json.loads(expand(written.stored, written.template))["data"]["value"] == big


BIG = 123456789012345678901234567890  # beyond 64 bits: orjson reads it as a float


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"key": None},
        {"headers": [("trace", b"abc")]},
        {"key": b"\xff\x00"},
        {"timestamp": -1},
        {"headers": BINARY_HEADERS},
        {"key": None, "value": b'{\n  "order_id": %d\r\n}\n' % BIG},
    ],
    ids=["usual", "no-key", "header", "binary-key", "no-timestamp", "cloudevents-binary", "no-key-pretty"],
)
@pytest.mark.parametrize("alone", [True, False])
def test_a_value_keeps_every_digit_on_every_path(changes: dict[str, Any], alone: bool) -> None:
    # Only the usual record's path copied the value's text; the others wrote it again from
    # what orjson parsed, and the handler got 1.2345678901234568e+29.
    rec = record(**{"value": b'{"order_id": %d}' % BIG, **changes})
    batch = [rec] if alone else [record(offset=1), rec, record(offset=3, value=b"not json")]
    written = encode_many(to_accept(batch, "f"))
    event = json.loads(written[0 if alone else 1])  # read as the worker reads it
    assert event["data"]["value"] == {"order_id": BIG}
    assert b"%d" % BIG in written[0 if alone else 1]
    assert all(b"\n" not in w and b"\r" not in w for w in written)  # an instance reads an envelope a line


def test_a_structured_cloudevent_keeps_every_digit_of_its_data() -> None:
    structured = [("content-type", b"application/cloudevents+json")]
    value = b'{"id": "e", "source": "/s", "type": "t", "data": {"n": %d, "m": [%d, 1.5, -7]}}' % (BIG, -BIG)
    (written,) = encode_many(to_accept([record(value, headers=structured)], "f"))
    event = json.loads(written)
    assert (event["id"], event["data"]) == ("e", {"n": BIG, "m": [-BIG, 1.5, -7]})
    edge = b'{"id": "e", "source": "/s", "type": "t", "data": [18446744073709551615, -9223372036854775808, "%d"]}' % BIG
    (written,) = encode_many(to_accept([record(edge, headers=structured)], "f"))
    assert json.loads(written)["data"] == [2**64 - 1, -(2**63), str(BIG)]


def test_only_the_usual_record_is_written_straight_into_json() -> None:
    batch = [record(offset=1), record(offset=2, headers=[("h", b"v")]), record(offset=3, value=b"not json"),
             record(offset=4, key=None), record(offset=5, timestamp=-1), record(offset=6, key=b"\xff")]
    assert [item.__class__ for item in to_accept(batch, "f")] == [Templated] + [Envelope] * 5


def test_usual_records_of_one_topic_come_by_column_and_the_others_keep_their_place() -> None:
    usual = [record(offset=n) for n in range(3)]
    written = to_accept(usual, "f")
    assert written.__class__ is TemplatedBatch and written.ids == ["2-0", "2-1", "2-2"]  # type: ignore[attr-defined]
    items = list(written)
    assert items == [Templated(f"2-{n}", "kafka://orders", "f", "kafka", items[n].stored, items[n].template) for n in range(3)]
    assert list(written[1:]) == items[1:] and written[-1] == items[-1]
    # A record that is not a usual one, or a second topic: each envelope in its place, one by one.
    mixed = to_accept([usual[0], record(offset=3, value=b"not json"), record(offset=4)], "f")
    assert [(e.__class__, e.id) for e in mixed] == [(Templated, "2-0"), (Envelope, "2-3"), (Templated, "2-4")]
    two = to_accept([record(offset=5), record(offset=6, topic="other")], "f")
    assert [(e.__class__, e.source) for e in two] == [(Templated, "kafka://orders"), (Templated, "kafka://other")]
    assert list(to_accept([], "f")) == []


def test_the_partitions_of_a_fetch_go_as_one_batch_when_they_share_a_template() -> None:
    p2 = to_accept([record(partition=2, offset=n) for n in range(2)], "f")
    p3 = to_accept([record(partition=3, offset=n) for n in range(2)], "f")
    joined = concatenated([p2, p3])
    assert joined.__class__ is TemplatedBatch and list(joined) == [*p2, *p3]
    assert concatenated([p2]) is p2
    other_epoch = to_accept([record(partition=4, offset=0)], "f", epoch=1)
    odd = to_accept([record(partition=5, offset=0, value=b"x")], "f")
    for parts in ([p2, other_epoch], [p2, odd]):
        flat = concatenated(parts)
        assert flat.__class__ is list and flat == [e for part in parts for e in part]


def test_the_usual_records_of_a_topic_share_one_template_and_keep_only_their_fields() -> None:
    batch = [record(offset=n, key=b"k-%d" % n, value=b'{"n": %d}' % n) for n in range(3)]
    written = to_accept(batch, "f")
    template, _ = record_template("kafka://orders", "f", 0)
    assert all(item.template is template for item in written)
    prefix = template_prefix(template)
    assert [item.stored for item in written] == [
        prefix + b'2\x00%d\x00"k-%d"\x00%s\x00{"n": %d}\x00%d' % (n, n, record_time(TS).encode(), n, TS) for n in range(3)
    ]
    assert len(written[0].stored) < len(encode(to_envelope(batch[0], "f"))) / 2


@pytest.mark.parametrize("name", ["100%", "%(0)b", "%s%%"])
def test_a_percent_sign_in_a_topic_or_function_name_is_kept_as_it_is(name: str) -> None:
    rec = record(topic=name)
    (written,) = to_accept([rec], name, epoch=1)
    event = json.loads(expand(written.stored, written.template))
    assert (event["source"], event["eventrunfunction"], event["id"]) == (f"kafka://{name}", name, "2-17-1")


def test_a_batch_gives_each_record_the_envelope_it_gets_alone() -> None:
    # Plain records, odd ones, CloudEvents headers and two topics, mixed in one batch.
    batch = [
        record(offset=1),
        record(offset=2, topic="other"),
        record(offset=3, value=b"not json"),
        record(offset=4, headers=[("ce_id", b"e4"), ("ce_source", b"/s"), ("ce_type", b"t"), ("ce_specversion", b"1.0")]),
        record(offset=5, key=None),
        record(offset=6),
    ]
    built = to_envelopes(batch, "f", epoch=3)
    assert built == [to_envelope(r, "f", epoch=3) for r in batch]
    assert [e.source for e in built] == ["kafka://orders", "kafka://other", "kafka://orders", "/s", "kafka://orders", "kafka://orders"]
    assert [e.id for e in built] == ["2-1-3", "2-2-3", "2-3-3", "e4", "2-5-3", "2-6-3"]


def test_records_of_a_batch_get_their_own_times() -> None:
    # The batch loop reuses the time text while the timestamp repeats; it must never carry a
    # time over to a record with another timestamp, nor past one it cannot format.
    stamps = [TS, TS, TS + 1, TS + 1000, 10**17, 10**17, TS + 1000, -1, TS, 0, 0]
    batch = [record(offset=i, timestamp=stamp) for i, stamp in enumerate(stamps)]
    built = to_envelopes(batch, "f")
    for rec, envelope in zip(batch, built):
        if rec.timestamp is not None and rec.timestamp >= 0 and rec.timestamp < 10**17:
            assert envelope.time == record_time(rec.timestamp), rec.offset
        assert envelope.data["timestamp"] == (rec.timestamp if rec.timestamp >= 0 else None)
    assert built[3].time not in (built[4].time, built[5].time)  # 10**17 ms has no date: stamped when built
    assert [e.time for e in built[:4]] == [
        "2024-05-01T10:00:00.123Z", "2024-05-01T10:00:00.123Z", "2024-05-01T10:00:00.124Z", "2024-05-01T10:00:01.123Z",
    ]


# --------------------------------------------------------------------------- CloudEvents


BINARY = [
    ("ce_specversion", b"1.0"),
    ("ce_id", b"evt-1"),
    ("ce_source", b"/shop"),
    ("ce_type", b"com.example.created"),
    ("ce_subject", b"orders/42"),
    ("ce_time", b"2024-05-01T09:00:00Z"),
    ("ce_traceparent", b"00-abc-def-01"),
]


def test_cloudevents_binary_mode_keeps_the_producers_attributes() -> None:
    event = roundtrip(to_envelope(record(headers=BINARY), "f", epoch=3))
    assert (event["id"], event["source"], event["type"], event["subject"], event["time"]) == (
        "evt-1", "/shop", "com.example.created", "orders/42", "2024-05-01T09:00:00Z",
    )
    # The record stays the data; every header, extensions included, is still there.
    assert event["data"]["value"] == {"order": 42}
    assert event["data"]["headers"]["ce_traceparent"] == "00-abc-def-01"
    assert event["data"]["partition"] == 2 and event["data"]["offset"] == 17


def test_cloudevents_binary_mode_defaults() -> None:
    headers = [("ce_id", b"evt-1"), ("ce_source", b"/shop"), ("ce_type", b"t")]
    envelope = to_envelope(record(headers=headers), "f")
    assert envelope.subject == "order-42"  # the key, as for any record
    assert envelope.time == "2024-05-01T10:00:00.123Z"
    assert envelope.datacontenttype == "application/json"


@pytest.mark.parametrize(
    ("value", "content_type", "data"),
    [
        (b"\x89PNG\r\n\x1a\n", b"image/png", {"value_base64": base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()}),
        (b"id,total\n9,19.5\n", b"text/csv; charset=utf-8", {"value_base64": base64.b64encode(b"id,total\n9,19.5\n").decode()}),
        (b'{"order": 42}', b"application/json", {"value": {"order": 42}}),
    ],
    ids=["png", "csv", "json"],
)
def test_cloudevents_binary_mode_takes_datacontenttype_from_the_content_type_header(
    value: bytes, content_type: bytes, data: dict[str, Any]
) -> None:
    # The Kafka binding maps the content-type header to datacontenttype in binary mode; it was
    # "application/json" whatever the header said. `data` stays the record, its value as any value.
    event = roundtrip(to_envelope(record(value, headers=[*BINARY_HEADERS, ("Content-Type", content_type)]), "f"))
    assert event["datacontenttype"] == content_type.decode()
    assert {k: event["data"][k] for k in data} == data
    assert event["data"]["headers"]["Content-Type"] == content_type.decode()


@pytest.mark.parametrize("given", [b"not a time", b"20250101T000000Z", b"2025-W01-1T00:00:00+00:00", b"2025-01-01T00Z"])
def test_a_cloudevents_time_that_is_no_rfc_3339_time_is_the_records(given: bytes) -> None:
    headers = [("ce_id", b"evt-1"), ("ce_source", b"/shop"), ("ce_type", b"t"), ("ce_time", given)]
    assert to_envelope(record(headers=headers), "f").time == "2024-05-01T10:00:00.123Z"
    structured = json.dumps({**STRUCTURED, "time": given.decode()}).encode()
    envelope = to_envelope(record(structured, headers=[("content-type", b"application/cloudevents+json")]), "f")
    assert (envelope.id, envelope.time) == ("evt-9", "2024-05-01T10:00:00.123Z")


@pytest.mark.parametrize("given", ["yesterday", 1714557600, None, ["2024-05-01T09:00:00Z"], "2024-05-01T09:00:00"])
def test_a_structured_cloudevents_time_that_is_no_rfc_3339_time_is_the_records(given: Any) -> None:
    value = json.dumps({**STRUCTURED, "time": given}).encode()
    envelope = to_envelope(record(value, headers=[("content-type", b"application/cloudevents+json")]), "f")
    assert (envelope.id, envelope.time) == ("evt-9", "2024-05-01T10:00:00.123Z")


@pytest.mark.parametrize(
    "headers",
    [
        [("ce_id", b"evt-1"), ("ce_source", b"/shop")],
        [("ce_id", b""), ("ce_source", b"/shop"), ("ce_type", b"t")],
        [("ce_id", b"\xff"), ("ce_source", b"/shop"), ("ce_type", b"t")],
        [("ce_id", None), ("ce_source", b"/shop"), ("ce_type", b"t")],
    ],
    ids=["no-type", "empty-id", "binary-id", "null-id"],
)
def test_incomplete_cloudevents_headers_are_an_ordinary_record(headers: list[tuple[str, bytes | None]]) -> None:
    envelope = to_envelope(record(headers=headers), "f")
    assert (envelope.id, envelope.source, envelope.type) == ("2-17", "kafka://orders", "eventrun.kafka.record")


STRUCTURED = {
    "specversion": "1.0",
    "id": "evt-9",
    "source": "/billing",
    "type": "com.example.paid",
    "subject": "invoices/9",
    "time": "2024-05-02T08:00:00Z",
    "datacontenttype": "application/json",
    "data": {"invoice": 9},
}


def test_cloudevents_structured_mode_takes_the_event_from_the_value() -> None:
    value = json.dumps(STRUCTURED).encode()
    headers = [("content-type", b"application/cloudevents+json; charset=UTF-8")]
    event = roundtrip(to_envelope(record(value, headers=headers), "f"))
    assert event == {
        "specversion": "1.0", "id": "evt-9", "source": "/billing", "type": "com.example.paid",
        "subject": "invoices/9", "time": "2024-05-02T08:00:00Z", "datacontenttype": "application/json",
        "eventrunfunction": "f", "eventruntrigger": "kafka", "data": {"invoice": 9},
    }


def test_an_empty_structured_cloudevents_subject_is_none() -> None:
    value = json.dumps({**STRUCTURED, "subject": ""}).encode()
    event = roundtrip(to_envelope(record(value, headers=[("content-type", b"application/cloudevents+json")]), "f"))
    assert event["id"] == "evt-9" and "subject" not in event


def test_cloudevents_structured_mode_with_data_base64() -> None:
    value = {key: STRUCTURED[key] for key in ("specversion", "id", "source", "type")}
    value["data_base64"] = base64.b64encode(b"\x00\x01").decode()
    headers = [("Content-Type", b"application/cloudevents+json")]
    envelope = to_envelope(record(json.dumps(value).encode(), headers=headers), "f")
    assert envelope.data == {"data_base64": value["data_base64"]}
    assert envelope.subject is None and envelope.time == "2024-05-01T10:00:00.123Z"


@pytest.mark.parametrize(
    "value",
    [b"not json", b"[1, 2]", json.dumps({"id": "x", "source": "/s"}).encode(), json.dumps({**STRUCTURED, "id": 7}).encode()],
    ids=["not-json", "array", "no-type", "id-not-text"],
)
def test_a_broken_structured_cloudevent_is_an_ordinary_record(value: bytes) -> None:
    envelope = to_envelope(record(value, headers=[("content-type", b"application/cloudevents+json")]), "f")
    assert (envelope.id, envelope.type) == ("2-17", "eventrun.kafka.record")


def test_the_undecodable_record_envelope() -> None:
    event = roundtrip(undecodable_envelope("orders", 1, 9, "f", "UnicodeDecodeError: bad header", epoch=0))
    assert (event["id"], event["source"], event["type"]) == ("1-9", "kafka://orders", "eventrun.kafka.undecodable")
    assert event["data"]["error"] == "UnicodeDecodeError: bad header"
    assert event["data"]["partition"] == 1 and event["data"]["offset"] == 9


def test_fingerprints_tell_records_apart() -> None:
    assert fingerprint(record()) == fingerprint(record())
    assert fingerprint(record()) != fingerprint(record(timestamp=TS + 1))
    assert fingerprint(record()) != fingerprint(record(b'{"order": 43}'))
    assert fingerprint(record(key=None)) != fingerprint(record(key=b""))


class _RawName(str):
    """A header name that aiokafka's pure-Python batch builder writes as bytes that are not UTF-8."""

    def encode(self, *args: Any, **kwargs: Any) -> bytes:  # type: ignore[override]
        return b"\xff\xfebad-name"


def raw_batch(*records: tuple[bytes, list[tuple[str, bytes]]], base: int = 5) -> bytes:
    """Record batch bytes as a broker sends them: (value, headers) at offsets base, base + 1, ..."""
    builder = _DefaultRecordBatchBuilderPy(2, 0, 0, -1, -1, -1, 1 << 20)
    for delta, (value, headers) in enumerate(records):
        builder.append(delta, TS, b"order-42", value, headers)
    batch = builder.build()
    struct.pack_into(">q", batch, 0, base)  # the base offset, as the broker assigns it
    return bytes(batch)


def test_a_peek_fingerprints_a_record_as_handing_it_over_does() -> None:
    raw = raw_batch((b'{"order": 42}', []), (b"{}", [(_RawName("x"), b"v")]))
    crc = MemoryRecords(raw).next_batch().crc
    peeked = Peek(7, raw)
    assert peeked.fingerprint(5) == fingerprint(record(offset=5))
    # The client cannot decode the record at 6: its fingerprint is of its batch's checksum.
    assert peeked.fingerprint(6) == undecodable_fingerprint(6, crc) != undecodable_fingerprint(5, crc)
    assert peeked.fingerprint(4) is None and peeked.fingerprint(7) is None  # not in this peek
    corrupt = bytearray(raw)
    corrupt[-1] ^= 0xFF  # a bad checksum: the client decodes none of the batch's records
    assert Peek(7, bytes(corrupt)).fingerprint(5) == undecodable_fingerprint(5, crc)
    other = raw_batch((b'{"order": 42}', []), (b"{}", [(_RawName("x"), b"w")]))
    assert Peek(7, other).fingerprint(6) != peeked.fingerprint(6)  # another undecodable record there


# --------------------------------------------------------------------------- start positions


def test_the_committed_offset_wins() -> None:
    start = decide(Mark(50, "ab"), 40, 0, started=True, latest=Mark(45, "cd"))
    assert (start.offset, start.verify, start.pin) == (40, None, None)


def test_a_first_start() -> None:
    assert decide(None, None, 3, started=False).offset == 3
    latest = decide(None, None, 3, started=True, latest=Mark(7, None))
    assert (latest.offset, latest.pin) == (7, 7)  # written down at the start, committed once assigned
    assert decide(None, None, 9, started=True, latest=Mark(7, None)).offset == 9  # retention took the records before


def test_latest_reads_the_record_before_its_position_again_to_check_the_log() -> None:
    # A topic deleted and created again between the start and the assignment (or a restart
    # before it) would have its first records skipped unseen.
    start = decide(None, None, 3, started=True, latest=Mark(7, "ab"))
    assert (start.offset, start.verify, start.pin) == (6, "ab", 7)  # the mark pinned at 7, with "ab"
    start = decide(None, None, 7, started=True, latest=Mark(7, "ab"))
    assert (start.offset, start.verify, start.pin) == (7, None, 7)  # retention took it: nothing to check


def test_a_partition_new_to_a_running_trigger_is_read_from_its_beginning() -> None:
    # "latest" applies to the trigger's first start only: a partition added later, or one whose
    # group offset is gone, must not skip records.
    start = decide(None, None, 0, started=True)
    assert (start.offset, start.pin) == (0, None)


def test_latest_is_the_first_record_stamped_since_the_start_or_the_end_if_earlier() -> None:
    since = TS
    assert latest_offset(10, since, (4, since + 5)) == 4  # produced after the start, before the lookup
    assert latest_offset(10, since, (4, since)) == 4
    assert latest_offset(10, since, None) == 10  # nothing stamped since
    assert latest_offset(10, since, (0, -1)) == 10  # Tansu's "nothing found"
    assert latest_offset(10, since, (4, since - 1)) == 10
    assert latest_offset(10, since, (12, since + 5)) == 10  # stamps come from producers' clocks: the end bounds it
    assert latest_offset(0, since, (0, since + 5)) == 0


def test_lost_group_offsets_resume_at_the_mark_and_check_the_last_record() -> None:
    start = decide(Mark(10, "ab"), None, 0, started=True)
    assert (start.offset, start.verify) == (9, "ab")
    assert decide(Mark(10, None), None, 0, started=True, latest=Mark(3, None)).offset == 10
    assert decide(Mark(10, "ab"), None, 12, started=True).offset == 12  # retention took it


def test_where_the_trigger_left_off_its_last_record_is_read_again_to_check_the_log() -> None:
    # The group's offset is where this trigger's mark is: the topic may have been deleted and
    # created again while it was away (or in a rebalance), so the last record is checked.
    start = decide(Mark(10, "ab"), 10, 0, started=True)
    assert (start.offset, start.verify, start.pin) == (9, "ab", None)
    assert decide(Mark(10, "ab"), 12, 0, started=True).verify is None  # another server read on: nothing to check
    assert decide(Mark(10, None), 10, 0, started=True).verify is None
    assert decide(Mark(10, "ab"), 10, 10, started=True).offset == 10  # retention took the record


def test_a_new_log_is_read_from_its_beginning_whatever_offset_the_group_has() -> None:
    # Nothing of the new log accepted yet: an offset the group has belongs to the old one.
    for committed in (None, 0, 10):
        start = decide(Mark(0, None, 1), committed, 2, started=True)
        assert (start.offset, start.pin) == (2, 2), committed
    assert decide(Mark(0, None, 0), 10, 0, started=True).offset == 10  # "latest" pinned at 0: no new log
    assert decide(Mark(4, "ab", 1), 4, 0, started=True).offset == 3  # the new log, read on


def test_verdicts() -> None:
    rec = record(offset=9)

    def verdict(first: ConsumerRecord[bytes, bytes], expected: int | None, verify: tuple[int, str] | None) -> Verdict:
        return judge(first.offset, fingerprint(first), expected, verify)

    assert verdict(rec, 9, None) is Verdict.SAME_LOG
    assert verdict(rec, 5, None) is Verdict.SAME_LOG  # forward: a compacted or trimmed log
    assert verdict(rec, 10, None) is Verdict.NEW_LOG  # backwards without eventrun seeking there
    assert verdict(rec, None, None) is Verdict.SAME_LOG
    assert verdict(rec, 9, (9, fingerprint(rec))) is Verdict.REREAD
    assert verdict(record(b"other", offset=9), 9, (9, fingerprint(rec))) is Verdict.RESTART
    assert verdict(record(offset=0), 9, (9, fingerprint(rec))) is Verdict.NEW_LOG
    assert verdict(record(offset=12), 9, (9, fingerprint(rec))) is Verdict.SAME_LOG
    # A record whose fingerprint could not be taken checks nothing: it is no reason to start over.
    assert judge(9, None, 9, (9, fingerprint(rec))) is Verdict.SAME_LOG


def test_marks_round_trip_and_count_epochs() -> None:
    marks = Marks(None)
    assert not marks.started and marks.get(0) is None and marks.epoch(0) == 0
    marks.started = True
    marks.advance(0, 10, "ab")
    assert marks.new_epoch(1) == 1
    assert marks.changed == {0, 1}
    # The start and each partition's mark are written apart (see Partitions).
    again = Marks(marks.dumps())
    assert again.started and again.get(0) is None
    for p in (0, 1):
        again.adopt(p, Mark.loads(marks.get(p).dumps()))  # type: ignore[union-attr]
    assert again.get(0) == Mark(10, "ab", 0)
    assert again.get(1) == Mark(0, None, 1)
    assert again.changed == set()
    again.advance(1, 5, "cd")
    assert again.epoch(1) == 1
    again.latest = {2: Mark(7, "ef"), 0: Mark(3, None)}
    assert Marks(again.dumps()).latest == {0: Mark(3, None), 2: Mark(7, "ef")}
    assert Marks('{"started": true, "partitions": {}}').latest == {}  # written before "latest" was kept
    # Written before the fingerprints were kept: no record to check the log by.
    assert Marks('{"started": true, "partitions": {}, "latest": {"1": 4}}').latest == {1: Mark(4, None)}
    # The one text an earlier eventrun kept, marks included, still reads.
    before = Marks('{"started": true, "partitions": {"0": [10, "ab", 0], "1": [5, null, 2]}}')
    assert before.get(0) == Mark(10, "ab", 0) and before.get(1) == Mark(5, None, 2) and before.changed == set()


def test_a_stored_mark_is_taken_unless_this_server_counted_a_later_epoch() -> None:
    marks = Marks(None)
    marks.advance(0, 10, "ab")
    marks.adopt(0, None)  # nothing written down: this server's mark stands
    assert marks.get(0) == Mark(10, "ab", 0) and marks.changed == {0}
    marks.adopt(0, Mark(4, "cd", 1))  # another server went on, and found the log started over
    assert marks.get(0) == Mark(4, "cd", 1) and marks.changed == set()
    marks.adopt(0, Mark(2, "ef", 1))  # also an older position of the same epoch (an offset reset, say)
    assert marks.get(0) == Mark(2, "ef", 1)
    marks.new_epoch(0)  # the store could not take this one: its ids are in use already
    marks.adopt(0, Mark(30, "gh", 1))
    assert marks.get(0) == Mark(0, None, 2)


# --------------------------------------------------------------------------- the trigger


class FakeEngine:
    """The engine interface a Kafka consumer uses."""

    def __init__(self) -> None:
        self.accepted: list[Envelope] = []
        self.state: dict[str, str] = {}

    async def accept_batch(self, envelopes: Sequence[Envelope]) -> list[Accepted]:
        self.accepted += envelopes
        return [Accepted(e.id, True) for e in envelopes]

    def backlog(self, function: str) -> int:
        return 0

    async def get_state(self, key: str) -> str | None:
        return self.state.get(key)

    async def put_state(self, key: str, value: str) -> None:
        self.state[key] = value


def manifest(bootstrap: str = "127.0.0.1:9092", **functions: dict[str, Any]) -> Manifest:
    return Manifest(
        kafka=KafkaConfig(bootstrap_servers=bootstrap),
        functions={name: FunctionConfig(handler="f.py:main", **config) for name, config in functions.items()},
    )


def test_one_consumer_per_kafka_trigger() -> None:
    m = manifest(
        orders={"triggers": ({"type": "kafka", "topic": "orders"}, {"type": "kafka", "topic": "refunds", "group_id": "g"})},
        report={"triggers": ({"type": "timer", "name": "n", "cron": "* * * * *"},)},
        audit={"triggers": ({"type": "kafka", "topic": "orders", "starting_position": "earliest"},)},
    )
    trigger = KafkaTrigger(FakeEngine(), m)
    assert [(c.function, c.topic, c.group_id) for c in trigger.consumers] == [
        ("orders", "orders", "eventrun-orders"),
        ("orders", "refunds", "g"),
        ("audit", "orders", "eventrun-audit"),
    ]
    assert trigger.settings.bootstrap_servers == "127.0.0.1:9092"
    assert trigger.settings.high_water_mark == 10_000
    assert set(trigger.state()) == {"orders:orders", "orders:refunds", "audit:orders"}
    assert {s["State"] for s in trigger.state().values()} == {"stopped"}


def test_two_triggers_of_one_group_on_one_topic_are_refused() -> None:
    m = manifest(
        a={"triggers": ({"type": "kafka", "topic": "orders", "group_id": "shared"},)},
        b={"triggers": ({"type": "kafka", "topic": "orders", "group_id": "shared"},)},
    )
    with pytest.raises(ManifestError, match=r"functions\.b\.triggers\[0\].*'orders'.*'shared'.*functions\.a"):
        KafkaTrigger(FakeEngine(), m)


async def test_a_broker_that_is_down_delays_nothing_and_shows_in_the_state(unused_tcp_port: int) -> None:
    m = manifest(f"127.0.0.1:{unused_tcp_port}", fn={"triggers": ({"type": "kafka", "topic": "t"},)})
    settings = Settings(bootstrap_servers=f"127.0.0.1:{unused_tcp_port}", backoff_min=0.05, backoff_max=0.1)
    engine = FakeEngine()
    trigger = KafkaTrigger(engine, m, settings=settings)
    started = time.monotonic()
    async with trigger:
        assert time.monotonic() - started < 1.0
        deadline = time.monotonic() + 5
        while not trigger.state()["fn:t"]["State"].startswith("broker unreachable"):
            assert time.monotonic() < deadline, trigger.state()
            await asyncio.sleep(0.02)
        state = trigger.state()["fn:t"]
        assert "KafkaConnectionError" in state["State"] and str(unused_tcp_port) in state["State"]
        assert "Connect call failed" in state["State"], state  # why, from eventrun's own try
        assert state["Partitions"] == [] and state["Accepted"] == 0
        await asyncio.sleep(0.3)  # a few retries
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 2.0
    assert trigger.state()["fn:t"]["State"] == "stopped"
    assert engine.accepted == []


async def test_records_of_a_codec_not_installed_are_held_back_not_taken_for_an_outage(
    unused_tcp_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    # The client raises UnsupportedCodecError (a KafkaError) for a batch compressed with a codec
    # whose library is missing. It was taken for an outage: "broker unreachable", connected 0.
    tp = TopicPartition("orders", 0)

    class Consumer:
        """What _consume asks of aiokafka's consumer, with a fetch that cannot decompress."""

        codec_missing = True

        def __init__(self) -> None:
            self.fetches = 0
            self.seeks: set[tuple[int, int]] = set()

        def assignment(self) -> set[TopicPartition]:
            return {tp}

        def paused(self) -> set[TopicPartition]:
            return set()

        def pause(self, *partitions: TopicPartition) -> None:
            pass

        def resume(self, *partitions: TopicPartition) -> None:
            pass

        def highwater(self, partition: TopicPartition) -> int | None:
            return None

        def seek(self, partition: TopicPartition, offset: int) -> None:
            self.seeks.add((partition.partition, offset))

        async def topics(self) -> set[str]:
            return {"orders"}

        async def getmany(self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None) -> dict[TopicPartition, list[Any]]:
            self.fetches += 1
            if self.codec_missing:
                raise UnsupportedCodecError("Libraries for zstd compression codec not found")
            await asyncio.sleep(timeout_ms / 1000)
            return {}

    engine = FakeEngine()
    settings = Settings(bootstrap_servers=f"127.0.0.1:{unused_tcp_port}", backoff_min=0.02, backoff_max=0.05, poll_interval=0.02)
    topic = TopicConsumer(engine, function="f", topic="orders", group_id="g", starting_position="earliest", settings=settings)
    topic._parts.expected[0] = 5  # where hand-offs stand: the position was decided, records up to 4 handed over
    topic._health.contact()
    fake = Consumer()

    async def until(condition: Any) -> None:
        deadline = time.monotonic() + 5
        while not condition():
            assert time.monotonic() < deadline, topic.state()
            await asyncio.sleep(0.01)

    with caplog.at_level(logging.INFO, logger="eventrun.triggers.kafka"):
        consuming = asyncio.create_task(topic._consume(fake))  # type: ignore[arg-type]
        try:
            await until(lambda: fake.fetches >= 3)
            state = topic.state()["State"]
            assert state.startswith("records held back: UnsupportedCodecError: Libraries for zstd compression codec not found")
            assert "cramjam" in state and "aiokafka[lz4,snappy,zstd]" in state, state
            assert topic.figures()["connected"] == 1
            # Read again from where hand-offs stand, each time: nothing skipped, nothing accepted.
            assert fake.seeks == {(0, 5)} and engine.accepted == []
            Consumer.codec_missing = False  # (installed, say): the next fetch finds nothing new
            await until(lambda: topic.state()["State"] == "consuming")
        finally:
            topic._stopping.set()
            await consuming
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1 and "records cannot be read: UnsupportedCodecError" in errors[0], errors
    assert "unreachable" not in caplog.text


def test_client_logs_are_quieted_unless_configured() -> None:
    client = logging.getLogger("aiokafka")
    before = client.level
    try:
        client.setLevel(logging.NOTSET)
        _quiet_client_logs()
        assert client.level == logging.CRITICAL
        client.setLevel(logging.DEBUG)
        _quiet_client_logs()
        assert client.level == logging.DEBUG
    finally:
        client.setLevel(before)


async def test_marks_the_store_cannot_take_are_logged_once_and_their_recovery_once(caplog: pytest.LogCaptureFixture) -> None:
    # A PostgreSQL outage wrote a traceback at every save; now one line, then one when it writes again.
    class Down(FakeEngine):
        failing = 3

        async def put_state(self, key: str, value: str) -> None:
            if self.failing:
                self.failing -= 1
                raise StoreError("the PostgreSQL store cannot serve this now (ConnectionRefusedError)")
            await super().put_state(key, value)

    engine = Down()
    parts = Partitions(engine, name="f:orders", topic="orders", state_key="k", mark_interval=60)
    parts.marks.advance(0, 3, "ab")
    with caplog.at_level(logging.WARNING, logger="eventrun.triggers.kafka.partitions"):
        for _ in range(4):
            await parts.save_marks(force=True)
    assert [r.getMessage() for r in caplog.records] == [
        "kafka f:orders: could not write down the partition marks"
        " (the PostgreSQL store cannot serve this now (ConnectionRefusedError))",
        "kafka f:orders: the partition marks are written down again (2 more failed since the last such line)",
    ]
    assert not any(r.exc_info for r in caplog.records), "no traceback for a store that cannot serve"
    assert Mark.loads(engine.state["k:0"]) == Mark(3, "ab", 0) and "k:start" in engine.state


def hand_off_to(engine: FakeEngine) -> tuple[HandOff, Partitions]:
    """The hand-offs of a consumer of topic "orders" for function "f", and its partitions."""
    parts = Partitions(engine, name="f:orders", topic="orders", state_key="k", mark_interval=60)
    handoff = HandOff(
        engine, parts, Health("f:orders", servers="b", group_id="g"), Settings(bootstrap_servers="b"),
        asyncio.Event(), function="f", topic="orders", name="f:orders",
    )
    return handoff, parts


async def test_a_hand_off_has_started_its_accept_when_it_returns() -> None:
    # The consumer fetches and converts the next batch right after a hand-off returns, without
    # giving the event loop a turn when records are buffered. The accept must already be under
    # way by then (its rows sent to the store's writer), or the two never overlap.
    release = asyncio.Event()

    class SlowEngine(FakeEngine):
        async def accept_batch(self, envelopes: Sequence[Envelope]) -> list[Accepted]:
            self.accepted += envelopes  # started: in the real engine, rows built and sent
            await release.wait()
            return [Accepted(e.id, True) for e in envelopes]

    class Consumer:
        def __init__(self) -> None:
            self.committed: dict[TopicPartition, int] = {}

        async def commit(self, offsets: dict[TopicPartition, int]) -> None:
            self.committed.update(offsets)

    engine = SlowEngine()
    handoff, parts = hand_off_to(engine)
    consumer = Consumer()
    tp = TopicPartition("orders", 2)
    await handoff.hand_off(consumer, {tp: [record(offset=0), record(offset=1)]}, parts.generation)  # type: ignore[arg-type]
    assert [e.id for e in engine.accepted] == ["2-0", "2-1"]
    assert consumer.committed == {}  # not durable yet: nothing committed
    release.set()
    await handoff.drain()
    assert consumer.committed == {tp: 2}


async def test_records_read_again_are_counted_as_duplicates_not_as_accepted() -> None:
    # A group's offsets reset (or a crash before the commit): the records map to the runs they
    # had; /healthz and /metrics counted them as accepted all the same, as if new events ran.
    class Repeats(FakeEngine):
        async def accept_batch(self, envelopes: Sequence[Envelope]) -> list[Accepted]:
            self.accepted += envelopes
            return [Accepted(e.id, e.id != "2-0") for e in envelopes]

    class Consumer:
        async def commit(self, offsets: dict[TopicPartition, int]) -> None:
            pass

    handoff, parts = hand_off_to(Repeats())
    tp = TopicPartition("orders", 2)
    await handoff.hand_off(Consumer(), {tp: [record(offset=0), record(offset=1), record(offset=2)]}, parts.generation)  # type: ignore[arg-type]
    await handoff.drain()
    assert (handoff.accepted, handoff.duplicates) == (2, 1)


async def test_the_next_accept_does_not_wait_for_the_commits_before_it() -> None:
    # Committing offsets is a round trip to the broker: the accepts after it go on meanwhile,
    # the commits still go in order, and at most UNCOMMITTED hand-offs wait for theirs.
    release = asyncio.Event()

    class Consumer:
        def __init__(self) -> None:
            self.commits: list[dict[TopicPartition, int]] = []

        async def commit(self, offsets: dict[TopicPartition, int]) -> None:
            await release.wait()
            self.commits.append(dict(offsets))

    engine = FakeEngine()
    handoff, parts = hand_off_to(engine)
    consumer = Consumer()
    tp = TopicPartition("orders", 2)

    def batch(n: int) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        return {tp: [record(offset=2 * n), record(offset=2 * n + 1)]}

    for n in range(UNCOMMITTED):
        await asyncio.wait_for(handoff.hand_off(consumer, batch(n), parts.generation), 1)  # type: ignore[arg-type]
    assert len(engine.accepted) == 2 * UNCOMMITTED and consumer.commits == []
    blocked = asyncio.create_task(handoff.hand_off(consumer, batch(UNCOMMITTED), parts.generation))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    assert not blocked.done() and len(engine.accepted) == 2 * UNCOMMITTED  # bounded
    release.set()
    await blocked
    await handoff.drain()
    assert consumer.commits == [{tp: 2 * (n + 1)} for n in range(UNCOMMITTED + 1)]
    assert [e.id for e in engine.accepted] == [f"2-{offset}" for offset in range(2 * UNCOMMITTED + 2)]


async def test_a_broker_may_hold_a_fetch_only_briefly() -> None:
    # A fetch held by the broker for the client's 500 ms (seen with Tansu while offsets were
    # committed) stalls the consumer that long; eventrun's clients allow 100 ms.
    settings = Settings(bootstrap_servers="127.0.0.1:9")
    consumer = new_client(settings, function="f", group_id="g")
    try:
        assert settings.fetch_wait_ms == 100
        assert consumer._fetch_max_wait_ms == settings.fetch_wait_ms  # what start() gives its fetcher
    finally:
        await consumer.stop()


def test_records_naming_their_topic_with_equal_strings_still_come_as_one_batch() -> None:
    # aiokafka gives each partition's records one topic string; another partition's may be
    # another string object of the same text.
    records = [record(offset=0, topic="".join(["ord", "ers"])), record(offset=1, topic="".join(["or", "ders"]))]
    assert records[0].topic is not records[1].topic
    written = to_accept(records, "f")
    assert written.__class__ is TemplatedBatch and len(written) == 2


async def test_the_record_read_again_to_check_the_log_is_not_handed_over_twice() -> None:
    engine = FakeEngine()
    handoff, parts = hand_off_to(engine)
    tp = TopicPartition("orders", 2)

    class Consumer:
        def __init__(self) -> None:
            self.paused: set[TopicPartition] = set()

        async def commit(self, offsets: dict[TopicPartition, int]) -> None:
            pass

        def pause(self, *tps: TopicPartition) -> None:
            self.paused.update(tps)

    consumer = Consumer()
    parts.verify[2], parts.expected[2] = (16, fingerprint(record(offset=16))), 16
    await handoff.hand_off(consumer, {tp: [record(offset=16), record(offset=17)]}, parts.generation)  # type: ignore[arg-type]
    await handoff.drain()
    assert [e.id for e in engine.accepted] == ["2-17"]
    parts.verify[2], parts.expected[2] = (17, fingerprint(record(offset=17))), 17
    await handoff.hand_off(consumer, {tp: [record(offset=17)]}, parts.generation)  # type: ignore[arg-type]
    assert parts.expected[2] == 18 and len(engine.accepted) == 1
    # Another record there: the log started over; the partition waits for its start to be decided again.
    parts.verify[2], parts.expected[2] = (18, fingerprint(record(offset=18))), 18
    await handoff.hand_off(consumer, {tp: [record(b'{"other": 1}', offset=18)]}, parts.generation)  # type: ignore[arg-type]
    assert len(engine.accepted) == 1 and tp in parts.pending and tp in consumer.paused
    assert parts.marks.get(2) == Mark(0, None, 1)


async def test_a_log_that_ends_before_the_position_is_read_again_under_a_new_epoch(caplog: pytest.LogCaptureFixture) -> None:
    # Tansu answers a read past a log's end with no records, not offset-out-of-range: a topic
    # deleted and created again was read only once it grew past the old position, from there.
    engine = FakeEngine()
    settings = Settings(bootstrap_servers="b")
    consumer = TopicConsumer(engine, function="f", topic="orders", group_id="g", starting_position="earliest", settings=settings)
    parts = consumer._parts
    p0, p1, p2 = (TopicPartition("orders", p) for p in range(3))

    class Client:
        def __init__(self) -> None:
            self.highwaters = {p0: 3, p1: 10, p2: None}
            self.paused: set[TopicPartition] = set()

        def assignment(self) -> set[TopicPartition]:
            return {p0, p1, p2}

        def highwater(self, tp: TopicPartition) -> int | None:
            return self.highwaters[tp]

        def pause(self, *tps: TopicPartition) -> None:
            self.paused.update(tps)

    client = Client()
    parts.expected.update({0: 10, 1: 10, 2: 10})
    parts.marks.advance(0, 10, "ab")
    await consumer._notice_new_logs(client, {})  # type: ignore[arg-type]
    assert parts.pending == {p0} and client.paused == {p0}
    assert parts.marks.get(0) == Mark(0, None, 1)
    assert "started over (its log ends at offset 3, before offset 10" in caplog.text
    assert Mark.loads(engine.state["kafka:g:orders:0"]) == Mark(0, None, 1)  # written down before any new id is used
    # Decided again, it starts at the new log's beginning, though the group has the old offset.
    assert decide(parts.marks.get(0), 10, 0, started=True).offset == 0
    # Fetched just now, a partition is left alone; so is one whose start is being decided.
    parts.pending.clear()
    parts.expected[0] = 10
    await consumer._notice_new_logs(client, {p0: []})  # type: ignore[arg-type]
    assert parts.pending == set() and parts.marks.epoch(0) == 1


class GroupMember:
    """What TopicConsumer asks of its client when partitions are assigned: committed offsets, seeks."""

    def __init__(self, committed: dict[TopicPartition, int]) -> None:
        self.committed_offsets = committed
        self.held: set[TopicPartition] = set()
        self.sought: dict[TopicPartition, int] = {}

    def assignment(self) -> set[TopicPartition]:
        return set(self.held)

    def pause(self, *tps: TopicPartition) -> None:
        pass

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.sought[tp] = offset

    async def committed(self, tp: TopicPartition) -> int | None:
        return self.committed_offsets.get(tp)

    async def beginning_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: 0 for tp in tps}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.committed_offsets.update(offsets)

    async def stop(self) -> None:
        self.held = set()  # left the group


async def test_partition_marks_go_with_their_partition_to_another_server() -> None:
    # Two servers on one store kept the topic's marks in one row, each writing its own view
    # (so each wiped the other's partitions), and read it only at their start: a partition that
    # moved went on under the old log's ids (no epoch), those of runs that already ran.
    engine = FakeEngine()
    settings = Settings(bootstrap_servers="b", mark_interval=60)

    def server() -> TopicConsumer:
        return TopicConsumer(engine, function="f", topic="orders", group_id="g", starting_position="earliest", settings=settings)

    p0, p1 = TopicPartition("orders", 0), TopicPartition("orders", 1)
    committed = {p0: 8, p1: 8}  # the group's offsets, in the old logs
    a, b = server(), server()
    clients = {a: GroupMember(committed), b: GroupMember(committed)}

    async def assign(consumer: TopicConsumer, *tps: TopicPartition) -> None:
        client = clients[consumer]
        client.held = set(tps)
        consumer._assigned(client, set(tps))  # type: ignore[arg-type]
        await consumer._position(client)  # type: ignore[arg-type]

    async def revoke(consumer: TopicConsumer) -> None:
        client = clients[consumer]
        await consumer._revoked(client, client.held)  # type: ignore[arg-type]
        client.held = set()

    for consumer in (a, b):
        await consumer._parts.load_marks()
    await assign(a, p0, p1)  # a joins first, with both partitions
    a._parts.marks.advance(0, 8, "a7")
    a._parts.marks.advance(1, 8, "b7")
    await revoke(a)
    await assign(a, p0)  # b joins
    await assign(b, p1)
    assert b._parts.marks.get(1) == Mark(8, "b7", 0)
    # Both logs start over; each server counts a new epoch for its partition and reads the new log.
    for consumer, p in ((a, 0), (b, 1)):
        consumer._parts.new_epoch(p, "a test")
        await consumer._parts.save_marks(force=True)
        consumer._parts.marks.advance(p, 2, f"new{p}")
        committed[TopicPartition("orders", p)] = 2
        await consumer._parts.save_marks()  # within the mark interval: not written yet
    assert Mark.loads(engine.state["kafka:g:orders:0"]).epoch == 1, "b's save wiped a's partition"
    assert Mark.loads(engine.state["kafka:g:orders:1"]).epoch == 1, "a's save wiped b's partition"
    # b stops: a is assigned both, and reads partition 1 where b left it, in the new log's epoch.
    await b._close(clients[b])  # type: ignore[arg-type]
    await revoke(a)
    await assign(a, p0, p1)
    assert a._parts.marks.get(1) == Mark(2, "new1", 1)
    assert clients[a].sought == {p0: 1, p1: 1}  # each checking its last record read, in the new log
    assert a._parts.verify == {0: (1, "new0"), 1: (1, "new1")}
    # A server started anew (b again) finds every partition's mark, whichever server wrote it.
    a._parts.marks.advance(1, 5, "new1-4")
    committed[p1] = 5
    await revoke(a)
    await assign(a, p0)
    b = server()
    clients[b] = GroupMember(committed)
    await b._parts.load_marks()
    await assign(b, p1)
    assert b._parts.marks.get(1) == Mark(5, "new1-4", 1) and clients[b].sought == {p1: 4}
    assert "kafka:g:orders" not in engine.state  # the row an earlier eventrun kept for all partitions


async def test_marks_an_earlier_eventrun_kept_in_one_row_still_count() -> None:
    engine = FakeEngine()
    engine.state["kafka:g:orders"] = '{"started": true, "partitions": {"0": [8, "a7", 1], "1": [3, "b2", 0]}}'
    engine.state["kafka:g:orders:1"] = Mark(6, "b5", 0).dumps()  # written since, by this eventrun
    settings = Settings(bootstrap_servers="b")
    consumer = TopicConsumer(engine, function="f", topic="orders", group_id="g", starting_position="latest", settings=settings)
    p0, p1 = TopicPartition("orders", 0), TopicPartition("orders", 1)
    client = GroupMember({p0: 8, p1: 6})
    client.held = {p0, p1}
    await consumer._parts.load_marks()
    assert consumer._parts.marks.started  # "latest" is not looked up again
    consumer._assigned(client, {p0, p1})  # type: ignore[arg-type]
    await consumer._position(client)  # type: ignore[arg-type]
    assert consumer._parts.marks.get(0) == Mark(8, "a7", 1) and consumer._parts.marks.get(1) == Mark(6, "b5", 0)
    assert client.sought == {p0: 7, p1: 5}
    assert engine.state["kafka:g:orders:start"] == '{"started":true}'


class Coordinator:
    """The part of aiokafka's group coordinator eventrun reads: the generation of the last join."""

    def __init__(self, generation: int) -> None:
        self.generation = generation


def test_a_partition_s_fence_is_its_holder_s_generation_above_any_its_row_had() -> None:
    era = FENCE_ERA
    assert fence_for(None, 0) == 0 and fence_for(None, 7) == 7  # a row without one: an earlier eventrun's
    assert fence_for(3, 7) == 7 and fence_for(era + 3, 7) == era + 7  # a later generation of the same group
    # Not above the row's: the row was written in an earlier life of the group (the broker forgot
    # it and counts from 0 again; Tansu's first generation is 0): the next era.
    assert fence_for(57, 1) == era + 1 and fence_for(7, 7) == era + 7 and fence_for(era + 9, 0) == 2 * era
    for seen in (None, 0, 5, era, era + 5, 3 * era + 2):
        for generation in (0, 1, 5, 6, 2**31 - 1):
            assert seen is None or fence_for(seen, generation) > seen
            assert fence_for(seen, generation) % era == generation


def test_a_mark_is_written_with_its_fence_first_and_one_without_still_reads() -> None:
    mark = Mark(12, "a11", 1)
    assert mark.stamped(4294967298) == '{"fence":4294967298,"mark":[12,"a11",1]}'  # the store reads the fence there
    assert read_row(mark.stamped(4294967298)) == (mark, 4294967298)
    assert mark.stamped(None) == mark.dumps() == '[12,"a11",1]'
    assert read_row(mark.dumps()) == (mark, None) and Mark.loads(mark.stamped(3)) == mark


def test_the_generation_is_read_from_the_client_s_coordinator() -> None:
    class Client:
        _coordinator = Coordinator(4)

    assert group_generation(Client()) == 4  # type: ignore[arg-type]
    Client._coordinator.generation = -1  # aiokafka's "none": the member was forgotten (a session expired)
    assert group_generation(Client()) is None
    assert group_generation(object()) is None  # type: ignore[arg-type]


class FencingEngine(FakeEngine):
    """A FakeEngine whose state takes a value under a fence only if the row's is not greater (as PostgreSQL's)."""

    async def put_state(self, key: str, value: str) -> None:
        held = self.state.get(key)
        fence = _fence_of(value)
        if fence is not None and held is not None and (_fence_of(held) or -1) > fence:
            return
        await super().put_state(key, value)


def _fence_of(value: str) -> int | None:
    document = json.loads(value)
    return document["fence"] if isinstance(document, dict) else None


class Member(GroupMember):
    """A GroupMember that tells the generation it joined in."""

    def __init__(self, committed: dict[TopicPartition, int], generation: int) -> None:
        super().__init__(committed)
        self._coordinator = Coordinator(generation)


async def stale_holder_comes_back(engine: FakeEngine) -> tuple[TopicConsumer, TopicConsumer]:
    """Server a holds partition 0 (generation 1) with marks not written yet, is paused past its
    session, and server b is given the partition (generation 2), counts a new epoch and writes
    it down; then a comes back and lets the partition go (its rebalance), writing its marks."""
    settings = Settings(bootstrap_servers="b", mark_interval=60)

    def server() -> TopicConsumer:
        return TopicConsumer(engine, function="f", topic="orders", group_id="g", starting_position="earliest", settings=settings)

    p0 = TopicPartition("orders", 0)
    committed = {p0: 8}
    a, b = server(), server()
    for consumer in (a, b):
        await consumer._parts.load_marks()
    client_a, client_b = Member(committed, 1), Member(committed, 2)
    client_a.held = {p0}
    a._assigned(client_a, {p0})  # type: ignore[arg-type]
    await a._position(client_a)  # type: ignore[arg-type]
    a._parts.marks.advance(0, 8, "a7")
    await a._parts.save_marks(force=True)
    a._parts.marks.advance(0, 12, "a11")  # accepted, not written down yet: then a is paused (SIGSTOP)
    client_b.held = {p0}
    b._assigned(client_b, {p0})  # type: ignore[arg-type]
    await b._position(client_b)  # type: ignore[arg-type]
    assert b._parts.marks.get(0) == Mark(8, "a7", 0)  # where a wrote it down last
    b._parts.new_epoch(0, "a test")  # the topic was created again meanwhile
    await b._parts.save_marks(force=True)
    b._parts.marks.advance(0, 3, "b2")
    await b._parts.save_marks(force=True)
    await a._revoked(client_a, {p0})  # type: ignore[arg-type]  # a is back: its heartbeat failed, it rejoins
    return a, b


async def test_a_holder_whose_session_expired_writes_its_marks_under_the_older_fence() -> None:
    engine = FakeEngine()
    writes: list[tuple[str, str]] = []
    put_state = engine.put_state

    async def recording(key: str, value: str) -> None:
        writes.append((key, value))
        await put_state(key, value)

    engine.put_state = recording  # type: ignore[method-assign]
    await stale_holder_comes_back(engine)
    marks = [(_fence_of(value), Mark.loads(value)) for key, value in writes if key == "kafka:g:orders:0"]
    assert marks == [
        (1, Mark(8, "a7", 0)),  # a, holding it in generation 1
        (2, Mark(8, "a7", 0)),  # b, given it in generation 2: the row is its own from now on
        (2, Mark(0, None, 1)),
        (2, Mark(3, "b2", 1)),
        (1, Mark(12, "a11", 0)),  # a, back: under its generation, which the store refuses
    ]


async def test_a_holder_whose_session_expired_never_overwrites_the_new_holder_s_marks(postgres: str) -> None:
    # The defect: a server paused past its session wrote, when it came back, the marks it held
    # over those of the server that took the partition over (the store's write was
    # unconditional), and the new log's epoch was lost: its records would take the ids of old runs.
    store = PostgresStore(postgres, "node-a")
    await store.open()
    try:

        class OnStore(FakeEngine):
            async def get_state(self, key: str) -> str | None:
                return await store.get_state(key)

            async def put_state(self, key: str, value: str) -> None:
                await store.put_state(key, value)

        a, b = await stale_holder_comes_back(OnStore())
        assert Mark.loads(await store.get_state("kafka:g:orders:0") or "") == Mark(3, "b2", 1)
        # Given the partition again (generation 3), a goes on from b's marks, in the new epoch.
        client_a = Member({TopicPartition("orders", 0): 3}, 3)
        client_a.held = {TopicPartition("orders", 0)}
        a._assigned(client_a, client_a.held)  # type: ignore[arg-type]
        await a._position(client_a)  # type: ignore[arg-type]
        assert a._parts.marks.get(0) == Mark(3, "b2", 1)
        assert client_a.sought == {TopicPartition("orders", 0): 2}  # checking the last record b read
    finally:
        await store.close()


async def test_a_row_of_an_earlier_life_of_the_group_is_written_over_under_the_next_era() -> None:
    # The broker forgot the group (a restart of Tansu's memory store, a group expired) and counts
    # its generations from 0 again: rows written under generation 57 must not refuse every write.
    engine = FencingEngine()
    engine.state["kafka:g:orders:0"] = Mark(8, "a7", 2).stamped(57)
    engine.state["kafka:g:orders:1"] = Mark(4, "c3", 0).dumps()  # an earlier eventrun's, without a fence
    consumer = TopicConsumer(
        engine, function="f", topic="orders", group_id="g", starting_position="earliest", settings=Settings(bootstrap_servers="b")
    )
    p0, p1 = TopicPartition("orders", 0), TopicPartition("orders", 1)
    client = Member({p0: 8, p1: 4}, 0)
    client.held = {p0, p1}
    await consumer._parts.load_marks()
    consumer._assigned(client, {p0, p1})  # type: ignore[arg-type]
    await consumer._position(client)  # type: ignore[arg-type]
    assert consumer._parts.marks.get(0) == Mark(8, "a7", 2)
    assert read_row(engine.state["kafka:g:orders:0"]) == (Mark(8, "a7", 2), FENCE_ERA)  # claimed at once
    assert read_row(engine.state["kafka:g:orders:1"]) == (Mark(4, "c3", 0), 0)
    consumer._parts.marks.advance(0, 10, "a9")
    await consumer._parts.save_marks(force=True)
    assert read_row(engine.state["kafka:g:orders:0"]) == (Mark(10, "a9", 2), FENCE_ERA)
    # A second look in the same generation (after an outage) keeps the fence: the row is its own.
    await consumer._parts.reload_marks([0])
    assert consumer._parts.fences[0] == FENCE_ERA
