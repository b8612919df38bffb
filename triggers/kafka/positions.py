"""Where each partition starts, and how a topic that started over (new log, same name) is noticed.

The dedupe key of a record is its (partition, offset). That holds for the life of one log: when a
topic is deleted and created again, or a broker loses its data (Tansu's memory store on restart),
offsets start again at 0 and new records would look like ones eventrun already accepted. So each
trigger remembers, per partition, the offset after the last record it accepted and a fingerprint
of that record ("marks", in the engine's durable state, one row per partition: see Partitions).
Offsets going backwards under the consumer (the client fell back to the oldest record because
the log no longer holds the position), a log that ends before the position (see
TopicConsumer._notice_new_logs) or a different record at a marked offset mean a new log: the
partition gets a new epoch, and its ids become "{partition}-{offset}-{epoch}", so nothing of the
new log is taken for a duplicate.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from eventrun.engine.envelope import dumps, loads


@dataclass(slots=True)
class Mark:
    """The offset after the last record accepted from a partition, and that record's fingerprint."""

    next: int
    fingerprint: str | None  # None: nothing to check the log by (no record before `next`, or none taken)
    epoch: int = 0

    def dumps(self) -> str:
        """The mark as the JSON text the engine stores for its partition."""
        return dumps([self.next, self.fingerprint, self.epoch]).decode()

    @classmethod
    def loads(cls, raw: str) -> Mark:
        """A mark from the text dumps() or stamped() gives."""
        return read_row(raw)[0]

    def stamped(self, fence: int | None) -> str:
        """The mark as its partition's row holds it, under the fence of the holder that writes it (see fence_for).

        `{"fence": F, "mark": [...]}`, the fence first: the PostgreSQL store takes the row only
        if the one it holds has no greater fence. Without a fence, as dumps() gives.
        """
        if fence is None:
            return self.dumps()
        return dumps({"fence": fence, "mark": [self.next, self.fingerprint, self.epoch]}).decode()


FENCE_ERA = 1 << 32
"""A fence is `era * FENCE_ERA + generation`: the consumer group's generations are 32-bit."""


def read_row(raw: str) -> tuple[Mark, int | None]:
    """A partition's mark and the fence it was written under, from its row (None: written without one, by an earlier eventrun)."""
    document = loads(raw)
    fence: int | None = None
    if isinstance(document, dict):
        fence, document = int(document["fence"]), document["mark"]
    next_offset, digest, epoch = document
    return Mark(int(next_offset), digest, int(epoch)), fence


def fence_for(seen: int | None, generation: int) -> int:
    """The fence a consumer assigned a partition in the group's `generation` writes its mark under.

    `seen`: the greatest fence the partition's row was known to hold (None: none). Fences order
    the holders of a partition: the store takes a mark only under a fence at least the one its
    row holds, so a holder the group has replaced since (its session expired while it was
    paused, say) cannot write over the marks of the one that took the partition over. Within one
    life of the group, a later generation is a later holder. A row whose fence is not below this
    generation's was written in an earlier life of the group (the broker forgot the group, and
    counts its generations from 0 again): the next era, so this holder's marks are taken.
    """
    era = max(seen, 0) // FENCE_ERA if seen is not None else 0
    fence = era * FENCE_ERA + generation
    return fence if seen is None or fence > seen else fence + FENCE_ERA


class Marks:
    """The marks of one trigger (one topic and group): how it started, and one mark per partition.

    The engine's state keeps the start (`dumps()`) apart from each partition's mark
    (`Mark.dumps()`), so servers sharing a store, each holding some of the partitions, never
    write over each other's marks (see Partitions).
    """

    def __init__(self, raw: str | None = None) -> None:
        """From the start's text, or from the one text an earlier eventrun kept, marks included."""
        self.started = False
        # Where "latest" put each partition at the trigger's first start (with the fingerprint
        # of the record before that position), until the group has an offset there: the group
        # may assign the partitions only seconds later.
        self.latest: dict[int, Mark] = {}
        self.changed: set[int] = set()  # partitions whose marks changed since they were written down
        self._marks: dict[int, Mark] = {}
        if raw:
            document: dict[str, Any] = loads(raw)
            self.started = bool(document.get("started"))
            digests = document.get("latest_fingerprints", {})
            self.latest = {
                int(partition): Mark(int(offset), digests.get(partition))
                for partition, offset in document.get("latest", {}).items()
            }
            for partition, (next_offset, digest, epoch) in document.get("partitions", {}).items():
                self._marks[int(partition)] = Mark(int(next_offset), digest, int(epoch))

    def get(self, partition: int) -> Mark | None:
        """The partition's mark, if eventrun read from it before."""
        return self._marks.get(partition)

    def epoch(self, partition: int) -> int:
        """How many times the partition's log was found to have started over."""
        mark = self._marks.get(partition)
        return mark.epoch if mark else 0

    def advance(self, partition: int, next_offset: int, digest: str | None) -> None:
        """Records up to `next_offset` were accepted; the last one has `digest`."""
        self._marks[partition] = Mark(next_offset, digest, self.epoch(partition))
        self.changed.add(partition)

    def new_epoch(self, partition: int) -> int:
        """The partition's log started over: count a new epoch and forget the old position."""
        epoch = self.epoch(partition) + 1
        self._marks[partition] = Mark(0, None, epoch)
        self.changed.add(partition)
        return epoch

    def adopt(self, partition: int, stored: Mark | None) -> None:
        """Take the partition's mark as the store has it: whoever held the partition last wrote it there.

        Kept instead: a mark of a later epoch than the stored one (this server's new epoch, which
        the store could not take), or any mark when the store has none (written by an earlier
        eventrun, or never).
        """
        mine = self._marks.get(partition)
        if stored is None or (mine is not None and mine.epoch > stored.epoch):
            return
        self._marks[partition] = stored
        self.changed.discard(partition)

    def dumps(self) -> str:
        """The trigger's start (whether it started, where "latest" put each partition) as the engine stores it."""
        document: dict[str, Any] = {"started": self.started}
        if self.latest:
            # (Two maps rather than one of pairs: an earlier eventrun still reads the offsets.)
            document["latest"] = {str(p): mark.next for p, mark in sorted(self.latest.items())}
            digests = {str(p): mark.fingerprint for p, mark in sorted(self.latest.items()) if mark.fingerprint}
            if digests:
                document["latest_fingerprints"] = digests
        return dumps(document).decode()


