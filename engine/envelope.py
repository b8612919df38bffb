"""The one event envelope every trigger produces (CloudEvents 1.0, JSON format)."""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import itertools
import json
import os
import re
import threading
import time
from typing import Any, Iterator, NamedTuple, Sequence

import orjson

from .worker import JSON_DEPTH, MAX_RESULT_NESTING

SPECVERSION = "1.0"


_clock: list[Any] = [-1, "", -1, ""]  # the last millisecond formatted and its text; the same for its second


def now_rfc3339() -> str:
    """The current UTC time as an RFC 3339 string with milliseconds."""
    return rfc3339_at(int(time.time() * 1000))


def rfc3339_at(millis: int) -> str:
    """A time in Unix milliseconds as an RFC 3339 string (UTC, with milliseconds)."""
    # Every acceptance, start and end stamps a time: the date and time of day are formatted once
    # a second, the milliseconds added once a millisecond.
    if millis != _clock[0]:
        second, ms = divmod(millis, 1000)
        if second != _clock[2]:
            _clock[2], _clock[3] = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _clock[0], _clock[1] = millis, f"{_clock[3]}.{ms:03d}Z"
    return _clock[1]  # type: ignore[no-any-return]


# RFC 3339's date-time (section 5.6): full-date "T" partial-time, then "Z" or an offset. Its
# "T" and "Z" may be lower-case; ASCII digits only. (datetime.fromisoformat takes more: basic
# and week dates, hours alone.)
_RFC3339 = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[Tt](\d\d):(\d\d):(\d\d)(?:\.\d+)?(?:[Zz]|[+-](\d\d):(\d\d))", re.ASCII
)


def is_rfc3339(value: Any) -> bool:
    """Whether `value` is an RFC 3339 date-time with its zone (`Z` or an offset), on a real date:
    what an envelope's `time` must be (the triggers check what producers send)."""
    match = _RFC3339.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        return False
    year, month, day, hour, minute, second, zone_hours, zone_minutes = (int(field or 0) for field in match.groups())
    try:
        datetime.date(year, month, day)
    except ValueError:  # 30 February, month 13, year 0
        return False
    # A second of 60 is a leap second.
    return hour < 24 and minute < 60 and second <= 60 and zone_hours < 24 and zone_minutes < 60


def new_id() -> str:
    """A fresh id: a UUID version 7 (time-ordered, 74 random bits) in its usual text form."""
    h = f"{time.time_ns() // 1_000_000:012x}{os.urandom(10).hex()}"
    variant = "89ab"[int(h[16], 16) & 3]
    return f"{h[:8]}-{h[8:12]}-7{h[13:16]}-{variant}{h[17:20]}-{h[20:32]}"


_VARIANT_RFC = bytes(0x80 | (b & 0x3F) for b in range(256))
"""Maps a random byte to one carrying the RFC 9562 variant (0b10) in its top bits."""

