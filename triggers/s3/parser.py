"""Pure parsing of S3/MinIO bucket notifications into envelopes: no I/O, no aiohttp, no botocore."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

from eventrun.engine.envelope import JSON_DEPTH, Envelope, JSONDecodeError, is_rfc3339, loads, nests_deeper
from eventrun.engine.errors import InvalidParameter
from eventrun.engine.manifest import FunctionConfig
from eventrun.engine.manifest import S3Trigger as S3TriggerConfig

TEST_EVENT = "s3:TestEvent"
# orjson writes at most JSON_DEPTH levels of nesting; the envelope holds the record two levels
# down (envelope, data), so a record nested deeper parses but could never be stored.
MAX_NESTING = JSON_DEPTH - 2


# MinIO's sequencer is the object's modification time: events that leave the object as it was
# (reads, tags, retention, legal holds) share the sequencer of the write before them, so their
# time tells them apart (a redelivery keeps it).
_SEQUENCER_SHARED = (
    "ObjectAccessed:", "ObjectCreated:PutTagging", "ObjectCreated:DeleteTagging",
    "ObjectCreated:PutRetention", "ObjectCreated:PutLegalHold",
)


class BadNotification(InvalidParameter):
    """A body that is not an S3 notification (the gateway answers 400)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class S3Event:
    """One notification record, normalised: the key decoded once, the name without `s3:`."""

    bucket: str
    key: str
    event_name: str  # "ObjectCreated:Put" from every store
    time: str | None  # the record's eventTime if it is RFC 3339 (the envelope's time)
    event_time: str | None  # the record's eventTime as it came, whatever its form (the id's)
    size: int | None
    etag: str | None
    version_id: str | None
    sequencer: str | None
    record: dict[str, Any]

    @property
    def id(self) -> str:
        """The CloudEvents id, stable across redeliveries of the same notification."""
        head = f"{self.event_name}:{self.bucket}/{self.key}"
        if self.sequencer and self.event_time and self.event_name.startswith(_SEQUENCER_SHARED):
            return f"{head}:{self.sequencer}:{self.event_time}"
        if self.sequencer:
            return f"{head}:{self.sequencer}"
        # moto (and a few stores) send no sequencer; these together still name one event.
        return f"{head}:{self.etag or ''}:{self.version_id or ''}:{self.event_time or ''}"

    @property
    def source(self) -> str:
        """The CloudEvents source: s3://{bucket}."""
        return f"s3://{self.bucket}"

    @property
    def type(self) -> str:
        """The CloudEvents type, e.g. eventrun.s3.ObjectCreated:Put."""
        return f"eventrun.s3.{self.event_name}"


def normalise_event_name(name: str) -> str:
    """MinIO's `s3:ObjectCreated:Put` and AWS's `ObjectCreated:Put` both become the latter."""
    return name.removeprefix("s3:")


def decode_key(raw: str) -> str:
    """A notification record's object key, form-decoded exactly once (`+` is a space, `%2B` a plus)."""
    return unquote_plus(raw)


def parse_body(raw: bytes | str, *, passed_over: list[str] | None = None) -> list[dict[str, Any]]:
    """The records of a raw JSON body (webhook request or SQS message); see records_from_body."""
    try:
        body = loads(raw)
    except JSONDecodeError as exc:
        raise BadNotification(f"body is not valid JSON: {exc}") from None
    return records_from_body(body, passed_over=passed_over)


