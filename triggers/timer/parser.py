"""Timer schedules, pure: SCF 7-field and crontab expressions, zones, slots, envelopes."""

from __future__ import annotations

import difflib
import re
import zoneinfo
from datetime import datetime, timedelta, timezone
from typing import Any

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
    # No previous fire time is passed: APScheduler then starts from `now`, rounded up to the
    # second, which with the microsecond makes "strictly after". Arithmetic stays in UTC.
    try:
        fire = schedule.get_next_fire_time(None, after.astimezone(UTC) + timedelta(microseconds=1))
    except OverflowError:  # past the last time a datetime holds (the end of year 9999): no slot
        return None
    return fire.astimezone(UTC) if fire is not None else None


def last_slot(schedule: CronTrigger, after: datetime, until: datetime) -> datetime | None:
    """The latest slot in (after, until], or None; bisects, so a year-long gap costs ~25 steps."""
    low = next_slot(schedule, after)
    if low is None or low > until:
        return None
    high = until  # invariant: `low` is a slot <= until, and no slot lies in (high, until]
    while True:
        following = next_slot(schedule, low)
        if following is None or following > until:
            return low
        middle = low + (high - low) / 2
        probe = next_slot(schedule, middle)
        if probe is not None and probe <= until:
            low = probe
        else:
            high = middle