_issued = [0]  # the sequence number of the last RequestId given out by this process
_issuing = threading.Lock()
_COUNTERS = [f"{c:03x}" for c in range(4096)]
_REQUEST_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def request_ids(n: int) -> tuple[int, list[str]]:
    """n fresh RequestIds, and the sequence number of the first (the others follow one by one).

    A RequestId is a UUID version 7 (RFC 9562) whose 12 bits after the version are a counter
    (the RFC's method 1): its millisecond and counter, 60 bits, are the run's sequence number in
    the store, so the store finds a run by its RequestId without an index of RequestIds. The
    numbers only go up in a process, even should the clock step back (and past the store's
    largest: issue_after); a 4,097th id in one millisecond borrows the next one. The last 62
    bits are random, so a RequestId cannot be guessed from another.
    """
    with _issuing:
        first = max(time.time_ns() // 1_000_000 << 12, _issued[0] + 1)
        _issued[0] = first + n - 1
    rand = bytearray(os.urandom(8 * n))
    rand[0::8] = rand[0::8].translate(_VARIANT_RFC)
    groups = iter(rand.hex(" ", 2).split())  # 4 hex digits a group, 4 groups an id
    ids: list[str] = []
    seq, end = first, first + n
    while seq < end:  # a millisecond at a time: its text is shared, the counter counts on
        millis, counter = divmod(seq, 4096)
        upto = min(end, (millis + 1) * 4096)
        m = f"{millis:012x}"
        head = f"{m[:8]}-{m[8:12]}-7"
        counters = _COUNTERS[counter : counter + upto - seq]
        ids += [f"{head}{c}-{a}-{b}{d}{e}" for c, a, b, d, e in zip(counters, groups, groups, groups, groups)]
        seq = upto
    return first, ids


def request_seq(request_id: str) -> int | None:
    """The sequence number a RequestId of request_ids() carries; None for text that is not one."""
    if _REQUEST_ID.fullmatch(request_id) is None:
        return None
    return int(f"{request_id[:8]}{request_id[9:13]}{request_id[15:18]}", 16)


def issue_after(seq: int) -> None:
    """Give out only sequence numbers above `seq` from now on (the largest a store holds)."""
    with _issuing:
        _issued[0] = max(_issued[0], seq)


class _Fields(NamedTuple):
    """An envelope's fields, in the order of its JSON form."""

    specversion: str
    id: str
    source: str
    type: str
    subject: str | None
    time: str
    datacontenttype: str | None
    function: str
    trigger: str
    data: Any


_JSON_KEYS = (
    "specversion", "id", "source", "type", "subject", "time", "datacontenttype",
    "eventrunfunction", "eventruntrigger", "data",
)


_NOW: Any = object()  # `time` not given: the envelope is stamped when built
_new_tuple = tuple.__new__


class Envelope(_Fields):
    """A CloudEvents 1.0 event addressed to one function: built by keyword, immutable, equal by value."""

    # A tuple underneath, because every accepted event builds one: a tuple is made in one call,
    # where a frozen dataclass sets its ten fields one by one through object.__setattr__.
    __slots__ = ()

    def __new__(
        cls,
        *,
        id: str,
        source: str,
        type: str,
        function: str,
        trigger: str,
        data: Any = None,
        subject: str | None = None,
        time: str = _NOW,
        datacontenttype: str | None = "application/json",
        specversion: str = SPECVERSION,
    ) -> Envelope:
        if time is _NOW:
            time = now_rfc3339()
        return _new_tuple(cls, (specversion, id, source, type, subject, time, datacontenttype, function, trigger, data))

    # Where a tuple would differ from a frozen dataclass, do as the dataclass: equal only to another
    # envelope (never to a plain tuple of the same values), not ordered, and fields cannot be assigned.

    def __eq__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            return tuple.__eq__(self, other)
        return False if isinstance(other, tuple) else NotImplemented

    def __ne__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            return tuple.__ne__(self, other)
        return True if isinstance(other, tuple) else NotImplemented

    __hash__ = tuple.__hash__

    def __lt__(self, other: object) -> bool:
        return NotImplemented

    __le__ = __gt__ = __ge__ = __lt__

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")

    def __getnewargs_ex__(self) -> tuple[tuple[()], dict[str, Any]]:
        return (), self._asdict()  # copy and pickle rebuild by keyword

    def to_dict(self) -> dict[str, Any]:
        """The CloudEvents JSON form, as the handler receives it."""
        specversion, id, source, type, subject, time, datacontenttype, function, trigger, data = self
        if subject is not None and datacontenttype is not None:  # the usual case, spelled out: it runs per event
            return {
                "specversion": specversion, "id": id, "source": source, "type": type, "subject": subject,
                "time": time, "datacontenttype": datacontenttype, "eventrunfunction": function,
                "eventruntrigger": trigger, "data": data,
            }  # fmt: skip
        event = dict(zip(_JSON_KEYS, self))
        # Unset attributes are left out rather than null; deleting keeps the other keys in order.
        if subject is None:
            del event["subject"]
        if datacontenttype is None:
            del event["datacontenttype"]
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


class Templated(NamedTuple):
    """An envelope given as a template and its own fields, with the attributes the store keeps apart.

    For envelopes that differ only in a few fields, such as a Kafka topic's records (the one hot
    path that writes envelopes itself): the store keeps the template once and, for each
    envelope, only `stored`, about a third of the JSON's bytes for a small record. `stored` is
    template_prefix(template) followed by the fields, separated by NUL bytes (so no field may
    hold one: JSON text never does). In the template, `%(0)b` stands for the first field,
    `%(1)b` for the second and so on (a field may come more than once), and `%%` for a percent
    sign. expand() gives the JSON.
    """

    id: str
    source: str
    function: str
    trigger: str
    stored: bytes
    template: bytes


class TemplatedBatch(Sequence[Templated]):
    """Templated envelopes sharing their source, function, trigger and template, by column.

    How the Kafka trigger hands over a batch of usual records: no Templated tuple is made per
    record, and the engine passes the columns on to the store as they are (see writes.Batch).
    It reads as the Templated envelopes it stands for; a slice of it is one too.
    """

    __slots__ = ("source", "function", "trigger", "template", "ids", "stored")

    def __init__(
        self, source: str, function: str, trigger: str, template: bytes, ids: list[str], stored: list[bytes]
    ) -> None:
        if len(ids) != len(stored):
            raise ValueError("a batch's columns differ in length")
        self.source = source
        self.function = function
        self.trigger = trigger
        self.template = template
        self.ids = ids
        self.stored = stored

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return TemplatedBatch(
                self.source, self.function, self.trigger, self.template, self.ids[index], self.stored[index]
            )
        return Templated(self.ids[index], self.source, self.function, self.trigger, self.stored[index], self.template)

    def __iter__(self) -> Iterator[Templated]:
        source, function, trigger, template = self.source, self.function, self.trigger, self.template
        return (Templated(i, source, function, trigger, s, template) for i, s in zip(self.ids, self.stored))

    @property
    def shared(self) -> tuple[str, str, str, bytes]:
        """What its envelopes share: source, function, trigger and template."""
        return self.source, self.function, self.trigger, self.template


def concatenated(parts: Sequence[Sequence[AnyEnvelope]]) -> Sequence[AnyEnvelope]:
    """The envelopes of the parts, in order: one TemplatedBatch when each part is one and all share a template."""
    if parts and all(part.__class__ is TemplatedBatch for part in parts):
        batches: Sequence[TemplatedBatch] = parts  # type: ignore[assignment]
        if len({batch.shared for batch in batches}) == 1:
            if len(batches) == 1:
                return batches[0]
            ids = list(itertools.chain.from_iterable(batch.ids for batch in batches))
            stored = list(itertools.chain.from_iterable(batch.stored for batch in batches))
            return TemplatedBatch(*batches[0].shared, ids, stored)
    return list(itertools.chain.from_iterable(parts))


_TEMPLATED = b"\x00"  # how a stored Templated envelope starts; one stored as JSON starts with "{"
_KEY_SIZE = 16


def template_prefix(template: bytes) -> bytes:
    """What starts the stored form of each envelope written with `template`: a mark and the template's key."""
    return _TEMPLATED + template_key(template)


def template_key(template: bytes) -> bytes:
    """The key the store keeps a template under: a digest of it."""
    return hashlib.blake2b(template, digest_size=_KEY_SIZE).digest()


def stored_template(stored: bytes) -> bytes | None:
    """The key of the template a stored envelope was written with; None for one stored as JSON."""
    return stored[1 : 1 + _KEY_SIZE] if stored[:1] == _TEMPLATED else None


def expand(stored: bytes, template: bytes) -> bytes:
    """The JSON of a Templated envelope from its stored form and its template."""
    fields = stored[1 + _KEY_SIZE :].split(b"\x00")
    return template % dict(zip(_FIELD_NAMES[: len(fields)], fields))  # type: ignore[no-any-return]


_FIELD_NAMES = [b"%d" % i for i in range(256)]


new_envelope = functools.partial(Envelope.__new__, Envelope)
"""Envelope(...) for hot paths: the same keywords and result at about half the cost, as calling the
class first packs the keyword arguments into a dict, and calling its __new__ does not."""

def dumps(value: Any) -> bytes:
    """Serialise to JSON bytes: the one place eventrun encodes JSON."""
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)