def records_from_body(body: Any, *, passed_over: list[str] | None = None) -> list[dict[str, Any]]:
    """The notification records of a parsed body; [] for an s3:TestEvent. Unwraps SNS envelopes.

    Accepts MinIO webhook bodies ({"EventName", "Key", "Records"}), S3 -> SQS bodies
    ({"Records"}) and either one inside an SNS `Notification`. Every record is checked, so a
    body that passes can be turned into envelopes without further errors. A record that is not
    one raises BadNotification, or, given `passed_over`, is left out and its problem added there.
    """
    if not isinstance(body, dict):
        raise BadNotification(f"expected a JSON object, got {type(body).__name__}")
    if body.get("Type") == "Notification" and isinstance(body.get("Message"), str):
        try:
            body = loads(body["Message"])
        except JSONDecodeError as exc:
            raise BadNotification(f"SNS Message is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise BadNotification(f"SNS Message: expected a JSON object, got {type(body).__name__}")
    if body.get("Event") == TEST_EVENT:
        return []
    records = body.get("Records")
    if not isinstance(records, list):
        raise BadNotification("expected a 'Records' list (an S3 or MinIO bucket notification)")
    good = []
    for index, record in enumerate(records):
        try:
            parse_record(record, where=f"Records[{index}]")
        except BadNotification as exc:
            if passed_over is None:
                raise
            passed_over.append(str(exc))
        else:
            good.append(record)
    return good


def parse_record(record: Any, *, where: str = "record") -> S3Event:
    """One record as an S3Event; raises BadNotification naming the missing field."""
    if not isinstance(record, dict):
        raise BadNotification(f"{where}: expected an object")
    name = record.get("eventName")
    s3 = record.get("s3")
    bucket = s3.get("bucket") if isinstance(s3, dict) else None
    obj = s3.get("object") if isinstance(s3, dict) else None
    if not isinstance(name, str) or not name:
        raise BadNotification(f"{where}.eventName: expected a string")
    if not isinstance(bucket, dict) or not isinstance(bucket.get("name"), str) or not bucket["name"]:
        raise BadNotification(f"{where}.s3.bucket.name: expected a string")
    if not isinstance(obj, dict) or not isinstance(obj.get("key"), str):
        raise BadNotification(f"{where}.s3.object.key: expected a string")
    if nests_deeper(record, MAX_NESTING):
        raise BadNotification(f"{where}: nests deeper than {MAX_NESTING} levels")
    size = obj.get("size")
    time = record.get("eventTime")
    return S3Event(
        bucket=bucket["name"],
        # Records carry the key form-encoded (MinIO, moto: `/` as %2F too; AWS keeps `/`).
        # MinIO's top-level "Key" is already decoded and is deliberately not used.
        key=decode_key(obj["key"]),
        event_name=normalise_event_name(name),
        time=time if is_rfc3339(time) else None,  # (an envelope's time is one: none is better than another)
        event_time=_time_text(time),  # (two uploads are told apart by it in any form)
        size=size if isinstance(size, int) and not isinstance(size, bool) else None,
        etag=_text(obj.get("eTag")),
        version_id=_text(obj.get("versionId")),
        sequencer=_text(obj.get("sequencer")),
        record=record,
    )


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _time_text(value: Any) -> str | None:
    """A record's eventTime as text, whatever its form (a number too)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return _text(value)


def event_matches(patterns: Iterable[str], event_name: str) -> bool:
    """Whether a normalised event name matches any pattern (`s3:ObjectCreated:*` or `ObjectCreated:*`)."""
    prefixed = f"s3:{event_name}"
    return any(
        fnmatch.fnmatchcase(prefixed, pattern) or fnmatch.fnmatchcase(event_name, pattern)
        for pattern in patterns
    )


def matches(trigger: S3TriggerConfig, event: S3Event) -> bool:
    """Whether one s3 trigger wants this event: bucket, event name, prefix and suffix of the decoded key."""
    return (
        trigger.bucket == event.bucket
        and event.key.startswith(trigger.prefix)
        and event.key.endswith(trigger.suffix)
        and event_matches(trigger.events, event.event_name)
    )


def to_envelope(event: S3Event, function: str) -> Envelope:
    """The envelope of one event for one function."""
    data = {
        "bucket": event.bucket,
        "key": event.key,
        "size": event.size,
        "etag": event.etag,
        "event_name": event.event_name,
        "version_id": event.version_id,
        "record": event.record,
    }
    # Without an eventTime the envelope's own default (now) stands.
    extra = {"time": event.time} if event.time else {}
    return Envelope(
        id=event.id,
        source=event.source,
        type=event.type,
        function=function,
        trigger="s3",
        subject=event.key,
        data=data,
        **extra,
    )


def to_envelopes(record: dict[str, Any], functions: Mapping[str, FunctionConfig]) -> list[Envelope]:
    """One envelope per function with a matching s3 trigger (fan-out); [] when none matches."""
    event = parse_record(record)
    return [
        to_envelope(event, name)
        for name, config in functions.items()
        if any(isinstance(t, S3TriggerConfig) and matches(t, event) for t in config.triggers)
    ]
