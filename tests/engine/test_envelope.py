"""The envelope: its CloudEvents JSON form, both ways."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import time
import uuid
from datetime import datetime

import pytest

from eventrun.engine import envelope as envelope_module
from eventrun.engine.envelope import (
    Envelope,
    Templated,
    decode,
    dumps,
    encode,
    encode_many,
    loads,
    new_envelope,
    issue_after,
    new_id,
    now_rfc3339,
    request_ids,
    request_seq,
    stored_many,
    stored_template,
    template_key,
    template_prefix,
)


def http_envelope(**changes: object) -> Envelope:
    fields: dict[str, object] = {
        "id": "order-42",
        "source": "/http/thumbnail",
        "type": "eventrun.http.request",
        "function": "thumbnail",
        "trigger": "http",
        "data": {"image": "a.png", "sizes": [64, 128], "meta": None},
        "time": "2024-05-01T12:00:00.000Z",
    }
    fields.update(changes)
    return Envelope(**fields)  # type: ignore[arg-type]


def test_to_dict_is_the_cloudevents_form():
    assert http_envelope().to_dict() == {
        "specversion": "1.0",
        "id": "order-42",
        "source": "/http/thumbnail",
        "type": "eventrun.http.request",
        "time": "2024-05-01T12:00:00.000Z",
        "datacontenttype": "application/json",
        "eventrunfunction": "thumbnail",
        "eventruntrigger": "http",
        "data": {"image": "a.png", "sizes": [64, 128], "meta": None},
    }


def test_subject_is_omitted_unless_set():
    assert "subject" not in http_envelope().to_dict()
    event = http_envelope(subject="images/a b+c.png").to_dict()
    assert event["subject"] == "images/a b+c.png"


def test_datacontenttype_none_is_omitted():
    assert "datacontenttype" not in http_envelope(datacontenttype=None).to_dict()


@pytest.mark.parametrize(
    "envelope",
    [
        http_envelope(),
        http_envelope(subject="k", data=None),
        http_envelope(data="text", datacontenttype=None),
        http_envelope(data=[1, 2.5, "ü"], subject="ключ"),
    ],
)
def test_from_dict_round_trips(envelope):
    assert Envelope.from_dict(envelope.to_dict()) == envelope
    assert decode(encode(envelope)) == envelope


def test_encode_is_cloudevents_json_bytes():
    raw = encode(http_envelope())
    assert isinstance(raw, bytes)
    assert loads(raw) == http_envelope().to_dict()
    assert decode(raw.decode()) == http_envelope()


def test_decode_accepts_a_foreign_cloudevent_without_optional_attributes():
    envelope = decode(
        b'{"id":"1","source":"/x","type":"t","time":"2024-01-01T00:00:00Z",'
        b'"eventrunfunction":"f","eventruntrigger":"http"}'
    )
    assert envelope.specversion == "1.0"
    assert envelope.data is None and envelope.subject is None and envelope.datacontenttype is None


def test_envelope_is_frozen():
    envelope = http_envelope()
    with pytest.raises(dataclasses.FrozenInstanceError):
        envelope.id = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        envelope.data = None  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        del envelope.subject  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        envelope.extra = 1  # type: ignore[attr-defined]
    assert envelope == http_envelope()


def test_envelope_fields_are_keywords_only():
    with pytest.raises(TypeError):
        Envelope("1", "/http/f", "eventrun.http.request", "f", "http")  # type: ignore[misc]


def test_envelopes_are_equal_by_value_and_only_to_envelopes():
    assert http_envelope() == http_envelope() and not http_envelope() != http_envelope()
    assert http_envelope() != http_envelope(subject="s") and not http_envelope() == http_envelope(subject="s")
    values = tuple(http_envelope())
    assert http_envelope() != values and values != http_envelope()
    assert not http_envelope() == values and not values == http_envelope()
    assert http_envelope() != "order-42"
    envelope = http_envelope(data=None)
    assert hash(envelope) == hash(http_envelope(data=None))
    with pytest.raises(TypeError):
        _ = envelope < http_envelope(data=None, id="z")  # type: ignore[operator]


def test_envelopes_copy_and_pickle():
    envelope = http_envelope(subject="s")
    for twin in (copy.copy(envelope), copy.deepcopy(envelope), pickle.loads(pickle.dumps(envelope))):
        assert type(twin) is Envelope and twin == envelope


def test_new_envelope_builds_what_envelope_builds():
    fields: dict[str, object] = {"id": "1", "source": "/s", "type": "t", "function": "f", "trigger": "kafka"}
    built = new_envelope(**fields, subject="k", time="2024-05-01T12:00:00.000Z", data={"a": 1})
    assert type(built) is Envelope
    assert built == Envelope(**fields, subject="k", time="2024-05-01T12:00:00.000Z", data={"a": 1})  # type: ignore[arg-type]
    assert new_envelope(**fields).time.endswith("Z")
    with pytest.raises(TypeError):
        new_envelope(id="1")


def test_time_defaults_to_now_in_rfc3339():
    envelope = Envelope(id="1", source="/http/f", type="eventrun.http.request", function="f", trigger="http")
    assert envelope.time.endswith("Z")
    assert datetime.fromisoformat(envelope.time.replace("Z", "+00:00")).tzinfo is not None
    assert now_rfc3339() >= envelope.time


def test_dumps_handles_non_string_keys_and_unicode():
    assert loads(dumps({1: "ü"})) == {"1": "ü"}


@pytest.mark.parametrize(
    "data",
    [{1: "a", "b": {2.5: None, True: [1]}}, {"ü": "ключ", "n": [1, 2.5, None]}, None, "text"],
    ids=["non-str-keys", "str-keys", "null", "text"],
)
def test_encode_is_dumps_of_to_dict(data):
    envelope = http_envelope(data=data, subject="s")
    assert encode(envelope) == dumps(envelope.to_dict())


def test_encode_fails_as_dumps_does():
    envelope = http_envelope(data={"when": object()})
    with pytest.raises(TypeError) as dumps_error:
        dumps(envelope.to_dict())
    with pytest.raises(TypeError) as encode_error:
        encode(envelope)
    assert type(encode_error.value) is type(dumps_error.value)
    assert str(encode_error.value) == str(dumps_error.value)


def test_encode_many_gives_each_envelope_its_own_bytes():
    # NUL bytes and the very bytes the envelopes are split at, inside strings and keys; nested
    # envelopes; unset attributes; non-str keys (which take the one-at-a-time way).
    envelopes = [
        http_envelope(id="1", data={"text": "a\x00b", ",\x00,": ",\x00,", "list": ["\x00", {"\x00": "\x00"}]}),
        http_envelope(id="2", subject="x\x00y", data=[http_envelope().to_dict(), http_envelope().to_dict()]),
        http_envelope(id="3", datacontenttype=None, data="\x00"),
        http_envelope(id="4", data=None),
        http_envelope(id="5", data={"ü": "ключ", "n": [1, 2.5, None, True]}),
    ]
    expected = [encode(envelope) for envelope in envelopes]
    assert encode_many(envelopes) == expected
    assert [loads(raw)["id"] for raw in encode_many(envelopes)] == ["1", "2", "3", "4", "5"]
    assert encode_many(envelopes[:1]) == expected[:1]
    assert encode_many([]) == []
    mixed = [*envelopes, http_envelope(id="6", data={1: "a", "b": {2.5: None}})]
    assert encode_many(mixed) == [encode(envelope) for envelope in mixed]


def test_a_templated_envelope_is_stored_as_its_fields_and_expands_to_its_json():
    template = b'{"id":"%(0)b","data":{"a":%(1)b,"b":%(2)b,"a2":%(1)b},"pct":"50%%"}'
    stored = template_prefix(template) + b'x1\x00{"k": [1, 2]}\x00""'
    item = Templated("x1", "test://t", "f", "kafka", stored, template)
    assert stored_template(stored) == template_key(template) and len(template_key(template)) == 16
    assert stored_template(b'{"id":"x1"}') is None  # an envelope stored as JSON
    whole = b'{"id":"x1","data":{"a":{"k": [1, 2]},"b":"","a2":{"k": [1, 2]}},"pct":"50%"}'
    assert envelope_module.expand(stored, template) == whole
    built = http_envelope(id="3")
    assert stored_many([built, item, built]) == [encode(built), stored, encode(built)]
    assert encode_many([built, item]) == [encode(built), envelope_module.expand(stored, template)]
    assert template_key(template) != template_key(template + b" ")


def test_encode_many_fails_as_encode_does():
    envelopes = [http_envelope(id="1"), http_envelope(id="2", data={"when": object()})]
    with pytest.raises(TypeError) as encode_error:
        encode(envelopes[1])
    with pytest.raises(TypeError) as many_error:
        encode_many(envelopes)
    assert type(many_error.value) is type(encode_error.value)
    assert str(many_error.value) == str(encode_error.value)


def check_request_id(text: str, millis_range: tuple[int, int]) -> None:
    parsed = uuid.UUID(text)
    assert str(parsed) == text
    assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
    assert millis_range[0] <= parsed.int >> 80 <= millis_range[1]


def test_new_id_is_a_uuid7_of_now():
    before = time.time_ns() // 1_000_000
    request_id = new_id()
    check_request_id(request_id, (before, time.time_ns() // 1_000_000))


def test_request_ids_are_distinct_uuid7s_of_now_carrying_their_seq():
    before = time.time_ns() // 1_000_000
    first, ids = request_ids(5000)
    after = time.time_ns() // 1_000_000
    assert len(ids) == 5000 and len(set(ids)) == 5000
    for request_id in ids:
        check_request_id(request_id, (before, after + 2))  # 5,000 in a millisecond borrow the next
    assert [request_seq(request_id) for request_id in ids] == list(range(first, first + 5000))
    # The seq is the millisecond and the 12 bits after the version (a counter): the UUID's top 64 bits.
    assert [uuid.UUID(request_id).int >> 64 for request_id in ids] == [
        (seq >> 12) << 16 | 0x7 << 12 | seq & 0xFFF for seq in range(first, first + 5000)
    ]
    assert sorted(ids) == ids  # the text sorts as the seq does
    assert request_ids(0)[1] == []
    assert len(request_ids(1)[1]) == 1


def test_request_ids_leave_62_bits_random():
    # Every bit below the variant takes both values across many ids.
    ids = [uuid.UUID(request_id).int for request_id in request_ids(2000)[1]]
    random_bits = (1 << 62) - 1
    ones = zeros = 0
    for value in ids:
        ones |= value & random_bits
        zeros |= ~value & random_bits
    assert ones == zeros == random_bits


def test_request_ids_only_go_up(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(envelope_module, "_issued", [0])  # what this test issues goes when it ends
    first, _ = request_ids(3)
    clock = time.time_ns
    monkeypatch.setattr(time, "time_ns", lambda: clock() - 3_600 * 10**9)  # the clock steps back an hour
    second, ids = request_ids(3)
    assert second == first + 3 and [request_seq(i) for i in ids] == [first + 3, first + 4, first + 5]
    issue_after(first + 10**9)  # a store holding a later row
    third, _ = request_ids(1)
    assert third == first + 10**9 + 1
    issue_after(first)  # an earlier one changes nothing
    assert request_ids(1)[0] == third + 1


@pytest.mark.parametrize(
    "text",
    [
        "",
        "r1",
        "01A22E62-474B-7000-ACCA-6DE017235586",  # upper case: not as given out
        "01a22e62-474b-4000-acca-6de017235586",  # version 4
        "01a22e62-474b-7000-ccca-6de017235586",  # not the RFC variant
        "01a22e62-474b-7000-acca-6de01723558",  # one digit short
        "01a22e62474b-7000-acca-6de017235586-",
        "+1a22e62-474b-7000-acca-6de017235586",
        "01a22e6_-474b-7000-acca-6de017235586",
        "01a22e62-474b-7000-acca-6de017235586\n",
    ],
)
def test_request_seq_of_other_text_is_none(text: str):
    assert request_seq(text) is None


def test_request_seq_reads_a_request_id():
    assert request_seq("01a22e62-474b-7001-80e0-78300a9d12fa") == 0x01A22E62474B << 12 | 0x001


def test_later_ids_sort_after_earlier_ones():
    first = request_ids(3)[1]
    time.sleep(0.002)
    assert max(first) < min(request_ids(3)[1]) and max(first) < new_id()


@pytest.mark.parametrize(
    "millis",
    [1_767_225_599_998, 1_767_225_599_999, 1_767_225_600_000, 1_767_225_600_001, 1_798_761_600_500, 0],
)
def test_now_is_the_utc_time_to_the_millisecond(monkeypatch: pytest.MonkeyPatch, millis: int) -> None:
    from datetime import timezone

    monkeypatch.setattr(envelope_module, "_clock", [-1, "", -1, ""])
    monkeypatch.setattr(envelope_module.time, "time", lambda: millis / 1000)
    expected = datetime.fromtimestamp(millis / 1000, timezone.utc).isoformat(timespec="milliseconds")
    assert now_rfc3339() == expected.replace("+00:00", "Z")
    monkeypatch.setattr(envelope_module.time, "time", lambda: (millis + 1) / 1000)  # the next millisecond
    assert now_rfc3339() == datetime.fromtimestamp((millis + 1) / 1000, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
