"""Timer schedules, pure: SCF 7-field and crontab expressions, zones, slots, envelopes."""

from __future__ import annotations

import difflib
import re
import zoneinfo
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from apscheduler.triggers.cron import CronTrigger

from eventrun.engine.envelope import Envelope

UTC = timezone.utc
EVENT_TYPE = "eventrun.timer.fired"
TRIGGER = "timer"

# Cron fields in the order each form writes them, as CronTrigger calls them.
_SCF_FIELDS = ("second", "minute", "hour", "day", "month", "day_of_week", "year")
_CRONTAB_FIELDS = ("minute", "hour", "day", "month", "day_of_week")
_LABELS = {"day": "day-of-month", "day_of_week": "day-of-week"}

# Crontab and SCF number weekdays from Sunday = 0 (7 is Sunday too); APScheduler 3 from
# Monday = 0. Weekdays are therefore handed to CronTrigger by name, never by number.
_CRON_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_APS_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_DOW_ITEM = re.compile(r"^(?:(\*)|([0-9a-z]+)(?:-([0-9a-z]+))?)(?:/(\d+))?$", re.IGNORECASE)


def parse_timezone(name: str) -> zoneinfo.ZoneInfo:
    """The IANA time zone `name`; ValueError naming it (and a likely fix) otherwise."""
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        pass
    known = zoneinfo.available_timezones()
    folded = {zone.lower(): zone for zone in known}
    close = [folded[name.strip().lower()]] if name.strip().lower() in folded else []
    close = close or difflib.get_close_matches(name, sorted(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(
        f"unknown time zone {name!r}{hint}; expected an IANA name such as 'Asia/Shanghai' or 'UTC'"
    )


def parse_cron(expr: str, tz: str = "UTC") -> CronTrigger:
    """A CronTrigger from SCF's 7-field or crontab's 5-field form; ValueError says what is wrong.

    7 fields: second minute hour day month day-of-week year. 5 fields: minute hour day month
    day-of-week (second 0, any year). `?` means `*`; day-of-week counts 0 (or 7) = Sunday.
    """
    zone = parse_timezone(tz)
    parts = expr.split()
    names: tuple[str, ...]
    if len(parts) == len(_SCF_FIELDS):
        names = _SCF_FIELDS
    elif len(parts) == len(_CRONTAB_FIELDS):
        names = _CRONTAB_FIELDS
    else:
        raise ValueError(
            f"expected 7 fields (second minute hour day month day-of-week year) or 5 "
            f"(minute hour day month day-of-week), got {len(parts)}"
        )
    values = {"second": "0", "year": "*"}
    for name, raw in zip(names, parts):
        value = "*" if raw == "?" else raw
        try:
            if name == "day_of_week":
                value = _day_of_week(value)
            CronTrigger(timezone=UTC, **{name: value})  # validates this field alone, to name it
        except ValueError as exc:
            raise ValueError(f"{_LABELS.get(name, name)} field {raw!r}: {exc}") from None
        values[name] = value
    schedule = CronTrigger(timezone=zone, **values)
    if schedule.get_next_fire_time(None, datetime(1970, 1, 1, tzinfo=UTC)) is None:
        raise ValueError("no date ever matches every field (such as 30 February)")
    return schedule


def _day_of_week(value: str) -> str:
    """A crontab/SCF day-of-week field as APScheduler weekday names."""
    days: set[int] = set()
    for item in value.split(","):
        days |= _day_of_week_item(item.strip())
    if len(days) == 7:
        return "*"
    return ",".join(name for name in _APS_DAYS if _CRON_DAYS.index(name) in days)


def _day_of_week_item(item: str) -> set[int]:
    match = _DOW_ITEM.match(item)
    if not match:
        raise ValueError(f"cannot read {item!r}; use 0-7 or SUN-SAT, ranges a-b, steps /n and lists a,b")
    star, first, last, step = match.groups()
    if star:
        low, high = 0, 6
    else:
        low = _weekday(first)
        if last:
            high = _weekday(last)
            if high == 0 < low:  # "FRI-SUN": Sunday closes the week as 7 does
                high = 7
            if high < low:
                raise ValueError(f"the range {item!r} runs backwards")
        else:
            high = max(low, 6) if step else low
    stride = int(step) if step else 1
    if stride < 1:
        raise ValueError("a step must be at least 1")
    return {day % 7 for day in range(low, high + 1, stride)}


def _weekday(token: str) -> int:
    if token.isdigit():
        number = int(token)
        if number > 7:
            raise ValueError(f"{number} is out of range 0-7 (0 and 7 are Sunday)")
        return number
    try:
        return _CRON_DAYS.index(token.lower())
    except ValueError:
        raise ValueError(f"unknown weekday {token!r}; expected SUN, MON, TUE, WED, THU, FRI or SAT") from None


def slot_id(fire_time: datetime) -> str:
    """The canonical text of a slot: UTC, whole seconds, RFC 3339 with "Z"."""
    if fire_time.tzinfo is None:
        raise ValueError("a fire time must carry its time zone")
    return fire_time.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_slot(text: str) -> datetime:
    """A slot back from its canonical text."""
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def to_envelope(function: str, trigger_name: str, fire_time: datetime, payload: Any) -> Envelope:
    """The envelope of one fired slot: id and time are the scheduled fire time, data the payload."""
    stamp = slot_id(fire_time)
    return Envelope(
        id=stamp,
        source=f"timer://{function}/{trigger_name}",
        type=EVENT_TYPE,
        function=function,
        trigger=TRIGGER,
        data=payload,
        time=stamp,
    )


def next_slot(schedule: CronTrigger, after: datetime) -> datetime | None:
    """The first slot strictly after `after`, in UTC; None once the schedule has ended."""
    try:
        return _next_slot(schedule, after.astimezone(UTC), None)
    except OverflowError:  # past the last time a datetime holds (the end of year 9999): no slot
        return None


def last_slot(schedule: CronTrigger, after: datetime, until: datetime) -> datetime | None:
    """The latest slot in (after, until], or None; bisects, so a year-long gap costs ~25 steps."""
    until = until.astimezone(UTC)

    def following(moment: datetime) -> datetime | None:  # the next slot, if it is <= until
        try:
            found = _next_slot(schedule, moment.astimezone(UTC), until)
        except OverflowError:
            return None
        return found if found is not None and found <= until else None

    low = following(after)
    if low is None:
        return None
    high = until  # invariant: `low` is a slot <= until, and no slot lies in (high, until]
    while True:
        if following(low) is None:
            return low
        middle = low + (high - low) / 2
        probe = following(middle)
        if probe is not None:
            low = probe
        else:
            high = middle


# -- slots in a zone with daylight saving time -------------------------------------------------
#
# APScheduler 3 adds wall-clock differences as absolute time (agronholm/apscheduler #529, #606):
# in a zone whose clocks went forward, "the next day at 00:00" lands at 01:00 and the day is
# skipped. So the cron fields are matched here on the wall clock alone (a CronTrigger in UTC,
# which has no DST, over naive local times), and each matching wall time W is put in the zone:
#   - a wall time the clocks show once fires then;
#   - one they show twice (the clocks went back) fires both times;
#   - one they skip (the clocks went forward by g) fires once, g later: at the moment the clocks
#     read W + g, that is W read with the offset from before the jump (zoneinfo's fold=0).
# The slots are found by walking the spans of constant UTC offset forward from `after`.

_PROBE = timedelta(days=1)
"""Step at which the UTC offset is looked at for a change: shorter than the least time between two
changes of any zone in the tz database (about 4 days), so no change and change back between two
looks is missed."""

_REACH = timedelta(days=2)
"""More than any jump of the clocks (an offset is under a day either way): a skipped wall time
fires less than this after its jump, and a wall time shown again, less than this after its first time."""


def _next_slot(schedule: CronTrigger, after: datetime, until: datetime | None) -> datetime | None:
    """The first slot after `after` (UTC); with `until`, None may also mean "none up to until"."""
    zone = schedule.timezone
    wall = _wall_clock(schedule)

    def offset(moment: datetime) -> timedelta:
        return moment.astimezone(zone).utcoffset() or timedelta(0)

    def match(naive: datetime) -> datetime | None:  # the first wall time > naive the fields match
        fire = wall.get_next_fire_time(None, naive.replace(tzinfo=UTC) + timedelta(microseconds=1))
        return fire.replace(tzinfo=None) if fire is not None else None

    naive_after = after.replace(tzinfo=None)
    best: datetime | None = None  # the earliest slot of a skipped wall time found so far
    # Begin a little before `after`: a wall time skipped by a jump just before it may fire after it.
    start = after - _REACH
    current = offset(start)
    while True:
        # The span of offset `current` from `start`: its first slot after `after`, if it lasts.
        floor = max(start - timedelta(microseconds=1), after).replace(tzinfo=None)
        shown = match(floor + current)
        first = (shown - current).replace(tzinfo=UTC) if shown is not None else None
        # Where a change of offset could still give an earlier slot; without a further match,
        # only a wall time shown again can (less than _REACH on).
        bounds = [t for t in (first, best, until) if t is not None] or [max(start, after) + _REACH]
        change = _next_change(offset, start, current, min(bounds))
        if change is None:
            return min((t for t in (first, best) if t is not None), default=None)
        then = offset(change)
        if then > current:  # clocks forward: wall times [change + current, change + then) skipped
            jump_at = change.replace(tzinfo=None) + current
            skipped = match(max(jump_at - timedelta(microseconds=1), naive_after + current))
            if skipped is not None and skipped < change.replace(tzinfo=None) + then:
                slot = (skipped - current).replace(tzinfo=UTC)
                best = slot if best is None else min(best, slot)
        start, current = change, then


def _next_change(offset: Callable[[datetime], timedelta], start: datetime, current: timedelta, end: datetime) -> datetime | None:
    """The first moment in (start, end] whose offset is not `current`, or None."""
    low = start
    while low < end:
        high = min(low + _PROBE, end)
        if offset(high) != current:
            while high - low > timedelta(microseconds=1):
                middle = low + (high - low) / 2
                if offset(middle) == current:
                    low = middle
                else:
                    high = middle
            return high
        low = high
    return None


def _wall_clock(schedule: CronTrigger) -> CronTrigger:
    """The schedule's fields on the wall clock: the same CronTrigger in UTC, which has no DST."""
    wall = CronTrigger.__new__(CronTrigger)
    wall.__setstate__({**schedule.__getstate__(), "timezone": UTC})
    return wall
