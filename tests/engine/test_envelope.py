"""The envelope: its CloudEvents JSON form, both ways."""

from __future__ import annotations

import dataclasses
from datetime import datetime

import pytest

from eventrun.engine.envelope import Envelope, decode, dumps, encode, loads, now_rfc3339


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
    with pytest.raises(dataclasses.FrozenInstanceError):
        http_envelope().id = "other"  # type: ignore[misc]


def test_time_defaults_to_now_in_rfc3339():
    envelope = Envelope(id="1", source="/http/f", type="eventrun.http.request", function="f", trigger="http")
    assert envelope.time.endswith("Z")
    assert datetime.fromisoformat(envelope.time.replace("Z", "+00:00")).tzinfo is not None
    assert now_rfc3339() >= envelope.time


def test_dumps_handles_non_string_keys_and_unicode():
    assert loads(dumps({1: "ü"})) == {"1": "ü"}