loads = orjson.loads
"""Parse JSON bytes or text (orjson's own function: no call in between on the hot paths)."""


def loads_exact(raw: bytes, parsed: Any) -> Any:
    """`parsed`, orjson's reading of `raw`; or, should `raw` hold an integer beyond 64 bits
    (which orjson reads as a float), `raw` read again keeping such integers' digits, written
    back as they came (orjson Fragments). Only JSON with 19 digits in a row is read twice."""
    if not _LONG_DIGITS.search(raw):
        return parsed
    try:
        return json.loads(raw, parse_int=_exact_int)
    except (ValueError, RecursionError):
        return parsed


_LONG_DIGITS = re.compile(rb"[0-9]{19}")


def _exact_int(text: str) -> Any:
    number = int(text)
    return number if -(2**63) <= number < 2**64 else orjson.Fragment(text.encode())


def nests_deeper(value: Any, levels: int, raw: bytes | None = None) -> bool:
    """Whether `value` nests deeper than `levels` levels (at most JSON_DEPTH, what orjson writes):
    told by writing it as deep as the deepest document holding it. `raw`, the JSON it was parsed
    from, spares most values that: each level takes a bracket."""
    if raw is not None and raw.count(b"[") + raw.count(b"{") <= levels:
        return False
    for _ in range(JSON_DEPTH - levels):
        value = [value]
    try:
        dumps(value)
    except TypeError:  # orjson's "Recursion limit reached"
        return True
    return False


