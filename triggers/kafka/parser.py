"""Kafka records to envelopes: pure, so tests feed captured records without a broker."""

from __future__ import annotations

import base64
import functools
import hashlib
import json.encoder
import time
from collections import Counter
from typing import Any, Protocol, Sequence

from orjson import Fragment

from eventrun.engine.envelope import (
    JSON_DEPTH,
    SPECVERSION,
    Envelope,
    JSONDecodeError,
    Templated,
    TemplatedBatch,
    decode,
    dumps,
    encode,
    expand,
    is_rfc3339,
    loads,
    loads_exact,
    nests_deeper,
    now_rfc3339,
    template_prefix,
)


TRIGGER = "kafka"
RECORD_TYPE = "eventrun.kafka.record"
UNDECODABLE_TYPE = "eventrun.kafka.undecodable"
CLOUDEVENTS_JSON = "application/cloudevents+json"
DEFAULT_MAX_JSON = 6 * 1024 * 1024
"""Values larger than this are handed over as `value_base64` instead of being parsed."""

_CE_PREFIX = "ce_"
# orjson writes at most JSON_DEPTH levels of nesting; the envelope holds a value two levels down
# (envelope, data), so a value nested deeper parses but could never be stored: it is not JSON here.
MAX_NESTING = JSON_DEPTH - 2


class RecordLike(Protocol):
    """What to_envelope reads of aiokafka's ConsumerRecord."""

    topic: str
    partition: int
    offset: int
    timestamp: int | None
    key: bytes | None
    value: bytes | None
    headers: Sequence[tuple[str, bytes | None]]


def record_id(partition: int, offset: int, epoch: int = 0) -> str:
    """The envelope id of a record: `"{partition}-{offset}"`, plus `-{epoch}` once a topic was recreated."""
    return f"{partition}-{offset}" if epoch == 0 else f"{partition}-{offset}-{epoch}"


def source_of(topic: str) -> str:
    """The CloudEvents source of a topic's records."""
    return f"kafka://{topic}"


def to_envelope(
    record: RecordLike, function: str, *, epoch: int = 0, max_json: int = DEFAULT_MAX_JSON
) -> Envelope:
    """The envelope of one record for one function, read back from its JSON; never raises for odd bytes."""
    return to_envelopes((record,), function, epoch=epoch, max_json=max_json)[0]


def to_envelopes(
    records: Sequence[RecordLike], function: str, *, epoch: int = 0, max_json: int = DEFAULT_MAX_JSON
) -> list[Envelope]:
    """The envelopes of records for one function, in order, read back from their JSON; never raises for odd bytes.

    What to_accept gives holds a value as the producer's text (see record_data); read back, it
    is Python objects, as eventrun's decoder gives them (an integer beyond 64 bits a float).
    """
    return [
        decode(expand(item.stored, item.template) if item.__class__ is Templated else encode(item))  # type: ignore[union-attr, arg-type]
        for item in to_accept(records, function, epoch=epoch, max_json=max_json)
    ]


@functools.lru_cache(maxsize=256)
def record_template(source: str, function: str, epoch: int) -> tuple[bytes, bytes]:
    """The template of the usual record's envelope (see Templated), and the format of its stored form.

    The template holds what the envelopes of a topic's records for one function share, in the
    order Envelope.to_dict gives the keys; the fields are the partition (0), offset (1), key as
    a JSON string (2), time (3), value as the producer wrote it (4) and timestamp (5).
    """

    def fixed(value: str) -> bytes:
        return dumps(value).replace(b"%", b"%%")

    template = b"".join((
        b'{"specversion":', fixed(SPECVERSION), b',"id":"%(0)b-%(1)b', b"-%d" % epoch if epoch else b"",
        b'","source":', fixed(source), b',"type":', fixed(RECORD_TYPE),
        b',"subject":%(2)b,"time":"%(3)b","datacontenttype":"application/json","eventrunfunction":', fixed(function),
        b',"eventruntrigger":', fixed(TRIGGER),
        b',"data":{"key":%(2)b,"value":%(4)b,"headers":{},"partition":%(0)b,"offset":%(1)b,"timestamp":%(5)b}}',
    ))  # fmt: skip
    stored = template_prefix(template).replace(b"%", b"%%") + b"%d\x00%d\x00%b\x00%b\x00%b\x00%d"
    return template, stored


