"""The one event envelope every trigger produces (CloudEvents 1.0, JSON format)."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import orjson

SPECVERSION = "1.0"


_clock: list[Any] = [-1, ""]  # the last millisecond formatted, and its text


def now_rfc3339() -> str:
    """The current UTC time as an RFC 3339 string with milliseconds."""
    # Every acceptance stamps a time; formatting once per millisecond keeps that off the ack path.
    millis = int(time.time() * 1000)
    if millis != _clock[0]:
        stamp = datetime.fromtimestamp(millis / 1000, timezone.utc).isoformat(timespec="milliseconds")
        _clock[0], _clock[1] = millis, stamp.replace("+00:00", "Z")
    return _clock[1]  # type: ignore[no-any-return]


def new_id() -> str:
    """A fresh RequestId: a UUID version 7 (time-ordered, 74 random bits) in its usual text form."""
    # Time-ordered ids land at the end of the store's index instead of at random pages,
    # which keeps durable acceptance cheap at high rates; the random part keeps them unguessable.
    h = f"{time.time_ns() // 1_000_000:012x}{os.urandom(10).hex()}"
    variant = "89ab"[int(h[16], 16) & 3]
    return f"{h[:8]}-{h[8:12]}-7{h[13:16]}-{variant}{h[17:20]}-{h[20:32]}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Envelope:
    """A CloudEvents 1.0 event addressed to one function."""

    id: str
    source: str
    type: str
    function: str
    trigger: str
    data: Any = None
    subject: str | None = None
    time: str = dataclasses.field(default_factory=now_rfc3339)
    datacontenttype: str | None = "application/json"
    specversion: str = SPECVERSION

    def to_dict(self) -> dict[str, Any]:
        """The CloudEvents JSON form, as the handler receives it."""
        event: dict[str, Any] = {
            "specversion": self.specversion,
            "id": self.id,
            "source": self.source,
            "type": self.type,
        }
        if self.subject is not None:
            event["subject"] = self.subject
        event["time"] = self.time
        if self.datacontenttype is not None:
            event["datacontenttype"] = self.datacontenttype
        event["eventrunfunction"] = self.function
        event["eventruntrigger"] = self.trigger
        event["data"] = self.data
        return event

    @classmethod
    def from_dict(cls, event: dict[str, Any]) -> Envelope:
        """Rebuild an envelope from its CloudEvents JSON form."""
        return cls(
            id=event["id"],
            source=event["source"],
            type=event["type"],
            function=event["eventrunfunction"],
            trigger=event["eventruntrigger"],
            data=event.get("data"),
            subject=event.get("subject"),
            time=event["time"],
            datacontenttype=event.get("datacontenttype"),
            specversion=event.get("specversion", SPECVERSION),
        )


def dumps(value: Any) -> bytes:
    """Serialise to JSON bytes: the one place eventrun encodes JSON."""
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)


def loads(raw: bytes | str) -> Any:
    """Parse JSON bytes or text."""
    return orjson.loads(raw)


JSONDecodeError = orjson.JSONDecodeError


def encode(envelope: Envelope) -> bytes:
    """The envelope as CloudEvents JSON bytes."""
    return dumps(envelope.to_dict())


def decode(raw: bytes | str) -> Envelope:
    """An envelope from CloudEvents JSON bytes."""
    return Envelope.from_dict(loads(raw))
