"""The timer trigger: cron parsing, envelopes, slot arithmetic, DST, validation and the loop."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from eventrun.engine.api import Accepted
from eventrun.engine.envelope import Envelope
from eventrun.engine.errors import ManifestError, ShuttingDown, StoreError
from eventrun.engine.manifest import FunctionConfig, Manifest
from eventrun.triggers.timer import (
    EVENT_TYPE,
    TimerTrigger,
    last_slot,
    next_slot,
    parse_cron,
    parse_slot,
    parse_timezone,
    slot_id,
    to_envelope,
)

UTC = timezone.utc
NEW_YORK = ZoneInfo("America/New_York")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def slots(expr: str, start: datetime, count: int, tz: str = "UTC") -> list[datetime]:
    """The first `count` slots of `expr` after `start`."""
    schedule = parse_cron(expr, tz)
    out: list[datetime] = []
    at = start
    for _ in range(count):
        nxt = next_slot(schedule, at)
        assert nxt is not None
        out.append(nxt)
        at = nxt
    return out


# --------------------------------------------------------------------------- parse_cron


@pytest.mark.parametrize(
    ("seven", "five"),
    [
        ("0 * * * * * *", "* * * * *"),
        ("0 */5 * * * * *", "*/5 * * * *"),
        ("0 30 2 * * * *", "30 2 * * *"),
        ("0 0 9 ? * 1-5 *", "0 9 * * MON-FRI"),
        ("0 15 10 1,15 * * *", "15 10 1,15 * *"),
        ("0 0 0 1 JAN ? *", "0 0 1 1 *"),
        ("0 0 12 ? * 0 *", "0 12 * * 7"),
        ("0 0-30/10 8-10 * 3-5 SAT,SUN *", "0-30/10 8-10 * 3-5 0,6"),
    ],
)
def test_seven_and_five_fields_give_the_same_schedule(seven: str, five: str) -> None:
    start = utc(2024, 2, 27, 13, 7, 11)
    assert slots(seven, start, 60) == slots(five, start, 60)


def test_five_fields_fire_on_second_zero_in_any_year() -> None:
    assert slots("*/20 * * * *", utc(2024, 12, 31, 23, 30, 5), 3) == [
        utc(2024, 12, 31, 23, 40),
        utc(2025, 1, 1, 0, 0),
        utc(2025, 1, 1, 0, 20),
    ]


def test_seven_fields_reach_seconds_and_years() -> None:
    assert slots("* * * * * * *", utc(2024, 1, 1, 0, 0, 0), 3) == [
        utc(2024, 1, 1, 0, 0, 1),
        utc(2024, 1, 1, 0, 0, 2),
        utc(2024, 1, 1, 0, 0, 3),
    ]
    assert slots("30 0 0 1 1 * 2030", utc(2024, 1, 1), 1) == [utc(2030, 1, 1, 0, 0, 30)]
    assert next_slot(parse_cron("30 0 0 1 1 * 2030"), utc(2030, 1, 1, 0, 0, 30)) is None


def test_question_mark_means_any() -> None:
    start = utc(2024, 3, 1)
    assert slots("0 0 12 ? * 3 *", start, 10) == slots("0 0 12 * * 3 *", start, 10)
    assert slots("0 12 ? * ?", start, 10) == slots("0 12 * * *", start, 10)


@pytest.mark.parametrize(
    ("dow", "weekdays"),
    [
        ("0", {"Sunday"}),
        ("7", {"Sunday"}),
        ("SUN", {"Sunday"}),
        ("1", {"Monday"}),
        ("6", {"Saturday"}),
        ("mon-fri", {"Monday", "Tuesday", "Wednesday", "Thursday", "Friday"}),
        ("1-5", {"Monday", "Tuesday", "Wednesday", "Thursday", "Friday"}),
        ("0,6", {"Saturday", "Sunday"}),
        ("5-7", {"Friday", "Saturday", "Sunday"}),
        ("FRI-SUN", {"Friday", "Saturday", "Sunday"}),
        ("*/2", {"Sunday", "Tuesday", "Thursday", "Saturday"}),
        ("1-5/2", {"Monday", "Wednesday", "Friday"}),
        ("0-6", {"Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"}),
    ],
)
def test_day_of_week_counts_from_sunday_as_crontab_and_scf_do(dow: str, weekdays: set[str]) -> None:
    # APScheduler 3 itself counts 0 = Monday; the mapping must not leak through.
    five = slots(f"0 9 * * {dow}", utc(2024, 3, 1), 21)
    seven = slots(f"0 0 9 ? * {dow} *", utc(2024, 3, 1), 21)
    assert five == seven
    assert {day.strftime("%A") for day in five} == weekdays


@pytest.mark.parametrize(
    ("expr", "fragments"),
    [
        ("", ["expected 7 fields", "or 5", "got 0"]),
        ("* * * * * *", ["got 6"]),
        ("61 * * * *", ["minute field '61'", "maximum value (59)"]),
        ("0 0 25 * * * *", ["hour field '25'", "23"]),
        ("0 0 0 32 * ? *", ["day-of-month field '32'"]),
        ("0 0 0 1 13 ? *", ["month field '13'"]),
        ("0 0 0 ? * 8 *", ["day-of-week field '8'", "0-7", "Sunday"]),
        ("0 9 * * FUNDAY", ["day-of-week field 'FUNDAY'", "unknown weekday"]),
        ("0 9 * * 5-2", ["day-of-week field '5-2'", "backwards"]),
        ("0 0 0 * * * 1969", ["year field '1969'", "1970"]),
        ("*/0 * * * *", ["minute field '*/0'", "Increment"]),
        ("0 9 L * *", ["day-of-month field 'L'"]),
        ("abc * * * *", ["minute field 'abc'"]),
        ("0 0 0 30 2 ? *", ["no date ever matches"]),
    ],
)
def test_invalid_expressions_say_which_field_and_why(expr: str, fragments: list[str]) -> None:
    with pytest.raises(ValueError) as caught:
        parse_cron(expr)
    for fragment in fragments:
        assert fragment in str(caught.value), str(caught.value)


@pytest.mark.parametrize(
    ("zone", "hint"),
    [
        ("Mars/Olympus_Mons", None),
        ("", None),
        ("../etc/passwd", None),
        ("America", None),
        ("america/new_york", "America/New_York"),
        ("Asia/Shangai", "Asia/Shanghai"),
    ],
)
def test_unknown_time_zones_are_refused(zone: str, hint: str | None) -> None:
    with pytest.raises(ValueError) as caught:
        parse_cron("* * * * *", zone)
    message = str(caught.value)
    assert f"unknown time zone {zone!r}" in message and "IANA" in message, message
    if hint:
        assert f"did you mean {hint!r}" in message, message


def test_the_time_zone_applies_to_the_fields() -> None:
    assert parse_timezone("Asia/Shanghai") == ZoneInfo("Asia/Shanghai")
    # 02:00 in Shanghai (UTC+8, no DST) is 18:00 UTC the day before.
    assert slots("0 0 2 * * * *", utc(2024, 6, 1), 2, "Asia/Shanghai") == [
        utc(2024, 6, 1, 18),
        utc(2024, 6, 2, 18),
    ]


# --------------------------------------------------------------------------- DST


def test_dst_fall_back_fires_the_repeated_wall_time_twice() -> None:
    """APScheduler's documented DST behaviour: cron works on wall-clock time, so a time that
    occurs twice when clocks go back fires twice. 2024-11-03 01:30 happens in EDT and in EST."""
    fired = slots("30 1 * * *", datetime(2024, 11, 2, 12, tzinfo=NEW_YORK), 4, "America/New_York")
    assert fired == [
        utc(2024, 11, 3, 5, 30),  # 01:30 EDT
        utc(2024, 11, 3, 6, 30),  # 01:30 EST, the hour again
        utc(2024, 11, 4, 6, 30),
        utc(2024, 11, 5, 6, 30),
    ]
    assert [f.astimezone(NEW_YORK).strftime("%H:%M") for f in fired] == ["01:30"] * 4
    ids = [to_envelope("f", "t", f, None).id for f in fired]
    assert len(set(ids)) == 4, "UTC ids keep the two 01:30 slots apart"


def test_dst_spring_forward_keeps_the_day_but_not_the_wall_time() -> None:
    """2024-03-10 02:30 does not exist in New York. APScheduler's docs (written for pytz) warn
    such a slot may not run at all; APScheduler 3.11 with zoneinfo reads the missing 02:30 with
    the offset in force before the jump, so it fires once, at 07:30Z (03:30 EDT). Pinned here so
    a library upgrade that changes it is noticed."""
    fired = slots("0 30 2 * * * *", datetime(2024, 3, 8, 12, tzinfo=NEW_YORK), 4, "America/New_York")
    assert fired == [
        utc(2024, 3, 9, 7, 30),  # 02:30 EST
        utc(2024, 3, 10, 7, 30),  # the missing 02:30 -> 03:30 EDT
        utc(2024, 3, 11, 6, 30),  # 02:30 EDT
        utc(2024, 3, 12, 6, 30),
    ]
    assert [f.astimezone(NEW_YORK).strftime("%d %H:%M") for f in fired] == [
        "09 02:30",
        "10 03:30",
        "11 02:30",
        "12 02:30",
    ]


def test_dst_spring_forward_skips_the_missing_hour_for_frequent_schedules() -> None:
    fired = slots("*/30 * * * *", datetime(2024, 3, 10, 1, 0, tzinfo=NEW_YORK), 3, "America/New_York")
    assert [f.astimezone(NEW_YORK).strftime("%H:%M %Z") for f in fired] == ["01:30 EST", "03:00 EDT", "03:30 EDT"]
    assert fired[1] - fired[0] == timedelta(minutes=30)


@pytest.mark.parametrize(
    ("expr", "zone", "after", "expected"),
    [
        # The day after the clocks go forward at 02:00 (New York, Berlin): midnight still fires.
        ("0 0 * * *", "America/New_York", utc(2025, 3, 9, 12), "2025-03-10 00:00 EDT"),
        ("0 0 * * 1", "America/New_York", utc(2025, 3, 4), "2025-03-10 00:00 EDT"),
        ("0 0 1 * *", "Europe/Berlin", utc(2025, 3, 2), "2025-04-01 00:00 CEST"),
        # Santiago's clocks go from 00:00 to 01:00: that day's midnight fires at 01:00.
        ("0 0 * * *", "America/Santiago", utc(2025, 9, 6, 12), "2025-09-07 01:00 -03"),
        # Lord Howe Island moves by half an hour.
        ("15 2 * * *", "Australia/Lord_Howe", utc(2025, 10, 4, 12), "2025-10-05 02:45 +11"),
    ],
)
def test_dst_spring_forward_never_loses_a_day(expr: str, zone: str, after: datetime, expected: str) -> None:
    """APScheduler 3 adds a day to a wall time as 24 hours, so after the clocks went forward its
    "next midnight" is 01:00 and the day is skipped (agronholm/apscheduler #529)."""
    fired = next_slot(parse_cron(expr, zone), after)
    assert fired is not None
    assert fired.astimezone(ZoneInfo(zone)).strftime("%Y-%m-%d %H:%M %Z") == expected


def wall_clock_slots(expr: str, zone: str, start: datetime, end: datetime) -> list[datetime]:
    """The slots in (start, end] by the definition: each wall time the fields match, at every
    moment the zone's clocks show it, or once with the offset before the jump if they skip it."""
    tz = ZoneInfo(zone)
    on_the_wall = parse_cron(expr, "UTC")  # UTC has no DST: its slots are the wall times
    naive = start.astimezone(tz).replace(tzinfo=None) - timedelta(days=2)
    moments: set[datetime] = set()
    while (wall := next_slot(on_the_wall, naive.replace(tzinfo=UTC))) is not None:
        naive = wall.replace(tzinfo=None)
        if naive > end.astimezone(tz).replace(tzinfo=None) + timedelta(days=2):
            break
        shown = {m for fold in (0, 1) if (m := naive.replace(tzinfo=tz, fold=fold).astimezone(UTC)).astimezone(tz).replace(tzinfo=None) == naive}
        moments |= shown or {naive.replace(tzinfo=tz, fold=0).astimezone(UTC)}
    return sorted(m for m in moments if start < m <= end)


@pytest.mark.parametrize("zone", ["America/New_York", "Europe/Berlin", "America/Santiago", "Australia/Lord_Howe", "Asia/Tehran"])
@pytest.mark.parametrize("expr", ["0 0 * * *", "30 0 * * *", "30 2 * * *", "0 0 1 * *", "0 0 * * 0", "*/20 0-3 * * *"])
def test_a_year_of_slots_follows_the_wall_clock_through_every_change(expr: str, zone: str) -> None:
    start, end = utc(2024, 12, 20), utc(2026, 1, 10)
    walked = []
    at = start
    while (at := next_slot(parse_cron(expr, zone), at)) is not None and at <= end:
        walked.append(at)
    assert walked == wall_clock_slots(expr, zone, start, end)
    assert last_slot(parse_cron(expr, zone), start, end) == walked[-1]


def test_catch_up_over_a_spring_forward_picks_the_day_after() -> None:
    """Down from Saturday evening to just after midnight on Monday (Berlin, 2025-03-30 went
    to summer time): the missed slot is Monday's midnight, not Sunday's."""
    daily = parse_cron("0 0 * * *", "Europe/Berlin")
    missed = last_slot(daily, utc(2025, 3, 28, 23), utc(2025, 3, 30, 22, 30))
    assert missed == datetime(2025, 3, 31, tzinfo=ZoneInfo("Europe/Berlin"))


# --------------------------------------------------------------------------- slots and envelopes


def test_to_envelope_carries_the_scheduled_slot_and_the_payload() -> None:
    payload = {"kind": "nightly", "n": [1, 2]}
    fire = datetime(2024, 5, 1, 2, 0, tzinfo=ZoneInfo("Asia/Shanghai"))
    envelope = to_envelope("report", "nightly", fire, payload)
    assert envelope == Envelope(
        id="2024-04-30T18:00:00Z",
        source="timer://report/nightly",
        type=EVENT_TYPE,
        function="report",
        trigger="timer",
        data=payload,
        time="2024-04-30T18:00:00Z",
    )
    event = envelope.to_dict()
    assert event["type"] == "eventrun.timer.fired"
    assert event["eventruntrigger"] == "timer" and event["eventrunfunction"] == "report"
    assert event["specversion"] == "1.0" and event["datacontenttype"] == "application/json"


def test_slot_ids_are_canonical() -> None:
    same = [
        utc(2024, 5, 1, 10, 0, 0),
        datetime(2024, 5, 1, 12, 0, 0, tzinfo=ZoneInfo("Europe/Berlin")),
        datetime(2024, 5, 1, 10, 0, 0, 999, tzinfo=UTC),
    ]
    assert {slot_id(s) for s in same} == {"2024-05-01T10:00:00Z"}
    assert parse_slot("2024-05-01T10:00:00Z") == same[0]
    with pytest.raises(ValueError, match="time zone"):
        slot_id(datetime(2024, 5, 1, 10))


def test_payload_may_be_anything_json() -> None:
    for payload in (None, "text", 3, [1, "a"], {"a": {"b": None}}):
        assert to_envelope("f", "t", utc(2024, 1, 1), payload).data == payload


def test_next_slot_is_strictly_after() -> None:
    every_minute = parse_cron("* * * * *")
    assert next_slot(every_minute, utc(2024, 1, 1, 0, 1)) == utc(2024, 1, 1, 0, 2)
    assert next_slot(every_minute, utc(2024, 1, 1, 0, 1) - timedelta(microseconds=1)) == utc(2024, 1, 1, 0, 1)


def test_last_slot_finds_the_latest_slot_in_a_gap() -> None:
    every_second = parse_cron("* * * * * * *")
    assert last_slot(every_second, utc(2024, 1, 1), utc(2024, 1, 1, 0, 0, 0, 900)) is None
    assert last_slot(every_second, utc(2024, 1, 1), utc(2024, 1, 1, 0, 0, 1)) == utc(2024, 1, 1, 0, 0, 1)
    assert last_slot(every_second, utc(2024, 1, 1), utc(2024, 1, 1, 0, 0, 7, 5)) == utc(2024, 1, 1, 0, 0, 7)
    noon_in_january = parse_cron("0 0 12 * 1 ? *")
    assert last_slot(noon_in_january, utc(2020, 1, 1), utc(2024, 5, 1)) == utc(2024, 1, 31, 12)
    assert last_slot(noon_in_january, utc(2024, 2, 1), utc(2024, 12, 31)) is None


def test_last_slot_over_a_long_gap_is_quick() -> None:
    every_second = parse_cron("* * * * * * *")
    begun = time.monotonic()
    assert last_slot(every_second, utc(2000, 1, 1), utc(2024, 5, 1, 10, 0, 0, 500)) == utc(2024, 5, 1, 10)
    assert time.monotonic() - begun < 1.0


# --------------------------------------------------------------------------- validation


def manifest(*triggers: dict[str, Any], function: str = "report") -> Manifest:
    return Manifest(
        functions={
            function: FunctionConfig(handler="functions/report.py:main_handler", triggers=triggers),
            "other": FunctionConfig(
                handler="functions/other.py:main_handler",
                triggers=({"type": "kafka", "topic": "orders"},),
            ),
        }
    )


def timer(name: str = "nightly", cron: str = "* * * * * * *", **more: Any) -> dict[str, Any]:
    return {"type": "timer", "name": name, "cron": cron, **more}


def refusal(*triggers: dict[str, Any]) -> str:
    """The ManifestError a TimerTrigger of a function with these triggers is refused with."""
    with pytest.raises(ManifestError) as caught:
        TimerTrigger(FakeEngine(), manifest(*triggers))
    return str(caught.value)


def test_a_bad_cron_is_refused_naming_function_trigger_and_problem() -> None:
    message = refusal(timer(cron="0 0 25 * * * *"))
    assert message.startswith("functions.report.triggers[0].cron: '0 0 25 * * * *' (timer 'nightly'): "), message
    assert "hour field '25'" in message, message


def test_a_bad_zone_is_refused_naming_function_trigger_and_problem() -> None:
    message = refusal(timer(), timer(name="later", timezone="Asia/Shangai"))
    assert "functions.report.triggers[1].timezone: unknown time zone 'Asia/Shangai'" in message and "(timer 'later')" in message
    assert "did you mean 'Asia/Shanghai'" in message


def test_every_bad_trigger_is_listed_at_once() -> None:
    lines = refusal(timer(cron="nope"), timer(name="b", timezone="Nowhere"), timer(name="c")).splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("functions.report.triggers[0].cron: 'nope' (timer 'nightly'): ")
    assert lines[1].startswith("functions.report.triggers[1].timezone: ") and lines[1].endswith("(timer 'b')")


@pytest.mark.parametrize("name", ["has space", "slash/y", "9lives", "x" * 61])
def test_trigger_names_must_be_safe_in_a_source_uri(name: str) -> None:
    with pytest.raises(ManifestError, match=r"triggers\[0\]\.name: .*must start with an ASCII letter"):
        TimerTrigger(FakeEngine(), manifest(timer(name=name)))


def test_a_manifest_without_timers_builds_an_idle_trigger() -> None:
    trigger = TimerTrigger(FakeEngine(), manifest())
    assert trigger.state() == {"Status": "stopped", "Schedules": []}


# --------------------------------------------------------------------------- the loop, on a fake engine


class FakeEngine:
    """Records accepted envelopes; dedupes on (function, source, id) like the real store."""

    def __init__(self, state: dict[str, str] | None = None, active: int = 0) -> None:
        self.accepted: list[Envelope] = []
        self.seen: dict[tuple[str, str, str], str] = {}
        self.state = dict(state or {})
        self.active_runs = active
        self.shutting_down = False
        self.refusals = 0  # the store's next calls that fail (an outage)
        self.refused: list[str] = []  # the slots it refused

    def _outage(self, what: str) -> None:
        if self.refusals:
            self.refusals -= 1
            self.refused.append(what)
            raise StoreError("the PostgreSQL store cannot serve this now (connection refused)")

    async def accept_batch(self, envelopes: Sequence[Envelope]) -> list[Accepted]:
        if self.shutting_down:
            raise ShuttingDown()
        self._outage(envelopes[0].id)
        out = []
        for envelope in envelopes:
            key = (envelope.function, envelope.source, envelope.id)
            if key in self.seen:
                out.append(Accepted(self.seen[key], False))
                continue
            self.seen[key] = f"req-{len(self.seen)}"
            self.accepted.append(envelope)
            out.append(Accepted(self.seen[key], True))
        return out

    async def active(self, function: str, source: str) -> int:
        self._outage("active")
        return self.active_runs

    async def get_state(self, key: str) -> str | None:
        return self.state.get(key)

    async def put_state(self, key: str, value: str) -> None:
        self.state[key] = value


async def state_once_accepted(engine: FakeEngine, config: Manifest, runs: int = 1, seconds: float = 5) -> dict[str, Any]:
    """Run a TimerTrigger until `engine` has accepted `runs` runs (failing after `seconds`): its state then."""
    async with TimerTrigger(engine, config) as trigger:
        async with asyncio.timeout(seconds):
            while len(engine.accepted) < runs:
                await asyncio.sleep(0.05)
        return trigger.state()


def by_trigger(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A timer state's schedules, by trigger name."""
    return {s["Trigger"]: s for s in state["Schedules"]}


async def test_every_second_fires_each_slot_once_in_order() -> None:
    engine = FakeEngine()
    async with TimerTrigger(engine, manifest(timer(payload={"k": 1}))) as trigger:
        await asyncio.sleep(2.6)
        state = trigger.state()
    ids = [e.id for e in engine.accepted]
    assert len(ids) >= 2, ids
    assert ids == sorted(set(ids))
    stamps = [parse_slot(i) for i in ids]
    assert all(b - a == timedelta(seconds=1) for a, b in zip(stamps, stamps[1:])), ids
    assert all(e.data == {"k": 1} and e.time == e.id for e in engine.accepted)
    assert engine.state["timer:report/nightly"] == ids[-1]
    [schedule] = state["Schedules"]
    assert state["Status"] == "running"
    assert schedule["Fired"] == len(ids) and schedule["LastFire"] == ids[-1]
    assert schedule["NextFire"] > ids[-1]
    assert trigger.state()["Status"] == "stopped"


async def test_catch_up_runs_only_the_last_missed_slot_on_start() -> None:
    long_ago = slot_id(datetime.now(UTC) - timedelta(hours=5))
    engine = FakeEngine(state={"timer:report/nightly": long_ago})
    before = datetime.now(UTC)
    trigger = TimerTrigger(engine, manifest(timer(cron="0 * * * * * *", catch_up=True)))
    await trigger.start()
    after = datetime.now(UTC)
    await trigger.stop()
    minutes = parse_cron("0 * * * * * *")
    latest = {last_slot(minutes, before - timedelta(minutes=2), at) for at in (before, after)}
    assert len(engine.accepted) == 1
    assert parse_slot(engine.accepted[0].id) in latest
    assert engine.state["timer:report/nightly"] == engine.accepted[0].id


@pytest.mark.parametrize(("catch_up", "state"), [(False, True), (True, False)])
async def test_no_catch_up_without_the_flag_or_a_remembered_slot(catch_up: bool, state: bool) -> None:
    remembered = {"timer:report/nightly": slot_id(datetime.now(UTC) - timedelta(hours=5))} if state else {}
    engine = FakeEngine(state=remembered)
    async with TimerTrigger(engine, manifest(timer(cron="0 * * * * * *", catch_up=catch_up))):
        pass
    assert engine.accepted == []


def test_a_zone_without_the_summer_time_its_name_suggests_is_warned_of(caplog: pytest.LogCaptureFixture) -> None:
    # 0 9 * * * in "EST" fires at 14:00 UTC all year: at 10:00 in New York for eight months.
    with caplog.at_level(logging.WARNING):
        TimerTrigger(FakeEngine(), manifest(timer(cron="0 9 * * *", timezone="EST")))
        TimerTrigger(FakeEngine(), manifest(timer(cron="0 9 * * *", timezone="America/New_York")))
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "timer report/nightly: timezone 'EST' is UTC-05:00 all year, without daylight saving time;"
        " for the time in New York use 'America/New_York'"
    ]


async def test_overlap_false_skips_while_a_run_is_active() -> None:
    engine = FakeEngine(active=1)
    busy = manifest(timer(overlap=False), timer(name="free"))
    async with TimerTrigger(engine, busy) as trigger:
        await asyncio.sleep(1.6)
        schedules = by_trigger(trigger.state())
    assert {e.source for e in engine.accepted} == {"timer://report/free"}
    assert schedules["nightly"]["Fired"] == 0 and schedules["nightly"]["Skipped"] >= 1
    assert "timer:report/nightly" in engine.state, "a skipped slot is still remembered as handled"
    # A slot skipped is no fire: an alert on an old LastFire must see a schedule that skips every slot.
    assert schedules["nightly"]["LastFire"] is None
    assert schedules["nightly"]["LastSlot"] == engine.state["timer:report/nightly"]
    assert schedules["free"]["LastFire"] == schedules["free"]["LastSlot"] == engine.accepted[-1].id


@pytest.mark.parametrize("overlap", [True, False])
async def test_a_slot_the_store_cannot_take_is_tried_again_until_it_can(overlap: bool) -> None:
    engine = FakeEngine()
    engine.refusals = 2  # 0.5 s, then 1 s: the store is back before the next slot, 2 s on
    state = await state_once_accepted(engine, manifest(timer(cron="*/2 * * * * * *", overlap=overlap)), 2, seconds=10)
    [schedule] = state["Schedules"]
    ids = [e.id for e in engine.accepted]
    if not overlap:
        assert engine.refused == ["active", "active"]
    else:
        assert engine.refused == [ids[0], ids[0]]  # the first slot, accepted once the store could
    assert parse_slot(ids[1]) - parse_slot(ids[0]) == timedelta(seconds=2), ids  # none lost
    assert schedule["Failure"] is None and schedule["Errors"] == 0, schedule


async def test_a_slot_the_store_cannot_take_before_the_next_is_due_gives_way_to_it() -> None:
    engine = FakeEngine()
    engine.refusals = 3  # 0.5 + 1 + 2 s: past the next slot, a second on
    [schedule] = (await state_once_accepted(engine, manifest(timer()), seconds=10))["Schedules"]
    assert schedule["Failure"] is None and schedule["Errors"] >= 1, schedule
    assert engine.accepted[0].id not in engine.refused[:1]  # a later slot fired in its place


async def test_a_schedule_stopped_by_an_error_reads_failed_with_no_next_slot() -> None:
    # /healthz said "running", with a NextFire long past, of a schedule that had stopped for good.
    engine = FakeEngine()

    async def broken(function: str, source: str) -> int:
        raise ConnectionRefusedError("an error the timer does not expect")

    engine.active = broken  # type: ignore[method-assign]
    state = await state_once_accepted(engine, manifest(timer(overlap=False), timer(name="free")))
    schedules = by_trigger(state)
    assert state["Status"] == "failed"
    assert schedules["nightly"]["Failure"] == "ConnectionRefusedError: an error the timer does not expect"
    assert schedules["nightly"]["NextFire"] is None
    assert schedules["free"]["Failure"] is None and schedules["free"]["NextFire"] is not None


async def test_a_schedule_whose_dates_have_all_passed_starts_says_so_and_never_fires(caplog: pytest.LogCaptureFixture) -> None:
    # Refused at start it would stop a server whose manifest was valid the day before.
    engine = FakeEngine()
    past = "0 0 0 1 1 ? 2020"
    state = await state_once_accepted(engine, manifest(timer(cron=past), timer(name="free")))
    schedules = by_trigger(state)
    assert state["Status"] == "running"
    assert schedules["nightly"]["NextFire"] is None and schedules["nightly"]["Failure"] is None
    assert schedules["nightly"]["Fired"] == 0 and schedules["free"]["NextFire"] is not None
    assert {e.source for e in engine.accepted} == {"timer://report/free"}
    assert f"timer report/nightly: the schedule {past!r} has no further slots" in caplog.text


async def test_two_timers_on_one_store_accept_each_slot_once() -> None:
    engine = FakeEngine()
    config = manifest(timer())
    async with TimerTrigger(engine, config) as one, TimerTrigger(engine, config) as two:
        await asyncio.sleep(2.2)
        counts = [s["Schedules"][0] for s in (one.state(), two.state())]
    ids = [e.id for e in engine.accepted]
    assert len(ids) == len(set(ids)) >= 2
    assert sum(c["Fired"] for c in counts) == len(ids)
    assert sum(c["Duplicates"] for c in counts) >= len(ids) - 1


async def test_stop_is_prompt_and_idempotent_and_the_engine_closing_ends_the_loop() -> None:
    engine = FakeEngine()
    trigger = TimerTrigger(engine, manifest(timer(cron="0 0 * * *"), timer(name="fast")))
    await trigger.start()
    await asyncio.sleep(1.2)
    engine.shutting_down = True
    await asyncio.sleep(1.1)
    begun = time.monotonic()
    await trigger.stop()
    await trigger.stop()
    assert time.monotonic() - begun < 0.5
    assert trigger.state()["Status"] == "stopped"