_json_string = json.encoder.encode_basestring  # a str as JSON text (C; one orjson call a key costs more)
_templated = functools.partial(tuple.__new__, Templated)  # Templated(...) from a tuple, without a Python-level call


def to_accept(
    records: Sequence[RecordLike], function: str, *, epoch: int = 0, max_json: int = DEFAULT_MAX_JSON
) -> Sequence[Envelope | Templated]:
    """What accept_batch takes for records: their envelopes, the usual ones as a template's fields.

    The usual record (non-empty UTF-8 key, JSON value, a timestamp, no headers) becomes a Templated
    envelope: the store keeps only its fields (the value as the producer wrote it: parsed only
    to know it is JSON, not turned into objects and written again) and the template once. That
    is most of the work per record on a busy topic, and a third of the bytes of its JSON.
    Anything else is built as an Envelope by the general path. Either way the envelope is the
    one to_envelopes gives (it expands and decodes these). When every record is a usual one of
    one topic (the rule on a busy topic), the answer is a TemplatedBatch: the same envelopes by
    column, with no object made per record.
    """
    ids: list[str] = []  # the usual records' ids and stored forms, while all are usual ones
    fields: list[bytes] = []
    out: list[Envelope | Templated] | None = None  # each envelope, from the first that is not
    topic, source, template, stored = None, "", b"", b""
    stamped, when = None, b""  # the last timestamp seen and its text: records of a batch share them in runs
    for record in records:
        if record.headers:
            out = _each(out, ids, fields, source, function, template)
            out.append(_general(record, function, epoch, max_json))
            continue
        key, value, timestamp = record.key, record.value, record.timestamp
        if key and value and len(value) <= max_json and timestamp is not None and timestamp >= 0:
            try:
                subject = _json_string(key.decode()).encode()
                # That it is JSON (and not too deep to store) is all that is needed of it.
                usual = not nests_deeper(loads(value), MAX_NESTING, value)
            except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError included
                usual = False
            if usual:
                if timestamp != stamped:
                    seconds, millis = divmod(timestamp, 1000)
                    second = _second(seconds)
                    when = f"{second}.{millis:03d}Z".encode() if second else b""
                    stamped = timestamp
                if when:
                    partition, offset = record.partition, record.offset
                    if record.topic is not topic:
                        topic = record.topic
                        source_now = source_of(topic)
                        template_now, stored = record_template(source_now, function, epoch)
                        if ids and template_now is not template:  # another topic: another template
                            out = _each(out, ids, fields, source, function, template)
                        source, template = source_now, template_now
                    event_id = f"{partition}-{offset}" if epoch == 0 else f"{partition}-{offset}-{epoch}"
                    written = stored % (partition, offset, subject, when, _one_line(value), timestamp)
                    if out is None:
                        ids.append(event_id)
                        fields.append(written)
                    else:
                        out.append(_templated((event_id, source, function, TRIGGER, written, template)))
                    continue
        out = _each(out, ids, fields, source, function, template)
        out.append(_general(record, function, epoch, max_json))
    if out is not None:
        return out
    return TemplatedBatch(source, function, TRIGGER, template, ids, fields) if ids else []


def _one_line(value: bytes) -> bytes:
    """A JSON value on one line, as a usual record's envelope must be (an instance reads one
    envelope a line). JSON holds a line break only between tokens (in a string it is escaped),
    so a space in its place means the same."""
    if b"\n" in value or b"\r" in value:
        return value.replace(b"\n", b" ").replace(b"\r", b" ")
    return value


def _each(
    out: list[Envelope | Templated] | None, ids: list[str], fields: list[bytes], source: str, function: str, template: bytes
) -> list[Envelope | Templated]:
    """`out`, or the usual records so far as Templated envelopes once one record is not usual."""
    if out is not None:
        return out
    out = [_templated((i, source, function, TRIGGER, f, template)) for i, f in zip(ids, fields)]
    ids.clear()
    fields.clear()
    return out