def too_deep_to_serve(result: Any) -> bool:
    """Whether a run's result nests deeper than MAX_RESULT_NESTING levels, so that some answer
    holding it could not be written."""
    return nests_deeper(result, MAX_RESULT_NESTING)


JSONDecodeError = orjson.JSONDecodeError


def encode(envelope: Envelope) -> bytes:
    """The envelope as CloudEvents JSON bytes (the same bytes as dumps(envelope.to_dict()))."""
    event = envelope.to_dict()
    try:
        return orjson.dumps(event)
    except TypeError:
        pass
    # Allowing non-str keys (which `data` may hold) slows down every dict, so that option is
    # only for the envelopes that need it; other errors come back the same from this call.
    return orjson.dumps(event, option=orjson.OPT_NON_STR_KEYS)


_BETWEEN = orjson.Fragment(b"\x00")


AnyEnvelope = Envelope | Templated
"""What accept_batch takes."""


def stored_many(envelopes: Sequence[AnyEnvelope]) -> list[bytes]:
    """What the store keeps of each envelope: its JSON, or a Templated one's `stored` form.

    Envelopes are encoded with one orjson call for the lot instead of one each. A batch of
    thousands is done in about half the time, most of the saving in allocating one output
    instead of thousands. They are written as one JSON array with a raw NUL byte after each:
    orjson never writes one itself (inside a string it escapes it as \\u0000), so splitting at
    the NULs gives back each envelope's bytes.
    """
    if not envelopes:
        return []
    if any(envelope.__class__ is Templated for envelope in envelopes):
        written = iter(_encode_all([e for e in envelopes if e.__class__ is not Templated]))  # type: ignore[misc]
        return [e.stored if e.__class__ is Templated else next(written) for e in envelopes]  # type: ignore[union-attr]
    return _encode_all(envelopes)  # type: ignore[arg-type]


def encode_many(envelopes: Sequence[AnyEnvelope]) -> list[bytes]:
    """[encode(e) for e in envelopes]: the JSON of each (a Templated one's expanded)."""
    return [
        expand(raw, e.template) if e.__class__ is Templated else raw  # type: ignore[union-attr]
        for e, raw in zip(envelopes, stored_many(envelopes))
    ]


def _encode_all(envelopes: Sequence[Envelope]) -> list[bytes]:
    if not envelopes:
        return []
    items: list[Any] = []
    for envelope in envelopes:
        items += (envelope.to_dict(), _BETWEEN)
    try:
        joined = orjson.dumps(items)
    except TypeError:  # non-str keys in some data: one at a time, as encode() does them
        return [encode(envelope) for envelope in envelopes]
    return joined[1:-3].split(b",\x00,")  # [e1,NUL,e2,NUL,...,en,NUL]


def decode(raw: bytes | str) -> Envelope:
    """An envelope from CloudEvents JSON bytes."""
    return Envelope.from_dict(loads(raw))