@dataclass(frozen=True, slots=True)
class Start:
    """Where a newly assigned partition starts reading, and why."""

    offset: int
    reason: str
    verify: str | None = None  # the fingerprint the record at `offset` must have
    # A position to write down as the mark (with `verify` as its fingerprint) and commit at once:
    # "latest" as resolved, or a new log's beginning.
    pin: int | None = None


def latest_offset(end: int, since: int, found: tuple[int, int] | None) -> int:
    """Where "latest" starts a partition: its first record stamped `since` (ms) or later, or its
    `end` when eventrun looked, whichever comes first.

    `found` is the broker's answer to the look-up by time: (offset, that record's timestamp).
    The end bounds it because stamps come from the producers' clocks: a record in the log when
    eventrun looked is never skipped for its stamp. (Tansu answers a look-up that finds nothing
    with offset 0 and timestamp -1: only a stamp at or after `since` counts.) The `end` is the
    high watermark of a fetch (see peek.py), not ListOffsets' answer, which Tansu gives short.
    """
    if found is not None and found[1] >= since and 0 <= found[0] < end:
        return found[0]
    return end


def decide(
    mark: Mark | None,
    committed: int | None,
    beginning: int,
    *,
    started: bool,
    latest: Mark | None = None,
) -> Start:
    """The start of a partition from the group's committed offset, the trigger's mark and the log's start.

    `latest`: where starting_position "latest" put the partition at the trigger's first start
    (see latest_offset), if it did, with the fingerprint of the record before that position.

    Whether the log still holds what eventrun read is found out when reading (see judge()):
    a position past the log's end makes the client fall back to the oldest record (offsets go
    backwards), and the record at a mark is compared with the one eventrun read there. The log's
    end offset is not looked up for this: Tansu answers ListOffsets(latest) with the base offset
    of the last record batch plus one, not the offset after its last record. (The high watermark
    of its fetch answers is right: the consumer watches that.)
    """
    if mark is not None and mark.epoch and mark.next == 0 and mark.fingerprint is None:
        # The log started over and nothing of the new one was accepted yet: an offset the group
        # has is the old log's. (Reading the new one again from its beginning, under the same
        # epoch, gives the ids it gave: idempotent.)
        return Start(beginning, "a new log, from its first record", pin=beginning)
    if committed is not None:
        if mark is not None and mark.fingerprint is not None and committed == mark.next and committed - 1 >= beginning:
            # Where this trigger left off: read its last record again, to know the log is still
            # the one it read (the topic may have been deleted and created again meanwhile).
            return Start(committed - 1, "committed offset, checking the last record read", verify=mark.fingerprint)
        return Start(committed, "committed offset")
    # The group has no offset here: a first start, a partition added later, or a broker that lost it.
    if mark is None:
        if latest is not None:
            return _latest(latest, beginning)
        return Start(beginning, "earliest record (never skip)" if started else "starting_position earliest")
    if mark.fingerprint is None or mark.next - 1 < beginning:
        return Start(max(mark.next, beginning), "eventrun's own mark")
    return Start(mark.next - 1, "eventrun's own mark, checking the last record read", verify=mark.fingerprint)


def _latest(latest: Mark, beginning: int) -> Start:
    """Where "latest" put the partition; the record before it is read again first, to check the log."""
    reason = "starting_position latest, as of the trigger's first start"
    if latest.fingerprint is not None and latest.next - 1 >= beginning:
        return Start(latest.next - 1, f"{reason}, checking the record before it", verify=latest.fingerprint, pin=latest.next)
    offset = max(latest.next, beginning)
    return Start(offset, reason, pin=offset)


class Verdict(enum.Enum):
    """What a fetched run of one partition's records means for its log."""

    SAME_LOG = "same"
    REREAD = "reread"  # the same log: the first record is the one read there before, read again to check it
    NEW_LOG = "new"  # accept these records, under a new epoch
    RESTART = "restart"  # a new log: drop these records and read the partition from its beginning


def judge(offset: int, digest: str | None, expected: int | None, verify: tuple[int, str] | None) -> Verdict:
    """Whether a partition's fetched records continue the log read before, by the first one's offset and fingerprint.

    `expected`: the offset reading was to go on at; `verify`: (offset, fingerprint) of the
    record read there before, when the partition was sought there to check it. A fingerprint
    that could not be taken (None) checks nothing.
    """
    if verify is not None:
        at, wanted = verify
        if offset == at:
            if digest is None:
                return Verdict.SAME_LOG
            return Verdict.REREAD if digest == wanted else Verdict.RESTART
        return Verdict.NEW_LOG if offset < at else Verdict.SAME_LOG
    if expected is not None and offset < expected:
        # Offsets went backwards without eventrun seeking there: the client reset its position
        # because the log no longer holds it.
        return Verdict.NEW_LOG
    return Verdict.SAME_LOG