def _general(record: RecordLike, function: str, epoch: int, max_json: int) -> Envelope:
    headers = record.headers
    if headers:
        structured = _structured_cloudevent(record.value, headers, max_json)
        if structured is not None:
            return _from_structured(structured, record, function)
    data = record_data(record, headers, max_json)
    # CloudEvents: a subject, when there is one, is a non-empty string; an empty key gives none.
    subject = data.get("key") or None
    attributes = _binary_attributes(headers) if headers else None
    if attributes is not None:
        return Envelope(
            id=attributes["id"],
            source=attributes["source"],
            type=attributes["type"],
            subject=attributes.get("subject", subject),
            time=_event_time(attributes.get("time"), record),
            # The Kafka binding maps the content-type header to datacontenttype in binary mode:
            # it describes the record's value (in data as `value` or `value_base64`).
            datacontenttype=_content_type(headers) or "application/json",
            function=function,
            trigger=TRIGGER,
            data=data,
        )
    return Envelope(
        id=record_id(record.partition, record.offset, epoch),
        source=source_of(record.topic),
        type=RECORD_TYPE,
        subject=subject,
        time=record_time(record.timestamp),
        function=function,
        trigger=TRIGGER,
        data=data,
    )


def undecodable_envelope(
    topic: str, partition: int, offset: int, function: str, error: str, *, epoch: int = 0
) -> Envelope:
    """The envelope standing in for a record the Kafka client itself could not decode."""
    return Envelope(
        id=record_id(partition, offset, epoch),
        source=source_of(topic),
        type=UNDECODABLE_TYPE,
        function=function,
        trigger=TRIGGER,
        data={
            "key": None,
            "value_base64": None,
            "headers": {},
            "partition": partition,
            "offset": offset,
            "timestamp": None,
            "error": error,
        },
    )


def record_data(record: RecordLike, headers: Sequence[tuple[str, bytes | None]], max_json: int) -> dict[str, Any]:
    """The `data` of a record's envelope: key (or key_base64), value (or value_base64), headers and position.

    A JSON value is held as its own text (an orjson Fragment, on one line), not as the objects
    it parses to: orjson reads an integer beyond 64 bits as a float, and writing that back
    would lose digits. The usual record's path copies the text the same way.
    """
    key = record.key
    text_key = _text(key) if key is not None else None
    data: dict[str, Any]
    if text_key is None and key is not None:
        data = {"key_base64": _b64(key)}  # instead of `key`, whose null means "no key"
    else:
        data = {"key": text_key}
    value = record.value
    if value is None:
        data["value"] = None  # a tombstone
    else:
        if _json(value, max_json) is _NOT_JSON:
            data["value_base64"] = _b64(value)
        else:
            data["value"] = Fragment(_one_line(value))
    timestamp = record.timestamp
    data["headers"] = headers_dict(headers) if headers else {}
    data["partition"] = record.partition
    data["offset"] = record.offset
    data["timestamp"] = timestamp if timestamp is not None and timestamp >= 0 else None
    return data


def headers_dict(headers: Sequence[tuple[str, bytes | None]]) -> dict[str, Any]:
    """Headers by name; a value is text if UTF-8, else {"base64": ...}; a repeated name maps to a list."""
    counts = Counter(name for name, _ in headers)
    out: dict[str, Any] = {}
    for name, raw in headers:
        value = _header_value(raw)
        if counts[name] > 1:
            out.setdefault(name, []).append(value)
        else:
            out[name] = value
    return out


def record_time(timestamp: int | None) -> str:
    """A record timestamp (ms since the epoch) as RFC 3339; now if the record has none."""
    if timestamp is None or timestamp < 0:
        return now_rfc3339()
    seconds, millis = divmod(timestamp, 1000)
    prefix = _second(seconds)
    return f"{prefix}.{millis:03d}Z" if prefix else now_rfc3339()


@functools.lru_cache(maxsize=256)
def _second(seconds: int) -> str:
    # Records of one batch mostly share their second; formatting it once each saves time.
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    except (OverflowError, OSError, ValueError):
        return ""


