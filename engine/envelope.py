"""The one event envelope every trigger produces (CloudEvents 1.0, JSON format)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import orjson

SPECVERSION = "1.0"


def now_rfc3339() -> str:
    """The current UTC time as an RFC 3339 string with milliseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