def fingerprint(record: RecordLike) -> str:
    """A short digest of a record's timestamp, key and value: tells two logs' records at one offset apart."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(str(record.timestamp).encode())
    for part in (record.key, record.value):
        digest.update(b"\x00" if part is None else b"\x01" + len(part).to_bytes(8, "big") + part)
    return digest.hexdigest()


def undecodable_fingerprint(offset: int, batch_crc: int) -> str:
    """The fingerprint of a record the client cannot decode: of its offset and its batch's checksum
    (which covers the batch's records, their timestamps, keys, values and headers)."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(b"undecodable %d %d" % (offset, batch_crc))
    return digest.hexdigest()


# -- CloudEvents ---------------------------------------------------------------------------

def _binary_attributes(headers: Sequence[tuple[str, bytes | None]]) -> dict[str, str] | None:
    """Producer attributes from Kafka-binding headers (ce_id, ce_source, ce_type, ...), if complete."""
    found: dict[str, str] = {}
    for name, raw in headers:
        lowered = name.lower()
        if not lowered.startswith(_CE_PREFIX) or raw is None:
            continue
        text = _text(raw)
        if text is not None:
            found[lowered[len(_CE_PREFIX):]] = text
    if not all(found.get(name) for name in ("id", "source", "type")):
        return None
    attributes = {name: found[name] for name in ("id", "source", "type")}
    for name in ("subject", "time"):
        if found.get(name):
            attributes[name] = found[name]
    return attributes


def _structured_cloudevent(
    value: bytes | None, headers: Sequence[tuple[str, bytes | None]], max_json: int
) -> dict[str, Any] | None:
    """The event of a structured-mode record (content-type application/cloudevents+json), if valid."""
    if value is None:
        return None
    content_type = _content_type(headers)
    if not content_type or content_type.split(";", 1)[0].strip().lower() != CLOUDEVENTS_JSON:
        return None
    event = _json(value, max_json)
    if not isinstance(event, dict):
        return None
    if not all(isinstance(event.get(name), str) and event[name] for name in ("id", "source", "type")):
        return None
    return loads_exact(value, event)  # (its integers beyond 64 bits, too, keep every digit)


def _content_type(headers: Sequence[tuple[str, bytes | None]]) -> str | None:
    """The record's `content-type` header as text, if it has one that is UTF-8 and not empty."""
    for name, raw in headers:
        if name.lower() == "content-type" and raw is not None:
            return _text(raw) or None
    return None


def _from_structured(event: dict[str, Any], record: RecordLike, function: str) -> Envelope:
    if "data" in event:
        data = event["data"]
    elif isinstance(event.get("data_base64"), str):
        data = {"data_base64": event["data_base64"]}
    else:
        data = None
    content_type = event.get("datacontenttype")
    subject = event.get("subject")
    return Envelope(
        id=event["id"],
        source=event["source"],
        type=event["type"],
        subject=subject if isinstance(subject, str) and subject else None,  # non-empty, or none
        time=_event_time(event.get("time"), record),
        datacontenttype=content_type if isinstance(content_type, str) else "application/json",
        function=function,
        trigger=TRIGGER,
        data=data,
    )


def _event_time(given: Any, record: RecordLike) -> str:
    """The producer's CloudEvents `time` if it is an RFC 3339 time with its zone; else, as without one, the record's."""
    return given if is_rfc3339(given) else record_time(record.timestamp)


# -- bytes ---------------------------------------------------------------------------------

_NOT_JSON = object()


def _json(raw: bytes, max_json: int) -> Any:
    if not raw or len(raw) > max_json:
        return _NOT_JSON
    try:
        parsed = loads(raw)
    except (JSONDecodeError, ValueError, RecursionError):
        return _NOT_JSON
    return _NOT_JSON if nests_deeper(parsed, MAX_NESTING, raw) else parsed


def _text(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _header_value(raw: bytes | None) -> Any:
    if raw is None:
        return None
    text = _text(raw)
    return text if text is not None else {"base64": _b64(raw)}


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")
